"""MGRAD-UNet's losses (Yan, Yang & Chen, Sci. Rep. 2024, eqs. 9–13 and Algorithm 1).

- :class:`SegmentationLoss`: L_seg = λ_dice·Dice + λ_ce·CE (eq. 9) on logits.
- :class:`AggregatedLoss`: Σ over the 2^n − 1 non-empty subsets s of the side outputs of
  L_seg(Σ_{i∈s} S_i) (eq. 11, Algorithm 1).
- :class:`WeightedSideLoss`: Σ w_i·L_seg(S_i) (eq. 13).
- :class:`MGRADLoss`: L_seg(P_1) + L_seg(P_2) + one of the two side losses.
- :class:`DiffusionSegmentationLoss`: the peer MedSegDiff's noise MSE plus its auxiliary head's.

Targets may be class indices (B×1×spatial) or one-hot (B×K×spatial).
"""

from __future__ import annotations

import itertools
from typing import Sequence, Union

import torch
import torch.nn as nn
from monai.losses import DiceCELoss
from monai.networks.utils import one_hot
from torch.utils.checkpoint import checkpoint

from mgrad_net.networks.mgrad_unet import MGRADOutput

__all__ = [
    "SegmentationLoss",
    "AggregatedLoss",
    "WeightedSideLoss",
    "MGRADLoss",
    "DiffusionSegmentationLoss",
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
        # the arguments, as given (DiceCELoss keeps lambda_dice and lambda_ce itself)
        self.include_background = include_background
        self.squared_pred = squared_pred
        self.batch = batch
        self.smooth = smooth

    def per_sample(self) -> SegmentationLoss:
        """This loss with its Dice term taken per sample (``batch=False``), all else the same."""
        return SegmentationLoss(
            lambda_dice=self.lambda_dice,
            lambda_ce=self.lambda_ce,
            include_background=self.include_background,
            squared_pred=self.squared_pred,
            batch=False,
            smooth=self.smooth,
        )

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

    The 2^n − 1 subset sums are formed with a subset matrix and scored in calls of ``seg_loss``
    over ``subsets_per_call`` subsets at a time: the subsets are stacked as extra samples
    (per-sample Dice) or, for the batch-pooled Dice, as samples whose voxels are the whole batch.
    Both give each subset's own loss, and the mean over a call's subsets times their count is
    their sum, as Algorithm 1 takes it.

    The subset sums, their softmax and the matching one-hot targets are the largest tensors of a
    training step: 31 × B × K × spatial floats each, 0.45 GB at batch 8, 224², 9 classes. Scoring
    a few subsets per call bounds what exists at once; with ``recompute`` none of it is kept for
    the backward pass, each call's share is formed again from the n side outputs (one more
    evaluation of this loss, a few percent of a step). By default a call scores as many subsets as
    hold :attr:`call_elements` values together: all 31 for small inputs (the chunked sum rounds
    differently, gradients within ~1e-6 relative, which two DDP ranks compared with one process
    in ``tests/test_distributed.py`` would notice), 4 at batch 8, 224², 9 classes, where 31 at
    once raise a training step's peak memory (measured in ``scripts/benchmark.md``).

    Args:
        seg_loss: the loss applied to every subset sum; a :class:`SegmentationLoss` by default.
        recompute: recompute the subset sums during backward instead of keeping them.
        subsets_per_call: subsets scored per call; ``None``: as many as fit in :attr:`call_elements`.
    """

    # 2**24 fp32 values: 64 MB per tensor of a call's subsets
    call_elements: int = 2**24

    def __init__(
        self, seg_loss: SegmentationLoss | None = None, recompute: bool = True, subsets_per_call: int | None = None
    ) -> None:
        super().__init__()
        if subsets_per_call is not None and subsets_per_call < 1:
            raise ValueError(f"subsets_per_call must be at least 1, got {subsets_per_call}.")
        self.seg_loss = seg_loss if seg_loss is not None else SegmentationLoss()
        # scores the folded subsets: one "sample" per subset (batch pooling, if any, is in the fold)
        self.per_subset = self.seg_loss.per_sample()
        self.recompute = recompute
        self.subsets_per_call = subsets_per_call

    def forward(self, side: Sequence[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        if len(side) == 0:
            raise ValueError("AggregatedLoss needs at least one side output, got none.")
        stacked = torch.stack(list(side))  # n×B×K×spatial
        onehot = self.seg_loss.as_one_hot(side[0], target)
        subsets = subset_matrix(len(side), stacked.device, stacked.dtype)
        recompute = self.recompute and torch.is_grad_enabled() and stacked.requires_grad
        total = stacked.new_zeros(())
        per_call = self.subsets_per_call or max(1, self.call_elements // side[0].numel())
        for rows in subsets.split(per_call):
            if recompute:
                total = total + checkpoint(self._score, rows, stacked, onehot, use_reentrant=False)
            else:
                total = total + self._score(rows, stacked, onehot)
        return total

    def _score(self, rows: torch.Tensor, stacked: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
        """The summed loss of the subsets in ``rows`` (a block of the subset matrix)."""
        sums = torch.einsum("sn,n...->s...", rows, stacked)  # s×B×K×spatial
        s, b, k = sums.shape[:3]
        targets = onehot.unsqueeze(0).expand_as(sums)
        if self.seg_loss.batch:
            # each subset becomes one "sample" whose voxels are all of the batch's
            fold = lambda t: t.transpose(1, 2).reshape(s, k, -1)  # noqa: E731
        else:
            fold = lambda t: t.reshape(s * b, k, -1)  # noqa: E731
        return s * self.per_subset(fold(sums), fold(targets))


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
        recompute: the aggregated loss's ``recompute``: keep memory at full size, or (``False``) skip
            the second evaluation of the subset sums where they fit, as in the CPU preset.
    """

    def __init__(
        self,
        lambda_dice: float = 0.7,
        lambda_ce: float = 0.3,
        side_loss: str = "aggregated",
        side_weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0, 1.0),
        batch: bool = True,
        recompute: bool = True,
    ) -> None:
        super().__init__()
        self.seg_loss = SegmentationLoss(lambda_dice=lambda_dice, lambda_ce=lambda_ce, batch=batch)
        self.side_loss: nn.Module | None
        if side_loss == "aggregated":
            self.side_loss = AggregatedLoss(self.seg_loss, recompute=recompute)
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


