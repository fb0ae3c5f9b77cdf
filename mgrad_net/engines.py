"""The T-pass feedback training step of MGRAD-UNet (eq. 7) as a MONAI ``SupervisedTrainer``."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from monai.data import MetaTensor
from monai.engines import SupervisedTrainer
from monai.engines.utils import IterationEvents
from monai.utils.enums import CommonKeys as Keys

from mgrad_net.networks.mgrad_unet import MGRADOutput

__all__ = ["FeedbackTrainer", "logits_of"]


def logits_of(output: Any) -> torch.Tensor:
    """The segmentation logits of a network output: ``P_1 + P_2`` of an :class:`MGRADOutput`, else itself."""
    if isinstance(output, MGRADOutput):
        return output.p1 + output.p2
    return output


class FeedbackTrainer(SupervisedTrainer):
    """``SupervisedTrainer`` whose iteration runs MGRAD-UNet's gate-control feedback scheme.

    Each batch gets ``feedback_passes`` passes. Pass 1 has no feedback; pass t > 1 is fed
    ``network.feedback(output)`` of pass t − 1 (λ·(G − M), detached). As in the published
    code, every pass computes its own loss and takes its own optimizer step. ``feedback_passes=1``
    is plain training. A network without a ``feedback`` method (a baseline swapped in through a
    config) gets plain steps, one per pass, on the same batch.

    The engine output holds ``image``, ``label``, ``pred`` (the logits ``P_1 + P_2`` of the last
    pass, as an eval-mode forward would give) and ``loss`` (the mean of the passes' losses), as
    MONAI handlers expect; ``engine.state.pass_losses`` lists each pass's loss (kept out of the
    output, which MONAI decollates per sample). FORWARD_COMPLETED,
    LOSS_COMPLETED and BACKWARD_COMPLETED fire once per pass (before that pass's optimizer step),
    MODEL_COMPLETED once per batch.

    With ``amp=True``, autocast runs in float16 with gradient scaling on CUDA and in bfloat16
    without scaling on a CPU (``amp_kwargs`` may set another dtype). With ``compile=True`` the
    network is ``torch.compile``-d (by ``SupervisedTrainer``) and fed plain tensors.

    Args:
        feedback_passes: passes per batch, T (3 in the published code).
        args, kwargs: those of :class:`monai.engines.SupervisedTrainer`.
    """

    def __init__(self, *args: Any, feedback_passes: int = 3, **kwargs: Any) -> None:
        if feedback_passes < 1:
            raise ValueError(f"feedback_passes must be at least 1, got {feedback_passes}.")
        if kwargs.get("accumulation_steps", 1) != 1:
            raise ValueError("FeedbackTrainer steps the optimizer every pass: accumulation_steps must be 1.")
        super().__init__(*args, **kwargs)
        self.feedback_passes = feedback_passes

    def _autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        if not self.amp:
            return contextlib.nullcontext()
        if device.type == "cuda":
            return torch.autocast("cuda", **self.amp_kwargs)
        kwargs = {"dtype": torch.bfloat16, **self.amp_kwargs}
        return torch.autocast(device.type, **kwargs)

    def _iteration(self, engine: FeedbackTrainer, batchdata: dict[str, torch.Tensor]) -> dict:  # type: ignore[override]
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        batch = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)
        if len(batch) == 2:
            inputs, targets = batch
            args: tuple = ()
            kwargs: dict = {}
        else:
            inputs, targets, args, kwargs = batch
        if engine.compile:
            # torch.compile traces plain tensors; MetaTensor's metadata is not needed for training
            inputs, targets = (t.as_tensor() if isinstance(t, MetaTensor) else t for t in (inputs, targets))
        engine.state.output = {Keys.IMAGE: inputs, Keys.LABEL: targets}

        network = engine.network
        core = getattr(network, "module", network)  # DistributedDataParallel wraps the model
        feedback_fn = getattr(core, "feedback", None)
        scaler = engine.scaler if inputs.device.type == "cuda" else None
        network.train()

        feedback = None
        pass_losses = []
        for t in range(self.feedback_passes):
            engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
            extra = dict(kwargs) if feedback is None else {**kwargs, "feedback": feedback}
            with self._autocast(inputs.device):
                output = engine.inferer(inputs, network, *args, **extra)
                engine.state.output[Keys.PRED] = logits_of(output)
                engine.fire_event(IterationEvents.FORWARD_COMPLETED)
                loss = engine.loss_function(output, targets).mean()
                engine.state.output[Keys.LOSS] = loss
                engine.fire_event(IterationEvents.LOSS_COMPLETED)
            if engine.amp and scaler is not None:
                scaler.scale(loss).backward()
                engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
                scaler.step(engine.optimizer)
                scaler.update()
            else:
                loss.backward()
                engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
                engine.optimizer.step()
            pass_losses.append(loss.detach())
            if feedback_fn is not None and t + 1 < self.feedback_passes and isinstance(output, MGRADOutput):
                feedback = feedback_fn(output)

        engine.state.output[Keys.LOSS] = torch.stack(pass_losses).mean()
        engine.state.pass_losses = pass_losses
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output
