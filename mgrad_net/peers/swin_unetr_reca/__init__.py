"""SwinUNETR with Recurrent-Attention (RecA-H), on MONAI's SwinUNETR: trained by the bundle's plain
step with MONAI's losses (its output is a logits tensor), so it brings no step or loss of its own."""

from mgrad_net.peers.swin_unetr_reca.network import (
    RECA_MODES,
    RecABasicLayer,
    RecASwinTransformerBlock,
    RecAWindowAttention,
    SwinUNETRRecA,
)

__all__ = ["RECA_MODES", "RecABasicLayer", "RecASwinTransformerBlock", "RecAWindowAttention", "SwinUNETRRecA"]
