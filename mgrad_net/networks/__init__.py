"""MGRAD-UNet and its building blocks. The peers of the comparison live in :mod:`mgrad_net.peers`;
the training-mode output type :class:`~mgrad_net.outputs.MGRADOutput` in :mod:`mgrad_net.outputs`."""

from mgrad_net.networks.blocks import RFB, DifferentialProcess, ResidualStage
from mgrad_net.networks.decoders import DifferentialPyramid, GRADDecoder, MSDDecoder, SideOutputs
from mgrad_net.networks.mgrad_unet import MGRADUNet

__all__ = [
    "RFB",
    "DifferentialProcess",
    "ResidualStage",
    "DifferentialPyramid",
    "GRADDecoder",
    "MSDDecoder",
    "SideOutputs",
    "MGRADUNet",
]
