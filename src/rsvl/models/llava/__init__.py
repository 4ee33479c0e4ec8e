"""The LLaVA-1.5 family of remote-sensing chat models: VHM (``vhm-7b``) and GeoChat
(``geochat-7b``), converted to transformers' ``LlavaForConditionalGeneration``.

Modules: :mod:`.cards` (model cards), :mod:`.config` (config.json -> ``LlavaConfig``),
:mod:`.convert` (checkpoint layouts, sharded folders, GeoChat's position-embedding
interpolation), :mod:`.tokenizer` (LLaMA's SentencePiece BPE without the sentencepiece
package), :mod:`.prompt` (vicuna_v1 template, task tags, chunked tokenisation),
:mod:`.parse` (boxes in answers), :mod:`.model` (:class:`LlavaChat`, the
:class:`~rsvl.models.chat.ChatModel`) and :mod:`.build` (``build`` / ``load`` /
``memory_estimate``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from rsvl.models.cards import ModelCard
from rsvl.models.lazy import lazy_names
from rsvl.models.llava.cards import CARDS

if TYPE_CHECKING:
    from rsvl.models.llava.model import LlavaChat

#: the family's names and the module of each: ``build`` imports transformers, so they are
#: imported on first use (rsvl.models.lazy)
__getattr__ = lazy_names(__name__, {
    "build": "build", "fetch_folder": "build", "load_llava": "build", "memory_estimate": "build",
    "LlavaChat": "model", "SentencePieceBPE": "tokenizer",
})


def load(
    card: ModelCard | str,
    weights: str | Path | None = None,
    device: str = "cpu",
    **options: Any,
) -> LlavaChat:
    """A published VHM / GeoChat folder as a :class:`LlavaChat` (see :func:`load_llava` for
    the options: ``vision_tower``, ``dtype``, ``load_in_8bit``, ``load_in_4bit``)."""
    return __getattr__("load_llava")(card, weights, device, **options)


def fetch(card: ModelCard | str, *, force: bool = False) -> Path:
    """``rsvl fetch`` for this family: a folder of files, not one checkpoint
    (:func:`~rsvl.models.llava.build.fetch_folder`)."""
    return __getattr__("fetch_folder")(card, force=force)


__all__ = ["CARDS", "LlavaChat", "SentencePieceBPE", "build", "fetch", "fetch_folder", "load", "memory_estimate"]
