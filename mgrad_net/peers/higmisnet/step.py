"""Hi-gMISnet's adversarial training step: the pGAN of Talukder et al. (Phys. Med. Biol. 69, 2024)
as a ``SupervisedTrainer`` iteration.

- :class:`AdversarialStep`: per batch, one forward of both generators; the two PatchGAN
  discriminators' step (MAE × 0.5 on real and generated pairs); then the generators' step
  (adversarial BCE × 1 + :class:`~mgrad_net.peers.higmisnet.HiGMISnetLoss`). One optimizer per network.
- :class:`SchedulerGroup`: one epoch-level LR schedule over the four optimizers, as the bundle's
  ``lr_scheduler`` (its ``LrScheduleHandler``, ``TrainingBudget`` and checkpoint use it as one).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
from monai.engines import SupervisedTrainer
from monai.engines.utils import IterationEvents
from monai.losses import PatchAdversarialLoss
from monai.networks import one_hot
from monai.utils.enums import CommonKeys as Keys

from mgrad_net.engines.supervised import autocast, prepare_batch
from mgrad_net.outputs import HiGMISnetOutput

__all__ = ["AdversarialStep", "SchedulerGroup"]


def _requires_grad(module: nn.Module, flag: bool) -> None:
    for p in module.parameters():
        p.requires_grad_(flag)


class AdversarialStep:
    """Hi-gMISnet's pGAN training iteration for MONAI's ``SupervisedTrainer`` (``iteration_update``).

    The engine's ``network`` is a :class:`~mgrad_net.peers.higmisnet.HiGMISnet`, its ``optimizer`` the
    foreground generator's and its ``loss_function`` a :class:`~.loss.HiGMISnetLoss`; this step holds the
    rest: the two discriminators (MONAI ``PatchDiscriminator``, fed the image concatenated with a
    C-channel mask: class probabilities for the foreground pair, complements for the background
    pair) and their optimizers, and the background generator's optimizer. Each batch:

    1. both generators' forward (training mode);
    2. discriminators: ``discriminator_weight`` (0.5) × [MAE(σ(D(img, real)), 1) + MAE(σ(D(img,
       generated)), 0)] each, generated masks detached, one optimizer step each (the notebook
       calls ``train_on_batch`` on the real and the generated pair in turn; here one step on
       their sum);
    3. generators, with the discriminators frozen: ``adversarial_weight`` (1) × BCE(σ(D(img,
       generated)), 1) each (MONAI's ``PatchAdversarialLoss``, criterion ``bce``) plus
       :class:`~.loss.HiGMISnetLoss` (segmentation, deep supervision, the reciprocal term, which reaches
       both generators); one backward, one optimizer step each.

    ``LOSS_COMPLETED`` and ``BACKWARD_COMPLETED`` fire once per phase (discriminators, then
    generators), so ``StopOnNonFiniteLoss`` stops before a non-finite loss reaches either step.
    The engine output holds ``image``, ``label``, ``pred`` (the combined logits, as eval mode
    gives them), and ``loss`` (the generators' objective); ``engine.state.gan_losses`` has every
    term. With ``engine.amp`` the forwards run under autocast (one ``GradScaler`` for all steps on
    CUDA).

    Args:
        discriminator_fg, discriminator_bg: the two PatchGAN discriminators.
        optimizer_bg: the background generator's optimizer.
        optimizer_d_fg, optimizer_d_bg: the discriminators' optimizers.
        adversarial_weight: weight of each generator's adversarial term (1).
        discriminator_weight: weight of each discriminator's MAE terms (0.5).
    """

    def __init__(
        self,
        discriminator_fg: nn.Module,
        discriminator_bg: nn.Module,
        optimizer_bg: torch.optim.Optimizer,
        optimizer_d_fg: torch.optim.Optimizer,
        optimizer_d_bg: torch.optim.Optimizer,
        adversarial_weight: float = 1.0,
        discriminator_weight: float = 0.5,
    ) -> None:
        self.discriminators = (discriminator_fg, discriminator_bg)
        self.optimizer_bg = optimizer_bg
        self.d_optimizers = (optimizer_d_fg, optimizer_d_bg)
        self.adversarial_weight = float(adversarial_weight)
        self.discriminator_weight = float(discriminator_weight)
        self.adversarial = PatchAdversarialLoss(criterion="bce")

    @staticmethod
    def _logits(discriminator: nn.Module, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        out = discriminator(torch.cat([image, mask.to(image.dtype)], dim=1))
        return out[-1] if isinstance(out, (list, tuple)) else out  # PatchDiscriminator: features…, output

    def __call__(self, engine: SupervisedTrainer, batchdata: dict) -> dict:
        inputs, targets, args, kwargs = prepare_batch(engine, batchdata)
        engine.state.output = {Keys.IMAGE: inputs, Keys.LABEL: targets}
        network = engine.network
        scaler = engine.scaler if engine.amp and inputs.device.type == "cuda" else None
        g_optimizers = (engine.optimizer, self.optimizer_bg)
        network.train()
        for d in self.discriminators:
            d.train()

        with autocast(engine, inputs.device):
            output: HiGMISnetOutput = engine.inferer(inputs, network, *args, **kwargs)
        engine.state.output[Keys.PRED] = output.logits
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        classes = output.foreground.logits.shape[1]
        real_fg = one_hot(targets.long(), num_classes=classes, dim=1).float()
        fakes = (torch.softmax(output.foreground.logits.float(), 1), torch.sigmoid(output.background.logits.float()))
        reals = (real_fg, 1 - real_fg)

        # 1. the discriminators, on real pairs and on generated pairs (detached)
        for opt in self.d_optimizers:
            opt.zero_grad(set_to_none=True)
        d_terms = []
        with autocast(engine, inputs.device):
            for d, real, fake in zip(self.discriminators, reals, fakes):
                on_real = torch.sigmoid(self._logits(d, inputs, real).float())
                on_fake = torch.sigmoid(self._logits(d, inputs, fake.detach()).float())
                d_terms.append(self.discriminator_weight * ((1 - on_real).mean() + on_fake.mean()))
        d_loss = d_terms[0] + d_terms[1]
        engine.state.output[Keys.LOSS] = d_loss
        engine.fire_event(IterationEvents.LOSS_COMPLETED)
        (scaler.scale(d_loss) if scaler is not None else d_loss).backward()
        engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
        for opt in self.d_optimizers:
            scaler.step(opt) if scaler is not None else opt.step()

        # 2. the generators, against the updated, frozen discriminators
        for opt in g_optimizers:
            opt.zero_grad(set_to_none=engine.optim_set_to_none)
        for d in self.discriminators:
            _requires_grad(d, False)
        try:
            with autocast(engine, inputs.device):
                adv = [
                    self.adversarial(
                        self._logits(d, inputs, fake).float(), target_is_real=True, for_discriminator=False
                    )
                    for d, fake in zip(self.discriminators, fakes)
                ]
                terms = engine.loss_function(output, targets, inputs)
            g_loss = self.adversarial_weight * (adv[0] + adv[1]) + terms["total"]
            engine.state.output[Keys.LOSS] = g_loss
            engine.fire_event(IterationEvents.LOSS_COMPLETED)
            (scaler.scale(g_loss) if scaler is not None else g_loss).backward()
            engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
        finally:
            for d in self.discriminators:
                _requires_grad(d, True)
        for opt in g_optimizers:
            scaler.step(opt) if scaler is not None else opt.step()
        if scaler is not None:
            scaler.update()

        engine.state.output[Keys.LOSS] = g_loss.detach()
        losses = {"d_fg": d_terms[0], "d_bg": d_terms[1], "adv_fg": adv[0], "adv_bg": adv[1]}
        losses.update({k: v for k, v in terms.items() if k != "total"})
        engine.state.gan_losses = {k: float(v.detach()) for k, v in losses.items()}
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output


class SchedulerGroup:
    """Several epoch-level LR schedulers stepped, saved and resized as one (the bundle's
    ``lr_scheduler``: ``LrScheduleHandler`` steps it and prints ``_last_lr[0]``, ``TrainingBudget``
    sets ``total_iters``, the checkpoint saves its ``state_dict``).

    Args:
        schedulers: the schedulers, e.g. one ``PolynomialLR`` per optimizer.
    """

    def __init__(self, schedulers: Sequence[Any]) -> None:
        self.schedulers = list(schedulers)
        if not self.schedulers:
            raise ValueError("SchedulerGroup needs at least one scheduler.")

    def step(self, *args: Any) -> None:
        for s in self.schedulers:
            s.step(*args)

    def get_last_lr(self) -> list[float]:
        return [lr for s in self.schedulers for lr in s.get_last_lr()]

    @property
    def _last_lr(self) -> list[float]:
        return self.get_last_lr()

    @property
    def total_iters(self) -> int:
        return getattr(self.schedulers[0], "total_iters")

    @total_iters.setter
    def total_iters(self, value: int) -> None:
        for s in self.schedulers:
            if hasattr(s, "total_iters"):
                s.total_iters = value

    def state_dict(self) -> dict:
        return {"schedulers": [s.state_dict() for s in self.schedulers]}

    def load_state_dict(self, state: dict) -> None:
        states = state["schedulers"]
        if len(states) != len(self.schedulers):
            raise ValueError(
                f"SchedulerGroup: the state holds {len(states)} schedulers, this group {len(self.schedulers)}."
            )
        for s, st in zip(self.schedulers, states):
            s.load_state_dict(st)
