"""The one registry of model families: every card, and ``build`` / ``load`` by name.

Each family is a package under ``rsvl.models`` (segment-anything's ``build_sam`` style) that
exposes the same three names:

* ``CARDS``: its :class:`~rsvl.models.cards.ModelCard` objects (pure data, next to the builder);
* ``build(name, **overrides)``: the architecture with random or initialised weights (what
  training starts from);
* ``load(card, weights=None, device="cpu", **options)``: the network with a checkpoint as
  published (``weights`` is a local file; else the card's file from rsvl's cache or a download).

The family packages are imported here at module level, so the card list is never silently
shorter; each package imports the modules behind ``build`` and ``load`` (open_clip,
transformers, torchvision) on first use (:mod:`rsvl.models.lazy`), so that loading one model
does not pay for the other families' libraries. An import error in a family then surfaces at
its first use, and ``tests/models/test_families.py`` imports every name of every family.
"""

from __future__ import annotations

import difflib
import logging
from pathlib import Path
from types import ModuleType
from typing import Any

from rsvl.errors import UnknownModelError
from rsvl.models import clip, fianet, lisa, llava, mini, rsprompter, sam
from rsvl.models.cards import ModelCard, normalise_name
from rsvl.models.device import check_device
from rsvl.models.weights import fetch as weights_fetch

log = logging.getLogger(__name__)

#: families whose ``load`` takes ``fast=True``
FAST_FAMILIES = ("clip", "sam", "rsprompter")

#: family name -> package, in the order `rsvl models` lists them
FAMILIES: dict[str, ModuleType] = {
    "clip": clip,
    "mini": mini,
    "sam": sam,
    "rsprompter": rsprompter,
    "fianet": fianet,
    "llava": llava,
    "lisa": lisa,
}


def _collect() -> dict[str, ModelCard]:
    cards: dict[str, ModelCard] = {}
    for family, module in FAMILIES.items():
        for card in module.CARDS:
            if card.family != family:
                raise ValueError(f"card {card.name!r} of package {family!r} says family {card.family!r}")
            if card.name in cards:
                raise ValueError(f"two model cards are named {card.name!r}")
            cards[card.name] = card
    return cards


#: every card by name
REGISTRY: dict[str, ModelCard] = _collect()


def list_cards(family: str | None = None, task: str | None = None) -> list[ModelCard]:
    """Registered cards sorted by name, optionally filtered by family and task."""
    cards = sorted(REGISTRY.values(), key=lambda c: c.name)
    if family is not None:
        cards = [c for c in cards if c.family == family]
    if task is not None:
        cards = [c for c in cards if task in c.tasks]
    return cards


def get_card(name: str | ModelCard) -> ModelCard:
    """The card registered as ``name`` (case-insensitive, ``_`` and ``-`` interchangeable).

    Raises :class:`~rsvl.errors.UnknownModelError` naming the closest registered names.
    """
    if isinstance(name, ModelCard):
        return name
    key = normalise_name(name)
    card = REGISTRY.get(key)
    if card is not None:
        return card
    close = difflib.get_close_matches(key, list(REGISTRY), n=3, cutoff=0.5)
    if not close:  # a family or architecture fragment ("farslip", "vit-l14") is still a hint
        close = sorted(n for n in REGISTRY if key and key in n)[:3]
    suggestion = f" Did you mean: {', '.join(close)}?" if close else ""
    raise UnknownModelError(
        f"Unknown model {name!r}.{suggestion}",
        hint="Run `rsvl models` to list every available model.",
    )


def resolve_card(name: str | ModelCard, weights: str | Path | None = None) -> ModelCard:
    """:func:`get_card`, plus the one unregistered kind of name: a bare open_clip
    architecture (``ViT-S-32``, ``ViT-B-16-quickgelu``) given with a local ``weights`` file."""
    try:
        return get_card(name)
    except UnknownModelError:
        card = clip.architecture_card(str(name)) if weights is not None else None
        if card is None:
            raise
        return card


def family_of(card: ModelCard) -> ModuleType:
    """The family package that builds and loads ``card``."""
    return FAMILIES[card.family]


def build(name: str | ModelCard, **overrides: Any) -> Any:
    """The architecture of ``name`` with random or initialised weights (see the family's
    ``build`` for the overrides it accepts)."""
    card = get_card(name)
    return FAMILIES[card.family].build(card.name, **overrides)


def load(
    name: str | ModelCard,
    weights: str | Path | None = None,
    device: str = "cpu",
    *,
    fast: bool = False,
    **options: Any,
) -> Any:
    """The network of ``name`` with its published checkpoint (or ``weights``), on ``device``.

    ``fast`` (``--fast``): the family's faster CPU path that trades a stated accuracy for
    speed, where it has one (CLIP: int8 linear layers, :mod:`rsvl.models.clip.fast`; SAM and
    RSPrompter: the same in SAM's ViT, :mod:`rsvl.models.sam.fast`). The
    built-in models already run their exact fast path (BatchNorms folded, channels-last);
    other families run as usual, with a log message saying so.
    """
    device = check_device(device)
    card = resolve_card(name, weights)
    if fast and card.family in FAST_FAMILIES:
        options["fast"] = True
    elif fast:
        log.warning("--fast: %s has no separate fast path; it runs as usual%s.", card.name,
                    " (the built-in models always run their exact fast path)" if card.family == "mini" else "")
    net = FAMILIES[card.family].load(card, weights=weights, device=device, **options)
    if not getattr(net, "name", None):
        net.name = card.name
    return net


__all__ = [
    "FAMILIES",
    "FAST_FAMILIES",
    "REGISTRY",
    "build",
    "family_of",
    "fetch",
    "get_card",
    "list_cards",
    "load",
    "normalise_name",
    "resolve_card",
]


def fetch(card: str | ModelCard, *, force: bool = False) -> Path:
    """Bring ``card``'s weights into rsvl's cache: the family's own ``fetch`` when it has one
    (a folder of files, e.g. VHM), else the card's single checkpoint
    (:func:`rsvl.models.weights.fetch`). Returns the file or folder."""
    card = get_card(card)
    family = family_of(card)
    if hasattr(family, "fetch"):
        return Path(family.fetch(card, force=force))
    return weights_fetch(card, force=force)
