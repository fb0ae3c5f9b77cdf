"""What the networks return in training mode, where engines and losses can depend on it.

A network's eval-mode output is a logits tensor, what MONAI's inferers, evaluators and losses take.
In training mode some networks return more: the types of those outputs live here, not in the
network modules, so that the dependencies run networks → outputs ← engines, losses (no engine or
loss imports a network).

- :class:`MGRADOutput`: one pass of MGRAD-UNet (both decoders' logits, side outputs, features).
- :class:`GateMaps`, :class:`GeneratorOutput`, :class:`HiGMISnetOutput`: the peer Hi-gMISnet's
  attention maps, each generator's output, and the segmenter's.
"""

from typing import List, NamedTuple

import torch

__all__ = ["MGRADOutput", "GateMaps", "GeneratorOutput", "HiGMISnetOutput"]


class MGRADOutput(NamedTuple):
    """What one training-mode pass of :class:`~mgrad_net.networks.MGRADUNet` returns.

    Lists of per-level tensors run from the finest level (full resolution) to the coarsest.

    Attributes:
        p1: logits of decoder 1 (MSD), B×K×spatial.
        p2: logits of decoder 2 (GRAD), B×K×spatial.
        side: the side outputs S_1..S_5 (eq. 3), each B×K×spatial at full resolution; empty when
            the network was built with ``side_outputs=False``.
        msd: decoder 1's features M_1..M_5 (the gates of decoder 2, and half of the feedback).
        grad: decoder 2's features G_1..G_5 (the other half of the feedback).
        features: the RFB features R_i the decoders saw, feedback included (R_i + F_i).
    """

    p1: torch.Tensor
    p2: torch.Tensor
    side: List[torch.Tensor]
    msd: List[torch.Tensor]
    grad: List[torch.Tensor]
    features: List[torch.Tensor]

    @property
    def logits(self) -> torch.Tensor:
        """The segmentation logits ``P_1 + P_2``: what the network predicts."""
        return self.p1 + self.p2


class GateMaps(NamedTuple):
    """The two attention maps of Hi-gMISnet's dual-mode attention gate, as logits (``sigmoid`` gives
    the maps): ``additive`` for σ(ψ(ReLU(θx + φg))), ``subtractive`` for 1 − σ(ψ(ReLU(θx − φg)))."""

    additive: torch.Tensor
    subtractive: torch.Tensor


class GeneratorOutput(NamedTuple):
    """A Hi-gMISnet generator's training output: per-class ``logits`` and the :class:`GateMaps`
    of its shallowest ``supervised_levels`` decoder levels, shallowest first, for deep supervision."""

    logits: torch.Tensor
    maps: List[GateMaps]


class HiGMISnetOutput(NamedTuple):
    """Hi-gMISnet's training output: both generators' outputs and the combined logits (what eval
    mode returns)."""

    foreground: GeneratorOutput
    background: GeneratorOutput
    logits: torch.Tensor
