"""MGRAD-UNet and its building blocks."""

from mgrad_net.networks.blocks import RFB, DifferentialProcess, ResidualStage
from mgrad_net.networks.decoders import DifferentialPyramid, GRADDecoder, MSDDecoder, SideOutputs
from mgrad_net.networks.mgrad_unet import MGRADOutput, MGRADUNet

__all__ = [
    "RFB",
    "DifferentialProcess",
    "ResidualStage",
    "DifferentialPyramid",
    "GRADDecoder",
    "MSDDecoder",
    "SideOutputs",
    "MGRADOutput",
    "MGRADUNet",
]
