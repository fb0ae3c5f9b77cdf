"""MGRAD-UNet: encoder, RFBs, the two differential decoders and the gate-control feedback (eq. 7)."""

import contextlib
from typing import Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from monai.networks.layers.factories import Pool
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.checkpoint import checkpoint

from mgrad_net.networks.blocks import RFB, ResidualStage, conv_norm_act
from mgrad_net.networks.decoders import GRADDecoder, MSDDecoder, SideOutputs, upsample_levels
from mgrad_net.outputs import MGRADOutput

__all__ = ["MGRADUNet"]

# The decoders are written for five levels (x_1..x_5), as in the paper.
LEVELS = 5
CHECKPOINTING = ("none", "full")


@contextlib.contextmanager
def _frozen_norm_stats(module: nn.Module) -> Iterator[None]:
    """BatchNorm normalises as in training but keeps its running statistics: a recomputation in
    backward must not count the batch a second time."""
    norms = [m for m in module.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    saved = [(m.momentum, m.num_batches_tracked.clone()) for m in norms]
    for m in norms:
        m.momentum = 0.0  # running = (1 - 0)·running + 0·batch
    try:
        yield
    finally:
        for m, (momentum, tracked) in zip(norms, saved):
            m.momentum = momentum
            m.num_batches_tracked.copy_(tracked)


class MGRADUNet(nn.Module):
    """MGRAD-UNet, the multi-scale differential network with multiple gated reverse attention.

    Yan, Yang & Chen, "A differential network with multiple gated reverse attention for medical
    image segmentation", Scientific Reports 14:20274 (2024). Five residual encoder stages with
    2× max-pooling between them; a receptive field block (RFB) per stage reduces each to
    ``decoder_channels``; decoder 1 (:class:`MSDDecoder`) predicts P_1 from multi-scale
    differences; decoder 2 (:class:`GRADDecoder`), gated by decoder 1, predicts P_2; side
    outputs of decoder 1 (:class:`SideOutputs`) feed the aggregated loss; the difference of the
    two decoders' features, λ·(G_i − M_i), is fed back into the RFB features of the next pass (eq. 7).

    Where the paper and the published code disagree this follows the code (see SPEC.md): DP
    without input convolutions, a sum in GRAD's first differences, feedback added after the RFB.

    Output contract:
        - eval mode: ``net(x)`` returns the logits ``P_1 + P_2`` (B×K×spatial), so MONAI inferers,
          tracing, scripting and ONNX export need no special case. With ``inference_passes`` > 1 the
          network runs that many passes, each fed with the previous one's feedback, and returns
          the last pass's logits.
        - train mode: ``net(x)`` returns an :class:`MGRADOutput`; ``net.feedback(out)`` gives the
          detached feedback for the next pass, ``net(x, feedback=f)`` applies it.

    Args:
        spatial_dims: number of spatial dimensions (2 as in the paper; 3 builds a volumetric variant).
        in_channels: number of input channels.
        out_channels: number of classes K, background included.
        features: widths of the five encoder stages.
        decoder_channels: width of the RFB outputs and of both decoders.
        use_rfb: use RFBs; ``False`` is the paper's ablation, a 1×1 conv-norm-act projection instead.
        side_outputs: build the side outputs; ``False`` is the paper's "no SideConv" ablation.
        feedback_weight: λ of eq. 7.
        norm: feature normalisation type and arguments.
        act: activation type and arguments (in place, as MONAI's BasicUNet: each follows a
            normalisation or a sum that nothing else reads).
        inference_passes: passes run in eval mode, each after the first fed with the previous
            pass's feedback; 1 is the published behaviour.
        checkpointing: ``"full"`` recomputes each encoder level (stage and RFB) and each decoder
            in the backward pass through ``torch.utils.checkpoint``, keeping only their inputs:
            activation memory for about one more forward pass of time. ``"none"`` keeps
            everything. Outputs, gradients and BatchNorm statistics are the same either way.
        channels_last: hold the convolution weights, and feed the input, in channels-last memory
            format (``channels_last_3d`` in 3D); the function is the same, only the kernels
            differ. Whether it is faster depends on the machine: the bundle's configs choose.
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        out_channels: int = 9,
        features: Sequence[int] = (64, 128, 256, 512, 1024),
        decoder_channels: int = 64,
        use_rfb: bool = True,
        side_outputs: bool = True,
        feedback_weight: float = 1e-3,
        norm: Union[tuple, str] = "batch",
        act: Union[tuple, str] = ("relu", {"inplace": True}),
        inference_passes: int = 1,
        checkpointing: str = "none",
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        if spatial_dims not in (1, 2, 3):
            raise ValueError(f"spatial_dims must be 1, 2 or 3, got {spatial_dims}.")
        if len(features) != LEVELS:
            raise ValueError(f"features must hold {LEVELS} encoder widths, got {tuple(features)}.")
        if checkpointing not in CHECKPOINTING:
            raise ValueError(f"checkpointing must be one of {CHECKPOINTING}, got {checkpointing!r}.")
        if inference_passes < 1:
            raise ValueError(f"inference_passes must be at least 1, got {inference_passes}.")
        if channels_last and spatial_dims == 1:
            raise ValueError("channels_last needs spatial_dims 2 or 3, got 1.")
        self.spatial_dims = spatial_dims
        self.levels = LEVELS
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.feedback_weight = float(feedback_weight)
        self.inference_passes = int(inference_passes)
        self.checkpointing = checkpointing
        self.channels_last = bool(channels_last)
        self.size_divisor = 2 ** (self.levels - 1)

        widths = [in_channels] + list(features)
        self.encoder = nn.ModuleList(
            [ResidualStage(spatial_dims, widths[i], widths[i + 1], norm, act) for i in range(self.levels)]
        )
        self.pool = Pool["max", spatial_dims](kernel_size=2)
        if use_rfb:
            self.rfbs = nn.ModuleList([RFB(spatial_dims, f, decoder_channels, norm, act) for f in features])
        else:
            self.rfbs = nn.ModuleList(
                [conv_norm_act(spatial_dims, f, decoder_channels, 1, norm, act) for f in features]
            )
        self.msd = MSDDecoder(spatial_dims, decoder_channels, out_channels, norm, act)
        self.grad = GRADDecoder(spatial_dims, decoder_channels, out_channels, norm, act)
        self.side = SideOutputs(spatial_dims, decoder_channels, out_channels, self.levels if side_outputs else 0)
        if self.channels_last:
            # .to() keeps a tensor's memory format, so the weights stay channels-last on any device
            self.to(memory_format=torch.channels_last if spatial_dims == 2 else torch.channels_last_3d)

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() != self.spatial_dims + 2:
            raise ValueError(
                "MGRADUNet(spatial_dims={}) expects a {}-D input (batch, channels, {} spatial), got shape {}.".format(
                    self.spatial_dims, self.spatial_dims + 2, self.spatial_dims, list(x.shape)
                )
            )
        if x.shape[1] != self.in_channels:
            raise ValueError(
                "MGRADUNet expects {} input channel(s) (in_channels), got {} in shape {}.".format(
                    self.in_channels, x.shape[1], list(x.shape)
                )
            )
        for size in x.shape[2:]:
            if size % self.size_divisor != 0 or size == 0:
                raise ValueError(
                    "MGRADUNet needs every spatial size divisible by {} (four 2x poolings), got shape {}.".format(
                        self.size_divisor, list(x.shape)
                    )
                )

    def forward_all(self, x: torch.Tensor, feedback: Optional[List[torch.Tensor]] = None) -> MGRADOutput:
        """One pass, whatever the mode: the full :class:`MGRADOutput`.

        Args:
            x: input, B×C_in×spatial.
            feedback: F_1..F_5 from :meth:`feedback` of the previous pass, added to the RFB
                features (eq. 7); ``None`` for a first pass.
        """
        if not torch.jit.is_tracing():
            # a traced graph keeps no Python branches; the shape checks would only warn there
            self._check_input(x)
        if feedback is not None and len(feedback) != self.levels:
            raise ValueError("feedback must hold {} tensors, got {}.".format(self.levels, len(feedback)))
        if self.channels_last:
            # oneDNN picks channels-last kernels when input and weight both are
            if x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            else:
                x = x.contiguous(memory_format=torch.channels_last_3d)
        recompute = False
        if not torch.jit.is_scripting():
            recompute = self._recomputes()
        e = x
        r: List[torch.Tensor] = []
        for i, (stage, rfb) in enumerate(zip(self.encoder, self.rfbs)):
            if i > 0:
                e = self.pool(e)
            if recompute:
                e, ri = self._recompute_level(i, e)
            else:
                e = stage(e)
                ri = rfb(e)
            r.append(ri)
        if feedback is not None:
            r = [r[i] + feedback[i] for i in range(self.levels)]  # eq. 7: R_i + F_i
        up = upsample_levels(r)
        if recompute:
            p1, m, p2, g = self._recompute_decoders(r, up)
        else:
            p1, m = self.msd(r, up)
            p2, g = self.grad(r, m, up)
        return MGRADOutput(p1, p2, self.side(m), m, g, r)

    @torch.jit.unused
    def _recomputes(self) -> bool:
        # eager training with gradients only; under torch.compile the compiler decides what to keep
        return (
            self.checkpointing == "full"
            and self.training
            and torch.is_grad_enabled()
            and not torch.compiler.is_compiling()
        )

    # "full" checkpointing, the one place it is applied: per encoder level and per decoder, as
    # MONAI's SwinUNETR checkpoints each of its blocks

    @torch.jit.unused
    def _checkpointed(self, fn, *args: object):
        def contexts():
            return contextlib.nullcontext(), _frozen_norm_stats(self)

        return checkpoint(fn, *args, use_reentrant=False, context_fn=contexts)

    @torch.jit.unused
    def _recompute_level(self, i: int, e: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        def level(e: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
            e = self.encoder[i](e)
            return e, self.rfbs[i](e)

        return self._checkpointed(level, e)

    @torch.jit.unused
    def _recompute_decoders(
        self, r: List[torch.Tensor], up: List[torch.Tensor]
    ) -> Tuple[torch.Tensor, List[torch.Tensor], torch.Tensor, List[torch.Tensor]]:
        p1, m = self._checkpointed(self.msd, r, up)
        p2, g = self._checkpointed(self.grad, r, m, up)
        return p1, m, p2, g

    def forward(
        self, x: torch.Tensor, feedback: Optional[List[torch.Tensor]] = None
    ) -> Union[torch.Tensor, MGRADOutput]:
        if self.training:
            return self.forward_all(x, feedback)
        out = self.forward_all(x, feedback)
        for _ in range(self.inference_passes - 1):
            out = self.forward_all(x, self.feedback(out))
        return out.p1 + out.p2

    def feedback(self, out: MGRADOutput) -> List[torch.Tensor]:
        """The feedback F_i = λ·(G_i − M_i) of eq. 7 for the next pass, detached from the graph."""
        return [(self.feedback_weight * (g - m)).detach() for m, g in zip(out.msd, out.grad)]
