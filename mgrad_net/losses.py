"""MGRAD-UNet's losses (Yan, Yang & Chen, Sci. Rep. 2024, eqs. 9–13 and Algorithm 1).

- :class:`SegmentationLoss`: L_seg = λ_dice·Dice + λ_ce·CE (eq. 9) on logits.
- :class:`AggregatedLoss`: Σ over the 2^n − 1 non-empty subsets s of the side outputs of
  L_seg(Σ_{i∈s} S_i) (eq. 11, Algorithm 1).
- :class:`WeightedSideLoss`: Σ w_i·L_seg(S_i) (eq. 13).
- :class:`MGRADLoss`: L_seg(P_1) + L_seg(P_2) + one of the two side losses.

Targets may be class indices (B×1×spatial) or one-hot (B×K×spatial).
"""

from __future__ import annotations

import itertools
from typing import Sequence, Union

import torch
import torch.nn as nn
from monai.losses import DiceCELoss
from monai.networks.utils import one_hot

from mgrad_net.outputs import MGRADOutput

__all__ = [
    "SegmentationLoss",
    "AggregatedLoss",
    "WeightedSideLoss",
    "MGRADLoss",
    "subset_matrix",
]


def subset_matrix(n: int, device: torch.device | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The (2^n − 1)×n 0/1 matrix whose rows are the non-empty subsets of n items, smallest first."""
    rows = [c for k in range(1, n + 1) for c in itertools.combinations(range(n), k)]
    mat = torch.zeros(len(rows), n, dtype=dtype, device=device)
    for r, members in enumerate(rows):
        mat[r, list(members)] = 1
    return mat


class SegmentationLoss(DiceCELoss):
    """L_seg of eq. 9: ``lambda_dice``·Dice(softmax(logits)) + ``lambda_ce``·CE(logits).

    The paper's text gives 0.3·Dice + 0.7·CE; the published training code computes
    0.3·CE + 0.7·Dice, and that produced the paper's tables, so the defaults follow the code.
    The Dice term is the published code's as well: softmax probabilities, background included,
    squared terms in the denominator, each class pooled over the whole batch, smoothing 1e-5,
    mean over classes.

    Args:
        lambda_dice: weight of the Dice term.
        lambda_ce: weight of the cross-entropy term.
        include_background: include class 0 in the Dice term.
        squared_pred: square probabilities and targets in the Dice denominator.
        batch: pool each class over the batch before the Dice ratio (``False``: per sample).
        smooth: added to the Dice numerator and denominator.
    """

    def __init__(
        self,
        lambda_dice: float = 0.7,
        lambda_ce: float = 0.3,
        include_background: bool = True,
        squared_pred: bool = True,
        batch: bool = True,
        smooth: float = 1e-5,
    ) -> None:
        super().__init__(
            include_background=include_background,
            softmax=True,
            squared_pred=squared_pred,
            batch=batch,
            smooth_nr=smooth,
            smooth_dr=smooth,
            lambda_dice=lambda_dice,
            lambda_ce=lambda_ce,
        )
        # the arguments, as given, for AggregatedLoss's closed form (DiceCELoss keeps the lambdas itself)
        self.include_background = include_background
        self.squared_pred = squared_pred
        self.batch = batch
        self.smooth = smooth

    @staticmethod
    def as_one_hot(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``target`` as a one-hot tensor shaped like ``logits``, from class indices or one-hot."""
        classes = logits.shape[1]
        if target.shape[1] == 1 and classes > 1:
            return one_hot(target, num_classes=classes, dim=1, dtype=logits.dtype)
        if target.shape[1] != classes:
            raise ValueError(
                f"target has {target.shape[1]} channels: expected 1 (class indices) or {classes} (one-hot), "
                f"for logits of shape {tuple(logits.shape)}."
            )
        return target.to(logits.dtype)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return super().forward(input, self.as_one_hot(input, target))


class AggregatedLoss(nn.Module):
    """Aggregated loss (eq. 11, Algorithm 1): Σ_{s ⊆ {1..n}, s ≠ ∅} L_seg(Σ_{i∈s} S_i).

    L_seg is ``seg_loss``'s eq. 9, softmax Dice plus cross-entropy, with its options (Dice weight,
    CE weight, background, squared terms, batch pooling, smoothing). Its 2^n − 1 evaluations are
    the most per-pixel work of a training step, so they are written out rather than run through
    ``DiceCELoss`` 31 times: the loss and its gradient with respect to each subset's logits have a
    closed form (:func:`_subset_seg_loss`), computed together while a block of subsets' softmax is
    at hand. Nothing of size subsets × batch × classes × spatial outlives its block (31 × B × K ×
    spatial floats, 0.45 GB at batch 8, 224², 9 classes, for the whole set): backward only scales
    the stored gradient with respect to the n side outputs. A block holds as many subsets as
    :attr:`call_elements` values: small enough to stay in the CPU's cache (measured in
    ``scripts/benchmark.md``). Tests check values and gradients against ``DiceCELoss`` on each
    subset sum.

    Args:
        seg_loss: the L_seg applied to every subset sum; a :class:`SegmentationLoss` by default.
        subsets_per_call: subsets per block; ``None``: as many as hold :attr:`call_elements` values.
    """

    # values of one block's subset sums: 2**21 floats, 8 MB (2 subsets of the preset's batch)
    call_elements: int = 2**21

    def __init__(self, seg_loss: SegmentationLoss | None = None, subsets_per_call: int | None = None) -> None:
        super().__init__()
        if subsets_per_call is not None and subsets_per_call < 1:
            raise ValueError(f"subsets_per_call must be at least 1, got {subsets_per_call}.")
        self.seg_loss = seg_loss if seg_loss is not None else SegmentationLoss()
        self.subsets_per_call = subsets_per_call

    def forward(self, side: Sequence[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        if len(side) == 0:
            raise ValueError("AggregatedLoss needs at least one side output, got none.")
        stacked = torch.stack(list(side))  # n×B×K×spatial
        onehot = self.seg_loss.as_one_hot(side[0], target)
        per_call = self.subsets_per_call or max(1, self.call_elements // side[0].numel())
        return _SubsetSegLoss.apply(stacked, onehot, self.seg_loss, per_call)


class _SubsetSegLoss(torch.autograd.Function):
    """Σ over every non-empty subset s of L_seg(Σ_{i∈s} x_i), its gradient formed in the forward pass."""

    @staticmethod
    def forward(ctx, stacked: torch.Tensor, onehot: torch.Tensor, seg: SegmentationLoss, per_call: int):
        grad = ctx.needs_input_grad[0]
        with torch.autocast(stacked.device.type, enabled=False):  # at least float32, as autocast has softmax
            # n×B×K×V in one block of memory (side outputs may come channels-last): sums are GEMMs
            x = stacked.to(torch.promote_types(stacked.dtype, torch.float32)).contiguous().flatten(3)
            y = onehot.to(x.dtype).contiguous().flatten(2)  # B×K×V
            n = x.shape[0]
            target_terms = _target_terms(y, seg)  # the same for every block
            dx = torch.zeros_like(x) if grad else None
            total = x.new_zeros(())
            for rows in subset_matrix(n, x.device, x.dtype).split(per_call):
                z = torch.mm(rows, x.view(n, -1)).view(-1, *x.shape[1:])  # the block's subset sums
                loss, dz = _subset_seg_loss(z, y, target_terms, seg, grad)
                total = total + loss
                if dz is not None:
                    dx.view(n, -1).addmm_(rows.t(), dz.view(rows.shape[0], -1))
        if grad:
            ctx.save_for_backward(dx.view(stacked.shape).to(stacked.dtype))
        return total

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (dx,) = ctx.saved_tensors
        return dx * grad_output, None, None, None


def _target_terms(y: torch.Tensor, seg: SegmentationLoss) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ_k y_k per voxel (1×B×1×V) and the Dice denominator's target sums Σ y² (or Σ y) per class."""
    yd = y[:, 0 if seg.include_background else 1 :]
    dims = [0, 2] if seg.batch else [2]
    ground = (yd * yd if seg.squared_pred else yd).sum(dims, keepdim=True)
    return y.sum(1, keepdim=True)[None], ground


def _subset_seg_loss(
    z: torch.Tensor, y: torch.Tensor, target_terms: tuple, seg: SegmentationLoss, grad: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Σ_s L_seg(z_s) (eq. 9, as ``DiceCELoss`` computes it) over logits z (S×B×K×V) and one-hot
    targets y (B×K×V) with their :func:`_target_terms`, and, with ``grad``, its gradient with
    respect to z.

    With p = softmax(z), the cross-entropy is the mean over the B·V voxels of −Σ_k y_k log p_k,
    with gradient (p·Σ_k y_k − y)/(B·V). Each Dice term is 1 − (2I + ε)/(D + ε), I = Σ p y and
    D = Σ p² + Σ y² (squared terms; Σ p + Σ y otherwise), summed per class over the voxels (and the
    batch, when pooled); its gradient with respect to p is g = c·(−2y/(D + ε) + (2I + ε)/(D + ε)²·2p)
    (·1 in place of 2p without squares), c its weight in the mean over classes (and samples).
    Through the softmax: ∂z = p∘(g − Σ_k p_k g_k). Products are reduced with ``sum`` rather than
    ``einsum``, which would copy p into a matrix layout first.
    """
    s, b, k, v = z.shape
    start = 0 if seg.include_background else 1
    log_p = torch.log_softmax(z, 2)
    p = log_p.exp()
    ce = (log_p.mul_(y)).sum((1, 2, 3)) / -(b * v)

    pd, yd = p[:, :, start:], y[:, start:]
    dims = (1, 3) if seg.batch else (3,)  # per class, and per sample unless pooled
    inter = (pd * yd).sum(dims, keepdim=True)
    pred = (pd * pd if seg.squared_pred else pd).sum(dims, keepdim=True)
    ysum, ground = target_terms
    num, den = 2 * inter + seg.smooth, pred + ground + seg.smooth
    dice = 1 - num / den  # S×1×K'×1 or S×B×K'×1
    loss = (seg.lambda_dice * dice.flatten(1).mean(1) + seg.lambda_ce * ce).sum()
    if not grad:
        return loss, None

    c = seg.lambda_dice / dice[0].numel()  # each Dice term's weight in its subset's mean
    slope = c * num / den**2  # ∂/∂(Σ p²) or ∂/∂(Σ p) of the Dice term
    g = torch.zeros_like(p) if start else torch.empty_like(p)
    gd = g[:, :, start:]
    if seg.squared_pred:
        torch.mul(pd, 2 * slope, out=gd)
    else:
        gd.copy_(slope.expand_as(gd))
    gd.addcmul_(yd.unsqueeze(0), -2 * c / den)
    g *= p  # p∘g
    ce_weight = seg.lambda_ce / (b * v)
    # ∂z = p∘g − p·Σ_k p_k g_k + ce_weight·(p·Σ_k y_k − y), the two p-terms in one pass
    dz = g.addcmul_(p, ce_weight * ysum - g.sum(2, keepdim=True)).sub_(y, alpha=ce_weight)
    return loss, dz


class WeightedSideLoss(nn.Module):
    """Weighted side loss (eq. 13): Σ_i w_i·L_seg(S_i), the paper's Table 5 alternative.

    The paper does not give the w_i; the default weighs every side output 1.

    Args:
        weights: w_1..w_n, one per side output (finest first).
        seg_loss: the loss applied to each side output; a :class:`SegmentationLoss` by default.
    """

    def __init__(self, weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0, 1.0), seg_loss: SegmentationLoss | None = None):
        super().__init__()
        self.weights = [float(w) for w in weights]
        self.seg_loss = seg_loss if seg_loss is not None else SegmentationLoss()

    def forward(self, side: Sequence[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        if len(side) != len(self.weights):
            raise ValueError(f"WeightedSideLoss has {len(self.weights)} weights but got {len(side)} side outputs.")
        return sum(w * self.seg_loss(s, target) for w, s in zip(self.weights, side))


class MGRADLoss(nn.Module):
    """The total MGRAD-UNet loss: L_seg(P_1) + L_seg(P_2) + side loss (eqs. 10–13).

    Given a plain logits tensor instead of an :class:`MGRADOutput` (a baseline network, or the
    eval-mode output) it returns L_seg of that tensor, so one loss serves every network a bundle
    can swap in.

    Args:
        lambda_dice: weight of the Dice term of L_seg.
        lambda_ce: weight of the cross-entropy term of L_seg.
        side_loss: ``"aggregated"`` (the paper's default), ``"weighted"`` (Table 5) or ``"none"``.
        side_weights: w_i of the weighted side loss.
        batch: Dice pooled over the batch (the published code) or per sample.
    """

    def __init__(
        self,
        lambda_dice: float = 0.7,
        lambda_ce: float = 0.3,
        side_loss: str = "aggregated",
        side_weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0, 1.0),
        batch: bool = True,
    ) -> None:
        super().__init__()
        self.seg_loss = SegmentationLoss(lambda_dice=lambda_dice, lambda_ce=lambda_ce, batch=batch)
        self.side_loss: nn.Module | None
        if side_loss == "aggregated":
            self.side_loss = AggregatedLoss(self.seg_loss)
        elif side_loss == "weighted":
            self.side_loss = WeightedSideLoss(side_weights, self.seg_loss)
        elif side_loss == "none":
            self.side_loss = None
        else:
            raise ValueError(f"side_loss must be 'aggregated', 'weighted' or 'none', got {side_loss!r}.")

    def forward(self, output: Union[MGRADOutput, torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        if isinstance(output, torch.Tensor):
            return self.seg_loss(output, target)
        target = self.seg_loss.as_one_hot(output.p1, target)
        loss = self.seg_loss(output.p1, target) + self.seg_loss(output.p2, target)
        if self.side_loss is not None and len(output.side) > 0:
            loss = loss + self.side_loss(output.side, target)
        return loss
