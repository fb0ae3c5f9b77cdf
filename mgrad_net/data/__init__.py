"""Data: datalists, the synthetic default data set, and phantoms for tests."""

from mgrad_net.data.datalist import check_no_overwrite, load_datalist, pair_folder
from mgrad_net.data.phantoms import PHANTOM_CLASSES, short_axis_phantom, write_phantom_dataset
from mgrad_net.data.synthetic import synthetic_disks, write_synthetic_dataset

__all__ = [
    "check_no_overwrite",
    "load_datalist",
    "pair_folder",
    "PHANTOM_CLASSES",
    "short_axis_phantom",
    "write_phantom_dataset",
    "synthetic_disks",
    "write_synthetic_dataset",
]
