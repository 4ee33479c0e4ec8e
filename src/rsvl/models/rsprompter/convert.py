"""RSPrompter checkpoints in MMDetection's layout: ``{'state_dict': ..., 'meta': ...}`` with
RSPrompter's key names (``backbone.vision_encoder.*``, ``neck.feature_aggregator.*``,
``roi_head.mask_head.*``, ``panoptic_head.*`` ...), read, written and strictly loaded."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from rsvl.io import atomic_path
from rsvl.models.checkpoint import CONVERT_HINT, check_keys, read_state_dict
from rsvl.models.rsprompter.anchor import RSPrompterAnchor
from rsvl.models.rsprompter.query import RSPrompterQuery
from rsvl.models.rsprompter.sam_det import SamDet
from rsvl.models.sam.config import SamConfig
from rsvl.models.sam.convert import hf_key_for
from rsvl.models.sam.sam import Sam

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


def upstream_name(model: nn.Module, key: str) -> str | None:
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
        name = upstream_name(model, k)
        if name is not None:
            out[name] = _to_upstream_tensor(name, v.detach().cpu())
    return out


def save_prompter_checkpoint(model: nn.Module, path: str | Path, meta: Mapping[str, Any] | None = None) -> Path:
    """Write ``{'state_dict': ..., 'meta': ...}`` (MMDetection layout), atomically."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    info: dict[str, Any] = {"rsvl_model": getattr(model, "rsvl_name", type(model).__name__)}
    classes = getattr(model, "num_classes", None)
    if classes is not None:
        info["num_classes"] = int(classes)
    info.update(dict(meta or {}))
    with atomic_path(p) as tmp:
        torch.save({"state_dict": to_mmdet_state_dict(model), "meta": info}, tmp)
    return p


_READ_HINT = (
    "MMEngine checkpoints also pickle the message hub and optimizer, which rsvl does not need. " + CONVERT_HINT
)
#: file keys upstream has and our model does not need: frozen BatchNorms (torchvision) carry
#: no step counter, and SamModel's tied copy of the Fourier matrix
_TOLERATED_SUFFIXES = ("num_batches_tracked", "prompt_encoder.shared_embedding.positional_embedding")


def load_prompter_checkpoint(model: nn.Module, source: str | Path | Mapping[str, Any]) -> nn.Module:
    """Load an RSPrompter / SAM-seg / SAM-det checkpoint (MMDetection names) into ``model``.

    Strict over every tensor the model uses (:func:`rsvl.models.checkpoint.check_keys`):
    missing, unexpected and mis-shaped keys raise :class:`~rsvl.errors.CheckpointMismatchError`
    naming them as spelled in the file. Tensors upstream's model does not have (unused SAM
    prompt-encoder parts) keep their current values.
    """
    sd = read_state_dict(source, "RSPrompter checkpoint", hint=_READ_HINT)
    ours = model.state_dict()
    wanted: dict[str, str] = {}
    for k in ours:
        name = upstream_name(model, k)
        if name is not None:
            wanted[name] = k
    sd = {n: t for n, t in sd.items() if n in wanted or not n.endswith(_TOLERATED_SUFFIXES)}
    expected = {name: _to_upstream_tensor(name, ours[k]) for name, k in wanted.items()}
    check_keys(
        expected,
        sd,
        what=f"Checkpoint does not match {getattr(model, 'rsvl_name', type(model).__name__)}",
        hint="Check the model variant, SAM size (vit_b/l/h), number of classes, prompt shape "
        "and LoRA setting.",
    )
    converted = {k: _from_upstream_tensor(name, sd[name]).to(ours[k].dtype) for name, k in wanted.items()}
    model.load_state_dict(converted, strict=False)
    return model
