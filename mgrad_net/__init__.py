"""mgrad-net: MGRAD-UNet (Yan, Yang & Chen, Sci. Rep. 2024) for MONAI."""

__version__ = "0.1.0"
