"""SAM-seg baseline: frozen SAM ViT + aggregator + FPN + a Mask R-CNN (or Mask2Former) head.

The Mask R-CNN head's RoI poolers (7x7 box, 14x14 mask, ``sampling_ratio=0``) sample as
upstream's mmcv ``RoIAlign`` does, with ``aligned=True``
(:class:`~rsvl.models.rsprompter.roi_pool.AlignedMultiScaleRoIAlign`); the Mask2Former head
pools no RoIs.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence

from torch import Tensor
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.roi_heads import RoIHeads, paste_masks_in_image

from rsvl.errors import UnknownModelError
from rsvl.models.rsprompter.losses import QueryLosses
from rsvl.models.rsprompter.query_head import QueryHead, query_predictions
from rsvl.models.rsprompter.roi_pool import AlignedMultiScaleRoIAlign
from rsvl.models.rsprompter.transforms import boxes_to_original, model_batch
from rsvl.models.rsprompter.trunk import FPN_STRIDES, SamTrunk, build_rpn, level_names
from rsvl.models.sam.sam import Sam


class SamSeg(SamTrunk):
    """SAM-seg: frozen SAM ViT + aggregator + FPN + a Mask R-CNN (or Mask2Former) head."""

    _uses_decoder = False

    def __init__(
        self, sam: Sam, num_classes: int, *, head: str = "maskrcnn", lora: bool = False, hidden_channels: int = 32,
        fpn_channels: int | None = None, representation_size: int = 1024, mask_head_channels: int = 256,
        num_queries: int = 100, feat_channels: int = 256, groups: int = 32, loss_points: int = 12544,
        num_heads: int = 8, ffn_channels: int = 2048, num_decoder_layers: int = 9,
        select_layers: Sequence[int] | None = None,
    ) -> None:
        super().__init__(sam, lora=lora, hidden_channels=hidden_channels, fpn_channels=fpn_channels,
                         select_layers=select_layers)
        c = self.fpn_channels
        self.num_classes = num_classes
        self.head_type = head
        if head == "maskrcnn":
            self.rpn = build_rpn(c, [[8 * st] for st in FPN_STRIDES])
            names = level_names(4)
            self.roi_heads = RoIHeads(
                AlignedMultiScaleRoIAlign(names, 7, 0), TwoMLPHead(c * 49, representation_size),
                FastRCNNPredictor(representation_size, num_classes + 1),
                0.5, 0.5, 512, 0.25, (10.0, 10.0, 5.0, 5.0), 0.05, 0.5, 100,
                mask_roi_pool=AlignedMultiScaleRoIAlign(names, 14, 0),
                mask_head=MaskRCNNHeads(c, [mask_head_channels] * 4, 1),
                mask_predictor=MaskRCNNPredictor(mask_head_channels, mask_head_channels, num_classes + 1),
            )
        elif head == "mask2former":
            self.head = QueryHead(
                num_classes, num_queries, c, feat_channels=feat_channels, out_channels=feat_channels,
                num_points=None, num_layers=num_decoder_layers, num_heads=num_heads, ffn_channels=ffn_channels,
                groups=groups,
            )
            self.losses = QueryLosses(num_classes, loss_points)
        else:
            raise UnknownModelError(f"Unknown SAM-seg head {head!r}.", hint="Use 'maskrcnn' or 'mask2former'.")

    def forward(
        self, images: Sequence[Tensor], targets: Sequence[Mapping[str, Tensor]] | None = None
    ) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        batch = model_batch(self.sam, images, targets, self.training)
        _, feats = self._encode(batch.pixels)
        size = self.sam.img_size
        if self.head_type == "mask2former":
            stages = self.head(feats)
            if self.training:
                assert batch.targets is not None
                return self.losses(stages, batch.targets)
            return query_predictions(stages[-1], batch, size, 100)
        il = ImageList(batch.pixels, batch.sizes)
        proposals, rpn_losses = self.rpn(il, OrderedDict(zip(level_names(5), feats, strict=True)), batch.targets)
        fd = OrderedDict(zip(level_names(4), feats[:4], strict=True))
        # the pooler infers level scales from the image sizes: give it the padded size
        dets, roi_losses = self.roi_heads(fd, proposals, [(size, size)] * len(proposals), batch.targets)
        if self.training:
            return {**rpn_losses, **roi_losses}
        out = []
        for d, rs, orig in zip(dets, batch.sizes, batch.original, strict=True):
            boxes = d["boxes"].clamp(min=0).minimum(d["boxes"].new_tensor([rs[1], rs[0]] * 2))
            keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
            boxes = boxes_to_original(boxes[keep], rs, orig)
            masks = d["masks"][keep]
            masks = paste_masks_in_image(masks, boxes, orig) if boxes.shape[0] else boxes.new_zeros(0, 1, *orig)
            out.append({"boxes": boxes, "labels": d["labels"][keep], "scores": d["scores"][keep], "masks": masks})
        return out
