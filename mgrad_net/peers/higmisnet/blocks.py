"""Building blocks of Hi-gMISnet's generator (Talukder et al., "Generalized medical image segmentation
using DWT based multilayer fusion and dual mode attention into high resolution pGAN", Phys. Med. Biol.
69 (2024), doi:10.1088/1361-6560/ad3cb3).

One small module per concept of the paper, named as the paper names it:

- :class:`HaarDWT`: the single-level 2D Haar discrete wavelet transform (sub-bands LL, LH, HL, HH)
  and its exact inverse;
- :class:`WaveletConvBlock`: the "wavelet conv block" of the DWT-based multilayer fusion;
- :class:`MultiResBlock` and :class:`ResPath`: the MultiResUNet body (Ibtehaz & Rahman, Neural
  Networks 121, 2020) the generator is built on;
- :class:`DualModeAttentionGate`: the dual-mode attention gate (DAG) of the decoder.

Everything trainable is made of MONAI's ``Convolution`` blocks, ``Norm``/``Act`` factories and
``AttentionBlock``; only the DWT is a fixed (non-trainable) convolution.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.blocks import Convolution
from monai.networks.layers.factories import Act, Norm
from monai.networks.nets.attentionunet import AttentionBlock

from mgrad_net.outputs import GateMaps

__all__ = ["HaarDWT", "WaveletConvBlock", "MultiResBlock", "ResPath", "DualModeAttentionGate"]


def _check_2d(spatial_dims: int, name: str) -> None:
    if spatial_dims != 2:
        raise ValueError(f"{name} is defined for 2D slices (spatial_dims=2), got spatial_dims={spatial_dims}.")


class HaarDWT(nn.Module):
    """Single-level 2D Haar DWT of every channel, as a fixed stride-2 convolution, and its inverse.

    Each non-overlapping 2×2 block ``[[a, b], [c, d]]`` of a channel becomes four coefficients of
    the orthonormal Haar basis (first letter: the filter along the height, second: along the width)::

        LL = (a + b + c + d) / 2      LH = (a − b + c − d) / 2
        HL = (a + b − c − d) / 2      HH = (a − b − c + d) / 2

    which is what the notebook's ``DWT`` layer computes with PyWavelets' ``haar`` filters
    (1/√2, ±1/√2) applied along rows then columns. The four 2×2 filters are orthonormal, so the
    transposed convolution with the same filters inverts the transform exactly
    (:meth:`inverse`).

    Why a fixed convolution: the Haar DWT is exactly one grouped stride-2 convolution with those
    four constant filters, so it needs no wavelet library (the notebook depends on PyWavelets and
    tensorflow_wavelets), runs on any device and dtype, traces and exports like any convolution,
    and is differentiable. The filters are a non-persistent buffer: not a parameter, not in the
    state dict.

    ``forward(x)`` takes ``(B, C, H, W)`` with even ``H`` and ``W`` and returns
    ``(B, 4C, H/2, W/2)``, the bands stacked band-major: ``[LL of every channel, LH…, HL…, HH…]``.

    Args:
        spatial_dims: must be 2.
    """

    BANDS = ("LL", "LH", "HL", "HH")

    def __init__(self, spatial_dims: int = 2) -> None:
        super().__init__()
        _check_2d(spatial_dims, type(self).__name__)
        filters = 0.5 * torch.tensor(
            [
                [[1.0, 1.0], [1.0, 1.0]],  # LL
                [[1.0, -1.0], [1.0, -1.0]],  # LH
                [[1.0, 1.0], [-1.0, -1.0]],  # HL
                [[1.0, -1.0], [-1.0, 1.0]],  # HH
            ]
        )
        self.register_buffer("filters", filters.unsqueeze(1), persistent=False)  # (4, 1, 2, 2)

    def _weight(self, channels: int, like: torch.Tensor) -> torch.Tensor:
        return self.filters.to(like.dtype).repeat(channels, 1, 1, 1)  # (4C, 1, 2, 2), grouped per channel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        if h % 2 or w % 2:
            raise ValueError(f"HaarDWT needs even spatial sizes, got {h}x{w}.")
        y = F.conv2d(x, self._weight(c, x), stride=2, groups=c)  # channel-major: c0 LL LH HL HH, c1 …
        return y.view(b, c, 4, h // 2, w // 2).transpose(1, 2).reshape(b, 4 * c, h // 2, w // 2)

    def ll(self, x: torch.Tensor) -> torch.Tensor:
        """The LL band alone, ``(B, C, H/2, W/2)`` (twice a 2×2 average pooling)."""
        return self(x)[:, : x.shape[1]]

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        """The exact inverse: ``(B, 4C, H/2, W/2)`` band-major coefficients back to ``(B, C, H, W)``."""
        b, c4, h, w = y.shape
        c = c4 // 4
        y = y.view(b, 4, c, h, w).transpose(1, 2).reshape(b, c4, h, w)
        return F.conv_transpose2d(y, self._weight(c, y), stride=2, groups=c)


class WaveletConvBlock(nn.Module):
    """The wavelet conv block of the DWT-based multilayer fusion: the Haar DWT of its input
    (all four bands), a 1×1 convolution to ``2·width``, parallel 3×3 and 5×5 convolutions (each
    conv + BN + ReLU, ``width`` channels), concatenated, and a 1×1 convolution to ``2·width``.
    Halves the spatial size.

    Args:
        spatial_dims: must be 2.
        in_channels: channels of the fused input.
        width: channels of each parallel branch; the block outputs ``2·width``.
    """

    def __init__(self, spatial_dims: int, in_channels: int, width: int) -> None:
        super().__init__()
        self.dwt = HaarDWT(spatial_dims)
        self.reduce = Convolution(spatial_dims, 4 * in_channels, 2 * width, kernel_size=1, conv_only=True)
        self.branch3 = Convolution(spatial_dims, 2 * width, width, kernel_size=3, norm=Norm.BATCH, act=Act.RELU)
        self.branch5 = Convolution(spatial_dims, 2 * width, width, kernel_size=5, norm=Norm.BATCH, act=Act.RELU)
        self.project = Convolution(spatial_dims, 2 * width, 2 * width, kernel_size=1, conv_only=True)
        self.out_channels = 2 * width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.reduce(self.dwt(x))
        return self.project(torch.cat([self.branch3(y), self.branch5(y)], dim=1))


class MultiResBlock(nn.Module):
    """MultiResUNet's MultiRes block: three chained 3×3 conv + BN + ReLU of ``W·0.167``, ``W·0.333``
    and ``W·0.5`` channels (``W = alpha·filters``: the chain approximates 3×3, 5×5 and 7×7
    receptive fields), concatenated and batch-normalised, plus a 1×1 conv + BN shortcut, then
    ReLU and BN. ``out_channels`` is the sum of the three widths.

    Args:
        spatial_dims: number of spatial dimensions.
        in_channels: input channels.
        filters: ``U``, the block's nominal width.
        alpha: MultiResUNet's width multiplier (1.67).
    """

    def __init__(self, spatial_dims: int, in_channels: int, filters: int, alpha: float = 1.67) -> None:
        super().__init__()
        w = alpha * filters
        widths = [max(1, int(w * f)) for f in (0.167, 0.333, 0.5)]
        self.out_channels = sum(widths)
        self.convs = nn.ModuleList()
        c = in_channels
        for width in widths:
            self.convs.append(Convolution(spatial_dims, c, width, kernel_size=3, norm=Norm.BATCH, act=Act.RELU))
            c = width
        self.shortcut = Convolution(
            spatial_dims, in_channels, self.out_channels, kernel_size=1, norm=Norm.BATCH, act=None
        )
        self.norm_cat = Norm[Norm.BATCH, spatial_dims](self.out_channels)
        self.act = Act[Act.RELU]()
        self.norm_out = Norm[Norm.BATCH, spatial_dims](self.out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs, y = [], x
        for conv in self.convs:
            y = conv(y)
            outs.append(y)
        y = self.norm_cat(torch.cat(outs, dim=1))
        return self.norm_out(self.act(y + self.shortcut(x)))


class ResPath(nn.Module):
    """MultiResUNet's ResPath on a skip connection: ``length`` residual units, each a 3×3 conv +
    BN + ReLU plus a 1×1 conv + BN shortcut, added, then ReLU and BN.

    Args:
        spatial_dims: number of spatial dimensions.
        in_channels: input channels.
        filters: channels of every unit (the output).
        length: number of units (4, 3, 2, 1, 1 from the shallowest skip down, as MultiResUNet).
    """

    def __init__(self, spatial_dims: int, in_channels: int, filters: int, length: int) -> None:
        super().__init__()
        self.convs = nn.ModuleList()
        self.shortcuts = nn.ModuleList()
        self.norms = nn.ModuleList()
        c = in_channels
        for _ in range(max(1, int(length))):
            self.convs.append(Convolution(spatial_dims, c, filters, kernel_size=3, norm=Norm.BATCH, act=Act.RELU))
            self.shortcuts.append(Convolution(spatial_dims, c, filters, kernel_size=1, norm=Norm.BATCH, act=None))
            self.norms.append(Norm[Norm.BATCH, spatial_dims](filters))
            c = filters
        self.act = Act[Act.RELU]()
        self.out_channels = filters

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv, shortcut, norm in zip(self.convs, self.shortcuts, self.norms):
            x = norm(self.act(conv(x) + shortcut(x)))
        return x


class DualModeAttentionGate(nn.Module):
    """The dual-mode attention gate (DAG) of Hi-gMISnet's decoder.

    The skip features ``x`` and the gating signal ``g`` are each split in two halves along the
    channels. The first halves get the additive (foreground) gate of Attention U-Net,

        α = σ(ψ(ReLU(θ·x₁ + φ·g₁))),    y₁ = α · x₁,

    computed by MONAI's :class:`~monai.networks.nets.attentionunet.AttentionBlock` (θ = ``W_x``,
    φ = ``W_g``, ψ = ``psi``; ``y₁`` is exactly that block's output). ψ is the notebook's, a 1×1
    convolution to one channel and the sigmoid: MONAI's block puts a BatchNorm between the two,
    which is taken out here (θ and φ keep MONAI's conv + BN), so the deep-supervised map is
    σ(conv(·)) as in the notebook. The second halves get the
    subtractive (background) gate, built from a second ``AttentionBlock``'s θ, φ, ψ:

        β = 1 − σ(ψ(ReLU(θ·x₂ − φ·g₂))),    y₂ = β · x₂,

    which suppresses the skip features where they exceed what the gating signal supports and
    passes them (β = 1 − σ(ψ(0))) where they do not. ``[y₁, y₂]`` is concatenated and mixed by a
    1×1 conv + BN + ReLU to the skip's channel count.

    As in MONAI's ``AttentionUnet``, ``g`` is the up-sampled decoder feature at the skip's
    resolution; the notebook instead computes the gate at half the skip's resolution (a 2×2
    stride-2 θ and a transposed-convolution φ) and up-samples the map. The equations are the same.

    ``forward(x, g)`` returns ``(y, GateMaps)``; the maps are returned as logits (σ(logit) is α,
    resp. β) for the deep supervision of the generator's attention maps.

    Args:
        spatial_dims: number of spatial dimensions.
        skip_channels: channels of ``x`` (and of the output).
        gate_channels: channels of ``g``.
        inter_channels: channels of θx and φg, split evenly between the two halves.
    """

    def __init__(self, spatial_dims: int, skip_channels: int, gate_channels: int, inter_channels: int) -> None:
        super().__init__()
        if skip_channels < 2 or gate_channels < 2:
            raise ValueError(
                f"the dual-mode gate splits its inputs in halves: got {skip_channels} and {gate_channels} channels."
            )
        self.x_split = skip_channels // 2
        self.g_split = gate_channels // 2
        inter = max(1, inter_channels // 2)
        self.additive = AttentionBlock(spatial_dims, f_int=inter, f_g=self.g_split, f_l=self.x_split)
        self.subtractive = AttentionBlock(
            spatial_dims, f_int=inter, f_g=gate_channels - self.g_split, f_l=skip_channels - self.x_split
        )
        for block in (self.additive, self.subtractive):  # ψ: conv → sigmoid, without MONAI's BatchNorm
            conv, _, sigmoid = block.psi
            block.psi = nn.Sequential(conv, sigmoid)
        self.mix = Convolution(spatial_dims, skip_channels, skip_channels, kernel_size=1, norm=Norm.BATCH, act=Act.RELU)

    @staticmethod
    def _psi_logit(block: AttentionBlock, z: torch.Tensor) -> torch.Tensor:
        return block.psi[:-1](F.relu(z))  # ψ without its final sigmoid

    def forward(self, x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, GateMaps]:
        x1, x2 = x[:, : self.x_split], x[:, self.x_split :]
        g1, g2 = g[:, : self.g_split], g[:, self.g_split :]
        a = self._psi_logit(self.additive, self.additive.W_x(x1) + self.additive.W_g(g1))
        b = self._psi_logit(self.subtractive, self.subtractive.W_x(x2) - self.subtractive.W_g(g2))
        y = torch.cat([x1 * torch.sigmoid(a), x2 * torch.sigmoid(-b)], dim=1)  # 1 − σ(b) = σ(−b)
        return self.mix(y), GateMaps(additive=a, subtractive=-b)
