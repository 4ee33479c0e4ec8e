"""SAM-det baseline: a torchvision Faster R-CNN whose boxes prompt a frozen SAM at test time.

The box head pools 7x7 RoIs as upstream's MMDetection Faster R-CNN does (mmcv ``RoIAlign``,
``sampling_ratio=0``, ``aligned=True``) rather than with torchvision's default pooler
(``sampling_ratio=2``, ``aligned=False``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead

from rsvl.models.rsprompter.lora import freeze
from rsvl.models.rsprompter.roi_pool import AlignedMultiScaleRoIAlign
from rsvl.models.rsprompter.transforms import check_images, masks_to_original, prepare_batch
from rsvl.models.sam.sam import Sam


class SamDet(nn.Module):
    """SAM-det: a torchvision Faster R-CNN; at test time its boxes prompt a frozen SAM."""

    def __init__(
        self, sam: Sam, num_classes: int, *, backbone: str | nn.Module = "resnet50", trainable_layers: int = 3,
        min_size: int | None = None, max_size: int | None = None, representation_size: int = 1024,
        **detector_kw: Any,
    ) -> None:
        super().__init__()

        if isinstance(backbone, str):
            body = resnet_fpn_backbone(backbone_name=backbone, weights=None, trainable_layers=trainable_layers)
        else:
            body = backbone
        size = sam.img_size
        c = body.out_channels
        detector_kw.setdefault("box_roi_pool", AlignedMultiScaleRoIAlign(["0", "1", "2", "3"], 7, 0))
        self.detector = FasterRCNN(
            body, min_size=min_size or size, max_size=max_size or size,
            image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225],
            box_head=TwoMLPHead(c * 49, representation_size),
            box_predictor=FastRCNNPredictor(representation_size, num_classes + 1), **detector_kw,
        )
        self.sam = sam
        self.num_classes = num_classes
        freeze(self.sam)
        self.sam.eval()

    def train(self, mode: bool = True) -> SamDet:
        super().train(mode)
        self.sam.eval()
        return self

    def forward(
        self, images: Sequence[Tensor], targets: Sequence[Mapping[str, Tensor]] | None = None
    ) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        check_images(images)
        if self.training:
            if targets is None:
                raise ValueError("training mode needs targets")
            tv = [{"boxes": t["boxes"].float().reshape(-1, 4), "labels": t["labels"].long()} for t in targets]
            return self.detector(list(images), tv)
        dets = self.detector(list(images))
        out = []
        with torch.no_grad():
            for img, d in zip(images, dets, strict=True):
                batch = prepare_batch(self.sam, [img], None)
                rs, orig = batch.sizes[0], batch.original[0]
                boxes = d["boxes"]
                if boxes.shape[0]:
                    emb = self.sam.encode_image(batch.pixels)
                    sy, sx = rs[0] / orig[0], rs[1] / orig[1]
                    low, _ = self.sam.decode(emb, boxes=boxes * boxes.new_tensor([sx, sy, sx, sy]), multimask_output=False)
                else:
                    low = boxes.new_zeros(0, 1, self.sam.config.low_res_size, self.sam.config.low_res_size)
                out.append({**d, "masks": masks_to_original(low, self.sam.img_size, rs, orig)})
        return out
