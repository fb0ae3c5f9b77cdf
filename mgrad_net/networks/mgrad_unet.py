"""MGRAD-UNet: encoder, RFBs, the two differential decoders and the gate-control feedback (eq. 7)."""

import contextlib
import math
from typing import List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts
from monai.networks.layers.factories import Pool

from mgrad_net.config import flag
from mgrad_net.networks.blocks import _INTERP_MODES, RFB, ResidualStage, add, conv_norm_act, inplace_act
from mgrad_net.networks.decoders import GRADDecoder, MSDDecoder, SideOutputs, upsample_levels
from mgrad_net.networks.lazy import frozen_norm_stats, lazy_active, lazy_op, lazy_recompute, strip_recipes

__all__ = ["MGRADOutput", "MGRADUNet", "default_channels_last"]

# The decoders are written for five levels (x_1..x_5), as in the paper.
LEVELS = 5
_CHECKPOINT_MODES = {
    False: "none", "none": "none", True: "full", "full": "full", "selective": "selective", "lazy": "lazy",
    "auto": "auto"
}


def _keep_conv_outputs(ctx: object, op: object, *args: object, **kwargs: object) -> CheckpointPolicy:
    """Selective policy: keep what the convolutions compute, recompute the rest (norms, activations,
    differences, interpolations), which costs memory traffic but few FLOPs."""
    if op is torch.ops.aten.convolution.default:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


@contextlib.contextmanager
def _frozen_stats_then(module: nn.Module, recompute_ctx: contextlib.AbstractContextManager):
    # the statistics' snapshot must be taken outside the selective recomputation's dispatch mode
    with frozen_norm_stats(module), recompute_ctx:
        yield


def _checkpoint(module: nn.Module, selective: bool, *args: object):
    def contexts():
        if not selective:
            return contextlib.nullcontext(), frozen_norm_stats(module)
        forward_ctx, recompute_ctx = create_selective_checkpoint_contexts(_keep_conv_outputs)
        return forward_ctx, _frozen_stats_then(module, recompute_ctx)

    return checkpoint(module, *args, use_reentrant=False, context_fn=contexts)


def _kept(t: torch.Tensor) -> torch.Tensor:
    # R_i, M_i and G_i stay alive in the network's output until backward ends anyway: under lazy
    # recomputation they lose their recipes, so that what saves them keeps them instead of
    # rebuilding them
    if not torch.jit.is_scripting():
        if lazy_active():
            return strip_recipes(t)
    return t


def default_channels_last(spatial_dims: int = 2) -> bool:
    """Whether :class:`MGRADUNet` holds its weights channels-last unless told: a 2D network, a CPU
    whose ATen kernels use AVX-512 (``torch.backends.cpu.get_cpu_capability()``), no CUDA device.

    Measured (``scripts/benchmark.md``): on a 2-core AVX-512 CPU (AMD EPYC, Zen 5) one full-size
    training pass at batch 8 took 18-19 s channels-last against 23 s NCHW, the CPU preset's step
    0.8-1.0 s against 1.5-2.5 s; on a 2-core AVX2 CPU (an earlier AMD EPYC) oneDNN's channels-last
    weight gradient ran at 22-29 GFLOP/s against 89-114 NCHW, so a step was slower. Not measured on
    GPUs, nor in 3D.
    """
    return (
        spatial_dims == 2
        and not torch.cuda.is_available()
        and torch.backends.cpu.get_cpu_capability().upper().startswith("AVX512")
    )


