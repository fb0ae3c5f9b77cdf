"""The two decoders and the side outputs of MGRAD-UNet (Yan, Yang & Chen, Sci. Rep. 2024).

- :class:`MSDDecoder`: the multi-scale differential decoder (decoder 1, eq. 2) → M_1..M_5, P_1.
- :class:`GRADDecoder`: the gate-control reverse attention decoder (decoder 2, eqs. 4–6) → G_1..G_5, P_2.
- :class:`SideOutputs`: SideConv (eq. 3), deep supervision maps S_1..S_5 from decoder 1.

Lists of per-level tensors run from the finest level (index 0, full resolution) to the
coarsest (index 4, 1/16), as x_1..x_5 in the paper. ``up`` lists Up2(x_2)..Up2(x_5): both
decoders need them, so the network computes them once (a decoder called alone computes them).
"""

from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.blocks import Convolution

from mgrad_net.networks.blocks import DifferentialProcess, conv_norm_act, interp_mode, upsample2

__all__ = ["upsample_levels", "DifferentialPyramid", "MSDDecoder", "GRADDecoder", "SideOutputs"]


def upsample_levels(x: List[torch.Tensor]) -> List[torch.Tensor]:
    """Up2(x_2), …, Up2(x_5): each deeper feature at the resolution of the level above it."""
    return [upsample2(x[i]) for i in range(1, len(x))]


