"""Model cards: what every model rsvl can run is, where its weights come from, and what it
expects as input.

A card is pure data. Each family package keeps its cards next to its builder
(``rsvl.models.clip.cards``, ``rsvl.models.sam.cards`` ...); :mod:`rsvl.models.registry`
collects them and dispatches ``build`` / ``load`` to the card's family, and
:mod:`rsvl.models.weights` turns a card's :class:`WeightsSource` into a local file.

Provenance rules for the published cards:

* ``revision`` is a full 40-hex Hugging Face commit only where that commit was read from a
  public source (tree / commit pages, or the snapshot path another project checked in). Where
  no commit could be confirmed offline it is ``None`` (download follows ``main``) and the card's
  ``notes`` say so.
* ``sha256`` is ``None`` for every published checkpoint: none of the upstream projects publish
  a checksum, and rsvl does not invent one. ``weights.fetch`` records the sha256 of what it
  downloaded next to the file (``<file>.sha256``) so that a site can pin it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from rsvl.errors import UnknownModelError

#: OpenAI CLIP normalisation (used by every open_clip RS model at inference).
OPENAI_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

#: task names a card can serve (the ``tasks/`` layer keys on these)
KNOWN_TASKS = ("classify", "search", "segment", "refer", "instances", "chat", "farmland")


@dataclass(frozen=True)
class WeightsSource:
    """Where a checkpoint comes from.

    Exactly one of ``hf_repo``, ``url``, ``bundled`` or ``unpublished`` is set.

    * ``hf_repo`` + ``hf_filename`` (+ ``revision``): a Hugging Face Hub file.
    * ``url``: a plain HTTPS download; with ``archive_member`` the download is a zip from which
      that member (matched by its base name) is extracted.
    * ``bundled``: a path relative to the installed ``rsvl`` package (built-in models).
    * ``unpublished``: the authors publish no weights; the text says how to get a file
      (train it, ask the authors). rsvl loads it from ``--weights`` or from its cache.

    ``filename`` is the name the file gets in rsvl's cache
    (``$RSVL_CACHE/<card name>/<filename>``) and the name users are told to place.
    """

    filename: str
    hf_repo: str | None = None
    hf_filename: str | None = None
    revision: str | None = None
    url: str | None = None
    archive_member: str | None = None
    bundled: str | None = None
    unpublished: str | None = None

    def __post_init__(self) -> None:
        kinds = [k for k in (self.hf_repo, self.url, self.bundled, self.unpublished) if k]
        if len(kinds) != 1:
            raise ValueError(
                f"WeightsSource({self.filename!r}) needs exactly one of hf_repo, url, bundled or unpublished"
            )
        if self.archive_member and not self.url:
            raise ValueError("archive_member only applies to url sources")
        if self.revision is not None and not self.hf_repo:
            raise ValueError("revision only applies to Hugging Face sources")

    @property
    def repo_filename(self) -> str:
        """Path of the file inside the Hugging Face repository."""
        return self.hf_filename or self.filename

    @property
    def download_url(self) -> str | None:
        """A URL a person can open in a browser to get the file (None for bundled weights)."""
        if self.hf_repo:
            rev = self.revision or "main"
            return f"https://huggingface.co/{self.hf_repo}/resolve/{rev}/{self.repo_filename}"
        return self.url


@dataclass(frozen=True)
class ModelCard:
    """Everything rsvl knows about one model, independent of how it is built."""

    name: str
    family: str
    #: e.g. the open_clip architecture name ("ViT-B-16", "RN50") or a free description
    architecture: str
    source: WeightsSource
    licence: str
    description: str
    #: open_clip: build the towers with QuickGELU (OpenAI-initialised checkpoints)
    quick_gelu: bool = False
    sha256: str | None = None
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD
    image_size: int = 224
    #: text context length in tokens (None for models without a text tower)
    context_length: int | None = 77
    tasks: tuple[str, ...] = ("classify", "search")
    #: provenance caveats: unpinned revision, inferred activation, protocol notes ...
    notes: str = ""
    #: free-form extra facts (published metrics, training data); not used for loading
    metadata: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        if not self.name or self.name != self.name.strip().lower():
            raise ValueError(f"model card names are lower-case without spaces: {self.name!r}")
        if self.sha256 is not None and (
            len(self.sha256) != 64 or any(c not in "0123456789abcdef" for c in self.sha256)
        ):
            raise ValueError(f"{self.name}: sha256 must be 64 lower-case hex digits")
        unknown = [t for t in self.tasks if t not in KNOWN_TASKS]
        if unknown:
            raise ValueError(f"{self.name}: unknown task(s) {unknown}; known: {KNOWN_TASKS}")

    @property
    def filename(self) -> str:
        return self.source.filename




def normalise_name(name: str) -> str:
    """A model name as cards spell it (lower case, ``_`` -> ``-``)."""
    return name.strip().lower().replace("_", "-")


def find_card(cards: Sequence[ModelCard], name: str | ModelCard) -> ModelCard | None:
    """``name`` if it is a card, else the card of that name (case-insensitive, ``_`` and
    ``-`` alike) among ``cards``, else None."""
    if isinstance(name, ModelCard):
        return name
    key = normalise_name(name)
    return next((card for card in cards if card.name == key), None)


def pick_card(cards: Sequence[ModelCard], name: str | ModelCard, family: str) -> ModelCard:
    """``name`` if it is a card, else the card of that name among one family's ``cards``
    (what a family's own functions accept where a user may pass a name)."""
    card = find_card(cards, name)
    if card is not None:
        return card
    raise UnknownModelError(
        f"{name!r} is not a {family} model ({', '.join(c.name for c in cards)}).",
        hint="Run `rsvl models` to list every model and its family.",
    )


__all__ = ["KNOWN_TASKS", "OPENAI_MEAN", "OPENAI_STD", "ModelCard", "WeightsSource", "find_card", "normalise_name", "pick_card"]