class MGRADOutput(NamedTuple):
    """What one training-mode pass of :class:`MGRADUNet` returns.

    Lists of per-level tensors run from the finest level (full resolution) to the coarsest.

    Attributes:
        p1: logits of decoder 1 (MSD), B×K×spatial.
        p2: logits of decoder 2 (GRAD), B×K×spatial.
        side: the side outputs S_1..S_5 (eq. 3), each B×K×spatial at full resolution; empty when
            the network was built with ``side_outputs=False``.
        msd: decoder 1's features M_1..M_5 (the gates of decoder 2, and half of the feedback).
        grad: decoder 2's features G_1..G_5 (the other half of the feedback).
        features: the RFB features R_i the decoders saw, feedback included (R_i + F_i).
    """

    p1: torch.Tensor
    p2: torch.Tensor
    side: List[torch.Tensor]
    msd: List[torch.Tensor]
    grad: List[torch.Tensor]
    features: List[torch.Tensor]


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
        act: activation type and arguments; run in place where the activation allows it.
        inference_passes: passes run in eval mode, each after the first fed with the previous
            pass's feedback; 1 is the published behaviour.
        checkpointing: in training, recompute during the backward pass what the forward pass
            computed, instead of keeping it. ``"lazy"`` keeps each convolution's output (but for the
            RFB branches' 1×1 and 1×k ones, run again) and rebuilds everything between them (normalisation,
            activation, differences, sums, gates, interpolation) one tensor at a time, when backward
            needs it (:mod:`mgrad_net.networks.lazy`); gradients equal ``"none"``'s within float
            rounding (autograd sums some of them in another order). ``"selective"`` keeps the same
            convolution outputs through PyTorch's selective checkpointing, per encoder level and
            decoder, bit-identical to ``"none"`` but rebuilding a whole block at once in backward.
            ``"full"`` (or ``True``) keeps only each block's inputs and recomputes everything, one
            more forward pass of time; ``"none"`` (or ``False``) keeps everything. BatchNorm's
            running statistics are updated once in every mode. At full size on our CPU (batch 8,
            224²) a 3-pass training step peaked at 13.5 GB without recomputation, 8.7 GB selective,
            6.9 GB full and 5.0-5.3 GB lazy (``scripts/benchmark.md``); at small widths the per-operation
            overhead dominates, so ``"auto"``, the default, is ``"lazy"`` when one first-stage
            activation of the batch (batch × ``features[0]`` × spatial size) holds at least
            :attr:`auto_selective_elements` values and ``"none"`` otherwise. Under
            ``torch.compile`` no mode applies, the compiler decides what to keep.
        cpu_micro_batch: in eval mode on a CPU, run a batch this many samples at a time (0: all at
            once). Each sample's output is the same either way; small chunks keep the full-resolution
            activations in cache, which on our 2-core CPU made batch 8 run 1.24 s/slice whole and
            0.96 s/slice in chunks of 1 (``scripts/benchmark.md``). GPUs always get the whole batch.
        channels_last: hold the convolution weights, and feed the input, in channels-last memory
            format (``channels_last_3d`` for ``spatial_dims=3``); what the network computes is the
            same, only oneDNN's kernels differ. ``None`` (default): on where we measured it faster,
            a 2D network built on a CPU with AVX-512 and no CUDA device in sight (a training pass
            20-25 % faster at full size, the CPU preset's step in about half the time); off on AVX2
            CPUs (oneDNN's channels-last weight gradient ran at a quarter of its NCHW speed there)
            and where CUDA is available (not measured). See :func:`default_channels_last`.
    """

    # read only in eager training; TorchScript need not compile it
    __jit_unused_properties__ = ["checkpoint_mode"]
    # "auto" recomputes (lazily) from here: 2**24 fp32 values is a 64 MB tensor. The full network
    # at batch 8, 224², holds 25.7 M; the CPU preset (16 wide, 128², batch 12: 3.1 M) trained 20 %
    # slower with selective checkpointing, whose per-operation overhead dominates at small widths.
    auto_selective_elements: int = 2**24

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
        act: Union[tuple, str] = "relu",
        inference_passes: int = 1,
        checkpointing: Union[bool, str] = "auto",
        cpu_micro_batch: int = 1,
        channels_last: Optional[bool] = None,
    ) -> None:
        super().__init__()
        # a bundle's `--network_def#use_rfb false` arrives as the text 'false', which is truthy
        use_rfb, side_outputs = flag(use_rfb, "use_rfb"), flag(side_outputs, "side_outputs")
        if spatial_dims not in (1, 2, 3):
            raise ValueError(f"spatial_dims must be 1, 2 or 3, got {spatial_dims}.")
        if len(features) != LEVELS:
            raise ValueError(f"features must hold {LEVELS} encoder widths, got {tuple(features)}.")
        if _CHECKPOINT_MODES.get(checkpointing) is None:
            raise ValueError(f"checkpointing must be one of {sorted(map(str, _CHECKPOINT_MODES))}, got {checkpointing!r}.")
        if inference_passes < 1:
            raise ValueError(f"inference_passes must be at least 1, got {inference_passes}.")
        self.spatial_dims = spatial_dims
        self.levels = LEVELS
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.feedback_weight = float(feedback_weight)
        self.inference_passes = int(inference_passes)
        self.checkpointing = checkpointing
        self.first_width = int(features[0])
        self.cpu_micro_batch = int(cpu_micro_batch)
        self.size_divisor = 2 ** (self.levels - 1)
        self.mode = _INTERP_MODES[spatial_dims]
        act = inplace_act(act)

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
        if channels_last is None:
            self.channels_last = default_channels_last(spatial_dims)
        else:
            self.channels_last = flag(channels_last, "channels_last")
        if self.channels_last and spatial_dims == 1:
            raise ValueError("channels_last needs spatial_dims 2 or 3, got 1.")
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
            # oneDNN picks channels-last kernels only when input and weight both are
            if x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            else:
                x = x.contiguous(memory_format=torch.channels_last_3d)
        mode = "none"
        if not torch.jit.is_scripting():
            mode = self.recompute_mode(x)
            if mode == "lazy":
                return self._lazy_pass(x, feedback)
        return self._pass(x, feedback, mode)

    def _pass(self, x: torch.Tensor, feedback: Optional[List[torch.Tensor]], mode: str) -> MGRADOutput:
        checkpointed = mode == "selective" or mode == "full"
        e = x
        r: List[torch.Tensor] = []
        for i, (stage, rfb) in enumerate(zip(self.encoder, self.rfbs)):
            if i > 0:
                e = self._pool(e)
            if checkpointed:
                e, ri = self._recompute_level(i, e, mode == "selective")
            else:
                e = stage(e)
                ri = rfb(e)
            r.append(_kept(ri))
        if feedback is not None:
            r = [_kept(add([r[i], feedback[i]])) for i in range(self.levels)]
        up = upsample_levels(r, self.mode)
        if checkpointed:
            p1, m, p2, g = self._recompute_decoders(r, up, mode == "selective")
        else:
            p1, m = self.msd(r, up)
            m = [_kept(t) for t in m]
            p2, g = self.grad(r, m, up)
        return MGRADOutput(p1, p2, self.side(m), m, [_kept(t) for t in g], r)

    def _pool(self, e: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            if lazy_active():
                return lazy_op(self.pool, e)
        return self.pool(e)

    @property
    def checkpoint_mode(self) -> str:
        """``"none"``, ``"lazy"``, ``"selective"``, ``"full"`` or ``"auto"``: what :attr:`checkpointing` asks for."""
        return _CHECKPOINT_MODES[self.checkpointing]

    @torch.jit.unused
    def recompute_mode(self, x: torch.Tensor) -> str:
        """What a pass over ``x`` recomputes: ``"none"``, ``"lazy"``, ``"selective"`` or ``"full"``.

        ``"none"`` outside eager training with gradients, whatever :attr:`checkpointing` says;
        ``"auto"`` resolves by the size of ``x``'s first-stage activation.
        """
        if not (self.training and torch.is_grad_enabled()) or torch.compiler.is_compiling():
            return "none"
        mode = self.checkpoint_mode
        if mode == "auto":
            first_stage = x.shape[0] * self.first_width * math.prod(x.shape[2:])
            mode = "lazy" if first_stage >= self.auto_selective_elements else "none"
        return mode

    @torch.jit.unused
    def _lazy_pass(self, x: torch.Tensor, feedback: Optional[List[torch.Tensor]]) -> MGRADOutput:
        with lazy_recompute():
            return self._pass(x, feedback, "lazy")

    @torch.jit.unused
    def _recompute_level(self, i: int, e: torch.Tensor, selective: bool) -> Tuple[torch.Tensor, torch.Tensor]:
        e = _checkpoint(self.encoder[i], selective, e)
        return e, _checkpoint(self.rfbs[i], selective, e)

    @torch.jit.unused
    def _recompute_decoders(
        self, r: List[torch.Tensor], up: List[torch.Tensor], selective: bool
    ) -> Tuple[torch.Tensor, List[torch.Tensor], torch.Tensor, List[torch.Tensor]]:
        p1, m = _checkpoint(self.msd, selective, r, up)
        p2, g = _checkpoint(self.grad, selective, r, m, up)
        return p1, m, p2, g

    def forward(
        self, x: torch.Tensor, feedback: Optional[List[torch.Tensor]] = None
    ) -> Union[torch.Tensor, MGRADOutput]:
        if self.training:
            return self.forward_all(x, feedback)
        chunk = self.cpu_micro_batch
        if chunk > 0 and not torch.jit.is_tracing() and x.device.type == "cpu" and x.shape[0] > chunk:
            # a traced graph would freeze the chunk boundaries of the batch size it was traced with
            outputs: List[torch.Tensor] = []
            for start in range(0, x.shape[0], chunk):
                fb: Optional[List[torch.Tensor]] = None
                if feedback is not None:
                    fb = [f[start : start + chunk] for f in feedback]
                outputs.append(self._predict(x[start : start + chunk], fb))
            return torch.cat(outputs, dim=0)
        return self._predict(x, feedback)

    def _predict(self, x: torch.Tensor, feedback: Optional[List[torch.Tensor]]) -> torch.Tensor:
        out = self.forward_all(x, feedback)
        for _ in range(self.inference_passes - 1):
            out = self.forward_all(x, self.feedback(out))
        return out.p1 + out.p2

    def feedback(self, out: MGRADOutput) -> List[torch.Tensor]:
        """The feedback F_i = λ·(G_i − M_i) of eq. 7 for the next pass, detached from the graph."""
        return [(self.feedback_weight * (g - m)).detach() for m, g in zip(out.msd, out.grad)]
