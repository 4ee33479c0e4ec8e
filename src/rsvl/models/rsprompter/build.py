"""Building the RSPrompter family (anchor, query, SAM-seg, SAM-det) and loading trained checkpoints."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from rsvl.errors import RsvlError, UnknownModelError, WeightsNotFoundError
from rsvl.models.cards import ModelCard, normalise_name, pick_card
from rsvl.models.rsprompter.anchor import RSPrompterAnchor
from rsvl.models.rsprompter.cards import CARDS
from rsvl.models.rsprompter.convert import load_prompter_checkpoint
from rsvl.models.rsprompter.query import RSPrompterQuery
from rsvl.models.rsprompter.sam_det import SamDet
from rsvl.models.rsprompter.sam_seg import SamSeg
from rsvl.models.sam.build import build_sam, load_sam, make_fast
from rsvl.models.sam.config import SamConfig
from rsvl.models.sam.sam import Sam
from rsvl.models.weights import resolve_weights

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

def _resolve_sam(sam: Sam | SamConfig | str | None, checkpoint: str | Path | None) -> Sam:
    if isinstance(sam, Sam):
        model = sam
    elif checkpoint is not None:
        model = load_sam(checkpoint, sam)
    else:
        model = build_sam(sam if sam is not None else "vit_b")
    return model

_ALIASES = {"rsprompter_anchor": "rsprompter-anchor", "samseg": "sam-seg", "samdet": "sam-det"}


def build(
    name: str, *, num_classes: int | None = None, sam: Sam | SamConfig | str | None = None,
    sam_checkpoint: str | Path | None = None, lora: bool = False, dataset: str | None = None,
    **overrides: Any,
) -> nn.Module:
    """Build ``rsprompter-anchor``, ``rsprompter-query``, ``sam-seg`` or ``sam-det`` (in
    training mode), by variant name or by card name (``rsprompter-anchor-nwpu``: the card gives
    the defaults of ``num_classes``, ``dataset`` and ``sam``).

    ``sam`` is a :class:`Sam`, a :class:`SamConfig` or a name (``vit_b``/``vit_l``/``vit_h``;
    None: the card's, else ``vit_b``, or read off ``sam_checkpoint``); with ``sam_checkpoint``
    its weights are loaded (Meta or transformers layout). ``dataset``
    picks RSPrompter's prompt shape (N_p, K_p); ``num_queries=`` / ``num_points=`` override it.
    Other keywords go to the model class (e.g. ``fpn_channels``, ``head="mask2former"`` for
    sam-seg, ``backbone="resnet18"`` for sam-det).
    """
    key = normalise_name(name)
    card = next((c for c in CARDS if c.name == key), None)
    if card is not None:
        meta = card.metadata
        key = meta["variant"]
        num_classes = int(meta["num_classes"]) if num_classes is None else num_classes
        dataset = meta["dataset"] if dataset is None else dataset
    key = _ALIASES.get(key, key)
    if key not in INSTANCE_MODELS:
        raise UnknownModelError(f"Unknown instance model {name!r}.", hint=f"Use one of {list(INSTANCE_MODELS)}.")
    if num_classes is None or num_classes < 1:
        raise ValueError("num_classes must be >= 1")
    dataset = "nwpu" if dataset is None else dataset
    if sam is None and sam_checkpoint is None:
        sam = card.architecture if card is not None else "vit_b"
    sam_model = _resolve_sam(sam, sam_checkpoint)
    kw = dict(overrides)
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


def card_name(variant: str, dataset: str) -> str:
    """The card of ``variant`` trained on ``dataset`` (a folder name such as ``nwpu_vhr10``
    works); the variant's first card when rsprompter has none for that dataset (its build
    then takes ``dataset=`` as an override)."""
    key = _ALIASES.get(normalise_name(variant), normalise_name(variant))
    ds = dataset.lower().replace("-", "").replace("_", "")
    ds = {"nwpuvhr10": "nwpu", "whubuilding": "whu"}.get(ds, ds)
    names = [c.name for c in CARDS if c.metadata["variant"] == key]
    if not names:
        raise UnknownModelError(f"Unknown instance model {variant!r}.", hint=f"Use one of {list(INSTANCE_MODELS)}.")
    wanted = f"{key}-{ds}"
    return wanted if wanted in names else names[0]


def load(
    card: ModelCard | str, weights: str | Path | None = None, device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None, fast: bool = False, **overrides: Any,
) -> nn.Module:
    """Build a registered RSPrompter card's model and load the user's trained checkpoint
    (MMDetection layout, strictly). ``overrides`` go to :func:`build` (tests shrink SAM and
    the heads this way; key names stay those of the card's architecture). ``fast``
    (``--fast``, float32 on the CPU): SAM's image encoder with LoRA merged and int8 linear
    layers (:mod:`rsvl.models.sam.fast`)."""
    card = pick_card(CARDS, card, "rsprompter")
    if card.family != "rsprompter":
        raise UnknownModelError(f"{card.name} is a {card.family} model, not an RSPrompter one.")
    if weights is None:
        raise WeightsNotFoundError(
            f"{card.name}: RSPrompter publishes no trained checkpoint.",
            hint="Train one (rsvl train instances --model " + card.metadata.get("variant", card.name)
            + ") and pass its path with --weights.",
        )
    path = resolve_weights(card, weights)
    model = build(card.name, **overrides)
    load_prompter_checkpoint(model, path)
    model = model.to(device)
    if dtype is not None:
        model = model.to(dtype)
    model = model.eval()
    if fast:
        model.fast = make_fast(model.sam).fast  # every variant holds its SAM as ``.sam``
    return model
