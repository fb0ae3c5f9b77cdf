"""Data: synthetic phantoms (and, later, datalist reading and validation)."""

from mgrad_net.data.synthetic import synthetic_disks

__all__ = ["synthetic_disks"]
