"""MGRAD-UNet and its building blocks, and the peers of the comparison (SwinUNETR-RecA, Hi-gMISnet, MedSegDiff)."""

from mgrad_net.networks.blocks import RFB, DifferentialProcess, ResidualStage
from mgrad_net.networks.decoders import DifferentialPyramid, GRADDecoder, MSDDecoder, SideOutputs
from mgrad_net.networks.higmisnet import HiGMISnet, HiGMISnetGenerator
from mgrad_net.networks.medsegdiff import ConditionalEncoding, FFParser, MedSegDiff, MedSegDiffUNet
from mgrad_net.networks.mgrad_unet import MGRADOutput, MGRADUNet
from mgrad_net.networks.swin_unetr_reca import SwinUNETRRecA

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
    "SwinUNETRRecA",
    "HiGMISnet",
    "HiGMISnetGenerator",
    "ConditionalEncoding",
    "FFParser",
    "MedSegDiff",
    "MedSegDiffUNet",
]
