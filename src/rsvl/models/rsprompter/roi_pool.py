"""Multi-level RoIAlign that samples as MMDetection does (mmcv ``RoIAlign``, ``aligned=True``).

torchvision's :class:`~torchvision.ops.MultiScaleRoIAlign` calls ``roi_align`` with
``aligned=False``: a box's corners are taken as pixel indices and its size is clamped to at
least one pixel. MMDetection's ``SingleRoIExtractor`` uses mmcv's ``RoIAlign`` whose default is
``aligned=True``: corners are continuous coordinates, shifted by half a pixel onto the pixel
centres, and no size clamp. The two differ by half a pixel in every RoI feature, so the same
weights give other detections. :class:`AlignedMultiScaleRoIAlign` keeps torchvision's level
mapping (``floor(4 + log2(sqrt(area) / 224))``, clamped to the pyramid, which on a stride-4
first level is MMDetection's ``floor(log2(sqrt(area) / 56))`` with ``finest_scale=56``) and
torchvision's RoI heads around it, and pools with ``aligned=True``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torchvision.ops import MultiScaleRoIAlign, roi_align
from torchvision.ops.poolers import LevelMapper


def _level_scales(feats: list[Tensor], image_shapes: list[tuple[int, int]]) -> list[float]:
    """Each level's spatial scale (a power of two) from its height over the largest image's."""
    height = max(h for h, _ in image_shapes)
    return [2.0 ** round(math.log2(f.shape[-2] / height)) for f in feats]


class AlignedMultiScaleRoIAlign(MultiScaleRoIAlign):
    """:class:`~torchvision.ops.MultiScaleRoIAlign` pooling with ``aligned=True`` (mmcv's RoIAlign).

    Same constructor, inputs and level mapping as torchvision's; only the sampling grid moves
    by half a pixel (and boxes under one pixel are no longer widened), as in MMDetection.
    """

    def forward(self, x: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]) -> Tensor:
        feats = [v for k, v in x.items() if k in self.featmap_names]
        if self.scales is None or self.map_levels is None:
            if not image_shapes:
                raise ValueError("images list should not be empty")
            scales = _level_scales(feats, image_shapes)
            self.scales = scales
            self.map_levels = LevelMapper(
                round(-math.log2(scales[0])), round(-math.log2(scales[-1])),
                canonical_scale=self.canonical_scale, canonical_level=self.canonical_level,
            )
        scales = self.scales
        rois = torch.cat([torch.cat([b.new_full((len(b), 1), i), b], dim=1) for i, b in enumerate(boxes)])
        size = self.output_size
        if len(feats) == 1:
            return roi_align(feats[0], rois, size, scales[0], self.sampling_ratio, aligned=True)
        levels = self.map_levels(boxes)
        out = feats[0].new_zeros((rois.shape[0], feats[0].shape[1], *size))
        for level, (feat, scale) in enumerate(zip(feats, scales, strict=True)):
            idx = torch.where(levels == level)[0]
            pooled = roi_align(feat, rois[idx], size, scale, self.sampling_ratio, aligned=True)
            out[idx] = pooled.to(out.dtype)
        return out
