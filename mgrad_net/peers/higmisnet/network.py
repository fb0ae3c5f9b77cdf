"""Hi-gMISnet (Talukder et al., Phys. Med. Biol. 69, 2024, doi:10.1088/1361-6560/ad3cb3): the
generator and the parallel-generator segmenter, in PyTorch on MONAI blocks.

The only public code is a TensorFlow/Keras notebook (github.com/tushartalukder/Hi-gMISnet,
``hi-gmisnet-training.ipynb``); this is a faithful re-implementation of its generator, extended to
C classes, with the notebook's defects fixed (see :class:`HiGMISnet`). The adversarial training
step (discriminators) is :mod:`.step`, its losses (the reciprocal loss among them) :mod:`.loss`; the
training-mode output types are in :mod:`mgrad_net.outputs`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.blocks import Convolution
from monai.networks.layers.factories import Dropout, Norm, Pool
from monai.networks.utils import copy_model_state
from monai.utils import look_up_option

from mgrad_net.outputs import GateMaps, GeneratorOutput, HiGMISnetOutput
from mgrad_net.peers.higmisnet.blocks import DualModeAttentionGate, HaarDWT, MultiResBlock, ResPath, WaveletConvBlock

__all__ = ["COMBINE_MODES", "HiGMISnetGenerator", "HiGMISnet", "combine_logits"]

COMBINE_MODES = ("and", "or")


def combine_logits(foreground: torch.Tensor, background: torch.Tensor, mode: str = "and") -> torch.Tensor:
    """Per-class logits of the two generators combined as the paper's inference does.

    ``p_c = softmax(foreground)_c`` is the foreground generator's probability of class ``c``;
    ``1 − q_c = σ(−background_c)`` the background generator's (it predicts the complement
    ``q_c`` of every class). The notebook thresholds both (0.5) and takes ``fg AND NOT bg`` or
    ``fg OR NOT bg``; here the soft versions, ``p·(1 − q)`` and ``p + (1 − q) − p·(1 − q)``, are
    returned as log-scores (``log_softmax + logsigmoid`` for ``"and"``, exact), whose argmax is the
    label map. Deterministic.
    """
    mode = look_up_option(mode, COMBINE_MODES)
    if mode == "and":
        return F.log_softmax(foreground, dim=1) + F.logsigmoid(-background)
    p, r = torch.softmax(foreground, dim=1), torch.sigmoid(-background)
    return torch.log((p + r - p * r).clamp_min(torch.finfo(p.dtype).tiny))


class HiGMISnetGenerator(nn.Module):
    """One generator of Hi-gMISnet: a MultiResUNet with DWT-based multilayer fusion in the encoder
    and dual-mode attention gates in the decoder.

    Encoder (levels 1…5, then a bottleneck MultiRes block at 1/32 of the input size). Level k's
    MultiRes block ``e_k`` takes the max-pooled previous level; from level 2 on it is concatenated
    with a wavelet feature ``f_k`` (``h_k = [f_k, e_k]``), and a ResPath on ``h_k`` gives the skip
    ``s_k``. The wavelet features, as in the notebook:

    - ``f_2``: the four Haar bands of the input (the input itself, wavelet-pooled);
    - ``f_{k+1}`` (k = 2, 3, 4): a :class:`WaveletConvBlock` of ``[bands of LL^{k−1}(input), s_k,
      LL(s_{k−1})]``: the input's sub-bands at that scale, the level's own skip and the LL band of
      the previous level's skip, fused and wavelet-pooled to the next level's size.

    Decoder (levels 5…1): the deeper feature is up-sampled by a 2×2 stride-2 transposed
    convolution + BN (+ dropout at the three deepest levels, as the notebook), the skip ``s_k`` is
    gated by a :class:`DualModeAttentionGate` with that up-sampled feature as gating signal, and a
    MultiRes block merges the two. A 1×1 convolution gives ``out_channels`` logits.

    Not included: the notebook's PraNet-style side branch (RFB, partial decoder, reverse
    attention), whose single sigmoid map multiplies the binary output, and the ImageNet VGG16 /
    DenseNet201 features ("partial hybrid transfer learning"), which need downloaded weights.

    Args:
        spatial_dims: must be 2 (slices).
        in_channels: image channels.
        out_channels: output channels.
        features: MultiResUNet's ``U`` of encoder levels 1…5 and the bottleneck (the notebook's
            32, 64, 128, 256, 512, 1024).
        alpha: MultiRes width multiplier (1.67).
        respath_lengths: ResPath units of skips 1…5 (4, 3, 2, 1, 1).
        dropout: dropout after the three deepest up-samplings (0.5); active in training only.
        supervised_levels: decoder levels (shallowest first) whose gate maps are returned for deep
            supervision (3, as the notebook).
    """

    size_divisor = 32

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        out_channels: int = 2,
        features: Sequence[int] = (32, 64, 128, 256, 512, 1024),
        alpha: float = 1.67,
        respath_lengths: Sequence[int] = (4, 3, 2, 1, 1),
        dropout: float = 0.5,
        supervised_levels: int = 3,
    ) -> None:
        super().__init__()
        if spatial_dims != 2:
            raise ValueError(f"Hi-gMISnet segments 2D slices (spatial_dims=2), got spatial_dims={spatial_dims}.")
        features = [int(f) for f in features]
        if len(features) != 6 or len(respath_lengths) != 5:
            raise ValueError(
                "features needs 6 widths (5 levels + bottleneck) and respath_lengths 5, "
                f"got {features}, {list(respath_lengths)}."
            )
        self.spatial_dims, self.in_channels, self.out_channels = spatial_dims, in_channels, out_channels
        self.supervised_levels = int(supervised_levels)
        self.dwt = HaarDWT(spatial_dims)
        self.pool = Pool[Pool.MAX, spatial_dims](kernel_size=2)

        self.encoders, self.respaths, self.fusions = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        c_in, skips, h_channels = in_channels, [], []
        for k, (u, length) in enumerate(zip(features[:5], respath_lengths)):
            block = MultiResBlock(spatial_dims, c_in, u, alpha)
            self.encoders.append(block)
            fused = 0 if k == 0 else (4 * in_channels if k == 1 else self.fusions[k - 2].out_channels)
            h = fused + block.out_channels
            self.respaths.append(ResPath(spatial_dims, h, u, length))
            skips.append(u)
            h_channels.append(h)
            if 1 <= k <= 3:  # fusion of level k+1 (0-based k) into the next level
                self.fusions.append(WaveletConvBlock(spatial_dims, 4 * in_channels + u + skips[k - 1], max(1, u // 4)))
            c_in = h
        self.bottleneck = MultiResBlock(spatial_dims, c_in, features[5], alpha)

        self.ups, self.up_norms, self.up_drops = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        self.gates, self.decoders = nn.ModuleList(), nn.ModuleList()
        c = self.bottleneck.out_channels
        for k in reversed(range(5)):
            u = features[k]
            self.ups.append(
                Convolution(
                    spatial_dims,
                    c,
                    u,
                    kernel_size=2,
                    strides=2,
                    is_transposed=True,
                    conv_only=True,
                    padding=0,
                    output_padding=0,
                )
            )
            self.up_norms.append(Norm[Norm.BATCH, spatial_dims](u))  # outside the Convolution: folding skips it
            self.up_drops.append(Dropout[Dropout.DROPOUT, spatial_dims](dropout if k >= 2 else 0.0))
            self.gates.append(DualModeAttentionGate(spatial_dims, skips[k], u, u))
            block = MultiResBlock(spatial_dims, skips[k] + u, u, alpha)
            self.decoders.append(block)
            c = block.out_channels
        self.head = Convolution(spatial_dims, c, out_channels, kernel_size=1, conv_only=True)

    def forward(self, x: torch.Tensor, with_maps: bool = True) -> GeneratorOutput:
        bands = self.dwt(x)  # f_2
        low = x
        skips: list[torch.Tensor] = []
        h = x
        fused: Optional[torch.Tensor] = None
        for k, (encoder, respath) in enumerate(zip(self.encoders, self.respaths)):
            e = encoder(h if k == 0 else self.pool(h))
            h = e if k == 0 else torch.cat([bands if k == 1 else fused, e], dim=1)
            skips.append(respath(h))
            if 1 <= k <= 3:
                if k >= 2:
                    low = self.dwt.ll(low)  # LL^{k-1} of the input, at this level's size
                scale_bands = bands if k == 1 else self.dwt(low)
                fused = self.fusions[k - 1](torch.cat([scale_bands, skips[k], self.dwt.ll(skips[k - 1])], dim=1))
        d = self.bottleneck(self.pool(h))

        maps: list[GateMaps] = []
        for i, k in enumerate(reversed(range(5))):
            up = self.up_drops[i](self.up_norms[i](self.ups[i](d)))
            attended, gate_maps = self.gates[i](skips[k], up)
            d = self.decoders[i](torch.cat([up, attended], dim=1))
            if with_maps and k < self.supervised_levels:
                maps.insert(0, gate_maps)
        return GeneratorOutput(self.head(d), maps)


class HiGMISnet(nn.Module):
    """Hi-gMISnet's parallel generators as one segmenter (Talukder et al., "Generalized medical
    image segmentation using DWT based multilayer fusion and dual mode attention into high
    resolution pGAN", Phys. Med. Biol. 69, 2024).

    Two :class:`HiGMISnetGenerator` of the same architecture: ``foreground`` predicts the mask,
    ``background`` its complement. Their PatchGAN discriminators and the losses live in
    :mod:`mgrad_net.peers.higmisnet.step`; they are needed for training only.

    Multi-class extension (the paper and notebook segment one foreground class): the foreground
    generator predicts C classes (softmax over C logits, background class included); the
    background generator predicts the complement of each class, ``q_c = P(pixel ∉ class c)``, as
    C independent sigmoids (for C = 2 this is the notebook's ``1 − mask`` pair). The attention
    maps of each generator are supervised with its own binary target: any foreground class for
    ``foreground``, the background class for ``background``.

    ``forward(x)``: in eval mode, the per-class logits of both generators combined as the
    paper's inference does (:func:`combine_logits`, ``combine``), deterministically: dropout and
    batch norm are in eval mode, since this is a plain ``nn.Module`` (the notebook calls every
    ``BatchNormalization`` and ``Dropout`` with ``training=True``, so its inference is stochastic
    and batch-dependent). In training mode, a :class:`HiGMISnetOutput` with both generators'
    logits and attention maps.

    Defects of the notebook fixed here: the reciprocal loss passes gradients (see
    :mod:`mgrad_net.peers.higmisnet.loss`); inference is deterministic (above); checkpoints are
    chosen on validation only (the bundle's selection; the notebook also kept the best *test*
    IoU).

    Spatial sizes must be multiples of 32 (five poolings and a DWT at each level).

    Args:
        spatial_dims: must be 2.
        in_channels: image channels.
        out_channels: classes C, background included.
        features, alpha, respath_lengths, dropout, supervised_levels: of each generator, see
            :class:`HiGMISnetGenerator`.
        combine: ``"and"`` (default) or ``"or"``: how eval mode combines the generators (the
            notebook picks whichever scores higher on its data).

    Weights: random initialisation; nothing is downloaded and the network reads no file.
    :meth:`load_from` takes a state dict already loaded (e.g. by
    :func:`mgrad_net.checkpoints.load_pretrained`).
    """

    size_divisor = HiGMISnetGenerator.size_divisor

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        out_channels: int = 2,
        features: Sequence[int] = (32, 64, 128, 256, 512, 1024),
        alpha: float = 1.67,
        respath_lengths: Sequence[int] = (4, 3, 2, 1, 1),
        dropout: float = 0.5,
        supervised_levels: int = 3,
        combine: str = "and",
    ) -> None:
        super().__init__()
        kwargs = dict(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels, features=features,
                      alpha=alpha, respath_lengths=respath_lengths, dropout=dropout,
                      supervised_levels=supervised_levels)  # fmt: skip
        self.foreground = HiGMISnetGenerator(**kwargs)
        self.background = HiGMISnetGenerator(**kwargs)
        self.spatial_dims, self.in_channels, self.out_channels = spatial_dims, in_channels, out_channels
        self.combine = look_up_option(combine, COMBINE_MODES)

    def load_from(self, weights: Mapping[str, torch.Tensor]) -> tuple[list[str], list[str]]:
        """Copy the tensors of the state dict ``weights`` that match this network by name and shape
        (as MONAI's ``SwinUNETR.load_from`` takes its weights already loaded); the rest of the network
        keeps its initialisation. Returns the names loaded and this network's names left as they were.

        Raises:
            ValueError: none of the tensors fits this network.
        """
        _, loaded, skipped = copy_model_state(self, dict(weights), inplace=True)
        if not loaded:
            raise ValueError("load_from: none of the given tensors matches this network by name and shape.")
        logging.getLogger("mgrad_net").info(
            "%s.load_from: %d tensors loaded, %d left as initialised", type(self).__name__, len(loaded), len(skipped)
        )
        return list(loaded), list(skipped)

    @torch.jit.unused
    def _check_input(self, x: torch.Tensor) -> None:
        shape = list(x.shape)
        if x.dim() != self.spatial_dims + 2 or shape[1] != self.in_channels:
            raise ValueError(
                f"HiGMISnet(in_channels={self.in_channels}) expects (batch, {self.in_channels}, H, W), "
                f"got shape {shape}."
            )
        if any(s % self.size_divisor for s in shape[2:]):
            raise ValueError(
                f"HiGMISnet needs spatial sizes that are multiples of {self.size_divisor}, got {shape[2:]}; "
                "the bundle's roi_size must follow the same rule."
            )

    def forward(self, x: torch.Tensor) -> Union[torch.Tensor, HiGMISnetOutput]:
        if not torch.jit.is_tracing() and not torch.jit.is_scripting():
            self._check_input(x)
        if not self.training:
            fg = self.foreground(x, with_maps=False).logits
            bg = self.background(x, with_maps=False).logits
            return combine_logits(fg, bg, self.combine)
        fg, bg = self.foreground(x), self.background(x)
        return HiGMISnetOutput(fg, bg, combine_logits(fg.logits.detach(), bg.logits.detach(), self.combine))
