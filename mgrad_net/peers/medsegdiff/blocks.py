"""MedSegDiff's conditioning blocks (Wu et al., "MedSegDiff: Medical Image Segmentation with Diffusion
Probabilistic Model", MIDL 2023, arXiv:2211.00611): the FF-Parser (eq. 5) and one stage of the dynamic
conditional encoding (eq. 3-4)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
from monai.networks.layers.factories import Norm
from monai.networks.nets.diffusion_model_unet import DiffusionUNetResnetBlock
from monai.utils import ensure_tuple_rep

__all__ = ["ConditionalEncoding", "FFParser"]


class FFParser(nn.Module):
    """The Feature-Frequency Parser (FF-Parser, eq. 5): ``m' = F⁻¹[A ⊙ F[m]]``.

    ``F`` is the real FFT over the spatial axes and ``A`` a learnable real attentive map, one value
    per channel and frequency, initialised to ones (the identity). It lets the network damp the
    high-frequency noise of the mask features. The map has the size of the features' spectrum, so
    the features' spatial size is fixed at construction (the bundle's ``roi_size`` at that level).

    Args:
        spatial_dims: number of spatial dimensions.
        channels: feature channels.
        spatial_size: the features' spatial size.
    """

    def __init__(self, spatial_dims: int, channels: int, spatial_size: Sequence[int]) -> None:
        super().__init__()
        self.spatial_dims = spatial_dims
        self.spatial_size = tuple(int(s) for s in ensure_tuple_rep(spatial_size, spatial_dims))
        spectrum = (*self.spatial_size[:-1], self.spatial_size[-1] // 2 + 1)
        self.attentive_map = nn.Parameter(torch.ones(channels, *spectrum))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[2:]) != self.spatial_size:
            raise ValueError(
                f"FFParser: features of spatial size {tuple(x.shape[2:])}, but its frequency map was built for "
                f"{self.spatial_size}; MedSegDiff takes inputs of exactly its spatial_size (the bundle's roi_size)."
            )
        dims = tuple(range(-self.spatial_dims, 0))
        spectrum = torch.fft.rfftn(x.float(), dim=dims, norm="ortho")
        out = torch.fft.irfftn(spectrum * self.attentive_map, s=self.spatial_size, dim=dims, norm="ortho")
        return out.to(x.dtype)


class ConditionalEncoding(nn.Module):
    """One stage of the dynamic conditional encoding (eq. 3-4): the mask features ``m`` (after the
    :class:`FFParser`) modulate the image features ``c`` as ``(LN(m) ⊙ LN(c)) ⊙ c``, then a
    time-conditioned ResNet block. The result is the image stream's new features. "LN" here is a
    one-group ``GroupNorm``: each sample is normalised over all its channels and positions together
    (C×H×W, one mean and variance per sample), with a learnable scale and shift per channel; it is
    not a per-pixel layer norm over the channels alone. The paper's transformer on the fused map is
    left out of the CPU preset.

    Args:
        spatial_dims: number of spatial dimensions.
        channels: feature channels of both streams at this stage.
        spatial_size: the stage's spatial size (for the FF-Parser).
        temb_channels: timestep embedding channels.
        norm_num_groups: groups of the ResNet block's GroupNorm.
    """

    def __init__(
        self, spatial_dims: int, channels: int, spatial_size: Sequence[int], temb_channels: int, norm_num_groups: int
    ) -> None:
        super().__init__()
        self.ff_parser = FFParser(spatial_dims, channels, spatial_size)
        self.norm_mask = Norm[Norm.GROUP, spatial_dims](num_groups=1, num_channels=channels)
        self.norm_image = Norm[Norm.GROUP, spatial_dims](num_groups=1, num_channels=channels)
        self.block = DiffusionUNetResnetBlock(
            spatial_dims, channels, temb_channels, channels, norm_num_groups=norm_num_groups
        )

    def forward(self, mask: torch.Tensor, image: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        fused = self.norm_mask(self.ff_parser(mask)) * self.norm_image(image) * image
        return self.block(fused, emb)
