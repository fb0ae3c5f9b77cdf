"""Synthetic two-class phantoms for demos and tests, made with MONAI's ``create_test_image_*``."""

from __future__ import annotations

import numpy as np
from monai.data.synthetic import create_test_image_2d, create_test_image_3d

__all__ = ["synthetic_disks"]


def synthetic_disks(
    count: int,
    size: int = 32,
    spatial_dims: int = 2,
    num_objs: int = 4,
    rad_min: int = 3,
    rad_max: int = 8,
    noise_max: float = 0.3,
    seed: int = 0,
) -> list[dict[str, np.ndarray]]:
    """``count`` noisy images of bright disks (balls in 3D) with their binary masks.

    Each item is ``{"image": 1×size^d float32, "label": 1×size^d int64}``: background 0, object 1.
    The same seed gives the same set, so a held-out set is just another seed.
    """
    rs = np.random.RandomState(seed)
    make = create_test_image_2d if spatial_dims == 2 else create_test_image_3d
    items = []
    for _ in range(count):
        shape = (size,) * spatial_dims
        image, label = make(
            *shape,
            num_objs=num_objs,
            rad_min=rad_min,
            rad_max=rad_max,
            noise_max=noise_max,
            num_seg_classes=1,
            channel_dim=0,
            random_state=rs,
        )
        items.append({"image": image.astype(np.float32), "label": label.astype(np.int64)})
    return items
