"""RSPrompter (TGRS 2024) and its SAM baselines: instance segmentation with learned SAM prompts.

Four models, all built on rsvl's one SAM (:mod:`rsvl.models.sam.model`) and torchvision's detection
parts, all speaking torchvision's detection convention so that one trainer serves them::

    model.train(); losses = model(images, targets)   # dict[str, Tensor], already weighted
    model.eval();  preds = model(images)             # list[dict(boxes, labels, scores, masks)]

``images``: list of float (3, H, W) tensors in 0-1 (any size: each is resized so that its
longest side is SAM's input size, normalised and zero-padded, as RSPrompter's test pipeline
does). ``targets``: list of dict(boxes=float (N, 4) xyxy pixels, labels=int64 (N,) 1-based,
masks=uint8 (N, H, W)). Predictions are in the original pixel frame; ``masks`` are float
(N, 1, H, W) probabilities.

* ``rsprompter-anchor``: SAM ViT (frozen) -> feature aggregator over every other ViT layer ->
  simple FPN -> torchvision RPN + RoI heads; a RoI prompter turns each 14x14 RoI feature into
  K_p sin-cos prompt tokens that drive SAM's mask decoder (one decoder batch element per RoI);
  the mask loss is BCE between the decoder's masks upsampled to the padded input and the
  full-image ground-truth masks.
* ``rsprompter-query``: the same features -> multi-scale deformable-attention pixel decoder ->
  Mask2Former-style queries; every stage predicts classes, K_p prompt tokens and a coarse
  "plus" mask whose detached logits go through SAM's mask embedding as the dense prompt; SAM's
  decoder gives the final masks. Hungarian matching (scipy) on the plus masks, deep
  supervision with CE / BCE / dice on both mask sets.
* ``sam-seg``: frozen SAM ViT + aggregator + FPN + a standard Mask R-CNN head (torchvision), or
  a plain Mask2Former head (``head="mask2former"``); SAM's decoder is not used.
* ``sam-det``: a torchvision Faster R-CNN trained alone; at test time its boxes prompt a frozen
  SAM (single-mask output).

The SAM ViT is frozen unless ``lora=True`` (peft LoRA r=16, alpha 32, dropout 0.05 on ``qkv``;
then only the adapters of the ViT train). RSPrompter's configs leave the mask decoder trainable
(``decoder_freeze=False``); so does rsvl.

Checkpoints: :func:`save_prompter_checkpoint` writes, and :func:`load_prompter_checkpoint`
reads, MMDetection's ``{'state_dict': ..., 'meta': ...}`` layout with RSPrompter's key names
(``backbone.vision_encoder.*``, ``neck.feature_aggregator.*``, ``roi_head.mask_head.*``,
``panoptic_head.*`` ...). Loading is strict over every tensor the model uses.
"""

from __future__ import annotations

import math
import re
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.roi_heads import RoIHeads, fastrcnn_loss, paste_masks_in_image
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.ops import MultiScaleRoIAlign

from rsvl.errors import (
    BandSelectionError,
    CheckpointMismatchError,
    InputNotFoundError,
    RsvlError,
    UnknownModelError,
    WeightsNotFoundError,
)
from rsvl.models.cards import pick_card
from rsvl.models.rsprompter.cards import CARDS
from rsvl.models.sam.build import build_sam, load_sam
from rsvl.models.sam.common import LayerNorm2d
from rsvl.models.sam.config import SamConfig
from rsvl.models.sam.convert import hf_key_for
from rsvl.models.sam.sam import Sam
from rsvl.models.sam.transforms import ResizeLongestSide

__all__ = [
    "DATASET_CLASSES",
    "INSTANCE_MODELS",
    "PROMPT_SHAPES",
    "FeatureAggregator",
    "MSDeformAttnPixelDecoder",
    "QueryHead",
    "RSPrompterAnchor",
    "RSPrompterQuery",
    "RoIPromptHead",
    "SamDet",
    "SamSeg",
    "SimpleFPN",
    "apply_lora",
    "build_instance_model",
    "hungarian_match",
    "load_prompter_checkpoint",
    "load_prompter_model",
    "match_masks",
    "prompt_shape",
    "save_prompter_checkpoint",
    "sincos_prompts",
    "sine_positional_encoding",
    "to_mmdet_state_dict",
]

INSTANCE_MODELS: tuple[str, ...] = ("rsprompter-anchor", "rsprompter-query", "sam-seg", "sam-det")

#: (N_p prompt sets per image, K_p points per set) of RSPrompter's dataset configs. For the
#: anchor variant N_p is only nominal: the number of prompt sets is the number of RoIs.
PROMPT_SHAPES: dict[str, dict[str, tuple[int, int]]] = {
    "rsprompter-anchor": {"nwpu": (70, 5), "whu": (100, 5), "ssdd": (70, 5)},
    "rsprompter-query": {"nwpu": (70, 5), "whu": (100, 5), "ssdd": (30, 5)},
}

#: classes of the three benchmark datasets (COCO json, 1-based category ids)
DATASET_CLASSES: dict[str, tuple[str, ...]] = {
    "nwpu": (
        "airplane", "ship", "storage_tank", "baseball_diamond", "tennis_court",
        "basketball_court", "ground_track_field", "harbor", "bridge", "vehicle",
    ),
    "whu": ("building",),
    "ssdd": ("ship",),
}

_FPN_STRIDES = (4, 8, 16, 32, 64)


def prompt_shape(name: str, dataset: str) -> tuple[int, int]:
    """RSPrompter's (N_p, K_p) for a variant and dataset (``nwpu``, ``whu``, ``ssdd``)."""
    table = PROMPT_SHAPES.get(name)
    if table is None:
        raise UnknownModelError(f"{name!r} has no prompt shape.", hint=f"Use one of {sorted(PROMPT_SHAPES)}.")
    key = dataset.lower().replace("-", "").replace("_", "")
    key = {"nwpuvhr10": "nwpu", "whubuilding": "whu"}.get(key, key)
    if key not in table:
        raise UnknownModelError(
            f"Unknown dataset {dataset!r} for {name}.",
            hint=f"Use one of {sorted(table)} or pass num_queries=/num_points= explicitly.",
        )
    return table[key]


# --------------------------------------------------------------------------------------
# shared blocks
# --------------------------------------------------------------------------------------


def sincos_prompts(values: Tensor, num_points: int) -> Tensor:
    """RSPrompter's prompt regression: (..., K_p * 2C) -> (..., K_p, C) as sin(even) + odd."""
    v = values.reshape(*values.shape[:-1], num_points, -1)
    if v.shape[-1] % 2:
        raise ValueError(f"the prompt head gives {v.shape[-1]} values per point; need an even count")
    return torch.sin(v[..., 0::2]) + v[..., 1::2]


def sine_positional_encoding(
    h: int, w: int, num_feats: int, *, device: torch.device | None = None, dtype: torch.dtype = torch.float32
) -> Tensor:
    """DETR's normalised sine encoding of an unpadded (h, w) grid -> (1, 2 * num_feats, h, w).

    Coordinates are cumulative counts 1..h / 1..w divided by the last one, times 2 pi; channels
    are [y, x], each with interleaved sin/cos at temperatures 10000^(2 floor(i/2) / num_feats).
    """
    eps, scale = 1e-6, 2 * math.pi
    y = torch.arange(1, h + 1, device=device, dtype=torch.float32) / (h + eps) * scale
    x = torch.arange(1, w + 1, device=device, dtype=torch.float32) / (w + eps) * scale
    dim_t = torch.arange(num_feats, device=device, dtype=torch.float32)
    dim_t = 10000.0 ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_feats)
    px = x[:, None] / dim_t  # (w, F)
    py = y[:, None] / dim_t  # (h, F)
    px = torch.stack((px[:, 0::2].sin(), px[:, 1::2].cos()), dim=-1).flatten(1)
    py = torch.stack((py[:, 0::2].sin(), py[:, 1::2].cos()), dim=-1).flatten(1)
    pos = torch.cat(
        (py[:, None, :].expand(h, w, num_feats), px[None, :, :].expand(h, w, num_feats)), dim=-1
    )
    return pos.permute(2, 0, 1)[None].to(dtype)


