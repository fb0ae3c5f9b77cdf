"""Building blocks of MGRAD-UNet (Yan, Yang & Chen, Sci. Rep. 14:20274, 2024).

One module per concept of the paper's Method section: the residual encoder stage, the receptive
field block (RFB, Fig. 8, eq. 8) and the differential process (DP, eq. 1), with the two
operations every decoder step is written in: Up2 and the absolute difference.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.blocks import Convolution
from monai.networks.layers.utils import get_act_layer

__all__ = ["conv_norm_act", "interp_mode", "upsample2", "ResidualStage", "RFB", "DifferentialProcess"]


def interp_mode(x: torch.Tensor) -> str:
    """The linear interpolation of ``x``'s dimensionality: linear, bilinear or trilinear."""
    dims = x.dim() - 2
    if dims == 1:
        return "linear"
    if dims == 2:
        return "bilinear"
    return "trilinear"


def upsample2(x: torch.Tensor) -> torch.Tensor:
    """Up2 of eq. 1: linear interpolation by 2 with ``align_corners=False``, as the published decoders do."""
    return F.interpolate(x, scale_factor=2.0, mode=interp_mode(x), align_corners=False)


def conv_norm_act(
    spatial_dims: int,
    in_channels: int,
    out_channels: int,
    kernel_size: Sequence[int] | int = 3,
    norm: tuple | str = "batch",
    act: tuple | str | None = "relu",
    dilation: int = 1,
    bias: bool = False,
) -> Convolution:
    """conv → norm → act, the unit every block of the paper is made of (bias-free: a norm follows)."""
    return Convolution(
        spatial_dims,
        in_channels,
        out_channels,
        kernel_size=kernel_size,
        act=act,
        norm=norm,
        dilation=dilation,
        bias=bias,
    )


class ResidualStage(nn.Module):
    """Encoder stage E_i: a residual double convolution.

    ``h = N(conv3(act(N(conv3(x)))))`` then ``act(h + N(conv1(h)))``. The 3×3 convolutions carry no
    bias; the 1×1 convolution of the residual branch has one, as in the published model.

    Args:
        spatial_dims: number of spatial dimensions.
        in_channels: input channels.
        out_channels: output channels.
        norm: feature normalisation type and arguments.
        act: activation type and arguments.
    """

    def __init__(
        self, spatial_dims: int, in_channels: int, out_channels: int, norm: tuple | str, act: tuple | str
    ) -> None:
        super().__init__()
        self.conv1 = conv_norm_act(spatial_dims, in_channels, out_channels, 3, norm, act)
        self.conv2 = conv_norm_act(spatial_dims, out_channels, out_channels, 3, norm, None)
        self.residual = conv_norm_act(spatial_dims, out_channels, out_channels, 1, norm, None, bias=True)
        self.act = get_act_layer(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv2(self.conv1(x))
        return self.act(h + self.residual(h))


class RFB(nn.Module):
    """Receptive field block (Liu & Huang, ECCV 2018) as MGRAD-UNet uses it (Fig. 8, eq. 8).

    Four branches: a 1×1 convolution, and three of 1×1 → factorised k-convolutions (k = 3, 5, 7)
    → 3×3 convolution with dilation k. The branches are concatenated and fused by a 3×3
    convolution, added to a 1×1 projection of the input, and activated. Every convolution is
    conv (no bias) → norm → act.

    The paper's 2D block factorises a k×k kernel into 1×k then k×1. For ``spatial_dims`` > 2 the
    same idea gives one 1-D kernel of size k per axis, last axis first, so the 2D block is
    exactly the published one and the 3D block stays a cheap separable approximation of k³.

    Args:
        spatial_dims: number of spatial dimensions.
        in_channels: input channels (the encoder stage width).
        out_channels: output channels (64 in the paper).
        norm: feature normalisation type and arguments.
        act: activation type and arguments.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int = 64,
        norm: tuple | str = "batch",
        act: tuple | str = "relu",
    ) -> None:
        super().__init__()

        def unit(cin: int, kernel: Sequence[int] | int, dilation: int = 1) -> Convolution:
            return conv_norm_act(spatial_dims, cin, out_channels, kernel, norm, act, dilation=dilation)

        branches = [nn.Sequential(unit(in_channels, 1))]
        for k in (3, 5, 7):
            layers = [unit(in_channels, 1)]
            for axis in reversed(range(spatial_dims)):
                kernel = [1] * spatial_dims
                kernel[axis] = k
                layers.append(unit(out_channels, kernel))
            layers.append(unit(out_channels, 3, dilation=k))
            branches.append(nn.Sequential(*layers))
        self.branches = nn.ModuleList(branches)
        self.fuse = unit(4 * out_channels, 3)
        self.shortcut = unit(in_channels, 1)
        self.act = get_act_layer(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branches = [branch(x) for branch in self.branches]
        return self.act(self.fuse(torch.cat(branches, dim=1)) + self.shortcut(x))


class DifferentialProcess(nn.Module):
    """Differential process DP of eq. 1: ``DP(a, b) = Conv(|Up2(a) − b|)``, ``a`` one level deeper.

    The paper also convolves each input before subtracting; the published model does not, and
    this follows the published model (fewer parameters, the reported results).

    Args:
        spatial_dims: number of spatial dimensions.
        channels: channels of both inputs and of the output.
        norm: feature normalisation type and arguments.
        act: activation type and arguments.
    """

    def __init__(self, spatial_dims: int, channels: int, norm: tuple | str = "batch", act: tuple | str = "relu"):
        super().__init__()
        self.conv = conv_norm_act(spatial_dims, channels, channels, 3, norm, act)

    def forward(self, a: torch.Tensor, b: torch.Tensor, a_up: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``a_up``, if given, is ``Up2(a)`` already computed elsewhere (the decoders share them)."""
        if a_up is None:
            a_up = upsample2(a)
        return self.conv(torch.abs(a_up - b))
