import pytest
import torch

from mgrad_net.networks import MGRADUNet

TINY = dict(features=(4, 8, 16, 32, 64), decoder_channels=8)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def tiny_net(**kwargs) -> MGRADUNet:
    """A small-width MGRAD-UNet: the real architecture at a size a CPU test can afford."""
    return MGRADUNet(**{**TINY, **kwargs})
