"""MGRAD-UNet's training step and the bundle's trainer, on MONAI's ``SupervisedTrainer``.

MONAI's ``SupervisedTrainer`` takes an ``iteration_update(engine, batchdata)`` that replaces its
default iteration; a step here is such a callable. :class:`FeedbackStep` is MGRAD-UNet's T-pass
gate-control feedback step (eq. 7). :class:`FeedbackTrainer` is ``SupervisedTrainer`` with that
step, the bundle's trainer. Networks whose method trains differently (a diffusion loss, an
adversarial step) bring a step of their own and the same trainer runs it. :class:`TrainingBudget`
ends a training after a given number of minutes, the comparison protocol's budget;
:func:`native_mixed_precision` says where autocast is fast hardware rather than emulation, and
:class:`EvaluatorAutocast` gives MONAI's evaluators (which autocast on CUDA only) bf16 on a CPU.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import torch
from ignite.engine import Engine, Events
from monai.data import MetaTensor
from monai.engines import SupervisedTrainer
from monai.engines.utils import IterationEvents
from monai.utils.enums import CommonKeys as Keys

from mgrad_net.outputs import MGRADOutput

__all__ = [
    "EvaluatorAutocast",
    "FeedbackStep",
    "FeedbackTrainer",
    "TrainingBudget",
    "autocast",
    "logits_of",
    "native_mixed_precision",
]


def logits_of(output: Any) -> torch.Tensor:
    """The segmentation logits of a network output: ``P_1 + P_2`` of an :class:`MGRADOutput`, else itself."""
    return output.logits if isinstance(output, MGRADOutput) else output


def autocast(engine: SupervisedTrainer, device: torch.device) -> contextlib.AbstractContextManager:
    """The engine's mixed precision: float16 on CUDA (with the engine's gradient scaler), bfloat16
    on a CPU (``engine.amp_kwargs`` may set another dtype); nothing when ``engine.amp`` is off."""
    if not engine.amp:
        return contextlib.nullcontext()
    if device.type == "cuda":
        return torch.autocast("cuda", **engine.amp_kwargs)
    return torch.autocast(device.type, **{"dtype": torch.bfloat16, **engine.amp_kwargs})


def native_mixed_precision(device: torch.device | str) -> bool:
    """Whether autocast runs on hardware made for it: any CUDA device (float16 tensor cores), or a
    CPU with AVX512-BF16 or AMX. Elsewhere (AVX2, plain AVX-512) oneDNN emulates bf16, slower
    than float32, so the configs' ``amp`` default stays off there."""
    if torch.device(device).type == "cuda":
        return True
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def prepare_batch(engine: SupervisedTrainer, batchdata: dict) -> tuple:
    """``(inputs, targets, args, kwargs)`` of a batch through the engine's ``prepare_batch``."""
    if batchdata is None:
        raise ValueError("Must provide batch data for current iteration.")
    batch = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)
    inputs, targets, args, kwargs = batch if len(batch) == 4 else (*batch, (), {})
    if engine.compile or getattr(engine, "compile_loss", False):
        # torch.compile traces plain tensors; MetaTensor's metadata is not needed for training
        inputs, targets = (t.as_tensor() if isinstance(t, MetaTensor) else t for t in (inputs, targets))
    return inputs, targets, args, kwargs


class FeedbackStep:
    """MGRAD-UNet's gate-control feedback scheme as a ``SupervisedTrainer`` iteration (eq. 7).

    Each batch gets ``passes`` passes. Pass 1 has no feedback; pass t > 1 is fed
    ``network.feedback(output)`` of pass t − 1 (λ·(G − M), detached). As in the published code,
    every pass computes its own loss and takes its own optimizer step. ``passes=1`` is plain
    training. ``passes`` means nothing to a network without a ``feedback`` method (a baseline or a
    peer swapped in through a config): it gets one plain step a batch, whatever ``passes`` says, so
    a config that leaves the feedback passes at MGRAD-UNet's value never trains it three times on
    each batch.

    The engine output holds ``image``, ``label``, ``pred`` (the logits ``P_1 + P_2`` of the last
    pass, as an eval-mode forward would give) and ``loss`` (the mean of the passes' losses), as
    MONAI handlers expect; ``engine.state.pass_losses`` lists each pass's loss (kept out of the
    output, which MONAI decollates per sample). FORWARD_COMPLETED, LOSS_COMPLETED and
    BACKWARD_COMPLETED fire once per pass (before that pass's optimizer step), MODEL_COMPLETED once
    per batch. With ``engine.amp`` the passes run under :func:`autocast`.

    Args:
        passes: passes per batch, T (3 in the published code).
    """

    def __init__(self, passes: int = 3) -> None:
        if passes < 1:
            raise ValueError(f"feedback_passes must be at least 1, got {passes}.")
        self.passes = int(passes)

    def __call__(self, engine: SupervisedTrainer, batchdata: dict) -> dict:
        inputs, targets, args, kwargs = prepare_batch(engine, batchdata)
        engine.state.output = {Keys.IMAGE: inputs, Keys.LABEL: targets}
        network = engine.network
        core = getattr(network, "module", network)  # DistributedDataParallel wraps the model
        feedback_fn = getattr(core, "feedback", None)
        passes = self.passes if callable(feedback_fn) else 1
        scaler = engine.scaler if engine.amp and inputs.device.type == "cuda" else None
        network.train()

        feedback = None
        pass_losses = []
        for t in range(passes):
            engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
            extra = dict(kwargs) if feedback is None else {**kwargs, "feedback": feedback}
            with autocast(engine, inputs.device):
                output = engine.inferer(inputs, network, *args, **extra)
                engine.state.output[Keys.PRED] = logits_of(output)
                engine.fire_event(IterationEvents.FORWARD_COMPLETED)
                loss = engine.loss_function(output, targets).mean()
                engine.state.output[Keys.LOSS] = loss
                engine.fire_event(IterationEvents.LOSS_COMPLETED)
            (scaler.scale(loss) if scaler is not None else loss).backward()
            engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
            if scaler is not None:
                scaler.step(engine.optimizer)
                scaler.update()
            else:
                engine.optimizer.step()
            pass_losses.append(loss.detach())
            if t + 1 < passes and isinstance(output, MGRADOutput):
                feedback = feedback_fn(output)

        engine.state.output[Keys.LOSS] = torch.stack(pass_losses).mean()
        engine.state.pass_losses = pass_losses
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output


