"""Embed an image once, then predict masks for any number of prompts (segment-anything's
``predictor.py``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from rsvl.errors import BandSelectionError, PromptError, RsvlError
from rsvl.models.sam.sam import Sam
from rsvl.models.sam.transforms import ResizeLongestSide


class SamPredictor:
    """Embed an image once, then predict masks for any number of prompts.

    >>> predictor = SamPredictor(load_sam("sam_vit_b_01ec64.pth"))
    >>> predictor.set_image(rgb)                      # uint8 (H, W, 3)
    >>> masks, iou, low_res = predictor.predict(points=[[500, 375]], point_labels=[1])

    Coordinates are (x, y) pixels of the original image. One prompt set gives masks
    (M, H, W) bool, iou (M,), low_res (M, 256, 256) logits; batched boxes (N, 4) (optionally
    with points (N, K, 2)) give (N, M, H, W), (N, M), (N, M, 256, 256). M = 3 with
    ``multimask`` else 1.
    """

    def __init__(self, model: Sam) -> None:
        self.model = model.eval()
        self.transform = ResizeLongestSide(model.img_size)
        self.reset_image()

    def reset_image(self) -> None:
        self.features: Tensor | None = None
        self.original_size: tuple[int, int] | None = None
        self.input_size: tuple[int, int] | None = None

    @property
    def device(self) -> torch.device:
        return self.model.device

    @torch.inference_mode()
    def set_image(self, image: np.ndarray) -> None:
        """Compute the embedding of a uint8 RGB (H, W, 3) image."""
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] != 3:
            raise BandSelectionError(
                f"SAM expects an RGB image shaped (H, W, 3); got {image.shape}.",
                hint="Select three bands (e.g. --bands 3,2,1) before segmenting.",
            )
        if image.dtype != np.uint8:
            raise RsvlError(
                f"SAM expects uint8 pixels; got {image.dtype}.",
                hint="Scale the image to 0-255 (e.g. with a percentile stretch) first.",
            )
        if min(image.shape[:2]) < 1:
            raise RsvlError(f"The image is empty: shape {image.shape}.")
        resized = self.transform.apply_image(np.ascontiguousarray(image))
        x = torch.as_tensor(resized, device=self.device).permute(2, 0, 1)[None]
        x = self.model.preprocess(x)
        self.features = self.model.encode_image(x)
        self.original_size = (int(image.shape[0]), int(image.shape[1]))
        self.input_size = (int(resized.shape[0]), int(resized.shape[1]))

    @torch.inference_mode()
    def predict(
        self,
        points: np.ndarray | Sequence[Any] | None = None,
        point_labels: np.ndarray | Sequence[Any] | None = None,
        box: np.ndarray | Sequence[Any] | None = None,
        mask_input: np.ndarray | Tensor | None = None,
        multimask: bool = True,
        return_logits: bool = False,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Masks, IoU predictions and low-res logits for one prompt set or a batch of boxes.

        points (K, 2) or (N, K, 2) x/y; point_labels (K,) or (N, K) with 1 = foreground,
        0 = background; box (4,) or (N, 4) xyxy; mask_input (1, 256, 256) or (N, 1, 256, 256)
        low-res logits from an earlier call. ``return_logits`` gives float logits instead of
        boolean masks.
        """
        if self.features is None or self.original_size is None or self.input_size is None:
            raise RsvlError("No image set.", hint="Call set_image(image) before predict().")
        if (points is None) != (point_labels is None):
            raise PromptError("Give point_labels with points (1 foreground, 0 background).")
        dev = self.device
        batched = False
        pts_t = lab_t = box_t = mask_t = None
        if points is not None:
            pts = np.asarray(points, dtype=np.float64)
            lab = np.asarray(point_labels)
            if pts.shape[-1] != 2 or pts.ndim not in (2, 3) or lab.shape != pts.shape[:-1]:
                raise PromptError(
                    f"points must be (K, 2) or (N, K, 2) with labels (K,) or (N, K); "
                    f"got {pts.shape} and {lab.shape}."
                )
            batched = batched or pts.ndim == 3
            pts = pts[None] if pts.ndim == 2 else pts
            lab = lab[None] if lab.ndim == 1 else lab
            pts = self.transform.apply_coords(pts, self.original_size)
            pts_t = torch.as_tensor(pts, dtype=torch.float32, device=dev)
            lab_t = torch.as_tensor(lab, dtype=torch.int64, device=dev)
        if box is not None:
            b = np.asarray(box, dtype=np.float64)
            if b.shape[-1] != 4 or b.ndim not in (1, 2):
                raise PromptError(f"box must be (4,) or (N, 4) xyxy; got {b.shape}.")
            batched = batched or b.ndim == 2
            b = self.transform.apply_boxes(b.reshape(-1, 4), self.original_size)
            box_t = torch.as_tensor(b, dtype=torch.float32, device=dev)
        if mask_input is not None:
            m = torch.as_tensor(np.asarray(mask_input), dtype=torch.float32, device=dev)
            batched = batched or m.ndim == 4
            mask_t = m[None] if m.ndim == 3 else m
        sizes = {t.shape[0] for t in (pts_t, box_t, mask_t) if t is not None}
        n = max(sizes) if sizes else 1
        if sizes - {1, n}:
            raise PromptError(f"Batched prompts disagree on the batch size: {sorted(sizes)}.")
        if pts_t is not None and lab_t is not None and pts_t.shape[0] != n:
            pts_t, lab_t = pts_t.expand(n, -1, -1), lab_t.expand(n, -1)
        if box_t is not None and box_t.shape[0] != n:
            box_t = box_t.expand(n, -1)
        if mask_t is not None and mask_t.shape[0] != n:
            mask_t = mask_t.expand(n, -1, -1, -1)

        low_res, iou = self.model.decode(
            self.features, pts_t, lab_t, box_t, mask_t, multimask_output=multimask
        )
        full = self.model.postprocess_masks(low_res, self.input_size, self.original_size)
        masks = full if return_logits else full > self.model.mask_threshold
        out = (masks.cpu().numpy(), iou.float().cpu().numpy(), low_res.float().cpu().numpy())
        if not batched:
            out = (out[0][0], out[1][0], out[2][0])
        return out
