"""Hi-gMISnet's adversarial training step: the pGAN of Talukder et al. (Phys. Med. Biol. 69, 2024)
as a ``SupervisedTrainer`` iteration, with its losses.

- :class:`HiGMISnetLoss`: the generators' non-adversarial terms: segmentation (×25), deep
  supervision of the attention-gate maps (5, 5, 5, 5, 3, 3) and the reciprocal loss, made
  differentiable (:func:`reciprocal_loss`).
- :class:`AdversarialStep`: per batch, one forward of both generators; the two PatchGAN
  discriminators' step (MAE × 0.5 on real and generated pairs); then the generators' step
  (adversarial BCE × 1 + :class:`HiGMISnetLoss`). One optimizer per network.
- :class:`SchedulerGroup`: one epoch-level LR schedule over the four optimizers, as the bundle's
  ``lr_scheduler`` (its ``LrScheduleHandler``, ``TrainingBudget`` and checkpoint use it as one).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.engines import SupervisedTrainer
from monai.engines.utils import IterationEvents
from monai.losses import DiceLoss, PatchAdversarialLoss, SSIMLoss
from monai.networks import one_hot
from monai.utils.enums import CommonKeys as Keys

from mgrad_net.engines.supervised import autocast, prepare_batch
from mgrad_net.networks.higmisnet import HiGMISnetOutput

__all__ = ["HiGMISnetLoss", "AdversarialStep", "SchedulerGroup", "reciprocal_loss", "soft_and", "soft_or"]


def soft_and(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Differentiable AND of two probability maps: ``p·q`` (the logical AND on {0, 1})."""
    return p * q