class FeedbackTrainer(SupervisedTrainer):
    """MONAI's ``SupervisedTrainer`` running :class:`FeedbackStep` unless given another step.

    Args:
        feedback_passes: passes per batch, T, of the default :class:`FeedbackStep` (a network
            without feedback takes one step a batch whatever its value).
        iteration_update: a network's own training step, ``step(engine, batchdata) -> output``;
            ``None`` for ``FeedbackStep(feedback_passes)``.
        compile_loss: run ``loss_function`` under ``torch.compile`` (its inputs as plain tensors), as
            ``compile`` does the network: MGRAD-UNet's aggregated loss is 33 softmax, cross-entropy
            and Dice evaluations at full resolution, element-wise work that the compiler fuses.
        args, kwargs: those of :class:`monai.engines.SupervisedTrainer`.
    """

    def __init__(
        self,
        *args: Any,
        feedback_passes: int = 3,
        iteration_update: Any = None,
        compile_loss: bool = False,
        **kwargs: Any,
    ) -> None:
        if kwargs.get("accumulation_steps", 1) != 1:
            raise ValueError("FeedbackTrainer steps the optimizer every pass: accumulation_steps must be 1.")
        step = iteration_update if iteration_update is not None else FeedbackStep(feedback_passes)
        super().__init__(*args, iteration_update=step, **kwargs)
        self.step = step
        self.compile_loss = bool(compile_loss)
        if self.compile_loss:
            self.loss_function = torch.compile(self.loss_function)


