"""The peers of the comparison, one folder each, holding its network, blocks, training step and loss:

- :mod:`.swin_unetr_reca`: SwinUNETR with Recurrent-Attention (on MONAI's SwinUNETR).
- :mod:`.medsegdiff`: MedSegDiff, segmentation by diffusion (on MONAI's diffusion blocks, schedulers
  and ``DiffusionInferer``).
- :mod:`.higmisnet`: Hi-gMISnet, the parallel-GAN segmenter (on MONAI's blocks and PatchGAN).

Nothing here is MGRAD-UNet's (:mod:`mgrad_net.networks`). Bundle configs name them as
``mgrad_net.peers.<Name>`` or ``mgrad_net.peers.<peer>.<Name>``.
"""

from mgrad_net.peers.higmisnet import AdversarialStep, HiGMISnet, HiGMISnetGenerator, HiGMISnetLoss, SchedulerGroup
from mgrad_net.peers.medsegdiff import (
    ConditionalEncoding,
    DiffusionSegmentationLoss,
    FFParser,
    MedSegDiff,
    MedSegDiffUNet,
    SegmentationDiffusionPrepareBatch,
)
from mgrad_net.peers.swin_unetr_reca import SwinUNETRRecA

__all__ = [
    "SwinUNETRRecA",
    "ConditionalEncoding",
    "DiffusionSegmentationLoss",
    "FFParser",
    "MedSegDiff",
    "MedSegDiffUNet",
    "SegmentationDiffusionPrepareBatch",
    "AdversarialStep",
    "HiGMISnet",
    "HiGMISnetGenerator",
    "HiGMISnetLoss",
    "SchedulerGroup",
]