def soft_or(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Differentiable OR of two probability maps: ``p + q − p·q`` (the logical OR on {0, 1})."""
    return p + q - p * q


def _boundary(target: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
    """The notebook's boundary term: ``|mean(|∂y t| − |∂y p|)| + |mean(|∂x t| − |∂x p|)|``
    with forward differences (``tf.image.image_gradients``), over the last two axes."""
    terms = []
    for dim in (-2, -1):
        dt, dp = torch.diff(target, dim=dim).abs(), torch.diff(pred, dim=dim).abs()
        terms.append((dt - dp).mean().abs())
    return terms[0] + terms[1]


def reciprocal_loss(
    image: torch.Tensor,
    foreground: torch.Tensor,
    background: torch.Tensor,
    target: torch.Tensor,
    ssim: SSIMLoss,
    weights: Sequence[float] = (5.0, 2.0, 5.0),
) -> torch.Tensor:
    """Hi-gMISnet's reciprocal loss between the two generators, soft (differentiable) and per class.

    ``foreground`` holds the foreground generator's class probabilities ``p`` (B, C, H, W),
    ``background`` the background generator's complements ``q`` (``q_c ≈ 1 − [y = c]``), and
    ``target`` the one-hot label. With ``OR = p + q − p·q`` and ``AND = p·(1 − q)``, per class:

    - image term (weight ``weights[0]``): ``0.4·(−log SSIM(img, img·OR)) + 0.6·MSE(img, img·OR)``:
      together the two generators should cover the whole image;
    - mask term (``weights[1]``): ``MAE(target, AND)``: foreground and NOT background is the mask;
    - boundary term (``weights[2]``): the notebook's image-gradient term between target and AND.

    The notebook computes this from NumPy-rounded predictions and attaches it with ``add_loss``,
    so it passes no gradient to either generator; the soft AND/OR equal the logical ones on
    {0, 1} and pass gradients to both. For C = 2 classes the class-1 terms are the notebook's;
    the C classes are averaged. The image must be scaled to [0, 1] (SSIM's data range).
    """
    or_ = soft_or(foreground, background)  # (B, C, H, W)
    and_ = soft_and(foreground, 1 - background)
    b, c = or_.shape[:2]
    img = image.float()
    recon = (img.unsqueeze(1) * or_.float().unsqueeze(2)).flatten(0, 1)  # (B·C, channels, H, W)
    ref = img.unsqueeze(1).expand(-1, c, *img.shape[1:]).flatten(0, 1)
    ssim_value = (1 - ssim(recon, ref)).clamp_min(1e-6)
    image_term = 0.4 * -torch.log(ssim_value) + 0.6 * F.mse_loss(recon, ref)
    mask_term = F.l1_loss(and_, target)
    return weights[0] * image_term + weights[1] * mask_term + weights[2] * _boundary(target, and_)


class HiGMISnetLoss(nn.Module):
    """The non-adversarial terms of both generators' objective, as the notebook weighs them.

    Called as ``loss(output, label, image)`` with a :class:`HiGMISnetOutput`, the label map
    ``(B, 1, H, W)`` and the image; returns a dict of the weighted terms and their ``"total"``:

    - ``seg_fg``: ``segmentation_weight`` (25) × segmentation loss of the foreground generator's C
      logits against the one-hot label: ``lambda_dice``·Dice + ``lambda_ce``·cross-entropy
      (softmax). The notebook's binary BCE is ``lambda_dice=0, lambda_ce=1``; the default is the
      comparison protocol's 0.7 Dice + 0.3 CE in the notebook's ×25 slot.
    - ``seg_bg``: the same weight × ``lambda_dice``·Dice + ``lambda_ce``·BCE of the background
      generator's C sigmoid logits against the complements ``1 − one-hot`` (MONAI's
      ``DiceCELoss`` uses a softmax cross-entropy for multi-channel inputs, which does not fit
      independent complements, so ``DiceLoss`` and ``BCEWithLogits`` are combined here).
    - ``deep_fg``, ``deep_bg``: BCE of each gate's additive and subtractive maps against the
      generator's binary target (foreground union, resp. background), area-resized to the map,
      weighted ``deep_weights`` per level (shallowest first: 5, 5, 3; both maps of a level share
      the weight). In the notebook two of the twelve map targets (the foreground generator's
      level-2 subtractive map, the background generator's level-2 additive map) are the other
      generator's target while all others are the generator's own; read as slips, fixed here.
    - ``reciprocal``: :func:`reciprocal_loss` (weights 5, 2, 5), with gradients to both generators.

    Args:
        segmentation_weight: weight of each segmentation term (25).
        lambda_dice, lambda_ce: the segmentation loss's mix.
        deep_weights: per supervised level, shallowest first.
        reciprocal_weights: image, mask and boundary weights of :func:`reciprocal_loss`.
    """

    def __init__(
        self,
        segmentation_weight: float = 25.0,
        lambda_dice: float = 0.7,
        lambda_ce: float = 0.3,
        deep_weights: Sequence[float] = (5.0, 5.0, 3.0),
        reciprocal_weights: Sequence[float] = (5.0, 2.0, 5.0),
    ) -> None:
        super().__init__()
        self.segmentation_weight = float(segmentation_weight)
        self.lambda_dice, self.lambda_ce = float(lambda_dice), float(lambda_ce)
        self.deep_weights = [float(w) for w in deep_weights]
        self.reciprocal_weights = [float(w) for w in reciprocal_weights]
        self.dice_softmax = DiceLoss(softmax=True)
        self.dice_sigmoid = DiceLoss(sigmoid=True)
        self.ssim = SSIMLoss(spatial_dims=2, data_range=1.0)

    def _deep(self, maps: list, target: torch.Tensor) -> torch.Tensor:
        total = target.new_zeros(())
        for weight, level in zip(self.deep_weights, maps):
            t = (
                F.interpolate(target, size=level.additive.shape[2:], mode="area")
                if level.additive.shape[2:] != target.shape[2:]
                else target
            )
            for logit in level:
                total = total + weight * F.binary_cross_entropy_with_logits(logit.float(), t)
        return total

    def forward(self, output: HiGMISnetOutput, label: torch.Tensor, image: torch.Tensor) -> dict[str, torch.Tensor]:
        fg, bg = output.foreground.logits.float(), output.background.logits.float()
        target = one_hot(label.long(), num_classes=fg.shape[1], dim=1).float()
        seg_fg = self.lambda_dice * self.dice_softmax(fg, target) + self.lambda_ce * F.cross_entropy(fg, target)
        seg_bg = self.lambda_dice * self.dice_sigmoid(
            bg, 1 - target
        ) + self.lambda_ce * F.binary_cross_entropy_with_logits(bg, 1 - target)
        union = 1 - target[:, :1]  # any foreground class
        terms = {
            "seg_fg": self.segmentation_weight * seg_fg,
            "seg_bg": self.segmentation_weight * seg_bg,
            "deep_fg": self._deep(output.foreground.maps, union),
            "deep_bg": self._deep(output.background.maps, 1 - union),
            "reciprocal": reciprocal_loss(
                image, torch.softmax(fg, 1), torch.sigmoid(bg), target, self.ssim, self.reciprocal_weights
            ),
        }
        terms["total"] = sum(terms.values())
        return terms


def _requires_grad(module: nn.Module, flag: bool) -> None:
    for p in module.parameters():
        p.requires_grad_(flag)


class AdversarialStep:
    """Hi-gMISnet's pGAN training iteration for MONAI's ``SupervisedTrainer`` (``iteration_update``).

    The engine's ``network`` is a :class:`~mgrad_net.networks.HiGMISnet`, its ``optimizer`` the
    foreground generator's and its ``loss_function`` a :class:`HiGMISnetLoss`; this step holds the
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
       :class:`HiGMISnetLoss` (segmentation, deep supervision, the reciprocal term, which reaches
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
