"""Building blocks of MGRAD-UNet (Yan, Yang & Chen, Sci. Rep. 14:20274, 2024).

One module per concept of the paper's Method section: the residual encoder stage, the receptive
field block (RFB, Fig. 8, eq. 8) and the differential process (DP, eq. 1).
"""

from __future__ import annotations

import functools
from typing import List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.blocks import Convolution
from monai.networks.layers.utils import get_act_layer

from mgrad_net.networks.lazy import lazy_act_of_sum, lazy_active, lazy_cat, lazy_conv, lazy_norm_act, lazy_op, lazy_sum, sum_terms

__all__ = ["ConvNormAct", "conv_norm_act", "upsample2", "add", "abs_diff", "inplace_act", "ResidualStage", "RFB", "DifferentialProcess"]

_INTERP_MODES = {1: "linear", 2: "bilinear", 3: "trilinear"}
# activations whose torch modules take ``inplace``
_INPLACE_ACTS = {"relu", "leakyrelu", "relu6", "elu", "selu", "celu", "hardtanh"}


def inplace_act(act: tuple | str | None) -> tuple | str | None:
    """``act`` with ``inplace=True`` where its module supports it and the caller did not say otherwise.

    Every activation in MGRAD-UNet follows a normalisation or a sum whose result nothing else
    reads, so overwriting it saves one activation-sized buffer per layer, in training (autograd
    keeps one tensor instead of two) and in inference.
    """
    if act is None:
        return None
    name, args = (act, {}) if isinstance(act, str) else (act[0], dict(act[1]) if len(act) > 1 else {})
    if str(name).lower() not in _INPLACE_ACTS:
        return act
    return (name, {"inplace": True, **args})


class ConvNormAct(Convolution):
    """MONAI's :class:`~monai.networks.blocks.Convolution` with a norm (same modules, same
    state-dict keys) whose norm → activation saves only the convolution's output under
    :func:`~mgrad_net.networks.lazy.lazy_recompute`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            if lazy_active():
                return lazy_norm_act(self.adn, self.conv(x))
        return self.adn(self.conv(x))


def conv_norm_act(
    spatial_dims: int,
    in_channels: int,
    out_channels: int,
    kernel_size: Sequence[int] | int = 3,
    norm: tuple | str = "batch",
    act: tuple | str | None = "relu",
    dilation: int = 1,
    bias: bool = False,
) -> ConvNormAct:
    """conv → norm → act, the unit every block of the paper is made of (bias-free: a norm follows)."""
    return ConvNormAct(
        spatial_dims,
        in_channels,
        out_channels,
        kernel_size=kernel_size,
        act=act,
        norm=norm,
        dilation=dilation,
        bias=bias,
    )


# The element-wise functions between convolutions hand themselves to lazy_op under
# lazy_recompute (which evaluates them with the switch off), so each block has one code path.


def upsample2(x: torch.Tensor, mode: str) -> torch.Tensor:
    """Up2 of eq. 1: linear interpolation by 2 with ``align_corners=False``, as the published decoders do."""
    if not torch.jit.is_scripting():
        if lazy_active():
            return lazy_op(functools.partial(upsample2, mode=mode), x, linear=True)
    return F.interpolate(x, scale_factor=2.0, mode=mode, align_corners=False)


# The element-wise functions below overwrite their own temporaries wherever autograd does not need
# them (always when nothing records the operations: inference, lazy recomputation's forward pass
# and rebuilds): a fresh activation-sized tensor costs more than the arithmetic that fills it
# (``lazy.add_into``). The same operations in the same order, so the results are bit-identical.


def add(terms: List[torch.Tensor]) -> torch.Tensor:
    """``terms[0] + terms[1] + …``, summed left to right."""
    if not torch.jit.is_scripting():
        if lazy_active():
            return lazy_sum(*terms)
    return sum_terms(terms)


def abs_diff(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``|a − b|``, the differential process's difference."""
    if not torch.jit.is_scripting():
        if lazy_active():
            return lazy_op(abs_diff, a, b)
    d = a - b
    return d.abs() if torch.is_grad_enabled() else d.abs_()  # |·|'s backward needs a − b


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
        if not torch.jit.is_scripting():
            if lazy_active():
                return lazy_act_of_sum(self.act, h, self.residual(h))
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
        if not torch.jit.is_scripting():
            if lazy_active():
                branches = [self._lazy_branch(branch, x) for branch in self.branches]
                return lazy_act_of_sum(self.act, self.fuse(lazy_cat(*branches)), self.shortcut(x))
        branches = [branch(x) for branch in self.branches]
        return self.act(self.fuse(torch.cat(branches, dim=1)) + self.shortcut(x))

    @torch.jit.unused
    def _lazy_branch(self, branch: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
        # Inside a branch only the last, dilated convolution's output is kept: the 1×1 and 1×k
        # convolutions before it are recomputed in backward (about 10 % of the network's
        # convolution FLOPs at full resolution) instead of holding nine full-resolution tensors.
        for unit in branch[:-1]:
            x = lazy_norm_act(unit.adn, lazy_conv(unit.conv, x))
        return branch[-1](x)


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
        self.mode = _INTERP_MODES[spatial_dims]

    def forward(self, a: torch.Tensor, b: torch.Tensor, a_up: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``a_up``, if given, is ``Up2(a)`` already computed elsewhere (the decoders share them)."""
        if a_up is None:
            a_up = upsample2(a, self.mode)
        return self.conv(abs_diff(a_up, b))
