"""MedSegDiff (Wu et al., MIDL 2023): the conditioning blocks, the noise predictor and segmenter, the
training batch (the label noised, the image the condition) and the loss with the auxiliary head.

- :mod:`.blocks`: :class:`FFParser` (eq. 5), :class:`ConditionalEncoding` (eq. 3-4).
- :mod:`.network`: :class:`MedSegDiffUNet` (eq. 2), :class:`MedSegDiff` (training and DDIM sampling).
- :mod:`.training`: :class:`SegmentationDiffusionPrepareBatch`, for MONAI's ``DiffusionInferer`` and
  the bundle's plain training step.
- :mod:`.loss`: :class:`DiffusionSegmentationLoss`.
"""

from mgrad_net.peers.medsegdiff.blocks import ConditionalEncoding, FFParser
from mgrad_net.peers.medsegdiff.loss import DiffusionSegmentationLoss
from mgrad_net.peers.medsegdiff.network import MedSegDiff, MedSegDiffUNet
from mgrad_net.peers.medsegdiff.training import SegmentationDiffusionPrepareBatch

__all__ = [
    "ConditionalEncoding",
    "FFParser",
    "DiffusionSegmentationLoss",
    "MedSegDiff",
    "MedSegDiffUNet",
    "SegmentationDiffusionPrepareBatch",
]