class DiffusionSegmentationLoss(nn.Module):
    """MedSegDiff's loss with its auxiliary head: ``MSE(ε̂, ε) + aux_weight · MSE(x̂_0, x_0)``.

    The first term is the paper's noise prediction loss (eq. 2); the second trains the official
    code's auxiliary segmentation head (``train_util.py`` weighs it 10). ``input`` and ``target`` each
    hold the two maps one after the other along the channels (``cat([ε, x_0])``, as
    :class:`mgrad_net.networks.MedSegDiffUNet` with ``aux_head`` and
    :class:`mgrad_net.engines.SegmentationDiffusionPrepareBatch` with ``aux_target`` give them).

    Args:
        aux_weight: the auxiliary head's weight.
    """

    def __init__(self, aux_weight: float = 10.0) -> None:
        super().__init__()
        self.aux_weight = float(aux_weight)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if input.shape != target.shape or input.shape[1] % 2:
            raise ValueError(
                f"DiffusionSegmentationLoss: input {tuple(input.shape)} and target {tuple(target.shape)} must both "
                "be cat([noise, x_0]) (an even channel count): the network needs aux_head and the batch aux_target."
            )
        eps, x0 = input.chunk(2, dim=1)
        noise, label = target.chunk(2, dim=1)
        return nn.functional.mse_loss(eps, noise) + self.aux_weight * nn.functional.mse_loss(x0, label)
