"""mgrad-net: MGRAD-UNet (Yan, Yang & Chen, Sci. Rep. 2024) for MONAI."""

__version__ = "0.1.0"

# bundle configs write `$import mgrad_net` and then `mgrad_net.data.…`: make the subpackages attributes
from mgrad_net import data, engines, handlers, io, losses, networks  # noqa: E402,F401