class TrainingBudget:
    """Stop a training after ``minutes`` of training time, validation excluded, with the epochs
    and the learning-rate schedule following the clock (the comparison protocol's budget).

    After every epoch the epochs that fit are estimated again: the epochs done, plus the time
    left divided by the median time of this process's last five epochs, its first left out once
    there are others (it carries the warm-up, so a slow first epoch no longer shortens the run;
    and a few epochs slowed by other work on the machine do not set the pace for the rest). The
    trainer's ``max_epochs`` becomes that estimate (never more than the command's
    ``max_epochs``), and so does the ``total_iters`` of ``lr_scheduler`` when it has one; a
    ``PolynomialLR`` is re-anchored to its closed form, so the rate is always
    ``base * (1 - epoch / estimate) ** power`` and reaches its end with the budget. Should the
    epochs run slower than estimated, the training stops at the end of the first epoch that ends
    past the budget: epochs are never cut, so the last one is validated and checkpointed like any
    other.

    The budget, the time spent and the estimate are part of the resumable checkpoint
    (``state_dict``): a run resumed with ``--resume`` keeps the budget it started with. MONAI's
    ``CheckpointLoader`` puts the command line's ``max_epochs`` back after loading, so each epoch
    starts by lowering it to the estimate again, and a run whose budget is spent stops before
    another epoch.

    Args:
        minutes: the budget; 0 or less for none (the handler then does nothing).
        lr_scheduler: an epoch-level scheduler whose ``total_iters`` follows the estimate.
    """

    def __init__(self, minutes: float, lr_scheduler: Any = None) -> None:
        self.seconds = float(minutes) * 60
        self.lr_scheduler = lr_scheduler
        self.spent = 0.0
        self.epochs = 0
        self.fit: int | None = None  # the epochs that fit, as last estimated
        self._cap: int | None = None  # the command's max_epochs, as this process first saw it
        self._times: list[float] = []  # this process's epoch times

    def attach(self, engine: Engine) -> None:
        if self.seconds > 0:
            engine.add_event_handler(Events.EPOCH_STARTED, self._keep_budget)
            # attach it before LrScheduleHandler: the estimate then lands before the scheduler steps
            engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def state_dict(self) -> dict[str, Any]:
        return {"seconds": self.seconds, "spent": self.spent, "epochs": self.epochs, "fit": self.fit}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "seconds" in state and float(state["seconds"]) != self.seconds:
            logging.getLogger("mgrad_net").warning(
                "resuming a run whose training budget is %.1f min: that budget is kept (this command gave %.1f)",
                float(state["seconds"]) / 60, self.seconds / 60)  # fmt: skip
            self.seconds = float(state["seconds"])
        self.spent, self.epochs = float(state["spent"]), int(state["epochs"])
        self.fit = None if state["fit"] is None else int(state["fit"])

    def _keep_budget(self, engine: Engine) -> None:
        if self._cap is None:
            self._cap = engine.state.max_epochs
        if self.fit is None:
            return
        if self.spent >= self.seconds or engine.state.epoch > self.fit:
            logging.getLogger("mgrad_net").info(
                "training budget %.1f min already spent (%.1f min, %d epochs): stopping", self.seconds / 60,
                self.spent / 60, self.epochs)  # fmt: skip
            engine.terminate()
        else:
            engine.state.max_epochs = min(engine.state.max_epochs, self.fit)

    def __call__(self, engine: Engine) -> None:
        # ignite's time of the epoch's iterations, set before EPOCH_COMPLETED's handlers run
        took = engine.state.times[Events.EPOCH_COMPLETED.name]
        self.spent += took
        self.epochs += 1
        self._times.append(took)
        log = logging.getLogger("mgrad_net")
        epoch = engine.state.epoch
        if self.spent >= self.seconds:
            if epoch < engine.state.max_epochs:
                log.info("training budget %.1f min spent after epoch %d: stopping", self.seconds / 60, epoch)
                engine.terminate()
            return
        later = sorted((self._times[1:] or self._times)[-5:])
        per_epoch = max(
            later[(len(later) - 1) // 2], 1e-9
        )  # the (lower) median of the last five: a passing slowdown is not the pace
        fit = epoch + round((self.seconds - self.spent) / per_epoch)
        total = min(self._cap if self._cap is not None else engine.state.max_epochs, fit)
        if total != engine.state.max_epochs:
            log.info("training budget %.1f min, %.1f spent: %d epochs fit (%.1f s each); max_epochs %d -> %d",
                     self.seconds / 60, self.spent / 60, fit, per_epoch, engine.state.max_epochs, total)  # fmt: skip
        self.fit = fit  # uncapped: a resumed run given a larger max_epochs goes on to it
        engine.state.max_epochs = total
        self._follow(total)

    def _follow(self, total: int) -> None:
        """The schedule's length set to ``total`` epochs; a polynomial decay's rate re-anchored to
        its closed form at the current epoch, so the next step continues the new curve."""
        scheduler = self.lr_scheduler
        if not hasattr(scheduler, "total_iters"):
            return
        scheduler.total_iters = total
        if isinstance(scheduler, torch.optim.lr_scheduler.PolynomialLR):
            left = 1.0 - min(scheduler.last_epoch, total) / total
            for group, base in zip(scheduler.optimizer.param_groups, scheduler.base_lrs):
                group["lr"] = base * left**scheduler.power


class EvaluatorAutocast:
    """bf16 autocast of a MONAI evaluator's forward on a CPU, where ``amp`` alone does nothing
    (MONAI's evaluators enter ``torch.autocast("cuda")`` only).

    Autocast is entered as each iteration starts and left once the forward completed; the
    prediction is cast back to float32 there, so postprocessing (inversion, argmax, metrics)
    runs as without it. Nothing happens on CUDA, where the evaluator's own ``amp`` applies, or
    when ``enabled`` is false.

    Args:
        device: the evaluator's device.
        enabled: the config's ``amp``.
    """

    def __init__(self, device: torch.device | str, enabled: bool) -> None:
        self.device = torch.device(device)
        self.enabled = bool(enabled) and self.device.type == "cpu"
        self._context: contextlib.AbstractContextManager | None = None

    def attach(self, engine: Engine) -> None:
        if self.enabled:
            engine.add_event_handler(Events.ITERATION_STARTED, self._enter)
            engine.add_event_handler(IterationEvents.FORWARD_COMPLETED, self._exit)

    def _enter(self, engine: Engine) -> None:
        self._exit(engine)  # an iteration that raised before its forward completed left it entered
        self._context = torch.autocast("cpu", dtype=torch.bfloat16)
        self._context.__enter__()

    def _exit(self, engine: Engine, *_: Any) -> None:
        if self._context is not None:
            self._context.__exit__(None, None, None)
            self._context = None
        output = engine.state.output
        if isinstance(output, dict) and isinstance(output.get(Keys.PRED), torch.Tensor):
            output[Keys.PRED] = output[Keys.PRED].float()
