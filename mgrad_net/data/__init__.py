"""Data: synthetic phantoms (and, later, datalist reading and validation)."""

from mgrad_net.data.synthetic import synthetic_disks, write_synthetic_dataset

__all__ = ["synthetic_disks", "write_synthetic_dataset"]
