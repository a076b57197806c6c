"""Image arrays in the layout backends expect: height x width x channels, uint8."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def to_numpy(image: Any) -> np.ndarray:
    if torch.is_tensor(image):
        image = image.detach().cpu().numpy()
    return np.asarray(image)


def to_hwc_uint8(image: Any) -> np.ndarray:
    """HxW, HxWxC or CxHxW (C in 1, 3, 4), floats in [0, 1] or integers in [0, 255] -> HxWxC uint8."""
    array = to_numpy(image)
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3:
        raise ValueError(f"An image must have 2 or 3 dimensions, got shape {array.shape}.")
    if array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        array = array.transpose(1, 2, 0)
    if array.dtype != np.uint8:
        array = np.clip(array * 255.0 if np.issubdtype(array.dtype, np.floating) else array, 0, 255).astype(np.uint8)
    return array
