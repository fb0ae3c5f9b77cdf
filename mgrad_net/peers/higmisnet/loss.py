"""Hi-gMISnet's generator losses (Talukder et al., Phys. Med. Biol. 69, 2024): segmentation, deep
supervision of the attention-gate maps and the reciprocal loss between the two generators, made
differentiable (:func:`reciprocal_loss`)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.losses import DiceLoss, SSIMLoss
from monai.networks import one_hot

from mgrad_net.outputs import HiGMISnetOutput

__all__ = ["HiGMISnetLoss", "reciprocal_loss", "soft_and", "soft_or"]


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
