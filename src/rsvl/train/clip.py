"""Fine-tune an open_clip CLIP the way FarSLIP does (both stages), with Lightning.

Losses (FarSLIP ``open_clip_train``; weights ``--w-g 1 / --w-d 0.1 / --w-l 1``):

* **global_itc** (always): symmetric InfoNCE over the L2-normalised global image embedding
  (CLS of the unmodified last block) and text embedding, scale ``logit_scale.exp()``;
  features are all-gathered (with gradients) across DDP ranks, as open_clip's ``ClipLoss``.
* **distill** (stage 1, ``roi2pooled``): the student's dense patch map of the global view -
  blocks ``0..L-2``, then the last block replaced by ``out_proj(A·v)`` on ``ln_1(x)`` with
  SegEarth attention ``A = softmax(qqᵀs)+softmax(kkᵀs)+softmax(vvᵀs)`` (no residual, no MLP),
  ``ln_post``, ``proj`` - is ``roi_align``-ed over each random crop box in grid units
  (``output_size`` = the grid, ``spatial_scale=1``, ``sampling_ratio=-1``, ``aligned=True``),
  averaged over the output cells and L2-normalised. The target is the mean of the crop's own
  dense patch tokens (crop resized to the input size), L2-normalised. ``loss = 1 - mean cos``.
  ``distill_type="active"`` (FarSLIP's default) computes the target with the student itself,
  gradients flowing through both sides; ``"ema"`` (momentum 0.99) and ``"frozen"`` use a
  teacher copy without gradients.
* **region_itc** (stage 2, ``cls`` align + ``--mpcl-loss``): crop CLS embedding of each object
  region vs its text (``cap`` or ``"a satellite image of {category}"``) with a multi-positive
  soft-target cross-entropy: the target of row ``i`` is the row-normalised indicator
  ``category_id[i] == category_id[j]``; both directions (image->text, text->image) are
  averaged. Regions with category id -1 (free-text ``cap`` regions, padding) are dropped.

Optimisation as FarSLIP: AdamW (betas 0.9/0.98, eps 1e-6), no weight decay on parameters with
``ndim < 2`` or named ``bn``/``ln``/``bias``/``logit_scale``, linear warmup then cosine per
step, ``logit_scale`` clamped to ``[0, ln 100]`` after each step; in a Long-CLIP text tower the
first positional table is frozen (only ``positional_embedding_res`` trains).

Views: the global view is the image's centred square resized to the model's input size
(FarSLIP resizes the shortest side without cropping; square batches need the crop). Stage 1
samples ``max_boxes`` crops inside that square with ``RandomResizedCrop`` parameters
(scale 0.3-0.7, ratio 3/4-4/3), each resized to the input size; stage 2 takes up to
``max_boxes`` object regions chosen as FarSLIP does (:func:`rsvl.data.mgrs.select_regions`).

Outputs under ``out``: ``checkpoints/last.ckpt`` (Lightning state: model, teacher, optimizer,
scheduler, step - written every ``ckpt_every`` steps and at the end, to a temporary name then
renamed), ``logs/version_*/metrics.csv`` (per-step losses) and ``final.pt`` in FarSLIP's layout
``{'epoch', 'step', 'name', 'state_dict': {'module.' + key: tensor}}`` that
``rsvl.load(..., weights=...)`` and open_clip's ``load_checkpoint`` read.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import random
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from rsvl.data.mgrs import MgrsDataset, MgrsRegion, is_mgrs_json, select_regions
from rsvl.errors import (
    DatasetError,
    OutputError,
    ResumeError,
    UnknownModelError,
    WeightsNotFoundError,
)
from rsvl.models.cards import OPENAI_MEAN, OPENAI_STD, ModelCard, WeightsSource
from rsvl.models.registry import get_card

log = logging.getLogger(__name__)

__all__ = [
    "ClipFineTuner",
    "ClipTrainConfig",
    "ClipTrainData",
    "TrainItem",
    "TrainResult",
    "build_train_model",
    "clip_infonce",
    "encode_image_and_dense",
    "multi_positive_contrastive",
    "open_train_items",
    "roi_distill_loss",
    "roi_pool_patches",
    "save_farslip_checkpoint",
    "train_clip",
]

LOSS_NAMES: tuple[str, ...] = ("global_itc", "distill", "region_itc")
DISTILL_TYPES: tuple[str, ...] = ("active", "ema", "frozen")
PRECISIONS: dict[str, str] = {
    "32": "32-true",
    "32-true": "32-true",
    "fp32": "32-true",
    "16": "16-mixed",
    "fp16": "16-mixed",
    "16-mixed": "16-mixed",
    "bf16": "bf16-mixed",
    "bf16-mixed": "bf16-mixed",
}
MAX_LOGIT_SCALE = math.log(100.0)


# ============================================================================================
# configuration
# ============================================================================================


@dataclass
class ClipTrainConfig:
    """Everything that shapes a run (FarSLIP's defaults where it has one)."""

    stage: int = 1
    epochs: int = 1
    #: stop after this many optimizer steps (-1: run ``epochs``)
    max_steps: int = -1
    batch_size: int = 40
    lr: float = 1e-6
    weight_decay: float = 1.0
    warmup_steps: int = 0
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    w_global: float = 1.0
    w_distill: float = 0.1
    w_region: float = 1.0
    max_boxes: int = 4
    #: stage 2: keep regions with min_size² <= area <= max_size² (pixels of the original image)
    min_size: float = 64.0
    max_size: float = 1024.0
    #: stage 1 crops: RandomResizedCrop scale (area fraction) and aspect-ratio ranges
    crop_scale: tuple[float, float] = (0.3, 0.7)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    distill_type: str = "active"
    ema_momentum: float = 0.99
    #: attention of the modified last block that makes the dense patch tokens
    dense_attn: str = "segearth"
    seed: int = 0
    num_workers: int = 0
    #: write ``checkpoints/last.ckpt`` every N optimizer steps (0: only at the end)
    ckpt_every: int = 500
    log_every: int = 10

    def __post_init__(self) -> None:
        if self.stage not in (1, 2):
            raise ValueError(f"stage must be 1 or 2, got {self.stage}")
        if self.distill_type not in DISTILL_TYPES:
            raise ValueError(f"distill_type must be one of {DISTILL_TYPES}, got {self.distill_type!r}")
        if self.max_boxes < 1:
            raise ValueError("max_boxes must be >= 1")
        self.betas = tuple(self.betas)  # type: ignore[assignment]
        self.crop_scale = tuple(self.crop_scale)  # type: ignore[assignment]
        self.crop_ratio = tuple(self.crop_ratio)  # type: ignore[assignment]

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


# ============================================================================================
# losses (pure functions on tensors)
# ============================================================================================


def clip_infonce(image_emb: torch.Tensor, text_emb: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """Symmetric CLIP InfoNCE: ``(CE(s·I·Tᵀ, arange) + CE(s·T·Iᵀ, arange)) / 2`` on
    L2-normalised rows; ``scale`` is the exponentiated logit scale."""
    img = F.normalize(image_emb.float(), dim=-1)
    txt = F.normalize(text_emb.float(), dim=-1)
    logits = scale * img @ txt.t()
    target = torch.arange(img.shape[0], device=img.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2


def roi_pool_patches(dense: torch.Tensor, boxes: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """RoI-pool a dense patch map over normalised boxes.

    ``dense`` (B, D, gh, gw); ``boxes`` (B, K, 4) xyxy in [0, 1] of the global view;
    ``valid`` (B, K) bool. Each valid box is scaled to grid units and ``roi_align``-ed with
    ``output_size=(gh, gw)``, ``spatial_scale=1``, ``sampling_ratio=-1``, ``aligned=True``;
    the output cells are averaged and L2-normalised. Returns (M, D), M = ``valid.sum()``,
    in row-major (image, box) order.
    """
    from torchvision.ops import roi_align

    gh, gw = dense.shape[-2:]
    b_idx, k_idx = valid.nonzero(as_tuple=True)
    sel = boxes[b_idx, k_idx].float()
    scale = torch.tensor([gw, gh, gw, gh], dtype=sel.dtype, device=sel.device)
    rois = torch.cat([b_idx.to(sel.dtype).unsqueeze(1), sel * scale], dim=1)
    pooled = roi_align(
        dense.float(), rois, output_size=(int(gh), int(gw)), spatial_scale=1.0,
        sampling_ratio=-1, aligned=True,
    )
    return F.normalize(pooled.mean(dim=(-2, -1)), dim=-1)


def roi_distill_loss(
    dense: torch.Tensor, boxes: torch.Tensor, valid: torch.Tensor, target: torch.Tensor
) -> torch.Tensor:
    """FarSLIP ``roi2pooled`` distillation: ``1 - mean cos(roi_pool(dense, box), target)``.

    ``target`` (M, D): one embedding per valid box (same order as :func:`roi_pool_patches`),
    normalised here. With no valid box the loss is a differentiable zero.
    """
    if not bool(valid.any()):
        return dense.sum() * 0.0
    pooled = roi_pool_patches(dense, boxes, valid)
    tgt = F.normalize(target.float(), dim=-1)
    return 1.0 - (pooled * tgt).sum(dim=-1).mean()


def multi_positive_contrastive(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    labels: torch.Tensor,
    scale: torch.Tensor | float,
) -> torch.Tensor:
    """Multi-positive image-text contrastive loss keyed on category id (FarSLIP ``--mpcl-loss``).

    Rows with ``labels < 0`` are dropped. ``p[i, j] = [labels[i] == labels[j]] / #positives(i)``;
    loss = ``(H(p, softmax(s·I·Tᵀ)) + H(p, softmax(s·T·Iᵀ))) / 2`` with ``H`` the soft-target
    cross-entropy averaged over rows. No valid row: a differentiable zero.
    """
    keep = labels >= 0
    if not bool(keep.any()):
        return (image_emb.sum() + text_emb.sum()) * 0.0
    img = F.normalize(image_emb[keep].float(), dim=-1)
    txt = F.normalize(text_emb[keep].float(), dim=-1)
    lab = labels[keep]
    pos = (lab.view(-1, 1) == lab.view(1, -1)).float()
    p = pos / pos.sum(dim=1, keepdim=True)
    logits_i = scale * img @ txt.t()
    logits_t = scale * txt @ img.t()
    loss_i = -(p * F.log_softmax(logits_i, dim=-1)).sum(dim=-1).mean()
    loss_t = -(p * F.log_softmax(logits_t, dim=-1)).sum(dim=-1).mean()
    return (loss_i + loss_t) / 2


# ============================================================================================
# the forward pass FarSLIP trains with (its VisionTransformer.forward_v2)
# ============================================================================================


def _check_vit(model: nn.Module) -> Any:
    v = model.visual
    if not hasattr(v, "class_embedding") or not hasattr(v, "transformer"):
        raise UnknownModelError(
            "Stage 1 (patch-to-crop distillation) needs a ViT image tower; this model has "
            f"{type(v).__name__}.",
            hint="Use a ViT architecture (ViT-B-16, ViT-B-32, ...), or stage 2.",
        )
    if (
        getattr(v, "attn_pool", None) is not None
        or getattr(v, "final_ln_after_pool", False)
        or getattr(v, "pool_type", "tok") != "tok"
    ):
        raise UnknownModelError(
            "Stage 1 needs a CLIP ViT pooled by its class token (no attention pool).",
            hint="Use an OpenAI-style open_clip ViT (ViT-B-16, ViT-B-32, ...).",
        )
    return v


def encode_image_and_dense(
    model: nn.Module,
    images: torch.Tensor,
    *,
    attn: str = "segearth",
    with_global: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """One ViT pass giving the global embedding and the dense patch map (not normalised).

    Blocks ``0..L-2`` are shared. Global = CLS of the unmodified last block -> ``ln_post`` ->
    ``proj`` (equals ``model.encode_image``). Dense = last block replaced by
    ``out_proj(A·v)`` on ``ln_1(x)`` (no residual, no MLP) -> ``ln_post`` -> ``proj``, patch
    tokens reshaped to (B, D, gh, gw). With ``with_global=False`` the global part is skipped.
    """
    from rsvl.models.clip.model import _last_block_attention

    v = _check_vit(model)
    x = v._embeds(images)
    blocks = v.transformer.resblocks
    batch_first = getattr(v.transformer, "batch_first", True)
    h = x if batch_first else x.transpose(0, 1)
    for blk in blocks[:-1]:
        h = blk(h)
    glob = None
    if with_global:
        g = blocks[-1](h)
        g = g if batch_first else g.transpose(0, 1)
        glob = v.ln_post(g[:, 0])
        if v.proj is not None:
            glob = glob @ v.proj
    h = h if batch_first else h.transpose(0, 1)
    last = blocks[-1]
    y = v.ln_post(_last_block_attention(last.attn, last.ln_1(h), attn))
    if v.proj is not None:
        y = y @ v.proj
    tokens = y[:, 1:]
    gh, gw = v.grid_size if hasattr(v, "grid_size") else (int(math.isqrt(tokens.shape[1])),) * 2
    dense = tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], int(gh), int(gw))
    return glob, dense


# ============================================================================================
# model construction
# ============================================================================================


def _arch_config(arch: str, model_cfg: Mapping[str, Any] | None) -> dict[str, Any]:
    import open_clip

    if model_cfg is not None:
        return copy.deepcopy(dict(model_cfg))
    cfg = open_clip.get_model_config(arch)
    if cfg is None:
        raise UnknownModelError(
            f"{arch!r} is neither an rsvl CLIP model nor an open_clip architecture.",
            hint="`rsvl models` lists rsvl's models; open_clip architectures are e.g. ViT-B-32, "
            "ViT-B-16, ViT-S-32 (open_clip.list_models()).",
        )
    return copy.deepcopy(cfg)


def _resolve_card(name: str, quick_gelu: bool | None, model_cfg: Mapping[str, Any] | None) -> tuple[ModelCard, bool]:
    """(card, registered?) for a registered rsvl CLIP card or a bare open_clip architecture."""
    try:
        card = get_card(name)
    except UnknownModelError:
        card = None
    if card is not None:
        if card.family != "clip":
            raise UnknownModelError(
                f"Model {card.name!r} is a {card.family!r} model; `rsvl train clip` fine-tunes "
                "open_clip CLIPs.",
                hint="Pick a CLIP model (`rsvl models`) or an open_clip architecture name.",
            )
        return card, True
    cfg = _arch_config(name, model_cfg)
    qg = bool(cfg.get("quick_gelu", False)) if quick_gelu is None else bool(quick_gelu)
    size = cfg.get("vision_cfg", {}).get("image_size", 224)
    ctx = cfg.get("text_cfg", {}).get("context_length", 77)
    card = ModelCard(
        name=name.strip().lower().replace(" ", "-"),
        family="clip",
        architecture=name,
        quick_gelu=qg,
        source=WeightsSource(filename=f"{name}.pt", url="file:local-weights-only"),
        licence="unknown",
        description=f"open_clip {name} (fine-tuned with rsvl train clip)",
        image_size=int(size[0] if isinstance(size, (list, tuple)) else size),
        context_length=int(ctx),
        mean=OPENAI_MEAN,
        std=OPENAI_STD,
    )
    return card, False


def build_train_model(
    model: str,
    weights: str | Path | None = None,
    *,
    random_init: bool = False,
    quick_gelu: bool | None = None,
    long_text: bool = False,
    model_cfg: Mapping[str, Any] | None = None,
) -> tuple[nn.Module, ModelCard]:
    """The open_clip network to fine-tune (float32, train mode) and the card it follows.

    ``model`` is an rsvl CLIP card name (``farslip2-vit-b16``; weights from ``weights`` or
    rsvl's cache) or an open_clip architecture name (``ViT-B-32``; weights from ``weights``,
    else random init). ``random_init`` ignores any weights (open_clip's initialisation).
    ``long_text`` turns a 77-position text tower into FarSLIP's 248-position Long-CLIP layout
    (``load_from_clip``); a long-text checkpoint is detected and kept as it is.
    ``model_cfg`` overrides the open_clip architecture config (tests, custom configs).
    """
    import open_clip

    from rsvl.models.clip.model import build_clip, read_checkpoint, to_long_text_state_dict
    from rsvl.models.weights import resolve_weights

    card, registered = _resolve_card(model, quick_gelu, model_cfg)
    if random_init and weights is not None:
        raise WeightsNotFoundError(
            "--random-init and --weights exclude each other.", hint="Drop one of them."
        )
    if random_init or (weights is None and not registered):
        cfg = _arch_config(card.architecture, model_cfg)
        cfg.pop("custom_text", None)
        cfg_qg = bool(cfg.pop("quick_gelu", False))
        qg = (card.quick_gelu or cfg_qg) if quick_gelu is None else bool(quick_gelu)
        if any(k in cfg.get("text_cfg", {}) for k in ("hf_model_name", "hf_tokenizer_name")):
            raise UnknownModelError(
                f"open_clip {card.architecture} has a Hugging Face text tower; rsvl trains "
                "CLIPs with open_clip's own text transformer.",
                hint="Use a CLIP architecture such as ViT-B-32 or ViT-B-16.",
            )
        net = open_clip.CLIP(**cfg, quick_gelu=qg)
        log.info("%s: random initialisation (%s)", card.name, "QuickGELU" if qg else "nn.GELU")
        if long_text:
            sd = to_long_text_state_dict(net.state_dict())
            net = build_clip(card, sd, quick_gelu=qg, model_cfg=model_cfg)
    else:
        if weights is not None and not registered:
            path = Path(weights).expanduser()
            if not path.is_file():
                raise WeightsNotFoundError(
                    f"--weights {path} does not exist.", hint="Check the path, or use --random-init."
                )
        else:
            path = resolve_weights(card, weights)
        sd = read_checkpoint(path)
        if long_text:
            sd = to_long_text_state_dict(sd)
        net = build_clip(card, sd, quick_gelu=quick_gelu, model_cfg=model_cfg, source=path)
        # build_clip may share storage with the (memory-mapped) file: own the parameters
        net = net.float()
        with torch.no_grad():
            for p in net.parameters():
                p.data = p.data.clone()
            for mod in net.modules():
                for k, b in list(mod._buffers.items()):
                    if b is not None:
                        mod._buffers[k] = b.clone()
    net = net.float().train()
    if hasattr(net, "positional_embedding_res"):  # Long-CLIP: pos frozen, pos_res trains
        net.positional_embedding.requires_grad_(False)
    return net, card


# ============================================================================================
# data
# ============================================================================================


@dataclass(frozen=True)
class TrainItem:
    """One training image: path, captions (one is drawn per visit), regions (stage 2)."""

    image: Path
    captions: tuple[str, ...]
    regions: tuple[MgrsRegion, ...] = ()


def open_train_items(
    path: str | Path,
    *,
    split: str | None = None,
    caption_key: str = "title",
    image_root: str | Path | None = None,
) -> tuple[list[TrainItem], str]:
    """Read a training index: MGRS region JSON, ``ucm.json``, Karpathy JSON or caption CSV.

    Returns ``(items, layout)``. ``split`` defaults to ``train`` for ``ucm.json`` and Karpathy
    files (CSV and MGRS have none).
    """
    from rsvl.data._common import load_json
    from rsvl.data.captions import KarpathyCaptionDataset, RetrievalCsvDataset
    from rsvl.data.scenes import UCMJsonDataset

    layouts = (
        "an MGRS region JSON (list of {global_filepath, global_caption, segment}), a ucm.json, "
        "a Karpathy dataset_*.json, or a CSV with 'filepath' and a caption column"
    )
    p = Path(path)
    if p.is_dir() and (p / "ucm.json").is_file():
        p = p / "ucm.json"
    if not p.exists():
        raise DatasetError(f"Training data not found: {p}.", hint=f"Expected {layouts}.")
    suffix = p.suffix.lower()
    if p.is_file() and suffix == ".json":
        data = load_json(p, "Training index", layouts)
        if isinstance(data, list):
            if not is_mgrs_json(data):
                raise DatasetError(
                    f"{p} is a JSON list whose first item has no 'global_filepath'.",
                    hint=f"Expected {layouts}.",
                )
            ds = MgrsDataset(p, image_root)
            return [TrainItem(it.image, (it.caption,), it.regions) for it in ds.samples], "mgrs"
        if isinstance(data, dict) and "samples" in data:
            s = split or "train"
            ucm = UCMJsonDataset(p, split=s)
            items = [TrainItem(x.image, tuple(x.captions)) for x in ucm.samples]
            return _with_captions(items, p), "ucm.json"
        if isinstance(data, dict) and "images" in data:
            s = split or "train"
            kp = KarpathyCaptionDataset(p, split=s, image_dir=image_root)
            items = [TrainItem(x.image, tuple(x.captions)) for x in kp.samples]
            return _with_captions(items, p), "karpathy"
        raise DatasetError(f"{p} is not a training index rsvl knows.", hint=f"Expected {layouts}.")
    if p.is_file() and suffix in (".csv", ".tsv"):
        csv = RetrievalCsvDataset(p, root=image_root, caption_key=caption_key,
                                  sep="\t" if suffix == ".tsv" else ",")
        items = [TrainItem(x.image, tuple(x.captions)) for x in csv.samples]
        return _with_captions(items, p), "csv"
    raise DatasetError(f"{p} is not a training index.", hint=f"Expected {layouts}.")


def _with_captions(items: list[TrainItem], path: Path) -> list[TrainItem]:
    kept = [
        TrainItem(it.image, tuple(c for c in it.captions if c.strip()), it.regions) for it in items
    ]
    kept = [it for it in kept if it.captions]
    if not kept:
        raise DatasetError(
            f"No image of {path} (in the selected split) has a caption.",
            hint="Image-text training needs captions; pick the split that has them.",
        )
    if len(kept) < len(items):
        log.warning("%s: %d image(s) without captions skipped", path, len(items) - len(kept))
    return kept


def _random_resized_crop_box(
    rng: random.Random, width: float, height: float, scale: Sequence[float], ratio: Sequence[float]
) -> tuple[float, float, float, float]:
    """(x1, y1, x2, y2) with torchvision ``RandomResizedCrop.get_params`` semantics."""
    area = width * height
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        ar = math.exp(rng.uniform(*log_r))
        w = int(round(math.sqrt(target * ar)))
        h = int(round(math.sqrt(target / ar)))
        if 0 < w <= width and 0 < h <= height:
            x = rng.randint(0, int(width) - w)
            y = rng.randint(0, int(height) - h)
            return float(x), float(y), float(x + w), float(y + h)
    # fallback: central crop at the nearest allowed ratio
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        h, w = height, round(height * max(ratio))
    else:
        w, h = width, height
    x, y = (width - w) // 2, (height - h) // 2
    return float(x), float(y), float(x + w), float(y + h)


class ClipTrainData(Dataset):
    """Training samples as dicts of tensors (see :meth:`__getitem__`)."""

    def __init__(
        self,
        items: Sequence[TrainItem],
        *,
        stage: int,
        image_size: int,
        context_length: int,
        config: ClipTrainConfig,
        mean: Sequence[float] = OPENAI_MEAN,
        std: Sequence[float] = OPENAI_STD,
    ) -> None:
        if stage == 2 and not any(it.regions for it in items):
            raise DatasetError(
                "Stage 2 (region contrastive loss) needs regions: none of the training images "
                "has any.",
                hint="Pass an MGRS-style region JSON (list of {global_filepath, global_caption, "
                "segment: [{bbox, category, category_id}]}) as --data, or train stage 1.",
            )
        self.items = list(items)
        self.stage = stage
        self.size = int(image_size)
        self.ctx = int(context_length)
        self.cfg = config
        self.mean = np.asarray(mean, dtype=np.float32).reshape(3, 1, 1)
        self.std = np.asarray(std, dtype=np.float32).reshape(3, 1, 1)
        self._tok: Any = None

    def __len__(self) -> int:
        return len(self.items)

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        if self._tok is None:
            from open_clip.tokenizer import SimpleTokenizer

            self._tok = SimpleTokenizer(context_length=self.ctx)
        return self._tok(texts)

    def _tensor(self, im: Any, box: tuple[float, float, float, float], *, keep_ratio: bool) -> torch.Tensor:
        """Crop ``box`` (pixels) and resize to size²: straight (``keep_ratio=False``), or
        shortest side + centre crop."""
        from PIL import Image

        x1, y1, x2, y2 = box
        if keep_ratio:
            w, h = x2 - x1, y2 - y1
            side = min(w, h)
            x1, y1 = x1 + (w - side) / 2, y1 + (h - side) / 2
            x2, y2 = x1 + side, y1 + side
        out = im.resize((self.size, self.size), Image.BICUBIC, box=(x1, y1, x2, y2))
        arr = np.asarray(out, dtype=np.float32).transpose(2, 0, 1) / 255.0
        return torch.from_numpy((arr - self.mean) / self.std)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        """``image`` (3, S, S), ``text`` (ctx,); stage 1: ``crops`` (K, 3, S, S), ``boxes``
        (K, 4) normalised xyxy of the global view, ``box_valid`` (K,); stage 2:
        ``region_images`` (K, 3, S, S), ``region_texts`` (K, ctx), ``region_labels`` (K,)
        (category id, -1 = dropped/padding)."""
        from PIL import Image

        from rsvl.data._common import check_image

        item = self.items[index]
        rng = random.Random(random.getrandbits(64))
        check_image(item.image, "the training index's image paths")
        try:
            with Image.open(item.image) as f:
                im = f.convert("RGB")
        except OSError as exc:
            raise DatasetError(
                f"Cannot read training image {item.image} ({exc}).",
                hint="Remove it from the index or replace the file.",
            ) from exc
        W, H = im.size
        side = min(W, H)
        left, top = (W - side) / 2, (H - side) / 2
        square = (left, top, left + side, top + side)
        out: dict[str, torch.Tensor] = {
            "image": self._tensor(im, square, keep_ratio=False),
            "text": self.tokenize([rng.choice(item.captions)])[0],
        }
        K, S = self.cfg.max_boxes, self.size
        if self.stage == 1:
            crops = torch.zeros(K, 3, S, S)
            boxes = torch.zeros(K, 4)
            for k in range(K):
                bx = _random_resized_crop_box(rng, side, side, self.cfg.crop_scale, self.cfg.crop_ratio)
                crops[k] = self._tensor(
                    im, (bx[0] + left, bx[1] + top, bx[2] + left, bx[3] + top), keep_ratio=False
                )
                boxes[k] = torch.tensor(bx) / side
            out.update(crops=crops, boxes=boxes, box_valid=torch.ones(K, dtype=torch.bool))
        else:
            regions = select_regions(
                item.regions, max_boxes=K, min_size=self.cfg.min_size,
                max_size=self.cfg.max_size, rng=rng,
            )
            imgs = torch.zeros(K, 3, S, S)
            texts = torch.zeros(K, self.ctx, dtype=torch.long)
            labels = torch.full((K,), -1, dtype=torch.long)
            for k, r in enumerate(regions):
                x1, y1, x2, y2 = r.box
                x1, y1, x2, y2 = max(x1, 0.0), max(y1, 0.0), min(x2, float(W)), min(y2, float(H))
                if x2 - x1 < 1 or y2 - y1 < 1:
                    continue
                imgs[k] = self._tensor(im, (x1, y1, x2, y2), keep_ratio=True)
                texts[k] = self.tokenize([r.text])[0]
                labels[k] = r.category_id
            out.update(region_images=imgs, region_texts=texts, region_labels=labels)
        return out


# ============================================================================================
# the LightningModule
# ============================================================================================


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        low = name.lower()
        exclude = p.ndim < 2 or any(t in low for t in ("bn", "ln", "bias", "logit_scale"))
        (no_decay if exclude else decay).append(p)
    return [
        {"params": no_decay, "weight_decay": 0.0},
        {"params": decay, "weight_decay": weight_decay},
    ]


def _warmup_cosine(warmup: int, total: int) -> Any:
    def factor(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        span = max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / span)))

    return factor


class ClipFineTuner(L.LightningModule):
    """FarSLIP-style fine-tuning of an open_clip ``CLIP`` (``self.model``).

    :meth:`compute_losses` returns every active term and their weighted ``total``; the
    training step logs them as ``loss/<name>``.
    """

    def __init__(self, model: nn.Module, config: ClipTrainConfig | Mapping[str, Any] | None = None) -> None:
        super().__init__()
        cfg = config if isinstance(config, ClipTrainConfig) else ClipTrainConfig(**dict(config or {}))
        self.config = cfg
        self.model = model
        self.teacher: nn.Module | None = None
        if cfg.stage == 1:
            _check_vit(model)
            if cfg.distill_type in ("ema", "frozen"):
                self.teacher = copy.deepcopy(model).requires_grad_(False).eval()
        self.history: list[dict[str, float]] = []

    # ------------------------------------------------------------------ helpers
    def _world(self) -> int:
        trainer = self._trainer
        return int(trainer.world_size) if trainer is not None else 1

    def _gather(self, x: torch.Tensor) -> torch.Tensor:
        """All-gather rows across ranks with gradients (open_clip ``gather_with_grad``)."""
        if self._world() <= 1:
            return x
        return self.all_gather(x, sync_grads=True).flatten(0, 1)

    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale.exp()

    def train(self, mode: bool = True) -> ClipFineTuner:
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    # ------------------------------------------------------------------ losses
    def compute_losses(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        cfg = self.config
        scale = self.logit_scale()
        images, texts = batch["image"], batch["text"]
        losses: dict[str, torch.Tensor] = {}
        if cfg.stage == 1:
            glob, dense = encode_image_and_dense(self.model, images, attn=cfg.dense_attn)
            assert glob is not None
        else:
            glob, dense = self.model.encode_image(images), None
        txt = self.model.encode_text(texts)
        losses["global_itc"] = clip_infonce(self._gather(glob), self._gather(txt), scale)
        total = cfg.w_global * losses["global_itc"]
        if cfg.stage == 1:
            assert dense is not None
            valid = batch["box_valid"].bool()
            crops = batch["crops"][valid]
            net = self.teacher if self.teacher is not None else self.model
            ctx = torch.no_grad() if self.teacher is not None else contextlib.nullcontext()
            with ctx:
                _, crop_dense = encode_image_and_dense(net, crops, attn=cfg.dense_attn, with_global=False)
                target = crop_dense.flatten(2).mean(dim=-1)
            losses["distill"] = roi_distill_loss(dense, batch["boxes"], valid, target)
            total = total + cfg.w_distill * losses["distill"]
        else:
            labels = batch["region_labels"].long()
            valid = labels >= 0
            r_img = self.model.encode_image(batch["region_images"][valid])
            r_txt = self.model.encode_text(batch["region_texts"][valid])
            lab = labels[valid]
            if self._world() > 1:  # equal shapes on every rank: pad to B*K, label -1
                n = labels.numel()
                pad_i = r_img.new_zeros(n, r_img.shape[-1])
                pad_t = r_txt.new_zeros(n, r_txt.shape[-1])
                pad_l = labels.new_full((n,), -1)
                m = valid.flatten()
                r_img = pad_i.masked_scatter(m[:, None], r_img)
                r_txt = pad_t.masked_scatter(m[:, None], r_txt)
                lab = pad_l.masked_scatter(m, lab)
                r_img, r_txt, lab = self._gather(r_img), self._gather(r_txt), self._gather(lab)
            losses["region_itc"] = multi_positive_contrastive(r_img, r_txt, lab, scale)
            total = total + cfg.w_region * losses["region_itc"]
        losses["total"] = total
        return losses

    # ------------------------------------------------------------------ Lightning hooks
    def training_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        losses = self.compute_losses(batch)
        bs = int(batch["image"].shape[0])
        self.log_dict({f"loss/{k}": v.detach() for k, v in losses.items()}, batch_size=bs,
                      prog_bar=False, on_step=True, on_epoch=False)
        self.log("loss", losses["total"].detach(), batch_size=bs, prog_bar=True)
        self.log("logit_scale", self.logit_scale().detach(), batch_size=bs)
        if self._trainer is None or self.trainer.is_global_zero:
            row = {"step": float(self.global_step + 1)}
            row.update({k: float(v.detach()) for k, v in losses.items()})
            self.history.append(row)
        return losses["total"]

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
            if self.teacher is not None and self.config.distill_type == "ema":
                m = self.config.ema_momentum
                for pt, ps in zip(self.teacher.parameters(), self.model.parameters(), strict=True):
                    pt.mul_(m).add_(ps.detach(), alpha=1 - m)

    def configure_optimizers(self) -> Any:
        cfg = self.config
        opt = torch.optim.AdamW(
            _param_groups(self.model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps
        )
        total = int(self.trainer.estimated_stepping_batches) if self._trainer is not None else 1
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _warmup_cosine(cfg.warmup_steps, max(total, 1)))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["rsvl_config"] = self.config.to_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get("rsvl_config") or {}
        for key in ("stage", "distill_type"):
            if key in saved and saved[key] != getattr(self.config, key):
                raise ResumeError(
                    f"The checkpoint was written by a run with {key}={saved[key]!r}; this run has "
                    f"{key}={getattr(self.config, key)!r}.",
                    hint="Resume with the same settings, or start a new run in another --out.",
                )

    # ------------------------------------------------------------------ export
    def student_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().float().cpu().clone() for k, v in self.model.state_dict().items()}


def save_farslip_checkpoint(
    model: nn.Module | Mapping[str, torch.Tensor],
    path: str | Path,
    *,
    name: str = "",
    epoch: int = 0,
    step: int = 0,
) -> Path:
    """Write ``{'epoch', 'step', 'name', 'state_dict': {'module.' + key: tensor}}`` (FarSLIP's
    training-checkpoint layout, float32) to a temporary name, then rename it to ``path``."""
    sd = model.state_dict() if isinstance(model, nn.Module) else dict(model)
    payload = {
        "epoch": int(epoch),
        "step": int(step),
        "name": str(name),
        "state_dict": {"module." + k: v.detach().float().cpu().contiguous() for k, v in sd.items()},
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


class _LastCheckpoint(L.Callback):
    """Write ``<dir>/last.ckpt`` every ``every`` optimizer steps and when training ends
    (temporary name, then rename)."""

    def __init__(self, directory: Path, every: int) -> None:
        self.directory = Path(directory)
        self.every = int(every)
        self._saved_at = -1

    @property
    def path(self) -> Path:
        return self.directory / "last.ckpt"

    def _save(self, trainer: L.Trainer) -> None:
        if trainer.global_step == self._saved_at:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = self.directory / "last.ckpt.tmp"
        trainer.save_checkpoint(tmp)
        if trainer.is_global_zero:
            os.replace(tmp, self.path)
        trainer.strategy.barrier("rsvl_last_checkpoint")
        self._saved_at = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if self.every > 0 and trainer.global_step > 0 and trainer.global_step % self.every == 0:
            self._save(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save(trainer)


# ============================================================================================
# the run
# ============================================================================================


@dataclass
class TrainResult:
    out: Path
    weights: Path
    checkpoint: Path
    steps: int
    epochs: int
    history: list[dict[str, float]] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)

    def summary(self, window: int | None = None) -> dict[str, dict[str, float]]:
        """Mean of each loss over the first and the last ``window`` steps of this run
        (default: a third of the steps, at most 10)."""
        out: dict[str, dict[str, float]] = {}
        if not self.history:
            return out
        if window is None:
            window = max(1, min(10, len(self.history) // 3))
        keys = [k for k in self.history[0] if k != "step"]
        head, tail = self.history[:window], self.history[-window:]
        for k in keys:
            out[k] = {
                "first": float(np.mean([r[k] for r in head])),
                "last": float(np.mean([r[k] for r in tail])),
            }
        return out


def resolve_precision(precision: str, accelerator: str = "auto") -> str:
    """``auto`` -> bf16-mixed on CUDA with bf16 support, 16-mixed on other CUDA, else 32-true."""
    p = str(precision).strip().lower()
    if p == "auto":
        cuda = accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
        if not cuda:
            return "32-true"
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    if p not in PRECISIONS:
        raise ValueError(f"precision must be auto or one of {sorted(PRECISIONS)}, got {precision!r}")
    return PRECISIONS[p]


def train_clip(
    data: str | Path,
    out: str | Path,
    *,
    model: str,
    weights: str | Path | None = None,
    random_init: bool = False,
    quick_gelu: bool | None = None,
    long_text: bool = False,
    model_cfg: Mapping[str, Any] | None = None,
    config: ClipTrainConfig | None = None,
    split: str | None = None,
    caption_key: str = "title",
    image_root: str | Path | None = None,
    precision: str = "auto",
    accelerator: str = "auto",
    devices: int | str = "auto",
    strategy: str = "auto",
    resume: bool | str | Path = False,
    progress: bool = True,
    callbacks: Sequence[L.Callback] = (),
) -> TrainResult:
    """Fine-tune ``model`` on ``data`` (FarSLIP stage ``config.stage``) and write ``out``.

    ``resume=True`` continues from ``out/checkpoints/last.ckpt`` (a path continues from that
    file): step, optimizer, scheduler and teacher state are restored. ``callbacks`` are extra
    Lightning callbacks (monitoring, tests).
    """
    cfg = config or ClipTrainConfig()
    out = Path(out)
    ckpt_dir = out / "checkpoints"
    last = ckpt_dir / "last.ckpt"
    ckpt_path: Path | None = None
    if resume:
        ckpt_path = last if resume is True else Path(resume)
        if not ckpt_path.is_file():
            raise ResumeError(
                f"Nothing to resume: {ckpt_path} does not exist.",
                hint="Start without --resume (or point --out at the run to continue).",
            )
    elif last.exists():
        raise OutputError(
            f"{out} already holds a training run ({last}).",
            hint="Pass --resume to continue it, or choose another --out.",
        )

    items, layout = open_train_items(data, split=split, caption_key=caption_key, image_root=image_root)
    net, card = build_train_model(
        model, weights, random_init=random_init, quick_gelu=quick_gelu,
        long_text=long_text, model_cfg=model_cfg,
    )
    size = getattr(net.visual, "image_size", card.image_size)
    size = int(size[0] if isinstance(size, (tuple, list)) else size)
    ctx = int(net.positional_embedding.shape[0])
    dataset = ClipTrainData(
        items, stage=cfg.stage, image_size=size, context_length=ctx, config=cfg,
        mean=card.mean, std=card.std,
    )
    if len(dataset) < 2:
        raise DatasetError(
            f"{data} has {len(dataset)} training image(s); contrastive training needs at least 2.",
            hint="Use a larger split.",
        )
    batch_size = min(cfg.batch_size, len(dataset))
    loader = DataLoader(
        dataset, batch_size=batch_size, shuffle=True, drop_last=True,
        num_workers=cfg.num_workers, persistent_workers=cfg.num_workers > 0,
    )
    prec = resolve_precision(precision, accelerator)
    module = ClipFineTuner(net, cfg)
    from lightning.pytorch.loggers import CSVLogger

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    logging.getLogger("lightning.fabric").setLevel(logging.WARNING)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    saver = _LastCheckpoint(ckpt_dir, cfg.ckpt_every)
    all_callbacks: list[L.Callback] = [saver, *callbacks]
    if progress:
        from lightning.pytorch.callbacks import RichProgressBar

        all_callbacks.append(RichProgressBar(leave=True))
    trainer = L.Trainer(
        max_epochs=cfg.epochs if cfg.max_steps < 0 else -1,
        max_steps=cfg.max_steps,
        precision=prec,  # type: ignore[arg-type]
        accelerator=accelerator,
        devices=devices,
        strategy=strategy,
        callbacks=all_callbacks,
        logger=CSVLogger(str(out), name="logs"),
        log_every_n_steps=max(1, min(cfg.log_every, len(loader))),
        enable_checkpointing=False,
        enable_progress_bar=progress,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=str(out),
    )
    settings = {
        "model": model, "architecture": card.architecture, "quick_gelu": card.quick_gelu,
        "weights": None if weights is None else str(weights), "random_init": random_init,
        "long_text": hasattr(net, "positional_embedding_res"), "data": str(data),
        "layout": layout, "split": split, "n_images": len(dataset), "precision": prec,
        "strategy": strategy, "config": cfg.to_dict(),
        "resumed_from": None if ckpt_path is None else str(ckpt_path),
    }
    if trainer.is_global_zero:
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / "train_config.json.tmp"
        tmp.write_text(json.dumps(settings, indent=2))
        os.replace(tmp, out / "train_config.json")
    trainer.fit(module, train_dataloaders=loader, ckpt_path=str(ckpt_path) if ckpt_path else None)
    weights_out = out / "final.pt"
    if trainer.is_global_zero:
        save_farslip_checkpoint(
            module.model, weights_out, name=card.architecture,
            epoch=trainer.current_epoch, step=trainer.global_step,
        )
    return TrainResult(
        out=out, weights=weights_out, checkpoint=saver.path, steps=int(trainer.global_step),
        epochs=int(trainer.current_epoch), history=module.history, settings=settings,
    )

