"""RSPrompter-anchor: RoI features of a Mask R-CNN style detector prompt SAM's mask decoder.

Both RoI poolers (7x7 for the box branch, 14x14 for the prompt branch, ``sampling_ratio=0``)
sample as upstream's mmcv ``RoIAlign`` does, with ``aligned=True``
(:class:`~rsvl.models.rsprompter.roi_pool.AlignedMultiScaleRoIAlign`).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.roi_heads import RoIHeads, fastrcnn_loss

from rsvl.models.rsprompter.prompts import RoIPromptHead, sine_positional_encoding
from rsvl.models.rsprompter.roi_pool import AlignedMultiScaleRoIAlign
from rsvl.models.rsprompter.transforms import boxes_to_original, masks_to_original, model_batch
from rsvl.models.rsprompter.trunk import FPN_STRIDES, SamTrunk, build_rpn, level_names
from rsvl.models.sam.sam import Sam


class _PromptRoIHeads(RoIHeads):
    """torchvision RoIHeads whose mask branch prompts SAM's decoder (full-image BCE)."""

    def __init__(self, *args: Any, mask_roi_pool: AlignedMultiScaleRoIAlign, prompt_head: RoIPromptHead,
                 pe_channels: int, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.prompt_roi_pool = mask_roi_pool
        self.mask_head = prompt_head  # type: ignore[assignment]
        self.pe_channels = pe_channels

    def with_extra_pe(self, feats: list[Tensor]) -> list[Tensor]:
        """Add the normalised sine encoding of the stride-4 grid to every level (upstream)."""
        h, w = feats[0].shape[-2:]
        pe = sine_positional_encoding(h, w, self.pe_channels // 2, device=feats[0].device, dtype=feats[0].dtype)
        return [f + F.interpolate(pe, f.shape[-2:], mode="bilinear", align_corners=False) for f in feats]

    def prompt_masks(
        self, sam: Sam, feats: OrderedDict[str, Tensor], boxes: list[Tensor], pad: int, image_embeddings: Tensor
    ) -> Tensor:
        """Boxes per image (padded-input frame) -> (N, 1, l, l) SAM mask logits."""
        n = sum(len(b) for b in boxes)
        low = sam.config.low_res_size
        if n == 0:
            return image_embeddings.new_zeros(0, 1, low, low)
        roi = self.prompt_roi_pool(feats, boxes, [(pad, pad)] * len(boxes))
        sparse = self.mask_head(roi)
        counts = torch.tensor([len(b) for b in boxes], device=image_embeddings.device)
        img = image_embeddings.repeat_interleave(counts, dim=0)
        pe = sam.prompt_encoder
        dense = pe.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(n, -1, *img.shape[-2:])
        masks, _ = sam.mask_decoder(img, pe.get_dense_pe(), sparse, dense, multimask_output=False)
        return masks

    def run(
        self, sam: Sam, feats: list[Tensor], proposals: list[Tensor], sizes: list[tuple[int, int]],
        pad: int, image_embeddings: Tensor, targets: list[dict[str, Tensor]] | None,
    ) -> tuple[list[dict[str, Tensor]], dict[str, Tensor]]:
        fd = OrderedDict(zip(level_names(len(feats)), self.with_extra_pe(feats), strict=True))
        pads = [(pad, pad)] * len(proposals)  # the pooler infers each level's scale from this
        if self.training:
            assert targets is not None
            proposals, matched, labels, reg_t = self.select_training_samples(proposals, targets)
        feats_box = self.box_head(self.box_roi_pool(fd, proposals, pads))
        class_logits, box_reg = self.box_predictor(feats_box)
        if self.training:
            loss_cls, loss_box = fastrcnn_loss(class_logits, box_reg, labels, reg_t)
            pos_boxes, gt_masks = [], []
            for props, lab, idx, t in zip(proposals, labels, matched, targets, strict=True):  # type: ignore[arg-type]
                pos = torch.where(lab > 0)[0]
                pos_boxes.append(props[pos])
                gt_masks.append(t["masks"][idx[pos]])
            logits = self.prompt_masks(sam, fd, pos_boxes, pad, image_embeddings)
            if logits.shape[0] == 0:
                loss_mask = class_logits.sum() * 0.0
            else:
                up = F.interpolate(logits, (pad, pad), mode="bilinear", align_corners=False)[:, 0]
                loss_mask = F.binary_cross_entropy_with_logits(up, torch.cat(gt_masks).to(up.dtype))
            return [], {"loss_classifier": loss_cls, "loss_box_reg": loss_box, "loss_mask": loss_mask}
        boxes, scores, labels_out = self.postprocess_detections(class_logits, box_reg, proposals, sizes)
        logits = self.prompt_masks(sam, fd, boxes, pad, image_embeddings)
        split = logits.split([len(b) for b in boxes])
        return [
            {"boxes": b, "scores": s, "labels": lab, "mask_logits": m}
            for b, s, lab, m in zip(boxes, scores, labels_out, split, strict=True)
        ], {}


class RSPrompterAnchor(SamTrunk):
    """RSPrompter-anchor: RoI features of a Mask R-CNN style detector prompt SAM's decoder."""

    _prompt_parts = ("no_mask_embed",)

    def __init__(
        self, sam: Sam, num_classes: int, *, num_points: int = 5, lora: bool = False,
        hidden_channels: int = 32, fpn_channels: int | None = None, representation_size: int = 1024,
        anchor_scales: Sequence[int] = (4, 8), score_thresh: float = 0.05, nms_thresh: float = 0.5,
        detections_per_img: int = 100, rcnn_batch_size: int = 256, select_layers: Sequence[int] | None = None,
    ) -> None:
        super().__init__(sam, lora=lora, hidden_channels=hidden_channels, fpn_channels=fpn_channels,
                         select_layers=select_layers)
        c = self.fpn_channels
        self.num_classes = num_classes
        self.num_points = num_points
        self.rpn = build_rpn(c, [[s * st for s in anchor_scales] for st in FPN_STRIDES])
        names = level_names(4)
        self.roi_heads = _PromptRoIHeads(
            AlignedMultiScaleRoIAlign(names, 7, 0),
            TwoMLPHead(c * 49, representation_size),
            FastRCNNPredictor(representation_size, num_classes + 1),
            0.5, 0.5, rcnn_batch_size, 0.25, (10.0, 10.0, 5.0, 5.0),
            score_thresh, nms_thresh, detections_per_img,
            mask_roi_pool=AlignedMultiScaleRoIAlign(names, 14, 0),
            prompt_head=RoIPromptHead(c, sam.config.prompt_embed_dim, 14, num_points),
            pe_channels=c,
        )

    def forward(
        self, images: Sequence[Tensor], targets: Sequence[Mapping[str, Tensor]] | None = None
    ) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        batch = model_batch(self.sam, images, targets, self.training)
        emb, feats = self._encode(batch.pixels)
        il = ImageList(batch.pixels, batch.sizes)
        fd = OrderedDict(zip(level_names(5), feats, strict=True))
        proposals, rpn_losses = self.rpn(il, fd, batch.targets)
        dets, roi_losses = self.roi_heads.run(
            self.sam, feats[:4], proposals, batch.sizes, self.sam.img_size, emb, batch.targets
        )
        if self.training:
            return {**rpn_losses, **roi_losses}
        out = []
        for d, rs, orig in zip(dets, batch.sizes, batch.original, strict=True):
            out.append({
                "boxes": boxes_to_original(d["boxes"], rs, orig),
                "labels": d["labels"],
                "scores": d["scores"],
                "masks": masks_to_original(d["mask_logits"], self.sam.img_size, rs, orig),
            })
        return out
