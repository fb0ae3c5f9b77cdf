"""Hi-gMISnet (Talukder et al., Phys. Med. Biol. 69, 2024): the generator's blocks, the two
generators as one segmenter, the pGAN training step and the generators' losses.

- :mod:`.blocks`: :class:`HaarDWT`, :class:`WaveletConvBlock`, :class:`MultiResBlock`, :class:`ResPath`,
  :class:`DualModeAttentionGate`.
- :mod:`.network`: :class:`HiGMISnetGenerator`, :class:`HiGMISnet`, :func:`combine_logits`.
- :mod:`.step`: :class:`AdversarialStep` (discriminators, then generators), :class:`SchedulerGroup`.
- :mod:`.loss`: :class:`HiGMISnetLoss`, :func:`reciprocal_loss`.

The training-mode outputs (:class:`~mgrad_net.outputs.HiGMISnetOutput` and its parts) are in
:mod:`mgrad_net.outputs`.
"""

from mgrad_net.peers.higmisnet.blocks import DualModeAttentionGate, HaarDWT, MultiResBlock, ResPath, WaveletConvBlock
from mgrad_net.peers.higmisnet.loss import HiGMISnetLoss, reciprocal_loss, soft_and, soft_or
from mgrad_net.peers.higmisnet.network import COMBINE_MODES, HiGMISnet, HiGMISnetGenerator, combine_logits
from mgrad_net.peers.higmisnet.step import AdversarialStep, SchedulerGroup

__all__ = [
    "DualModeAttentionGate",
    "HaarDWT",
    "MultiResBlock",
    "ResPath",
    "WaveletConvBlock",
    "HiGMISnetLoss",
    "reciprocal_loss",
    "soft_and",
    "soft_or",
    "COMBINE_MODES",
    "HiGMISnet",
    "HiGMISnetGenerator",
    "combine_logits",
    "AdversarialStep",
    "SchedulerGroup",
]
