"""Model cards of RSPrompter and its SAM baselines (pure data: no torch import).

RSPrompter publishes no trained checkpoints (KyanChen/RSPrompter issues #90, #101, #126: the
maintainer shares weights by e-mail only; the lightning-era files in the HF Space have another
layout). Each card therefore names the weights the model *starts from*, SAM ViT-B in the
transformers layout (``facebook/sam-vit-base``, as RSPrompter's dataset configs), and its
loader needs the user's own trained checkpoint (``--weights``; MMDetection
``{'state_dict', 'meta'}`` layout with RSPrompter's key names, see
:func:`rsvl.models.rsprompter.convert.load_prompter_checkpoint`). No sha256 is published for anything.

Published numbers (paper v1 tables, AP box / AP mask in %, likely SAM ViT-H) are kept in each
card's metadata for reference, not as rsvl measurements.
"""

from __future__ import annotations

from typing import Any

from rsvl.models.cards import ModelCard, WeightsSource

_MEAN = (0.485, 0.456, 0.406)
_STD = (0.229, 0.224, 0.225)
_SAM_BASE_REVISION = "d0d9250bd6a38ebbb901aa29e8d37787e366f7be"  # as the sam-vit-base-hf card

_CLASSES: dict[str, tuple[str, ...]] = {
    "nwpu": (
        "airplane", "ship", "storage_tank", "baseball_diamond", "tennis_court",
        "basketball_court", "ground_track_field", "harbor", "bridge", "vehicle",
    ),
    "whu": ("building",),
    "ssdd": ("ship",),
}
_DATASET_TITLE = {"nwpu": "NWPU VHR-10", "whu": "WHU building", "ssdd": "SSDD (SAR ships)"}

#: (N_p, K_p) per variant and dataset, as RSPrompter's configs (anchor: N_p is the RoI count)
_PROMPT_SHAPES: dict[str, dict[str, tuple[int, int]]] = {
    "rsprompter-anchor": {"nwpu": (70, 5), "whu": (100, 5), "ssdd": (70, 5)},
    "rsprompter-query": {"nwpu": (70, 5), "whu": (100, 5), "ssdd": (30, 5)},
}

#: paper v1 tables: (AP box, AP mask) in %
_PAPER_AP: dict[str, dict[str, tuple[float, float]]] = {
    "rsprompter-anchor": {"whu": (68.06, 66.89), "nwpu": (68.54, 67.64), "ssdd": (73.09, 72.61)},
    "rsprompter-query": {"whu": (70.36, 69.21), "nwpu": (58.79, 65.29), "ssdd": (66.50, 64.57)},
    "sam-seg": {"whu": (67.15, 64.86), "nwpu": (62.83, 57.40), "ssdd": (62.41, 59.46)},
    "sam-det": {"whu": (66.54, 61.87), "nwpu": (63.71, 59.76), "ssdd": (69.42, 64.09)},
}

_DESCRIPTIONS = {
    "rsprompter-anchor": "RSPrompter-anchor: RoI features of a Mask R-CNN style detector on SAM "
    "ViT features regress K_p prompt tokens per RoI for SAM's mask decoder.",
    "rsprompter-query": "RSPrompter-query: Mask2Former-style queries regress K_p prompt tokens "
    "and a dense mask prompt per query for SAM's mask decoder.",
    "sam-seg": "SAM-seg baseline: frozen SAM ViT + feature aggregator + simple FPN + Mask R-CNN head.",
    "sam-det": "SAM-det baseline: a Faster R-CNN R50-FPN whose boxes prompt a frozen SAM.",
}

PROMPTER_CARDS: list[dict[str, Any]] = [
    {
        "name": f"{variant}-{dataset}",
        "variant": variant,
        "dataset": dataset,
        "classes": _CLASSES[dataset],
        "prompt_shape": _PROMPT_SHAPES.get(variant, {}).get(dataset),
        "paper_ap_box_mask": _PAPER_AP[variant][dataset],
    }
    for variant in ("rsprompter-anchor", "rsprompter-query", "sam-seg", "sam-det")
    for dataset in ("nwpu", "whu", "ssdd")
]


def _to_card(d: dict[str, Any]) -> ModelCard:
    shape = d["prompt_shape"]
    return ModelCard(
        name=d["name"],
        family="rsprompter",
        architecture="vit_b",
        source=WeightsSource(
            filename="model.safetensors",
            hf_repo="facebook/sam-vit-base",
            hf_filename="model.safetensors",
            revision=_SAM_BASE_REVISION,
        ),
        licence="Apache-2.0",
        description=f"{_DESCRIPTIONS[d['variant']]} {_DATASET_TITLE[d['dataset']]} "
        f"({len(d['classes'])} class{'es' if len(d['classes']) > 1 else ''}"
        + (f"; prompt shape N_p={shape[0]}, K_p={shape[1]}" if shape else "")
        + ").",
        sha256=None,
        mean=_MEAN,
        std=_STD,
        image_size=1024,
        context_length=None,
        tasks=("instances",),
        notes="No trained checkpoint is published upstream: the card's download is only the SAM "
        "ViT-B initialisation; train the model (or obtain RSPrompter's MMDetection checkpoint) and "
        "pass it with --weights. Input: longest side 1024, SAM mean/std, zero-padded to 1024 x 1024.",
        metadata={
            "variant": d["variant"],
            "dataset": d["dataset"],
            "num_classes": len(d["classes"]),
            "classes": d["classes"],
            "prompt_shape": shape,
            "init_from": "sam-vit-base-hf",
            "trained_weights_published": False,
            "paper_ap_box_mask": d["paper_ap_box_mask"],
            "repo": "https://github.com/KyanChen/RSPrompter",
        },
    )


CARDS: tuple[ModelCard, ...] = tuple(_to_card(d) for d in PROMPTER_CARDS)

__all__ = ["PROMPTER_CARDS", "CARDS"]
