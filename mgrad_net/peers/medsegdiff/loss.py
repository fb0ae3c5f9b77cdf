"""MedSegDiff's training loss with the official code's auxiliary head (Wu et al., MIDL 2023)."""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["DiffusionSegmentationLoss"]


class DiffusionSegmentationLoss(nn.Module):
    """MedSegDiff's loss with its auxiliary head: ``MSE(ε̂, ε) + aux_weight · MSE(x̂_0, x_0)``.

    The first term is the paper's noise prediction loss (eq. 2); the second trains the official
    code's auxiliary segmentation head (``train_util.py`` weighs it 10). ``input`` and ``target`` each
    hold the two maps one after the other along the channels (``cat([ε, x_0])``, as
    :class:`~mgrad_net.peers.medsegdiff.MedSegDiffUNet` with ``aux_head`` and
    :class:`~mgrad_net.peers.medsegdiff.SegmentationDiffusionPrepareBatch` with ``aux_target`` give them).

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
