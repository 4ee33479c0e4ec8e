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
from typing import Any

from rsvl.models.cards import ModelCard
from rsvl.models.llava.build import build, fetch_folder, load_llava, memory_estimate
from rsvl.models.llava.cards import CARDS
from rsvl.models.llava.model import LlavaChat
from rsvl.models.llava.tokenizer import SentencePieceBPE


def load(
    card: ModelCard | str,
    weights: str | Path | None = None,
    device: str = "cpu",
    **options: Any,
) -> LlavaChat:
    """A published VHM / GeoChat folder as a :class:`LlavaChat` (see :func:`load_llava` for
    the options: ``vision_tower``, ``dtype``, ``load_in_8bit``, ``load_in_4bit``)."""
    return load_llava(card, weights, device, **options)


#: ``rsvl fetch`` for this family: a folder of files, not one checkpoint
fetch = fetch_folder

__all__ = ["CARDS", "LlavaChat", "SentencePieceBPE", "build", "fetch", "fetch_folder", "load", "memory_estimate"]