def positive_attention(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """x + x·σ(m): decoder 2's deepest level, gated by decoder 1."""
    return x + x * torch.sigmoid(m)


def reverse_attention(up: torch.Tensor, x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """|Up2(deeper) + RA| with RA = (1 − σ(m))·x (eq. 4; a sum, as the published model has it)."""
    return torch.abs(up + x * (1 - torch.sigmoid(m)))


class DifferentialPyramid(nn.Module):
    """What both decoders share after their first-order differences (eq. 2, eqs. 5–6).

    From the first differences d54, d43, d32, d21 it builds the higher orders with DP
    (d543, d432, d321; d5432, d4321; d54321), sums them per level
    (L4 = d54, L3 = Conv(d43 + d543), L2 = Conv(d32 + d432 + d5432),
    L1 = Conv(d21 + d321 + d4321 + d54321)), and decodes top-down from the deepest feature
    ``top``: O5 = top, O4 = Conv(Up2(top) + L4), O3, O2 likewise, O1 = conv3×3(Up2(O2) + L1)
    (a plain convolution with bias), and the prediction conv1×1(O1).

    Args:
        spatial_dims: number of spatial dimensions.
        channels: decoder width (64 in the paper).
        out_channels: number of classes K.
        norm: feature normalisation type and arguments.
        act: activation type and arguments.
    """

    def __init__(self, spatial_dims: int, channels: int, out_channels: int, norm: tuple | str, act: tuple | str):
        super().__init__()

        def dp() -> DifferentialProcess:
            return DifferentialProcess(spatial_dims, channels, norm, act)

        def conv() -> Convolution:
            return conv_norm_act(spatial_dims, channels, channels, 3, norm, act)

        self.dp543, self.dp432, self.dp321 = dp(), dp(), dp()
        self.dp5432, self.dp4321 = dp(), dp()
        self.dp54321 = dp()
        self.level3, self.level2, self.level1 = conv(), conv(), conv()
        self.up4, self.up3, self.up2 = conv(), conv(), conv()
        self.up1 = Convolution(spatial_dims, channels, channels, kernel_size=3, conv_only=True, bias=True)
        self.head = Convolution(spatial_dims, channels, out_channels, kernel_size=1, conv_only=True, bias=True)

    def forward(
        self,
        d54: torch.Tensor,
        d43: torch.Tensor,
        d32: torch.Tensor,
        d21: torch.Tensor,
        top: torch.Tensor,
        top_up: Optional[torch.Tensor] = None,
    ) -> tuple[torch.Tensor, List[torch.Tensor]]:
        d543, d432, d321 = self.dp543(d54, d43), self.dp432(d43, d32), self.dp321(d32, d21)
        d5432, d4321 = self.dp5432(d543, d432), self.dp4321(d432, d321)
        d54321 = self.dp54321(d5432, d4321)

        l3 = self.level3(d43 + d543)
        l2 = self.level2(d32 + d432 + d5432)
        l1 = self.level1(d21 + d321 + d4321 + d54321)

        if top_up is None:
            top_up = upsample2(top)
        o4 = self.up4(top_up + d54)
        o3 = self.up3(upsample2(o4) + l3)
        o2 = self.up2(upsample2(o3) + l2)
        o1 = self.up1(upsample2(o2) + l1)
        return self.head(o1), [o1, o2, o3, o4, top]


class MSDDecoder(nn.Module):
    """Multi-scale differential decoder (decoder 1, eq. 2).

    First differences between adjacent RFB features, d54 = DP(x5, x4), …, d21 = DP(x2, x1),
    then the :class:`DifferentialPyramid` with ``top = x5``. Returns P_1 and M_1..M_5
    (M_5 = x5).

    Args:
        spatial_dims: number of spatial dimensions.
        channels: decoder width (64 in the paper).
        out_channels: number of classes K.
        norm: feature normalisation type and arguments.
        act: activation type and arguments.
    """

    def __init__(self, spatial_dims: int, channels: int, out_channels: int, norm: tuple | str, act: tuple | str):
        super().__init__()
        self.dp54 = DifferentialProcess(spatial_dims, channels, norm, act)
        self.dp43 = DifferentialProcess(spatial_dims, channels, norm, act)
        self.dp32 = DifferentialProcess(spatial_dims, channels, norm, act)
        self.dp21 = DifferentialProcess(spatial_dims, channels, norm, act)
        self.pyramid = DifferentialPyramid(spatial_dims, channels, out_channels, norm, act)

    def forward(
        self, x: List[torch.Tensor], up: Optional[List[torch.Tensor]] = None
    ) -> tuple[torch.Tensor, List[torch.Tensor]]:
        if up is None:
            up = upsample_levels(x)
        x1, x2, x3, x4, x5 = x[0], x[1], x[2], x[3], x[4]
        return self.pyramid(
            self.dp54(x5, x4, up[3]),
            self.dp43(x4, x3, up[2]),
            self.dp32(x3, x2, up[1]),
            self.dp21(x2, x1, up[0]),
            x5,
            up[3],
        )


class GRADDecoder(nn.Module):
    """Gate-control reverse attention differential decoder (decoder 2, eqs. 4–6).

    Gates from decoder 1, w_i = σ(M_i). The deepest feature gets positive attention,
    x5s = Conv(x5 + x5·w5); the first differences use reverse attention RA_i = (1 − w_i)·x_i
    (eq. 4): g54 = Conv(|Up2(x5s) + RA_4|), g43 = Conv(|Up2(x4) + RA_3|), g32, g21 likewise.
    Note the sum: the paper's DP subtracts, the published model adds at this step, and this
    follows the published model. Then the :class:`DifferentialPyramid` with ``top = x5s``.
    Returns P_2 and G_1..G_5 (G_5 = x5s).

    The gates are not detached, as in the published model: decoder 2's loss also trains decoder 1.

    Args:
        spatial_dims: number of spatial dimensions.
        channels: decoder width (64 in the paper).
        out_channels: number of classes K.
        norm: feature normalisation type and arguments.
        act: activation type and arguments.
    """

    def __init__(self, spatial_dims: int, channels: int, out_channels: int, norm: tuple | str, act: tuple | str):
        super().__init__()

        def conv() -> Convolution:
            return conv_norm_act(spatial_dims, channels, channels, 3, norm, act)

        self.attend5 = conv()
        self.ra54, self.ra43, self.ra32, self.ra21 = conv(), conv(), conv(), conv()
        self.pyramid = DifferentialPyramid(spatial_dims, channels, out_channels, norm, act)

    def forward(
        self, x: List[torch.Tensor], m: List[torch.Tensor], up: Optional[List[torch.Tensor]] = None
    ) -> tuple[torch.Tensor, List[torch.Tensor]]:
        if up is None:
            up = upsample_levels(x)
        x1, x2, x3, x4, x5 = x[0], x[1], x[2], x[3], x[4]
        x5s = self.attend5(positive_attention(x5, m[4]))
        x5s_up = upsample2(x5s)
        g54 = self.ra54(reverse_attention(x5s_up, x4, m[3]))
        g43 = self.ra43(reverse_attention(up[2], x3, m[2]))
        g32 = self.ra32(reverse_attention(up[1], x2, m[1]))
        g21 = self.ra21(reverse_attention(up[0], x1, m[0]))
        return self.pyramid(g54, g43, g32, g21, x5s, x5s_up)


class SideOutputs(nn.Module):
    """SideConv (eq. 3): S_i = Up^{i−1}(conv1×1(M_i)), K-channel maps at full resolution.

    As in the published model, the 1×1 convolution comes first (on 64 channels it is cheaper
    than upsampling first) and Up is repeated ×2 linear interpolation with ``align_corners=True``,
    which is not the same as one ×2^{i−1} interpolation.

    Args:
        spatial_dims: number of spatial dimensions.
        in_channels: decoder width (64 in the paper).
        out_channels: number of classes K.
        levels: number of decoder levels (5).
    """

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, levels: int = 5):
        super().__init__()
        self.convs = nn.ModuleList(
            [
                Convolution(spatial_dims, in_channels, out_channels, kernel_size=1, conv_only=True, bias=True)
                for _ in range(levels)
            ]
        )

    def forward(self, m: List[torch.Tensor]) -> List[torch.Tensor]:
        out: List[torch.Tensor] = []
        for i, conv in enumerate(self.convs):
            s = conv(m[i])
            for _ in range(i):
                s = F.interpolate(s, scale_factor=2.0, mode=interp_mode(s), align_corners=True)
            out.append(s)
        return out