class FeatureAggregator(nn.Module):
    """RSPrompter's aggregator: every other ViT hidden state -> one (B, out, h, w) map.

    Each selected (B, h, w, C) state goes through Conv1x1(C->hidden)+BN+ReLU+Conv3x3+BN+ReLU;
    the results are fused recurrently (h = x_prev + h_i; x = h + Conv3x3BNReLU(h)), then
    Conv1x1(hidden->out)+BN+ReLU+Conv3x3+BN+ReLU+Conv3x3.
    """

    def __init__(
        self,
        in_channels: int,
        num_hidden_states: int,
        hidden_channels: int = 32,
        out_channels: int = 256,
        select_layers: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        self.num_hidden_states = num_hidden_states
        # hidden state 0 is the embedding output, i the output of block i-1: 1, 3, 5, ...
        self.select_layers = tuple(select_layers if select_layers is not None else range(1, num_hidden_states, 2))
        if not self.select_layers or max(self.select_layers) >= num_hidden_states:
            raise ValueError(f"select_layers {self.select_layers} outside 0..{num_hidden_states - 1}")

        def cbr(cin: int, cout: int, k: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, k, padding=k // 2), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        self.downconvs = nn.ModuleList(
            nn.Sequential(*cbr(in_channels, hidden_channels, 1), *cbr(hidden_channels, hidden_channels, 3))
            for _ in self.select_layers
        )
        self.hidden_convs = nn.ModuleList(
            nn.Sequential(*cbr(hidden_channels, hidden_channels, 3)) for _ in self.select_layers
        )
        self.fusion_conv = nn.Sequential(
            *cbr(hidden_channels, out_channels, 1),
            *cbr(out_channels, out_channels, 3),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )

    def forward(self, hidden_states: Sequence[Tensor]) -> Tensor:
        if len(hidden_states) != self.num_hidden_states:
            raise ValueError(f"expected {self.num_hidden_states} hidden states, got {len(hidden_states)}")
        x: Tensor | None = None
        for down, hidden_conv, idx in zip(self.downconvs, self.hidden_convs, self.select_layers, strict=True):
            h = down(hidden_states[idx].permute(0, 3, 1, 2))
            if x is not None:
                h = x + h
            x = h + hidden_conv(h)
        assert x is not None
        return self.fusion_conv(x)


class _ConvLN(nn.Module):
    """Conv (no bias) + LayerNorm2d; attribute names as MMCV's ConvModule with LN2d."""

    def __init__(self, cin: int, cout: int, k: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, padding=k // 2, bias=False)
        self.norm_layer = LayerNorm2d(cout)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm_layer(self.conv(x))


class SimpleFPN(nn.Module):
    """ViTDet-style pyramid from one stride-16 map: strides 4, 8, 16, 32 (+64 by pooling)."""

    def __init__(self, backbone_channel: int = 256, out_channels: int = 256, num_outs: int = 5) -> None:
        super().__init__()
        c = backbone_channel
        self.fpn1 = nn.Sequential(
            nn.ConvTranspose2d(c, c // 2, 2, 2), LayerNorm2d(c // 2), nn.GELU(), nn.ConvTranspose2d(c // 2, c // 4, 2, 2)
        )
        self.fpn2 = nn.Sequential(nn.ConvTranspose2d(c, c // 2, 2, 2))
        self.fpn3 = nn.Sequential(nn.Identity())
        self.fpn4 = nn.Sequential(nn.MaxPool2d(kernel_size=2, stride=2))
        ins = [c // 4, c // 2, c, c]
        self.lateral_convs = nn.ModuleList(_ConvLN(i, out_channels, 1) for i in ins)
        self.fpn_convs = nn.ModuleList(_ConvLN(out_channels, out_channels, 3) for _ in ins)
        self.num_outs = num_outs

    def forward(self, x: Tensor) -> list[Tensor]:
        levels = [self.fpn1(x), self.fpn2(x), self.fpn3(x), self.fpn4(x)]
        outs = [fc(lc(lv)) for lv, lc, fc in zip(levels, self.lateral_convs, self.fpn_convs, strict=True)]
        while len(outs) < self.num_outs:
            outs.append(F.max_pool2d(outs[-1], 1, stride=2))
        return outs


def apply_lora(encoder: nn.Module, r: int = 16, alpha: int = 32, dropout: float = 0.05) -> nn.Module:
    """Add peft LoRA adapters to every ``qkv`` Linear of a SAM ViT; only they stay trainable."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError as exc:  # pragma: no cover - peft is a dependency
        raise RsvlError("LoRA needs the peft package.", hint="pip install peft") from exc
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=["qkv"], bias="none")
    inject_adapter_in_model(cfg, encoder)
    for name, p in encoder.named_parameters():
        p.requires_grad = "lora_" in name
    return encoder


def _freeze(module: nn.Module) -> None:
    for p in module.parameters():
        p.requires_grad = False


def _resolve_sam(sam: Sam | SamConfig | str | None, checkpoint: str | Path | None) -> Sam:
    if isinstance(sam, Sam):
        model = sam
    elif checkpoint is not None:
        model = load_sam(checkpoint, sam)
    elif sam is None:
        raise RsvlError("No SAM given.", hint="Pass sam='vit_b' (or a SamConfig) and/or sam_checkpoint=.")
    else:
        model = build_sam(sam)
    return model


# --------------------------------------------------------------------------------------
# input transform (resize longest side, normalise, pad) and back
# --------------------------------------------------------------------------------------


@dataclass
class _Batch:
    pixels: Tensor  # (B, 3, S, S) normalised, zero-padded
    sizes: list[tuple[int, int]]  # resized, unpadded
    original: list[tuple[int, int]]
    targets: list[dict[str, Tensor]] | None


def _check_images(images: Sequence[Tensor]) -> None:
    if isinstance(images, Tensor) and images.ndim == 3:
        raise BandSelectionError("Pass a list of (3, H, W) images, not one tensor.")
    for img in images:
        if img.ndim != 3 or img.shape[0] != 3:
            raise BandSelectionError(
                f"Instance models take RGB images shaped (3, H, W); got {tuple(img.shape)}.",
                hint="Select three bands (e.g. --bands 3,2,1) first.",
            )


def _prepare(sam: Sam, images: Sequence[Tensor], targets: Sequence[Mapping[str, Tensor]] | None) -> _Batch:
    """Resize each image so that its longest side is SAM's input size, normalise, pad."""
    _check_images(images)
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
    return _Batch(torch.stack(pixels), sizes, original, out_targets if targets is not None else None)


def _masks_to_original(logits: Tensor, size: int, resized: tuple[int, int], original: tuple[int, int]) -> Tensor:
    """(N, 1, l, l) low-res logits -> (N, 1, H, W) probabilities in the original frame."""
    if logits.shape[0] == 0:
        return logits.new_zeros(0, 1, *original)
    probs = logits.float().sigmoid()
    probs = F.interpolate(probs, (size, size), mode="bilinear", align_corners=False)
    probs = probs[..., : resized[0], : resized[1]]
    return F.interpolate(probs, original, mode="bilinear", align_corners=False)


def _boxes_to_original(boxes: Tensor, resized: tuple[int, int], original: tuple[int, int]) -> Tensor:
    sy, sx = original[0] / resized[0], original[1] / resized[1]
    return boxes * boxes.new_tensor([sx, sy, sx, sy])


# --------------------------------------------------------------------------------------
# the SAM-feature trunk shared by anchor, query and sam-seg
# --------------------------------------------------------------------------------------


class _SamTrunk(nn.Module):
    """SAM (+ optional LoRA) -> aggregator -> simple FPN. Holds the whole SAM as ``self.sam``."""

    #: SAM prompt-encoder parts the model uses (the rest is frozen: upstream lacks them)
    _prompt_parts: tuple[str, ...] = ()
    _uses_decoder = True

    def __init__(
        self, sam: Sam, *, lora: bool, hidden_channels: int = 32, fpn_channels: int | None = None,
        select_layers: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        self.sam = sam
        cfg = sam.config
        c = fpn_channels or cfg.prompt_embed_dim
        self.fpn_channels = c
        self.aggregator = FeatureAggregator(
            cfg.encoder_embed_dim, cfg.encoder_depth + 1, hidden_channels, c, select_layers
        )
        self.fpn = SimpleFPN(c, c, 5)
        self.lora = lora
        _freeze(sam)
        if lora:
            apply_lora(sam.image_encoder)
        pe = sam.prompt_encoder
        for part in self._prompt_parts:
            for p in getattr(pe, part).parameters():
                p.requires_grad = True
        if self._uses_decoder:
            for p in sam.mask_decoder.parameters():
                p.requires_grad = True

    def _encode(self, pixels: Tensor) -> tuple[Tensor, list[Tensor]]:
        enc = self.sam.image_encoder
        if self.lora:
            out = enc(pixels, return_hidden_states=True)
        else:
            with torch.no_grad():
                out = enc(pixels, return_hidden_states=True)
        emb, hidden = out  # type: ignore[misc]
        return emb, self.fpn(self.aggregator(hidden))

    def train(self, mode: bool = True) -> _SamTrunk:
        super().train(mode)
        if not self.lora:  # a frozen ViT stays in eval mode (upstream's _set_grad_false)
            self.sam.image_encoder.eval()
        return self


def _rpn(channels: int, sizes: Sequence[Sequence[int]], *, train_pre: int = 2000, test_pre: int = 1000,
         post: int = 1000) -> RegionProposalNetwork:
    ratios = ((0.5, 1.0, 2.0),) * len(sizes)
    gen = AnchorGenerator(tuple(tuple(s) for s in sizes), ratios)
    head = RPNHead(channels, gen.num_anchors_per_location()[0])
    return RegionProposalNetwork(
        gen, head, 0.7, 0.3, 256, 0.5,
        dict(training=train_pre, testing=test_pre), dict(training=post, testing=post), 0.7,
    )


def _level_names(n: int) -> list[str]:
    return [str(i) for i in range(n)]


# --------------------------------------------------------------------------------------
# RSPrompter-anchor
# --------------------------------------------------------------------------------------


class RoIPromptHead(nn.Module):
    """A 14x14 RoI feature -> K_p sin-cos prompt tokens (RSPrompter's ``point_emb``)."""

    def __init__(self, in_channels: int, prompt_dim: int, roi_size: int = 14, num_points: int = 5) -> None:
        super().__init__()
        self.num_points = num_points
        side = (roi_size + 1) // 2
        self.point_emb = nn.Sequential(
            nn.Conv2d(in_channels, in_channels, 3, stride=2, padding=1),
            nn.BatchNorm2d(in_channels),
            nn.ReLU(inplace=True),
            nn.Flatten(),
            nn.Linear(in_channels * side * side, in_channels),
            nn.ReLU(inplace=True),
            nn.Linear(in_channels, in_channels),
            nn.ReLU(inplace=True),
            nn.Linear(in_channels, prompt_dim * 2 * num_points),
        )

    def forward(self, roi_feats: Tensor) -> Tensor:
        """(N, C, r, r) -> (N, K_p, prompt_dim)."""
        return sincos_prompts(self.point_emb(roi_feats), self.num_points)


class _PromptRoIHeads(RoIHeads):
    """torchvision RoIHeads whose mask branch prompts SAM's decoder (full-image BCE)."""

    def __init__(self, *args: Any, mask_roi_pool: MultiScaleRoIAlign, prompt_head: RoIPromptHead,
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
        fd = OrderedDict(zip(_level_names(len(feats)), self.with_extra_pe(feats), strict=True))
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


class RSPrompterAnchor(_SamTrunk):
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
        self.rpn = _rpn(c, [[s * st for s in anchor_scales] for st in _FPN_STRIDES])
        names = _level_names(4)
        self.roi_heads = _PromptRoIHeads(
            MultiScaleRoIAlign(names, 7, 0),
            TwoMLPHead(c * 49, representation_size),
            FastRCNNPredictor(representation_size, num_classes + 1),
            0.5, 0.5, rcnn_batch_size, 0.25, (10.0, 10.0, 5.0, 5.0),
            score_thresh, nms_thresh, detections_per_img,
            mask_roi_pool=MultiScaleRoIAlign(names, 14, 0),
            prompt_head=RoIPromptHead(c, sam.config.prompt_embed_dim, 14, num_points),
            pe_channels=c,
        )

    def forward(
        self, images: Sequence[Tensor], targets: Sequence[Mapping[str, Tensor]] | None = None
    ) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        if self.training and targets is None:
            raise ValueError("training mode needs targets")
        batch = _prepare(self.sam, images, targets if self.training else None)
        emb, feats = self._encode(batch.pixels)
        il = ImageList(batch.pixels, batch.sizes)
        fd = OrderedDict(zip(_level_names(5), feats, strict=True))
        proposals, rpn_losses = self.rpn(il, fd, batch.targets)
        dets, roi_losses = self.roi_heads.run(
            self.sam, feats[:4], proposals, batch.sizes, self.sam.img_size, emb, batch.targets
        )
        if self.training:
            return {**rpn_losses, **roi_losses}
        out = []
        for d, rs, orig in zip(dets, batch.sizes, batch.original, strict=True):
            out.append({
                "boxes": _boxes_to_original(d["boxes"], rs, orig),
                "labels": d["labels"],
                "scores": d["scores"],
                "masks": _masks_to_original(d["mask_logits"], self.sam.img_size, rs, orig),
            })
        return out


# --------------------------------------------------------------------------------------
# deformable-attention pixel decoder and the Mask2Former-style query head
# --------------------------------------------------------------------------------------


def _ms_deform_attn(value: Tensor, shapes: list[tuple[int, int]], loc: Tensor, weights: Tensor) -> Tensor:
    """value (B, N_v, H, D); loc (B, N_q, H, L, P, 2) in [0, 1]; weights (B, N_q, H, L, P)."""
    b, _, heads, d = value.shape
    _, nq, _, levels, points, _ = loc.shape
    per_level = value.split([h * w for h, w in shapes], dim=1)
    grids = 2 * loc - 1
    sampled = []
    for lvl, (h, w) in enumerate(shapes):
        v = per_level[lvl].flatten(2).transpose(1, 2).reshape(b * heads, d, h, w)
        g = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)  # (B*H, N_q, P, 2)
        sampled.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False))
    stacked = torch.stack(sampled, dim=-2).flatten(-2)  # (B*H, D, N_q, L*P)
    w_ = weights.transpose(1, 2).reshape(b * heads, 1, nq, levels * points)
    return (stacked * w_).sum(-1).view(b, heads * d, nq).transpose(1, 2)


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention (Deformable DETR), in plain PyTorch (grid_sample)."""

    def __init__(self, dim: int, num_heads: int = 8, num_levels: int = 3, num_points: int = 4) -> None:
        super().__init__()
        self.h, self.l, self.p = num_heads, num_levels, num_points
        self.sampling_offsets = nn.Linear(dim, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(dim, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(dim, dim)
        self.output_proj = nn.Linear(dim, dim)
        nn.init.zeros_(self.sampling_offsets.weight)
        theta = torch.arange(num_heads, dtype=torch.float32) * (2 * math.pi / num_heads)
        grid = torch.stack([theta.cos(), theta.sin()], -1)
        grid = (grid / grid.abs().max(-1, keepdim=True)[0]).view(num_heads, 1, 1, 2)
        grid = grid.repeat(1, num_levels, num_points, 1) * torch.arange(1, num_points + 1).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for lin in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, x: Tensor, pos: Tensor, ref: Tensor, shapes: list[tuple[int, int]]) -> Tensor:
        b, n, c = x.shape
        q = x + pos
        v = self.value_proj(x).view(b, n, self.h, c // self.h)
        off = self.sampling_offsets(q).view(b, n, self.h, self.l, self.p, 2)
        aw = self.attention_weights(q).view(b, n, self.h, self.l * self.p).softmax(-1)
        aw = aw.view(b, n, self.h, self.l, self.p)
        norm = torch.tensor([[w, h] for h, w in shapes], device=x.device, dtype=x.dtype)
        loc = ref[:, :, None, :, None, :] + off / norm[None, None, None, :, None, :]
        return self.output_proj(_ms_deform_attn(v, shapes, loc, aw)) + x


class _FFN(nn.Module):
    """Linear-ReLU-Linear with a residual (MMCV FFN names: layers.0.0, layers.1)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(inplace=True), nn.Dropout(0.0)),
            nn.Linear(hidden, dim),
            nn.Dropout(0.0),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.layers(x)


class _EncoderLayer(nn.Module):
    def __init__(self, dim: int, heads: int, levels: int, ffn: int) -> None:
        super().__init__()
        self.self_attn = MSDeformAttn(dim, heads, levels, 4)
        self.ffn = _FFN(dim, ffn)
        self.norms = nn.ModuleList([nn.LayerNorm(dim), nn.LayerNorm(dim)])

    def forward(self, x: Tensor, pos: Tensor, ref: Tensor, shapes: list[tuple[int, int]]) -> Tensor:
        x = self.norms[0](self.self_attn(x, pos, ref, shapes))
        return self.norms[1](self.ffn(x))


class _Encoder(nn.Module):
    def __init__(self, layers: list[_EncoderLayer]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)


class _ConvGN(nn.Module):
    def __init__(self, cin: int, cout: int, k: int, groups: int, bias: bool, relu: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, padding=k // 2, bias=bias)
        self.gn = nn.GroupNorm(groups, cout)
        self.relu = relu

    def forward(self, x: Tensor) -> Tensor:
        x = self.gn(self.conv(x))
        return F.relu(x) if self.relu else x


class MSDeformAttnPixelDecoder(nn.Module):
    """Mask2Former's pixel decoder: deformable encoder on the 3 coarsest levels + FPN tail."""

    def __init__(
        self, in_channels: Sequence[int], feat_channels: int = 128, out_channels: int = 256,
        num_layers: int = 3, num_heads: int = 8, ffn_channels: int = 512, num_encoder_levels: int = 3,
        groups: int = 32,
    ) -> None:
        super().__init__()
        n_in = len(in_channels)
        self.n_in, self.n_enc = n_in, num_encoder_levels
        self.feat_channels = feat_channels
        self.input_convs = nn.ModuleList(
            _ConvGN(in_channels[i], feat_channels, 1, groups, True, False)
            for i in range(n_in - 1, n_in - num_encoder_levels - 1, -1)
        )
        self.encoder = _Encoder(
            [_EncoderLayer(feat_channels, num_heads, num_encoder_levels, ffn_channels) for _ in range(num_layers)]
        )
        self.level_encoding = nn.Embedding(num_encoder_levels, feat_channels)
        rest = range(n_in - num_encoder_levels - 1, -1, -1)
        self.lateral_convs = nn.ModuleList(_ConvGN(in_channels[i], feat_channels, 1, groups, False, False) for i in rest)
        self.output_convs = nn.ModuleList(_ConvGN(feat_channels, feat_channels, 3, groups, False, True) for _ in rest)
        self.mask_feature = nn.Conv2d(feat_channels, out_channels, 1)

    def forward(self, feats: Sequence[Tensor]) -> tuple[Tensor, list[Tensor]]:
        """feats: strides 4..64 (high to low resolution) -> mask features (stride 4) and the
        encoder outputs from low to high resolution."""
        b = feats[0].shape[0]
        srcs, poss, refs, shapes = [], [], [], []
        for i in range(self.n_enc):
            f = self.input_convs[i](feats[self.n_in - i - 1])
            h, w = f.shape[-2:]
            pos = sine_positional_encoding(h, w, self.feat_channels // 2, device=f.device, dtype=f.dtype)
            pos = pos + self.level_encoding.weight[i].view(1, -1, 1, 1)
            srcs.append(f.flatten(2).transpose(1, 2))
            poss.append(pos.flatten(2).transpose(1, 2).expand(b, -1, -1))
            ys = (torch.arange(h, device=f.device, dtype=f.dtype) + 0.5) / h
            xs = (torch.arange(w, device=f.device, dtype=f.dtype) + 0.5) / w
            refs.append(torch.stack([xs[None, :].expand(h, w), ys[:, None].expand(h, w)], -1).reshape(-1, 2))
            shapes.append((h, w))
        x = torch.cat(srcs, 1)
        pos_all = torch.cat(poss, 1)
        ref = torch.cat(refs, 0)[None, :, None, :].expand(b, -1, self.n_enc, -1)
        for layer in self.encoder.layers:
            x = layer(x, pos_all, ref, shapes)
        outs = [
            t.transpose(1, 2).reshape(b, -1, h, w)
            for t, (h, w) in zip(x.split([h * w for h, w in shapes], 1), shapes, strict=True)
        ]
        for i, lat, oc in zip(range(self.n_in - self.n_enc - 1, -1, -1), self.lateral_convs, self.output_convs, strict=True):
            cur = lat(feats[i])
            y = cur + F.interpolate(outs[-1], cur.shape[-2:], mode="bilinear", align_corners=False)
            outs.append(oc(y))
        return self.mask_feature(outs[-1]), outs[: self.n_enc]


class _MHA(nn.Module):
    """Residual multi-head attention with positions added to q and k (MMCV names: attn.*)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, dropout=0.0, batch_first=True)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, k_pos: Tensor, mask: Tensor | None = None) -> Tensor:
        return q + self.attn(q + q_pos, k + k_pos, v, attn_mask=mask, need_weights=False)[0]


class _DecoderLayer(nn.Module):
    """Mask2Former decoder layer: masked cross-attention, self-attention, FFN (post-norm)."""

    def __init__(self, dim: int, heads: int, ffn: int) -> None:
        super().__init__()
        self.cross_attn = _MHA(dim, heads)
        self.self_attn = _MHA(dim, heads)
        self.ffn = _FFN(dim, ffn)
        self.norms = nn.ModuleList([nn.LayerNorm(dim) for _ in range(3)])

    def forward(self, q: Tensor, mem: Tensor, q_pos: Tensor, mem_pos: Tensor, mask: Tensor | None) -> Tensor:
        q = self.norms[0](self.cross_attn(q, mem, mem, q_pos, mem_pos, mask))
        q = self.norms[1](self.self_attn(q, q, q, q_pos, q_pos))
        return self.norms[2](self.ffn(q))


class _TransformerDecoder(nn.Module):
    def __init__(self, dim: int, heads: int, ffn: int, num_layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(_DecoderLayer(dim, heads, ffn) for _ in range(num_layers))
        self.post_norm = nn.LayerNorm(dim)


#: SAM decoding callback of the query head: (sparse (B*Q, K, C), plus-mask logits or None,
#: image embeddings (B, C, h, w)) -> SAM mask logits (B*Q, 1, l, l)
SamDecodeFn = Callable[[Tensor, Tensor | None, Tensor], Tensor]


@dataclass
class _StageOut:
    cls: Tensor  # (B, Q, C+1)
    masks: Tensor  # (B, Q, l, l) final masks (SAM's, or the plain head's)
    plus: Tensor | None  # (B, Q, l', l') mask_embed . pixel features (RSPrompter only)


class QueryHead(nn.Module):
    """Mask2Former-style head. With ``num_points`` it is RSPrompter's: every stage also
    regresses K_p sin-cos prompts per query and SAM's decoder makes the masks."""

    def __init__(
        self, num_classes: int, num_queries: int, in_channels: int, *, feat_channels: int = 128,
        out_channels: int = 256, num_points: int | None = 5, prompt_dim: int = 256, num_layers: int = 6,
        num_heads: int = 8, ffn_channels: int = 512, encoder_layers: int = 3, groups: int = 32,
    ) -> None:
        super().__init__()
        f = feat_channels
        self.num_classes, self.num_queries, self.num_heads = num_classes, num_queries, num_heads
        self.num_points = num_points
        self.num_levels = 3
        self.pixel_decoder = MSDeformAttnPixelDecoder(
            [in_channels] * 5, f, out_channels, encoder_layers, num_heads, ffn_channels, 3, groups
        )
        self.transformer_decoder = _TransformerDecoder(f, num_heads, ffn_channels, num_layers)
        self.query_embed = nn.Embedding(num_queries, f)
        self.query_feat = nn.Embedding(num_queries, f)
        self.level_embed = nn.Embedding(self.num_levels, f)
        self.mask_embed = nn.Sequential(
            nn.Linear(f, f), nn.ReLU(inplace=True), nn.Linear(f, f), nn.ReLU(inplace=True), nn.Linear(f, out_channels)
        )
        if num_points:
            self.cls_embed: nn.Module = nn.Sequential(nn.Linear(f, f), nn.ReLU(inplace=True), nn.Linear(f, num_classes + 1))
            self.point_emb = nn.Sequential(
                nn.Linear(f, f // 2), nn.ReLU(inplace=True), nn.Linear(f // 2, f // 2), nn.ReLU(inplace=True),
                nn.Linear(f // 2, prompt_dim * 2 * num_points),
            )
        else:
            self.cls_embed = nn.Linear(f, num_classes + 1)

    def _stage(
        self, q: Tensor, mask_feat: Tensor, target: tuple[int, int], sam_decode: SamDecodeFn | None,
        image_embeddings: Tensor | None,
    ) -> tuple[_StageOut, Tensor]:
        b, nq, _ = q.shape
        out = self.transformer_decoder.post_norm(q)
        cls = self.cls_embed(out)
        plus = torch.einsum("bqc,bchw->bqhw", self.mask_embed(out), mask_feat)
        if self.num_points and sam_decode is not None:
            assert image_embeddings is not None
            sparse = sincos_prompts(self.point_emb(out), self.num_points).flatten(0, 1)
            masks = sam_decode(sparse, plus.detach().flatten(0, 1)[:, None], image_embeddings)
            masks = masks.reshape(b, nq, *masks.shape[-2:])
            stage = _StageOut(cls, masks, plus)
        else:
            stage = _StageOut(cls, plus, None)
        attn = F.interpolate(plus, target, mode="bilinear", align_corners=False)
        attn = attn.flatten(2)[:, None].expand(-1, self.num_heads, -1, -1).flatten(0, 1)
        attn = (attn.sigmoid() < 0.5).detach()
        return stage, attn

    def forward(
        self, feats: Sequence[Tensor], sam_decode: SamDecodeFn | None = None, image_embeddings: Tensor | None = None
    ) -> list[_StageOut]:
        b = feats[0].shape[0]
        mask_feat, mem = self.pixel_decoder(feats)
        inputs, poss = [], []
        for i in range(self.num_levels):
            x = mem[i].flatten(2).transpose(1, 2) + self.level_embed.weight[i].view(1, 1, -1)
            h, w = mem[i].shape[-2:]
            pos = sine_positional_encoding(h, w, x.shape[-1] // 2, device=x.device, dtype=x.dtype)
            inputs.append(x)
            poss.append(pos.flatten(2).transpose(1, 2).expand(b, -1, -1))
        q = self.query_feat.weight[None].expand(b, -1, -1)
        q_pos = self.query_embed.weight[None].expand(b, -1, -1)
        stage, attn = self._stage(q, mask_feat, mem[0].shape[-2:], sam_decode, image_embeddings)
        stages = [stage]
        for i, layer in enumerate(self.transformer_decoder.layers):
            lvl = i % self.num_levels
            attn = attn & (attn.sum(-1) != attn.shape[-1])[..., None]  # all-masked rows: attend all
            q = layer(q, inputs[lvl], q_pos, poss[lvl], attn)
            nxt = mem[(i + 1) % self.num_levels].shape[-2:]
            stage, attn = self._stage(q, mask_feat, nxt, sam_decode, image_embeddings)
            stages.append(stage)
        return stages


def _point_sample(x: Tensor, points: Tensor) -> Tensor:
    """x (N, C, H, W), points (N, P, 2) in [0, 1] (x, y) -> (N, C, P)."""
    return F.grid_sample(x, 2 * points[:, :, None] - 1, mode="bilinear", align_corners=False)[..., 0]


def _uncertain_points(logits: Tensor, num_points: int, oversample: float, importance: float) -> Tensor:
    """Mask2Former's point sampling: mostly the most uncertain of oversampled random points."""
    n = logits.shape[0]
    sampled = int(num_points * oversample)
    coords = torch.rand(n, sampled, 2, device=logits.device)
    unc = -_point_sample(logits, coords)[:, 0].abs()
    k = int(importance * num_points)
    idx = unc.topk(k, dim=1)[1]
    picked = torch.gather(coords, 1, idx[..., None].expand(-1, -1, 2))
    if num_points - k > 0:
        picked = torch.cat([picked, torch.rand(n, num_points - k, 2, device=logits.device)], 1)
    return picked


def hungarian_match(cost: Tensor | np.ndarray) -> tuple[Tensor, Tensor]:
    """Minimum-cost assignment of a (num_preds, num_gts) cost matrix (scipy's
    ``linear_sum_assignment``): (pred indices, gt indices), sorted by pred index."""
    c = cost.detach().float().cpu().numpy() if isinstance(cost, Tensor) else np.asarray(cost, dtype=np.float64)
    c = np.nan_to_num(c, nan=1e8, posinf=1e8, neginf=-1e8)
    rows, cols = linear_sum_assignment(c)
    return torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)


def match_masks(
    cls_logits: Tensor, mask_logits: Tensor, gt_labels: Tensor, gt_masks: Tensor, *, num_points: int = 12544,
    class_weight: float = 2.0, mask_weight: float = 5.0, dice_weight: float = 5.0,
) -> tuple[Tensor, Tensor]:
    """Mask2Former's Hungarian matching of one image: classification cost (-p(class)),
    sigmoid BCE and dice (eps 1) costs on ``num_points`` shared random points.

    cls_logits (Q, C+1), mask_logits (Q, h, w), gt_labels (G,) 0-based, gt_masks (G, H, W).
    """
    if gt_labels.numel() == 0:
        e = torch.zeros(0, dtype=torch.int64)
        return e, e
    with torch.no_grad():
        pts = torch.rand(1, num_points, 2, device=mask_logits.device)
        pm = _point_sample(mask_logits[:, None].float(), pts.expand(mask_logits.shape[0], -1, -1))[:, 0]
        gm = _point_sample(gt_masks[:, None].float(), pts.expand(gt_masks.shape[0], -1, -1))[:, 0]
        cost_cls = -cls_logits.float().softmax(-1)[:, gt_labels]
        pos = F.binary_cross_entropy_with_logits(pm, torch.ones_like(pm), reduction="none")
        neg = F.binary_cross_entropy_with_logits(pm, torch.zeros_like(pm), reduction="none")
        cost_mask = (pos @ gm.T + neg @ (1 - gm).T) / num_points
        sig = pm.sigmoid()
        cost_dice = 1 - (2 * sig @ gm.T + 1) / (sig.sum(-1)[:, None] + gm.sum(-1)[None, :] + 1)
        cost = class_weight * cost_cls + mask_weight * cost_mask + dice_weight * cost_dice
    rows, cols = hungarian_match(cost)
    return rows.to(mask_logits.device), cols.to(mask_logits.device)


def _dice_loss(pred: Tensor, target: Tensor, avg: float) -> Tensor:
    p = pred.sigmoid()
    d = (2 * (p * target).sum(1) + 1) / (p.sum(1) + target.sum(1) + 1)
    return (1 - d).sum() / avg


class _QueryLosses:
    """Deep-supervised Mask2Former losses (CE x2 with no-object 0.1, BCE x5, dice x5)."""

    def __init__(self, num_classes: int, num_points: int, oversample: float = 3.0, importance: float = 0.75) -> None:
        self.num_classes = num_classes
        self.num_points, self.oversample, self.importance = num_points, oversample, importance

    def __call__(self, stages: list[_StageOut], targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        losses: dict[str, Tensor] = {}
        last = len(stages) - 1
        for i, st in enumerate(stages):
            prefix = "" if i == last else f"d{i}."
            for k, v in self._single(st, targets).items():
                losses[prefix + k] = v
        return losses

    def _single(self, st: _StageOut, targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        b, q, _ = st.cls.shape
        match_on = st.plus if st.plus is not None else st.masks
        labels = torch.full((b, q), self.num_classes, dtype=torch.int64, device=st.cls.device)
        preds, plus, gts = [], [], []
        for j, t in enumerate(targets):
            gl = t["labels"] - 1
            rows, cols = match_masks(st.cls[j], match_on[j], gl, t["masks"], num_points=self.num_points)
            labels[j, rows] = gl[cols]
            preds.append(st.masks[j, rows])
            if st.plus is not None:
                plus.append(st.plus[j, rows])
            gts.append(t["masks"][cols])
        cw = st.cls.new_ones(self.num_classes + 1)
        cw[-1] = 0.1
        out = {"loss_cls": 2.0 * F.cross_entropy(st.cls.flatten(0, 1), labels.flatten(), weight=cw)}
        pred = torch.cat(preds)
        n = pred.shape[0]
        names = [("loss_mask", "loss_dice", pred)]
        if st.plus is not None:
            names.append(("loss_mask_plus", "loss_dice_plus", torch.cat(plus)))
        if n == 0:
            for lm, ld, p in names:
                out[lm] = p.sum() * 0.0 + st.masks.sum() * 0.0
                out[ld] = p.sum() * 0.0 + st.masks.sum() * 0.0
            return out
        gt = torch.cat(gts).float()
        with torch.no_grad():
            pts = _uncertain_points(pred[:, None].float(), self.num_points, self.oversample, self.importance)
            gt_pts = _point_sample(gt[:, None], pts)[:, 0]
        for lm, ld, p in names:
            pp = _point_sample(p[:, None].float(), pts)[:, 0]
            out[lm] = 5.0 * F.binary_cross_entropy_with_logits(pp, gt_pts)
            out[ld] = 5.0 * _dice_loss(pp, gt_pts, float(max(n, 1)))
        return out


def _instance_postprocess(cls: Tensor, masks: Tensor, max_per_image: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """MaskFormer instance post-processing: top-k over queries x classes (no background),
    score x mean foreground probability. Returns (query idx, labels 1-based, scores, masks)."""
    q, c1 = cls.shape
    c = c1 - 1
    scores = cls.float().softmax(-1)[:, :-1].flatten()
    k = min(max_per_image, scores.numel())
    top, idx = scores.topk(k, sorted=True)
    query = torch.div(idx, c, rounding_mode="floor")
    labels = idx % c + 1
    m = masks[query].float()
    fg = (m > 0).float()
    mscore = (m.sigmoid() * fg).flatten(1).sum(1) / (fg.flatten(1).sum(1) + 1e-6)
    return query, labels, top * mscore, m


class RSPrompterQuery(_SamTrunk):
    """RSPrompter-query: Mask2Former-style queries regress SAM prompts (+ a dense mask prompt)."""

    _prompt_parts = ("mask_downscaling",)

    def __init__(
        self, sam: Sam, num_classes: int, *, num_queries: int = 70, num_points: int = 5, lora: bool = False,
        hidden_channels: int = 32, fpn_channels: int | None = None, feat_channels: int = 128,
        num_decoder_layers: int = 6, num_heads: int = 8, ffn_channels: int = 512, encoder_layers: int = 3,
        groups: int = 32, loss_points: int = 12544, max_per_image: int = 100,
        select_layers: Sequence[int] | None = None,
    ) -> None:
        super().__init__(sam, lora=lora, hidden_channels=hidden_channels, fpn_channels=fpn_channels,
                         select_layers=select_layers)
        self.num_classes, self.num_queries, self.num_points = num_classes, num_queries, num_points
        self.max_per_image = max_per_image
        prompt_dim = sam.config.prompt_embed_dim
        self.head = QueryHead(
            num_classes, num_queries, self.fpn_channels, feat_channels=feat_channels, out_channels=prompt_dim,
            num_points=num_points, prompt_dim=prompt_dim, num_layers=num_decoder_layers, num_heads=num_heads,
            ffn_channels=ffn_channels, encoder_layers=encoder_layers, groups=groups,
        )
        self.losses = _QueryLosses(num_classes, loss_points)

    def _sam_decode(self, sparse: Tensor, plus: Tensor | None, image_embeddings: Tensor) -> Tensor:
        pe = self.sam.prompt_encoder
        n = sparse.shape[0]
        reps = n // image_embeddings.shape[0]
        img = image_embeddings.repeat_interleave(reps, dim=0)
        assert plus is not None
        if plus.shape[-2:] != pe.mask_input_size:
            plus = F.interpolate(plus, pe.mask_input_size, mode="bilinear", align_corners=False)
        dense = pe.embed_masks(plus)
        masks, _ = self.sam.mask_decoder(img, pe.get_dense_pe(), sparse, dense, multimask_output=False)
        return masks

    def forward(
        self, images: Sequence[Tensor], targets: Sequence[Mapping[str, Tensor]] | None = None
    ) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        if self.training and targets is None:
            raise ValueError("training mode needs targets")
        batch = _prepare(self.sam, images, targets if self.training else None)
        emb, feats = self._encode(batch.pixels)
        stages = self.head(feats, self._sam_decode, emb)
        if self.training:
            assert batch.targets is not None
            return self.losses(stages, batch.targets)
        return _query_predictions(stages[-1], batch, self.sam.img_size, self.max_per_image)


def _mask_boxes(binary: Tensor) -> Tensor:
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


def _query_predictions(st: _StageOut, batch: _Batch, size: int, max_per_image: int) -> list[dict[str, Tensor]]:
    out = []
    for j, (rs, orig) in enumerate(zip(batch.sizes, batch.original, strict=True)):
        _, labels, scores, m = _instance_postprocess(st.cls[j], st.masks[j], max_per_image)
        probs = _masks_to_original(m[:, None], size, rs, orig)
        boxes = _mask_boxes(probs[:, 0] > 0.5)
        out.append({"boxes": boxes, "labels": labels, "scores": scores, "masks": probs})
    return out


# --------------------------------------------------------------------------------------
# baselines: SAM-seg and SAM-det
# --------------------------------------------------------------------------------------


class SamSeg(_SamTrunk):
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
            self.rpn = _rpn(c, [[8 * st] for st in _FPN_STRIDES])
            names = _level_names(4)
            self.roi_heads = RoIHeads(
                MultiScaleRoIAlign(names, 7, 0), TwoMLPHead(c * 49, representation_size),
                FastRCNNPredictor(representation_size, num_classes + 1),
                0.5, 0.5, 512, 0.25, (10.0, 10.0, 5.0, 5.0), 0.05, 0.5, 100,
                mask_roi_pool=MultiScaleRoIAlign(names, 14, 0),
                mask_head=MaskRCNNHeads(c, [mask_head_channels] * 4, 1),
                mask_predictor=MaskRCNNPredictor(mask_head_channels, mask_head_channels, num_classes + 1),
            )
        elif head == "mask2former":
            self.head = QueryHead(
                num_classes, num_queries, c, feat_channels=feat_channels, out_channels=feat_channels,
                num_points=None, num_layers=num_decoder_layers, num_heads=num_heads, ffn_channels=ffn_channels,
                groups=groups,
            )
            self.losses = _QueryLosses(num_classes, loss_points)
        else:
            raise UnknownModelError(f"Unknown SAM-seg head {head!r}.", hint="Use 'maskrcnn' or 'mask2former'.")

    def forward(
        self, images: Sequence[Tensor], targets: Sequence[Mapping[str, Tensor]] | None = None
    ) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        if self.training and targets is None:
            raise ValueError("training mode needs targets")
        batch = _prepare(self.sam, images, targets if self.training else None)
        _, feats = self._encode(batch.pixels)
        size = self.sam.img_size
        if self.head_type == "mask2former":
            stages = self.head(feats)
            if self.training:
                assert batch.targets is not None
                return self.losses(stages, batch.targets)
            return _query_predictions(stages[-1], batch, size, 100)
        il = ImageList(batch.pixels, batch.sizes)
        proposals, rpn_losses = self.rpn(il, OrderedDict(zip(_level_names(5), feats, strict=True)), batch.targets)
        fd = OrderedDict(zip(_level_names(4), feats[:4], strict=True))
        # the pooler infers level scales from the image sizes: give it the padded size
        dets, roi_losses = self.roi_heads(fd, proposals, [(size, size)] * len(proposals), batch.targets)
        if self.training:
            return {**rpn_losses, **roi_losses}
        out = []
        for d, rs, orig in zip(dets, batch.sizes, batch.original, strict=True):
            boxes = d["boxes"].clamp(min=0).minimum(d["boxes"].new_tensor([rs[1], rs[0]] * 2))
            keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
            boxes = _boxes_to_original(boxes[keep], rs, orig)
            masks = d["masks"][keep]
            masks = paste_masks_in_image(masks, boxes, orig) if boxes.shape[0] else boxes.new_zeros(0, 1, *orig)
            out.append({"boxes": boxes, "labels": d["labels"][keep], "scores": d["scores"][keep], "masks": masks})
        return out


class SamDet(nn.Module):
    """SAM-det: a torchvision Faster R-CNN; at test time its boxes prompt a frozen SAM."""

    def __init__(
        self, sam: Sam, num_classes: int, *, backbone: str | nn.Module = "resnet50", trainable_layers: int = 3,
        min_size: int | None = None, max_size: int | None = None, representation_size: int = 1024,
        **detector_kw: Any,
    ) -> None:
        super().__init__()
        from torchvision.models.detection import FasterRCNN
        from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

        if isinstance(backbone, str):
            body = resnet_fpn_backbone(backbone_name=backbone, weights=None, trainable_layers=trainable_layers)
        else:
            body = backbone
        size = sam.img_size
        c = body.out_channels
        self.detector = FasterRCNN(
            body, min_size=min_size or size, max_size=max_size or size,
            image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225],
            box_head=TwoMLPHead(c * 49, representation_size),
            box_predictor=FastRCNNPredictor(representation_size, num_classes + 1), **detector_kw,
        )
        self.sam = sam
        self.num_classes = num_classes
        _freeze(self.sam)
        self.sam.eval()

    def train(self, mode: bool = True) -> SamDet:
        super().train(mode)
        self.sam.eval()
        return self

    def forward(
        self, images: Sequence[Tensor], targets: Sequence[Mapping[str, Tensor]] | None = None
    ) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        _check_images(images)
        if self.training:
            if targets is None:
                raise ValueError("training mode needs targets")
            tv = [{"boxes": t["boxes"].float().reshape(-1, 4), "labels": t["labels"].long()} for t in targets]
            return self.detector(list(images), tv)
        dets = self.detector(list(images))
        out = []
        with torch.no_grad():
            for img, d in zip(images, dets, strict=True):
                batch = _prepare(self.sam, [img], None)
                rs, orig = batch.sizes[0], batch.original[0]
                boxes = d["boxes"]
                if boxes.shape[0]:
                    emb = self.sam.encode_image(batch.pixels)
                    sy, sx = rs[0] / orig[0], rs[1] / orig[1]
                    low, _ = self.sam.decode(emb, boxes=boxes * boxes.new_tensor([sx, sy, sx, sy]), multimask_output=False)
                else:
                    low = boxes.new_zeros(0, 1, self.sam.config.low_res_size, self.sam.config.low_res_size)
                out.append({**d, "masks": _masks_to_original(low, self.sam.img_size, rs, orig)})
        return out


# --------------------------------------------------------------------------------------
# factory
# --------------------------------------------------------------------------------------


def build_instance_model(
    name: str, num_classes: int, *, sam: Sam | SamConfig | str | None = "vit_b",
    sam_checkpoint: str | Path | None = None, lora: bool = False, dataset: str = "nwpu", **kw: Any,
) -> nn.Module:
    """Build ``rsprompter-anchor``, ``rsprompter-query``, ``sam-seg`` or ``sam-det``.

    ``sam`` is a :class:`Sam`, a :class:`SamConfig` or a name (``vit_b``/``vit_l``/``vit_h``);
    with ``sam_checkpoint`` its weights are loaded (Meta or transformers layout). ``dataset``
    picks RSPrompter's prompt shape (N_p, K_p); ``num_queries=`` / ``num_points=`` override it.
    Other keywords go to the model class (e.g. ``fpn_channels``, ``head="mask2former"`` for
    sam-seg, ``backbone="resnet18"`` for sam-det).
    """
    key = name.strip().lower().replace("_", "-")
    key = {"rsprompter_anchor": "rsprompter-anchor", "samseg": "sam-seg", "samdet": "sam-det"}.get(key, key)
    if key not in INSTANCE_MODELS:
        raise UnknownModelError(f"Unknown instance model {name!r}.", hint=f"Use one of {list(INSTANCE_MODELS)}.")
    if num_classes < 1:
        raise ValueError("num_classes must be >= 1")
    sam_model = _resolve_sam(sam, sam_checkpoint)
    if key == "rsprompter-anchor":
        _, k = prompt_shape(key, dataset)
        kw.setdefault("num_points", k)
        model: nn.Module = RSPrompterAnchor(sam_model, num_classes, lora=lora, **kw)
    elif key == "rsprompter-query":
        n, k = prompt_shape(key, dataset)
        kw.setdefault("num_queries", n)
        kw.setdefault("num_points", k)
        model = RSPrompterQuery(sam_model, num_classes, lora=lora, **kw)
    elif key == "sam-seg":
        model = SamSeg(sam_model, num_classes, lora=lora, **kw)
    else:
        if lora:
            raise RsvlError("SAM-det keeps SAM frozen; LoRA does not apply.", hint="Drop lora=True for sam-det.")
        model = SamDet(sam_model, num_classes, **kw)
    model.rsvl_name = key  # type: ignore[assignment]
    model.rsvl_dataset = dataset  # type: ignore[assignment]
    return model.train()


# --------------------------------------------------------------------------------------
# checkpoints in MMDetection / RSPrompter layout
# --------------------------------------------------------------------------------------

_PEFT = re.compile(r"\.(base_layer|lora_[AB]\.[^.]+|lora_dropout\.[^.]+)(?=\.)")


def _sam_hf(key: str, cfg: SamConfig) -> str:
    """Our SAM key (segment-anything names, maybe with peft parts) -> transformers name."""
    m = _PEFT.search(key)
    if m:
        plain = key[: m.start()] + key[m.end():]
        hf = hf_key_for(plain, cfg)
        head, _, tail = hf.rpartition(".")
        return f"{head}{m.group(0)}.{tail}"
    return hf_key_for(key, cfg)


def _sam_roles(model: nn.Module) -> dict[str, str]:
    """Where each SAM part lives in the upstream model (prefix of its transformers names)."""
    roles = {"vision_encoder.": "backbone.vision_encoder."}
    if isinstance(model, RSPrompterAnchor):
        roles.update({
            "mask_decoder.": "roi_head.mask_head.mask_decoder.mask_decoder.",
            "prompt_encoder.no_mask_embed.": "roi_head.mask_head.no_mask_embed.",
            "shared_image_embedding.": "shared_image_embedding.shared_image_embedding.",
        })
    elif isinstance(model, RSPrompterQuery):
        roles.update({
            "mask_decoder.": "panoptic_head.mask_decoder.mask_decoder.",
            "prompt_encoder.mask_embed.": "panoptic_head.sam_mask_embed.",
            "shared_image_embedding.": "shared_image_embedding.shared_image_embedding.",
        })
    elif isinstance(model, SamDet):
        roles = {"": "segmentor.sam_model."}
    return roles


_RULES: list[tuple[str, str]] = [
    (r"^aggregator\.", "neck.feature_aggregator."),
    (r"^fpn\.", "neck.feature_spliter."),
    (r"^rpn\.head\.conv\.0\.0\.", "rpn_head.rpn_conv."),
    (r"^rpn\.head\.cls_logits\.", "rpn_head.rpn_cls."),
    (r"^rpn\.head\.bbox_pred\.", "rpn_head.rpn_reg."),
    (r"^roi_heads\.box_head\.fc6\.", "roi_head.bbox_head.shared_fcs.0."),
    (r"^roi_heads\.box_head\.fc7\.", "roi_head.bbox_head.shared_fcs.1."),
    (r"^roi_heads\.box_predictor\.cls_score\.", "roi_head.bbox_head.fc_cls."),
    (r"^roi_heads\.box_predictor\.bbox_pred\.", "roi_head.bbox_head.fc_reg."),
    (r"^roi_heads\.mask_head\.point_emb\.", "roi_head.mask_head.point_emb."),
    (r"^roi_heads\.mask_head\.(\d+)\.0\.", r"roi_head.mask_head.convs.\1.conv."),
    (r"^roi_heads\.mask_predictor\.conv5_mask\.", "roi_head.mask_head.upsample."),
    (r"^roi_heads\.mask_predictor\.mask_fcn_logits\.", "roi_head.mask_head.conv_logits."),
    (r"^head\.", "panoptic_head."),
    # SAM-det's torchvision Faster R-CNN -> MMDetection's Faster R-CNN R50-FPN
    (r"^detector\.backbone\.body\.", "detector.backbone."),
    (r"^detector\.backbone\.fpn\.inner_blocks\.(\d+)\.0\.", r"detector.neck.lateral_convs.\1.conv."),
    (r"^detector\.backbone\.fpn\.layer_blocks\.(\d+)\.0\.", r"detector.neck.fpn_convs.\1.conv."),
    (r"^detector\.rpn\.head\.conv\.0\.0\.", "detector.rpn_head.rpn_conv."),
    (r"^detector\.rpn\.head\.cls_logits\.", "detector.rpn_head.rpn_cls."),
    (r"^detector\.rpn\.head\.bbox_pred\.", "detector.rpn_head.rpn_reg."),
    (r"^detector\.roi_heads\.box_head\.fc6\.", "detector.roi_head.bbox_head.shared_fcs.0."),
    (r"^detector\.roi_heads\.box_head\.fc7\.", "detector.roi_head.bbox_head.shared_fcs.1."),
    (r"^detector\.roi_heads\.box_predictor\.cls_score\.", "detector.roi_head.bbox_head.fc_cls."),
    (r"^detector\.roi_heads\.box_predictor\.bbox_pred\.", "detector.roi_head.bbox_head.fc_reg."),
]


def _upstream_name(model: nn.Module, key: str) -> str | None:
    """Upstream (MMDetection) name of one of our state-dict keys; None when upstream's model
    has no such tensor (SAM prompt-encoder parts the variant does not use)."""
    if key.startswith("sam."):
        sam: Sam = model.sam  # type: ignore[assignment]
        hf = _sam_hf(key[4:], sam.config)
        for ours, theirs in _sam_roles(model).items():
            if hf.startswith(ours):
                return theirs + hf[len(ours):]
        return None
    for pattern, repl in _RULES:
        new, n = re.subn(pattern, repl, key)
        if n:
            return new
    return key


# tensors whose layout differs: torchvision puts background first and regresses it too
_CLS_KEYS = re.compile(r"(bbox_head\.fc_cls)\.(weight|bias)$")
_REG_KEYS = re.compile(r"(bbox_head\.fc_reg)\.(weight|bias)$")
_MASK_LOGITS = re.compile(r"mask_head\.conv_logits\.(weight|bias)$")


def _to_upstream_tensor(name: str, t: Tensor) -> Tensor:
    if _CLS_KEYS.search(name):  # torchvision [bg, c1..cN] -> mmdet [c1..cN, bg]
        return torch.cat([t[1:], t[:1]])
    if _REG_KEYS.search(name):  # drop the background's 4 regression rows
        return t[4:]
    if _MASK_LOGITS.search(name):
        return t[1:]
    return t


def _from_upstream_tensor(name: str, t: Tensor) -> Tensor:
    if _CLS_KEYS.search(name):
        return torch.cat([t[-1:], t[:-1]])
    if _REG_KEYS.search(name):
        return torch.cat([t.new_zeros(4, *t.shape[1:]), t])
    if _MASK_LOGITS.search(name):
        return torch.cat([t.new_zeros(1, *t.shape[1:]), t])
    return t


def to_mmdet_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Our model's tensors under RSPrompter's (MMDetection) names, upstream tensor layouts."""
    out: dict[str, Tensor] = {}
    for k, v in model.state_dict().items():
        name = _upstream_name(model, k)
        if name is not None:
            out[name] = _to_upstream_tensor(name, v.detach().cpu())
    return out


def save_prompter_checkpoint(model: nn.Module, path: str | Path, meta: Mapping[str, Any] | None = None) -> Path:
    """Write ``{'state_dict': ..., 'meta': ...}`` (MMDetection layout); temp name + rename."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    info: dict[str, Any] = {"rsvl_model": getattr(model, "rsvl_name", type(model).__name__)}
    classes = getattr(model, "num_classes", None)
    if classes is not None:
        info["num_classes"] = int(classes)
    info.update(dict(meta or {}))
    tmp = p.with_name(p.name + ".part")
    torch.save({"state_dict": to_mmdet_state_dict(model), "meta": info}, tmp)
    tmp.replace(p)
    return p


def _read_checkpoint(source: str | Path | Mapping[str, Any]) -> dict[str, Tensor]:
    if isinstance(source, Mapping):
        obj: Any = source
        shown = "the state dict"
    else:
        p = Path(source).expanduser()
        shown = str(p)
        if not p.is_file():
            raise InputNotFoundError(f"Checkpoint not found: {p}")
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj = load_file(str(p), device="cpu")
        else:
            try:
                obj = torch.load(str(p), map_location="cpu", weights_only=True)
            except Exception as exc:
                raise CheckpointMismatchError(
                    f"Cannot read {p} with torch.load(weights_only=True): {exc}",
                    hint="MMEngine checkpoints also pickle the message hub and optimizer; keep only the "
                    "weights once, in a Python you trust: ck = torch.load(p, weights_only=False); "
                    "torch.save({'state_dict': ck['state_dict']}, 'weights.pth').",
                ) from exc
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise CheckpointMismatchError(f"{shown} holds no state dict.")
    sd = {str(k): v for k, v in obj.items() if isinstance(v, Tensor)}
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    if not sd:
        raise CheckpointMismatchError(f"{shown} holds no tensors.")
    return sd


def _names(keys: Sequence[str], limit: int = 12) -> str:
    keys = sorted(keys)
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def load_prompter_checkpoint(model: nn.Module, source: str | Path | Mapping[str, Any]) -> nn.Module:
    """Load an RSPrompter / SAM-seg / SAM-det checkpoint (MMDetection names) into ``model``.

    Strict over every tensor the model uses: missing, unexpected and mis-shaped keys raise
    :class:`CheckpointMismatchError` naming them (as spelled in the file). Tensors upstream's
    model does not have (unused SAM prompt-encoder parts) keep their current values.
    """
    sd = _read_checkpoint(source)
    ours = model.state_dict()
    wanted = {}
    for k in ours:
        name = _upstream_name(model, k)
        if name is not None:
            wanted[name] = k
    # frozen BatchNorms (torchvision) carry no step counter; MMDetection's do
    optional = {
        n for n in sd
        if n not in wanted
        and (n.endswith("num_batches_tracked") or n.endswith("prompt_encoder.shared_embedding.positional_embedding"))
    }
    missing = [n for n in wanted if n not in sd]
    unexpected = [n for n in sd if n not in wanted and n not in optional]
    converted: dict[str, Tensor] = {}
    bad = []
    for name, k in wanted.items():
        if name not in sd:
            continue
        t = _from_upstream_tensor(name, sd[name])
        if t.shape != ours[k].shape:
            bad.append(f"{name} {tuple(sd[name].shape)} (model {tuple(_to_upstream_tensor(name, ours[k]).shape)})")
        else:
            converted[k] = t.to(ours[k].dtype)
    if missing or unexpected or bad:
        parts = []
        if missing:
            parts.append(f"missing keys: {_names(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_names(unexpected)}")
        if bad:
            parts.append(f"shape mismatches: {_names(bad)}")
        raise CheckpointMismatchError(
            f"Checkpoint does not match {getattr(model, 'rsvl_name', type(model).__name__)}: " + "; ".join(parts) + ".",
            hint="Check the model variant, SAM size (vit_b/l/h), number of classes, prompt shape and LoRA setting.",
        )
    model.load_state_dict(converted, strict=False)
    return model


def load_prompter_model(
    name_or_card: Any, weights: str | Path | None = None, device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """Build a registered RSPrompter card's model and load the user's trained checkpoint."""

    card = pick_card(CARDS, name_or_card, "rsprompter")
    if card.family != "rsprompter":
        raise UnknownModelError(f"{card.name} is a {card.family} model, not an RSPrompter one.")
    if weights is None:
        raise WeightsNotFoundError(
            f"{card.name}: RSPrompter publishes no trained checkpoint.",
            hint="Train one (rsvl train instances --model " + card.metadata.get("variant", card.name)
            + ") and pass its path with --weights.",
        )
    meta = dict(card.metadata)
    model = build_instance_model(
        meta["variant"], int(meta["num_classes"]), sam=card.architecture, dataset=meta["dataset"]
    )
    load_prompter_checkpoint(model, weights)
    model = model.to(device)
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()
