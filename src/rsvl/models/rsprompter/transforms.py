"""Input transform of the instance models (resize the longest side, normalise, pad) and the
way back to the original pixel frame."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from rsvl.errors import BandSelectionError
from rsvl.models.sam.sam import Sam
from rsvl.models.sam.transforms import ResizeLongestSide


@dataclass
class Batch:
    pixels: Tensor  # (B, 3, S, S) normalised, zero-padded
    sizes: list[tuple[int, int]]  # resized, unpadded
    original: list[tuple[int, int]]
    targets: list[dict[str, Tensor]] | None


def check_images(images: Sequence[Tensor]) -> None:
    if isinstance(images, Tensor) and images.ndim == 3:
        raise BandSelectionError("Pass a list of (3, H, W) images, not one tensor.")
    for img in images:
        if img.ndim != 3 or img.shape[0] != 3:
            raise BandSelectionError(
                f"Instance models take RGB images shaped (3, H, W); got {tuple(img.shape)}.",
                hint="Select three bands (e.g. --bands 3,2,1) first.",
            )


def model_batch(
    sam: Sam, images: Sequence[Tensor], targets: Sequence[Mapping[str, Tensor]] | None, training: bool
) -> Batch:
    """The batch a model's ``forward`` works on: targets are required in training mode and
    ignored otherwise (torchvision's detection convention)."""
    if training and targets is None:
        raise ValueError("training mode needs targets")
    return prepare_batch(sam, images, targets if training else None)


def prepare_batch(sam: Sam, images: Sequence[Tensor], targets: Sequence[Mapping[str, Tensor]] | None) -> Batch:
    """Resize each image so that its longest side is SAM's input size, normalise, pad."""
    check_images(images)
    size = sam.img_size
    pixels, sizes, original, out_targets = [], [], [], []
    for i, img in enumerate(images):
        h, w = int(img.shape[-2]), int(img.shape[-1])
        nh, nw = ResizeLongestSide.get_preprocess_shape(h, w, size)
        x = img.to(sam.pixel_mean.device, torch.float32)
        if (nh, nw) != (h, w):
            x = F.interpolate(x[None], (nh, nw), mode="bilinear", align_corners=False, antialias=nh < h)[0]
        pixels.append(sam.preprocess(x[None] * 255.0)[0])
        sizes.append((nh, nw))
        original.append((h, w))
        if targets is not None:
            t = targets[i]
            boxes = t["boxes"].to(x.device, torch.float32).reshape(-1, 4)
            scale = boxes.new_tensor([nw / w, nh / h, nw / w, nh / h])
            new = {"boxes": boxes * scale, "labels": t["labels"].to(x.device, torch.int64).reshape(-1)}
            if "masks" in t and t["masks"] is not None:
                m = t["masks"].to(x.device)
                if m.ndim == 2:
                    m = m[None]
                m = m.float()
                if m.shape[-2:] != (nh, nw):
                    m = F.interpolate(m[:, None], (nh, nw), mode="nearest")[:, 0] if m.shape[0] else m.new_zeros(0, nh, nw)
                new["masks"] = F.pad(m, (0, size - nw, 0, size - nh))
            out_targets.append(new)
    return Batch(torch.stack(pixels), sizes, original, out_targets if targets is not None else None)


def masks_to_original(logits: Tensor, size: int, resized: tuple[int, int], original: tuple[int, int]) -> Tensor:
    """(N, 1, l, l) low-res logits -> (N, 1, H, W) probabilities in the original frame."""
    if logits.shape[0] == 0:
        return logits.new_zeros(0, 1, *original)
    probs = logits.float().sigmoid()
    probs = F.interpolate(probs, (size, size), mode="bilinear", align_corners=False)
    probs = probs[..., : resized[0], : resized[1]]
    return F.interpolate(probs, original, mode="bilinear", align_corners=False)


def boxes_to_original(boxes: Tensor, resized: tuple[int, int], original: tuple[int, int]) -> Tensor:
    sy, sx = original[0] / resized[0], original[1] / resized[1]
    return boxes * boxes.new_tensor([sx, sy, sx, sy])

def mask_boxes(binary: Tensor) -> Tensor:
    """(N, H, W) bool -> (N, 4) xyxy boxes with exclusive x2/y2; empty masks give zeros."""
    n, h, w = binary.shape
    if n == 0:
        return torch.zeros(0, 4, device=binary.device)
    rows, cols = binary.any(2).float(), binary.any(1).float()
    y1, y2 = rows.argmax(1), h - rows.flip(1).argmax(1)
    x1, x2 = cols.argmax(1), w - cols.flip(1).argmax(1)
    boxes = torch.stack([x1, y1, x2, y2], 1).float()
    boxes[~binary.flatten(1).any(1)] = 0
    return boxes


def to_tensor(rgb: np.ndarray) -> Tensor:
    """(H, W, 3) uint8 -> (3, H, W) float in [0, 1]: the image input of every instance model in
    torchvision's detection convention (RSPrompter's family and mini-instances)."""
    return torch.from_numpy(np.array(rgb, copy=True)).permute(2, 0, 1).float().div_(255.0)
