"""Image preparation shared by every task that feeds whole images to an image tower.

Torch's antialiased bilinear resize is the reference here (the README's zero-shot and
retrieval numbers were measured with it), which is why this lives in the model layer and
not in the torch-free ``rsvl.io`` / ``rsvl.geo``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F


def expand_to_square(image: np.ndarray, fill: Sequence[int]) -> np.ndarray:
    """``image`` (H, W, 3) centred on a square of colour ``fill`` (LLaVA's expand2square:
    the offset is ``(long - short) // 2``)."""
    h, w = image.shape[:2]
    if h == w:
        return image
    side = max(h, w)
    out = np.empty((side, side, 3), dtype=image.dtype)
    out[:] = np.asarray(fill, dtype=image.dtype)
    top, left = (side - h) // 2, (side - w) // 2
    out[top : top + h, left : left + w] = image
    return out


def square_image(rgb: np.ndarray, size: int) -> np.ndarray:
    """A (3, H, W) uint8 image of any shape -> (3, size, size) uint8: resize the short side
    to ``size`` (bilinear, antialiased), then centre crop (CLIP's way)."""
    x = torch.from_numpy(np.ascontiguousarray(rgb)).float()[None]
    h, w = x.shape[-2:]
    s = size / min(h, w)
    nh, nw = max(size, round(h * s)), max(size, round(w * s))
    x = F.interpolate(x, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
    top, left = (nh - size) // 2, (nw - size) // 2
    x = x[..., top : top + size, left : left + size]
    return x[0].round().clamp(0, 255).to(torch.uint8).numpy()
