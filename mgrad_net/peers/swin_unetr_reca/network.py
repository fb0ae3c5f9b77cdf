"""SwinUNETR with Recurrent-Attention (RecA-H), built on MONAI's own SwinUNETR.

MONAI's :class:`~monai.networks.nets.SwinUNETR` is built as it is; with ``reca=True`` its window
attentions, transformer blocks and stages are then given a forward that carries a query memory
from block to block (the subclasses below add no parameters and no buffers). Everything else
(patch embedding, patch merging, the UNETR encoder and decoder, the initialisation) is MONAI's.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
import torch.utils.checkpoint as checkpoint
from monai.networks.nets.swin_unetr import (
    BasicLayer,
    SwinTransformerBlock,
    SwinUNETR,
    WindowAttention,
    compute_mask,
    get_window_size,
    window_partition,
    window_reverse,
)
from monai.networks.utils import copy_model_state
from monai.utils import look_up_option

__all__ = ["RECA_MODES", "RecAWindowAttention", "RecASwinTransformerBlock", "RecABasicLayer", "SwinUNETRRecA"]

RECA_MODES = ("published", "aligned")


class RecAWindowAttention(WindowAttention):
    """MONAI's :class:`WindowAttention` whose queries take the previous block's accumulated
    queries: ``Q̂ = Q + memory``, attention computed with ``Q̂``, and ``Q̂`` returned as the next
    block's memory. Keys, values, the relative position bias, the mask and the projection are
    MONAI's. Same parameters as the parent.

    ``forward(x, mask, memory)`` returns ``(output, q_hat)``; ``memory`` and ``q_hat`` are
    ``(windows·batch, tokens, channels)``, the queries before the ``head_dim ** -0.5`` scaling, as
    in the published code (heads split per channel group, so adding before or after the head
    split is the same sum).
    """

    def forward(  # type: ignore[override]
        self, x: torch.Tensor, mask: Optional[torch.Tensor], memory: Optional[torch.Tensor] = None
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        b, n, c = x.shape
        heads = self.num_heads
        qkv = self.qkv(x).view(b, n, 3, heads, c // heads)
        q_hat = qkv[:, :, 0].reshape(b, n, c)
        if memory is not None:
            q_hat = q_hat + memory
        q = q_hat.view(b, n, heads, -1).transpose(1, 2)
        k, v = qkv[:, :, 1].transpose(1, 2), qkv[:, :, 2].transpose(1, 2)
        index = self.relative_position_index[:n, :n].reshape(-1)  # type: ignore[index]
        bias = self.relative_position_bias_table[index].view(n, n, heads).permute(2, 0, 1)
        attn = (q * self.scale) @ k.transpose(-2, -1) + bias.unsqueeze(0)
        if mask is not None:  # shifted windows: -100 between tokens from different regions
            nw = mask.shape[0]
            attn = (attn.view(b // nw, nw, heads, n, n) + mask.unsqueeze(1).unsqueeze(0)).view(b, heads, n, n)
        attn = self.attn_drop(self.softmax(attn)).to(v.dtype)
        out = (attn @ v).transpose(1, 2).reshape(b, n, c)
        return self.proj_drop(self.proj(out)), q_hat


class RecASwinTransformerBlock(SwinTransformerBlock):
    """MONAI's :class:`SwinTransformerBlock` passing a query memory through its attention.

    ``forward(x, mask_matrix, memory)`` returns ``(x, q_hat)``. Where the memory meets the
    queries is ``reca_mode``:

    - ``"published"``: the memory stays in the window layout of the block that made it and is
      added to this block's window-partitioned queries as they are, as the published code does.
      Between a regular-window block and a shifted-window one (and back), token ``i`` of the
      memory then sits at a position shifted by ``window_size // 2`` from token ``i`` of the queries.
    - ``"aligned"``: the memory is kept on the (padded, unshifted) token grid; each block rolls
      and partitions it as it does its own tokens, so every query gets the memory of its own
      position.
    """

    reca_mode: str = "published"

    def forward(  # type: ignore[override]
        self, x: torch.Tensor, mask_matrix: Optional[torch.Tensor], memory: Optional[torch.Tensor] = None
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        if self.use_checkpoint:
            attended, memory = checkpoint.checkpoint(self.forward_part1, x, mask_matrix, memory, use_reentrant=False)
        else:
            attended, memory = self.forward_part1(x, mask_matrix, memory)
        x = x + self.drop_path(attended)
        if self.use_checkpoint:
            return x + checkpoint.checkpoint(self.forward_part2, x, use_reentrant=False), memory
        return x + self.forward_part2(x), memory

    def forward_part1(  # type: ignore[override]
        self, x: torch.Tensor, mask_matrix: Optional[torch.Tensor], memory: Optional[torch.Tensor] = None
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        b, *spatial, c = x.shape
        window_size, shift_size = get_window_size(tuple(spatial), self.window_size, self.shift_size)
        pads = [(w - s % w) % w for s, w in zip(spatial, window_size)]
        # F.pad lists the last axis first: channels unpadded, then each spatial axis at its end
        x = F.pad(self.norm1(x), [0, 0] + [p for pad in reversed(pads) for p in (0, pad)])
        grid = [b, *x.shape[1:-1]]
        axes = tuple(range(1, len(spatial) + 1))
        shifted = any(s > 0 for s in shift_size)
        if shifted:
            x = torch.roll(x, [-s for s in shift_size], axes)
        aligned = self.reca_mode == "aligned"
        if aligned and memory is not None:
            memory = window_partition(
                torch.roll(memory, [-s for s in shift_size], axes) if shifted else memory, window_size
            )
        out, q_hat = self.attn(window_partition(x, window_size), mask_matrix if shifted else None, memory)
        out = window_reverse(out.view(-1, *window_size, c), window_size, grid)
        if aligned:
            q_hat = window_reverse(q_hat.view(-1, *window_size, c), window_size, grid)
        if shifted:
            out = torch.roll(out, list(shift_size), axes)
            if aligned:
                q_hat = torch.roll(q_hat, list(shift_size), axes)
        if any(pads):
            out = out[(slice(None), *(slice(0, s) for s in spatial))].contiguous()
        return out, q_hat


class RecABasicLayer(BasicLayer):
    """MONAI's :class:`BasicLayer` (one Swin stage) running its blocks as RecA-H does: the memory
    starts empty at the stage's first block, goes from block to block, and ends with the stage
    (it does not cross a patch merging)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, *spatial = x.shape
        window_size, shift_size = get_window_size(tuple(spatial), self.window_size, self.shift_size)
        padded = [-(-s // w) * w for s, w in zip(spatial, window_size)]
        mask = compute_mask(padded, window_size, shift_size, x.device)
        x = x.movedim(1, -1)
        memory: Optional[torch.Tensor] = None
        for blk in self.blocks:
            x, memory = blk(x, mask, memory)
        if self.downsample is not None:
            x = self.downsample(x)
        return x.movedim(-1, 1)


class SwinUNETRRecA(SwinUNETR):
    """SwinUNETR (Hatamizadeh et al., "Swin UNETR: Swin Transformers for Semantic Segmentation of
    Brain Tumors in MRI Images", arXiv:2201.01266) with Recurrent-Attention (Li et al.,
    "Recurrent-Attention: A robust neural network operator for medical image segmentation",
    submitted to Medical Image Analysis; code: github.com/CAU-COE-VEICLab/Recurrent-Attention).

    RecA changes only the queries of window self-attention. Block ``t`` of a stage attends with

        Q̂ₜ = Qₜ + Q̂ₜ₋₁,    Q̂₀ = 0,

    and hands ``Q̂ₜ`` on as the memory of block ``t + 1``; keys, values, the softmax, the
    relative position bias and the MLP are unchanged. As in the published SwinUNETR-RecA
    (RecA-H) the memory runs within each Swin stage, after the heads are split, and starts anew
    at every stage. No parameter is added: one addition per block.

    ``reca=False`` is MONAI's SwinUNETR exactly (nothing is converted): the same parameters, the
    same state-dict keys and, from the same state dict, the same outputs. ``reca=True`` has the
    same parameters and keys, and MONAI's initialisation, so a state dict loads either way.

    Where the memory meets the queries, relative to the cyclic shift (``reca_mode``):
    ``"published"`` (the default) adds it in window layout as the published code does, so the
    memory of a regular-window block reaches a shifted-window block's queries displaced by half a
    window (and back); ``"aligned"`` carries it on the token grid so each query gets the memory
    of its own position. The default is the published one because the comparison reproduces the
    peer as its authors ran it and reported it; ``"aligned"`` is offered for studying the operator
    as the equation states it. See :class:`RecASwinTransformerBlock`.

    Spatial size: every spatial size of the input must be a multiple of 32 (a 2×2 patch embedding
    and four 2× patch mergings); anything else is a ``ValueError`` naming the shape and the rule.

    Args:
        in_channels: number of input channels.
        out_channels: number of output channels (classes, background included).
        spatial_dims: number of spatial dimensions, 2 or 3.
        feature_size: width of the patch embedding, doubled at each stage; a multiple of 12.
        depths: number of transformer blocks in each of the four stages.
        num_heads: attention heads in each stage (each must divide that stage's width).
        window_size: local window size.
        reca: carry the query memory (Recurrent-Attention); ``False`` is MONAI's SwinUNETR.
        reca_mode: ``"published"`` or ``"aligned"``, see above.
        qkv_bias: add a learnable bias to query, key, value.
        mlp_ratio: ratio of the MLP's hidden width to the block width.
        norm_name: normalisation of the convolutional encoder and decoder blocks.
        drop_rate: dropout rate.
        attn_drop_rate: attention dropout rate.
        dropout_path_rate: stochastic depth rate.
        normalize: layer-normalise the transformer's stage outputs before the decoder.
        use_checkpoint: gradient checkpointing of the transformer blocks.
        downsample: ``"merging"`` or ``"mergingv2"`` (MONAI's patch merging variants).
        use_v2: SwinUNETR-v2 (a residual convolution block before each stage).

    Weights: MONAI's initialisation; nothing is downloaded and the network reads no file.
    :meth:`load_from` takes a state dict already loaded (e.g. by
    :func:`mgrad_net.checkpoints.load_pretrained`).
    """

    size_divisor = 32

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        spatial_dims: int = 2,
        feature_size: int = 24,
        depths: Sequence[int] = (2, 2, 2, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: Union[Sequence[int], int] = 7,
        reca: bool = True,
        reca_mode: str = "published",
        qkv_bias: bool = True,
        mlp_ratio: float = 4.0,
        norm_name: Union[Tuple, str] = "instance",
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        dropout_path_rate: float = 0.0,
        normalize: bool = True,
        use_checkpoint: bool = False,
        downsample: str = "merging",
        use_v2: bool = False,
    ) -> None:
        super().__init__(
            in_channels=in_channels,
            out_channels=out_channels,
            depths=depths,
            num_heads=num_heads,
            window_size=window_size,
            qkv_bias=qkv_bias,
            mlp_ratio=mlp_ratio,
            feature_size=feature_size,
            norm_name=norm_name,
            drop_rate=drop_rate,
            attn_drop_rate=attn_drop_rate,
            dropout_path_rate=dropout_path_rate,
            normalize=normalize,
            use_checkpoint=use_checkpoint,
            spatial_dims=spatial_dims,
            downsample=downsample,
            use_v2=use_v2,
        )
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.reca = bool(reca)
        self.reca_mode = look_up_option(reca_mode, RECA_MODES)
        if self.reca:
            for stage in self.stages():
                # the same modules, parameters and initialisation; only their forward changes
                stage.__class__ = RecABasicLayer
                for block in stage.blocks:
                    block.__class__ = RecASwinTransformerBlock
                    block.reca_mode = self.reca_mode
                    block.attn.__class__ = RecAWindowAttention

    def stages(self) -> list:
        """The four Swin stages (MONAI's ``BasicLayer``), shallowest first."""
        vit = self.swinViT
        return [vit.layers1[0], vit.layers2[0], vit.layers3[0], vit.layers4[0]]

    def load_from(self, weights: Mapping[str, torch.Tensor]) -> tuple[list[str], list[str]]:  # type: ignore[override]
        """Copy the tensors of the state dict ``weights`` that match this network by name and shape; the
        rest keeps its initialisation. Returns the names loaded and this network's names left as they were.

        ``weights`` is a state dict of this network or of MONAI's SwinUNETR, or of its Swin encoder
        alone (keys without ``swinViT.``; timm's ``mlp.fc1``/``mlp.fc2`` names are mapped to MONAI's
        ``mlp.linear1``/``mlp.linear2``). MONAI's ``SwinUNETR.load_from`` takes the 3D self-supervised
        checkpoint's ``{"state_dict": …}`` instead; this one takes any such state dict, already loaded.

        Raises:
            ValueError: none of the tensors fits this network.
        """
        state = dict(weights)
        if not any(k.startswith("swinViT.") for k in state):  # the Swin encoder alone
            rename = {".mlp.fc1.": ".mlp.linear1.", ".mlp.fc2.": ".mlp.linear2."}
            for old, new in rename.items():
                state = {k.replace(old, new): v for k, v in state.items()}
            state = {f"swinViT.{k}": v for k, v in state.items()}
        _, loaded, skipped = copy_model_state(self, state, inplace=True)
        if not loaded:
            raise ValueError("load_from: none of the given tensors matches this network by name and shape.")
        logging.getLogger("mgrad_net").info(
            "%s.load_from: %d tensors loaded, %d of this network's left as initialised",
            type(self).__name__,
            len(loaded),
            len(skipped),
        )
        return list(loaded), list(skipped)

    @torch.jit.unused
    def _check_input_size(self, spatial_shape: Sequence[int]) -> None:
        shape = [int(s) for s in spatial_shape]
        if len(shape) != self.spatial_dims or any(s % self.size_divisor != 0 or s == 0 for s in shape):
            raise ValueError(
                f"{type(self).__name__} needs every spatial size to be a multiple of {self.size_divisor} (a 2x2 patch "
                f"embedding and four 2x patch mergings), got spatial shape {shape}; the bundle's roi_size must follow "
                "the same rule."
            )

    def forward(self, x_in: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting() and not torch.jit.is_tracing():
            if x_in.dim() != self.spatial_dims + 2 or x_in.shape[1] != self.in_channels:
                raise ValueError(
                    f"{type(self).__name__}(spatial_dims={self.spatial_dims}, in_channels={self.in_channels}) expects "
                    f"(batch, {self.in_channels}, {self.spatial_dims} spatial sizes), got shape {list(x_in.shape)}."
                )
        return super().forward(x_in)
