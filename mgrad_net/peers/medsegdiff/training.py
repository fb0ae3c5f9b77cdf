"""MedSegDiff's training batch: the label map is what gets noised, the image is the condition.

MONAI's ``DiffusionPrepareBatch`` noises the batch's *image* (an image-generation model). A
segmentation diffusion model noises the *label map* and is conditioned on the image, so
:class:`SegmentationDiffusionPrepareBatch` keeps MONAI's noise and timestep drawing and hands the
one-hot label, scaled to [-1, 1], to MONAI's ``DiffusionInferer`` in ``concat`` mode. With it the
bundle's ordinary trainer step (one forward, an MSE loss against the noise, one optimizer step)
is MedSegDiff's training step (eq. 1-2): no loop of our own.
"""

from __future__ import annotations

from typing import Any

import torch
from monai.engines.utils import DiffusionPrepareBatch, default_prepare_batch
from monai.networks.utils import one_hot

__all__ = ["SegmentationDiffusionPrepareBatch"]


class SegmentationDiffusionPrepareBatch(DiffusionPrepareBatch):
    """``(x_0, ε, (), {noise, timesteps, condition, mode})`` of a labelled batch, for
    ``DiffusionInferer(inputs=x_0, noise=ε, timesteps=t, condition=image, mode="concat")``.

    ``x_0 = 2·onehot(label) − 1`` (the multi-class extension of MedSegDiff's binary mask), ε is
    standard normal noise of its shape (the loss's target) and ``t`` uniform in ``[0, T)``. With
    ``aux_target`` the target is ``cat([ε, x_0])``, for a network with MedSegDiff's auxiliary ``x_0``
    head and :class:`~.loss.DiffusionSegmentationLoss`.

    Args:
        num_train_timesteps: T, the noise scheduler's steps.
        num_classes: classes of the one-hot map, background included.
        aux_target: append ``x_0`` to the target.
    """

    def __init__(self, num_train_timesteps: int, num_classes: int, aux_target: bool = False) -> None:
        super().__init__(num_train_timesteps)
        self.num_classes = int(num_classes)
        self.aux_target = bool(aux_target)

    def __call__(
        self,
        batchdata: dict[str, torch.Tensor],
        device: str | torch.device | None = None,
        non_blocking: bool = False,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor, tuple, dict]:
        images, labels = default_prepare_batch(batchdata, device, non_blocking, **kwargs)
        if labels is None:
            raise ValueError("MedSegDiff trains on labelled batches: this batch has no 'label'.")
        x0 = one_hot(labels.long(), self.num_classes, dim=1).to(images.dtype) * 2 - 1
        noise = self.get_noise(x0)
        timesteps = self.get_timesteps(x0)
        target = self.get_target(x0, noise, timesteps)
        if self.aux_target:
            target = torch.cat([target, x0], dim=1)
        return x0, target, (), {"noise": noise, "timesteps": timesteps, "condition": images, "mode": "concat"}
