"""MedSegDiff: segmentation by denoising a label map conditioned on the image.

Wu, J., Fu, R., Fang, H., Zhang, Y., Yang, Y., Xiong, H., Liu, H., Xu, Y. "MedSegDiff: Medical Image
Segmentation with Diffusion Probabilistic Model." MIDL 2023 (arXiv:2211.00611).

The network follows the paper (closest in public code to lucidrains' ``med-seg-diff-pytorch``, see
``shared/PEERS.md``), built from the blocks of MONAI's ``DiffusionModelUNet``:

- :class:`~.blocks.FFParser`: the Feature-Frequency Parser, a learnable map on the features' spectrum (eq. 5);
- :class:`~.blocks.ConditionalEncoding`: the dynamic conditional encoding's fusion of the mask features
  into the image features at each stage (eq. 3-4), with the FF-Parser on the mask features;
- :class:`MedSegDiffUNet`: the two streams sharing a timestep embedding, added at the bottleneck, and
  the decoder on the mask stream; it predicts the noise ε (eq. 2);
- :class:`MedSegDiff`: the segmenter. In training it is the noise predictor; called on an image
  alone it samples a segmentation with seeded DDIM and returns per-class scores.

Departures, each documented where it is made: multi-class (a one-hot map scaled to [-1, 1] is
diffused, not a binarised mask); no transformer in the conditional encoding (the CPU preset's
budget); no learned variance; DDIM sampling with few steps instead of 1000 DDPM steps. The official
code's auxiliary segmentation head (not in the paper) is an option, ``aux_head``: see
:class:`MedSegDiffUNet` and :meth:`MedSegDiff.segment`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
from monai.networks.blocks import Convolution
from monai.networks.layers.factories import Norm
from monai.networks.nets.diffusion_model_unet import (
    DiffusionUnetDownsample,
    DiffusionUNetResnetBlock,
    WrappedUpsample,
    get_timestep_embedding,
)
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler
from monai.utils import ensure_tuple_rep

from mgrad_net.peers.medsegdiff.blocks import ConditionalEncoding

__all__ = ["MedSegDiff", "MedSegDiffUNet"]


class MedSegDiffUNet(nn.Module):
    """MedSegDiff's noise predictor ε_θ(x_t, I, t) (eq. 2).

    Two encoders, one for the noisy label map ``x_t`` and one for the image ``I``, share a sinusoidal
    timestep embedding. At every stage the :class:`ConditionalEncoding` fuses the mask features into
    the image stream; the two streams are added at the bottleneck, and the decoder decodes the mask
    stream with its skip connections. With ``skip_condition`` the skips carry both streams (the
    conditioned image features beside the mask features; lucidrains' ``skip_connect_condition_fmaps``),
    so the decoder sees the image at every scale and not only at the bottleneck: the boundaries of
    small structures are drawn at full resolution. The input is ``cat([x_t, I])`` along the
    channels, as MONAI's ``DiffusionInferer`` in ``concat`` mode gives it.

    With ``aux_head`` a second head on the decoder's last features predicts the clean label map
    ``x_0`` itself (the official code's auxiliary segmentation head, trained with 10 × its MSE to
    the mask), and the output is ``cat([ε, x_0])``: ``2 · num_classes`` channels. Why: under the
    noise loss the image matters little where ``x_t`` is almost pure noise (with the linear schedule
    the noise target's dependence on ``x_0`` has weight √(ᾱ/(1 − ᾱ)) ≈ 0.02 at t = 900), so in a short
    training the image → mask pathway is learned at small t only, and sampling starts from noise it
    cannot read. The head's loss weighs the image equally at every t.

    Args:
        spatial_dims: number of spatial dimensions.
        in_channels: image channels.
        num_classes: label-map channels (the one-hot classes, background included), also the output's.
        spatial_size: the input's spatial size (fixed: the FF-Parser's maps are sized to it); each
            entry divisible by ``2 ** (len(features) - 1)``.
        features: channels per stage.
        norm_num_groups: groups of the ResNet blocks' GroupNorm (divides every entry of ``features``).
        skip_condition: the skips carry the image stream's features too.
        aux_head: add the auxiliary head predicting ``x_0`` (output ``cat([ε, x_0])``).
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        num_classes: int = 4,
        spatial_size: Sequence[int] | int = 192,
        features: Sequence[int] = (12, 24, 48, 96),
        norm_num_groups: int = 4,
        skip_condition: bool = True,
        aux_head: bool = False,
    ) -> None:
        super().__init__()
        size = ensure_tuple_rep(spatial_size, spatial_dims)
        factor = 2 ** (len(features) - 1)
        if any(int(s) % factor for s in size) or any(f % norm_num_groups for f in features):
            raise ValueError(
                f"MedSegDiffUNet: spatial_size {tuple(size)} must be divisible by {factor} "
                f"and features {tuple(features)} by norm_num_groups {norm_num_groups}."
            )
        self.in_channels, self.num_classes = in_channels, num_classes
        self.spatial_size = tuple(int(s) for s in size)
        f0, temb = features[0], 4 * features[0]
        self.time_embed = nn.Sequential(nn.Linear(f0, temb), nn.SiLU(), nn.Linear(temb, temb))

        def conv(cin: int, cout: int) -> Convolution:
            return Convolution(spatial_dims, cin, cout, kernel_size=3, padding=1, conv_only=True)

        def block(cin: int, cout: int) -> DiffusionUNetResnetBlock:
            return DiffusionUNetResnetBlock(spatial_dims, cin, temb, cout, norm_num_groups=norm_num_groups)

        self.mask_in, self.image_in = conv(num_classes, f0), conv(in_channels, f0)
        chans = [f0, *features]
        self.mask_blocks = nn.ModuleList(block(chans[i], chans[i + 1]) for i in range(len(features)))
        self.image_blocks = nn.ModuleList(block(chans[i], chans[i + 1]) for i in range(len(features)))
        self.conditioners = nn.ModuleList(
            ConditionalEncoding(spatial_dims, f, [s // 2**i for s in self.spatial_size], temb, norm_num_groups)
            for i, f in enumerate(features)
        )
        self.mask_down = nn.ModuleList(DiffusionUnetDownsample(spatial_dims, f, use_conv=True) for f in features[:-1])
        self.image_down = nn.ModuleList(DiffusionUnetDownsample(spatial_dims, f, use_conv=True) for f in features[:-1])
        self.mid = block(features[-1], features[-1])
        self.skip_condition = bool(skip_condition)
        self.up_blocks = nn.ModuleList(block((3 if skip_condition else 2) * f, f) for f in features)
        self.upsample = nn.ModuleList(
            WrappedUpsample(
                spatial_dims,
                in_channels=features[i],
                out_channels=features[i - 1],
                mode="nontrainable",
                interp_mode="nearest",
                scale_factor=2.0,
                align_corners=None,
            )
            for i in range(1, len(features))
        )

        def head() -> nn.Sequential:
            norm = Norm[Norm.GROUP, spatial_dims](num_groups=norm_num_groups, num_channels=f0)
            return nn.Sequential(norm, nn.SiLU(), conv(f0, num_classes))

        self.out = head()
        self.aux_out = head() if aux_head else None

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """ε predicted for ``x = cat([x_t, I])`` at ``timesteps``, followed by ``x_0`` with ``aux_head``
        (``context`` is unused: concat mode)."""
        del context
        noisy, image = x[:, : self.num_classes], x[:, self.num_classes :]
        emb = self.time_embed(get_timestep_embedding(timesteps, self.mask_in.out_channels).to(x.dtype))
        m, c = self.mask_in(noisy), self.image_in(image)
        skips = []
        for i, (mask_block, image_block, conditioner) in enumerate(
            zip(self.mask_blocks, self.image_blocks, self.conditioners)
        ):
            m, c = mask_block(m, emb), image_block(c, emb)
            c = conditioner(m, c, emb)
            skips.append(torch.cat([m, c], dim=1) if self.skip_condition else m)
            if i < len(self.mask_down):
                m, c = self.mask_down[i](m), self.image_down[i](c)
        m = self.mid(m + c, emb)
        for i in reversed(range(len(skips))):
            m = self.up_blocks[i](torch.cat([m, skips[i]], dim=1), emb)
            if i > 0:
                m = self.upsample[i - 1](m)
        if self.aux_out is None:
            return self.out(m)
        return torch.cat([self.out(m), self.aux_out(m)], dim=1)


class MedSegDiff(nn.Module):
    """The MedSegDiff segmenter: a :class:`MedSegDiffUNet` with its noise schedule and sampler.

    Training (eq. 1-2): a label map ``x_0`` (one-hot, scaled to [-1, 1]: the multi-class extension)
    is noised to ``x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε`` by :attr:`noise_scheduler` (MONAI's
    ``DDPMScheduler``) and the network predicts ε under an MSE loss; the bundle does this with MONAI's
    ``DiffusionInferer`` (``mode="concat"``), calling ``forward(cat([x_t, I]), timesteps)``.

    Inference: ``forward(image)`` alone runs deterministic DDIM (Song et al., ICLR 2021, eq. 12 with
    η = 0) for ``num_inference_steps`` steps from ``num_ensemble`` seeded noise maps and returns the
    mean of the members' denoised maps: per-class scores in [-1, 1] whose argmax is the label. The
    steps are :meth:`sampling_timesteps` ("trailing" spacing: T − 1 first, [999, 499] for 2 steps of
    T = 1000), and each step moves the sample to exactly the timestep the network is called at next
    (after the last, to ᾱ = 1); :meth:`ddim_step` does that with the noise levels ᾱ of MONAI's
    ``DDIMScheduler`` (:attr:`sampler`). MONAI 1.6's own ``set_timesteps`` and ``step`` disagree: the
    one spreads the steps over [T − 1, 0] (``[999, 0]``), the other moves each sample down by
    T // N (to 499), so the network would be called at t = 0 on a sample that still carries the
    noise of t = 499. The noise comes
    from a CPU generator seeded with ``seed`` at every call and is the same for every image of a
    batch, so one image gives the same output bit for bit whatever the device's RNG state or the
    batch it is in (on one device and dtype). So SliceInferer, the evaluator, MONAI Label and the
    export work unchanged.

    With ``aux_head`` (see :class:`MedSegDiffUNet`) each DDIM step takes as its estimate of ``x_0``
    ``aux_blend · head + (1 − aux_blend) · x̂_0(ε)``, where ``x̂_0(ε) = (x_t − √(1 − ᾱ_t) ε) / √ᾱ_t`` is
    the noise head's; the step continues from the noise that estimate implies. The official code
    blends the head's output with the finished sample; blending at every step lets the head steer
    the early steps, where the noise head cannot read the image. ``aux_blend`` 0 is the paper's
    sampler, 1 samples with the head alone (an ``x_0``-predicting diffusion model).

    Args:
        spatial_dims: number of spatial dimensions.
        in_channels: image channels.
        out_channels: classes, background included.
        spatial_size: the fixed input size (the bundle's ``roi_size``).
        features: channels per stage of the noise predictor.
        norm_num_groups: GroupNorm groups.
        skip_condition: the decoder's skips carry the image stream too (see :class:`MedSegDiffUNet`).
        aux_head: train the auxiliary ``x_0`` head too (see :class:`MedSegDiffUNet`).
        aux_blend: the head's weight in each sampling step's ``x_0`` estimate, in [0, 1].
        num_train_timesteps: diffusion steps T.
        schedule: MONAI's noise schedule name (``linear_beta``, ``scaled_linear_beta``, ``cosine``...).
        num_inference_steps: DDIM steps at inference.
        num_ensemble: sampled members averaged at inference.
        seed: the sampling noise's seed.
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        out_channels: int = 4,
        spatial_size: Sequence[int] | int = 192,
        features: Sequence[int] = (12, 24, 48, 96),
        norm_num_groups: int = 4,
        skip_condition: bool = True,
        aux_head: bool = False,
        aux_blend: float = 1.0,
        num_train_timesteps: int = 1000,
        schedule: str = "linear_beta",
        num_inference_steps: int = 10,
        num_ensemble: int = 1,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not 1 <= num_inference_steps <= num_train_timesteps or num_ensemble < 1:
            raise ValueError(
                f"MedSegDiff: num_inference_steps must be in [1, {num_train_timesteps}] and num_ensemble at least 1, "
                f"got {num_inference_steps} and {num_ensemble}."
            )
        if not 0.0 <= aux_blend <= 1.0:
            raise ValueError(f"MedSegDiff: aux_blend must be in [0, 1], got {aux_blend}.")
        self.unet = MedSegDiffUNet(
            spatial_dims, in_channels, out_channels, spatial_size, features, norm_num_groups, skip_condition, aux_head
        )
        self.aux_head, self.aux_blend = bool(aux_head), float(aux_blend)
        self.noise_scheduler = DDPMScheduler(num_train_timesteps, schedule)
        # the noise levels ᾱ_t of sampling (the same schedule as training's); ddim_step does the steps
        self.sampler = DDIMScheduler(num_train_timesteps, schedule)
        self.num_classes = out_channels
        self.num_inference_steps, self.num_ensemble, self.seed = int(num_inference_steps), int(num_ensemble), int(seed)

    def forward(
        self, x: torch.Tensor, timesteps: torch.Tensor | None = None, context: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The noise prediction for ``x = cat([x_t, I])`` when ``timesteps`` is given; else ``x`` is an
        image and the result is :meth:`segment`'s per-class scores."""
        if timesteps is not None:
            return self.unet(x, timesteps, context)
        return self.segment(x)

    def sampling_timesteps(self) -> list[int]:
        """The ``num_inference_steps`` timesteps of sampling, first to last: ``⌊T·(N − i)/N + ½⌋ − 1``
        for i = 0 … N − 1 ("trailing" spacing, Lin et al., WACV 2024): the first is T − 1, where the
        sample is pure noise, and no network call is spent at t = 0. ``[999, 499]`` for N = 2,
        ``[999, 899, …, 99]`` for N = 10, every timestep for N = T (strictly decreasing for N ≤ T)."""
        steps, n = self.sampler.num_train_timesteps, self.num_inference_steps
        return [(2 * steps * (n - i) + n) // (2 * n) - 1 for i in range(n)]

    def ddim_step(
        self, output: torch.Tensor, t: int, t_next: int | None, sample: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One deterministic DDIM step (η = 0) from ``sample`` = x_t to ``x_{t_next}``, and the step's
        ``x_0`` estimate (clipped to [-1, 1]): ``x_{t'} = √ᾱ_{t'} x̂_0 + √(1 − ᾱ_{t'}) ε̂`` (DDIM eq. 12).
        ``output`` is the network's ε̂, or with ``aux_head`` its ``x_0`` estimate (then
        ``ε̂ = (x_t − √ᾱ_t x̂_0) / √(1 − ᾱ_t)``). ``t_next`` None: the last step, onto ᾱ = 1 (the
        scheduler's ``final_alpha_cumprod``). ε̂ is the unclipped estimate's, as in MONAI's and
        diffusers' DDIM."""
        alphas = self.sampler.alphas_cumprod
        a_t = alphas[t].to(sample.device, sample.dtype)
        a_next = (alphas[t_next] if t_next is not None else self.sampler.final_alpha_cumprod).to(
            sample.device, sample.dtype
        )
        if self.aux_head:
            x0 = output
            eps = (sample - a_t.sqrt() * x0) / (1 - a_t).sqrt()
        else:
            eps = output
            x0 = (sample - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        x0 = x0.clamp(-1.0, 1.0)
        return a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps, x0

    @torch.no_grad()
    def segment(self, image: torch.Tensor) -> torch.Tensor:
        """Seeded DDIM sampling averaged over the ensemble: ``(B, out_channels, *spatial)`` scores."""
        b, shape = image.shape[0], (1, self.num_classes, *image.shape[2:])
        generator = torch.Generator(device="cpu").manual_seed(self.seed)
        steps = self.sampling_timesteps()
        total = torch.zeros((b, *shape[1:]), device=image.device, dtype=image.dtype)
        for _ in range(self.num_ensemble):
            sample = torch.randn(shape, generator=generator).to(image.device, image.dtype).expand(b, *shape[1:])
            denoised = sample
            for i, t in enumerate(steps):
                timesteps = torch.full((b,), t, device=image.device, dtype=torch.long)
                output = self.unet(torch.cat([sample, image], dim=1), timesteps)
                if self.aux_head:
                    output = self.x0_estimate(output, sample, t)
                sample, denoised = self.ddim_step(output, t, steps[i + 1] if i + 1 < len(steps) else None, sample)
            total = total + denoised
        return total / self.num_ensemble

    def x0_estimate(self, output: torch.Tensor, sample: torch.Tensor, t: int) -> torch.Tensor:
        """A sampling step's ``x_0`` estimate from the network's ``cat([ε, x_0])`` at ``x_t = sample``:
        the auxiliary head's, blended with the noise head's by ``aux_blend``."""
        eps, head = output[:, : self.num_classes], output[:, self.num_classes :]
        if self.aux_blend == 1.0:
            return head
        alpha = self.sampler.alphas_cumprod[t].to(sample.device, sample.dtype)
        from_eps = (sample - (1 - alpha).sqrt() * eps) / alpha.sqrt()
        return self.aux_blend * head + (1 - self.aux_blend) * from_eps
