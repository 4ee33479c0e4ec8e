"""SAM's input transform: resize the longest side (segment-anything's ``utils/transforms.py``)."""

from __future__ import annotations

import numpy as np
from PIL import Image
from torch import Tensor


class ResizeLongestSide:
    """Resize so that the longest side is ``target_length`` (SAM's input transform).

    Images are resized with PIL's bilinear filter, as segment-anything does; coordinates and
    boxes are scaled per axis by the same factors.
    """

    def __init__(self, target_length: int = 1024) -> None:
        self.target_length = target_length

    @staticmethod
    def get_preprocess_shape(old_h: int, old_w: int, long_side: int) -> tuple[int, int]:
        scale = long_side / max(old_h, old_w)
        # as segment-anything, but never 0 (it fails on a 1 x 300 sliver; we give 1 x 1024)
        return max(1, int(old_h * scale + 0.5)), max(1, int(old_w * scale + 0.5))

    def target_shape(self, original_size: tuple[int, int]) -> tuple[int, int]:
        return self.get_preprocess_shape(original_size[0], original_size[1], self.target_length)

    def apply_image(self, image: np.ndarray) -> np.ndarray:
        """uint8 (H, W, 3) -> uint8 (h, w, 3) with max(h, w) == target_length."""
        h, w = self.target_shape((image.shape[0], image.shape[1]))
        return np.array(Image.fromarray(image).resize((w, h), Image.Resampling.BILINEAR))

    def apply_coords(
        self, coords: np.ndarray | Tensor, original_size: tuple[int, int]
    ) -> np.ndarray | Tensor:
        """(..., 2) x/y pixel coordinates in the original image -> resized frame (float)."""
        old_h, old_w = original_size
        new_h, new_w = self.target_shape(original_size)
        if isinstance(coords, Tensor):
            out_t = coords.clone().float()
            out_t[..., 0] = out_t[..., 0] * (new_w / old_w)
            out_t[..., 1] = out_t[..., 1] * (new_h / old_h)
            return out_t
        out = np.array(coords, dtype=np.float64, copy=True)
        out[..., 0] = out[..., 0] * (new_w / old_w)
        out[..., 1] = out[..., 1] * (new_h / old_h)
        return out

    def apply_boxes(
        self, boxes: np.ndarray | Tensor, original_size: tuple[int, int]
    ) -> np.ndarray | Tensor:
        """(B, 4) xyxy boxes in the original image -> resized frame."""
        return self.apply_coords(boxes.reshape(-1, 2, 2), original_size).reshape(-1, 4)
