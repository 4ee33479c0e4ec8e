"""Models loaded once and shared between requests and jobs, one lock per model.

A network is not safe to call from two threads at once (generation state, batch norm in
eval is fine but the chat KV cache and the tokenizer are not), so every use of a model
holds its lock; two different models run side by side. Loading is also under the lock, so
two first requests for a model load it once.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from rsvl import api
from rsvl.errors import UnknownModelError
from rsvl.models import registry
from rsvl.models.cards import ModelCard
from rsvl.models.weights import is_available_offline, weights_state

#: the model each task uses when a request names none
DEFAULT_MODELS: dict[str, str] = {
    "classify": "mini-clip",
    "segment": "mini-clip",
    "search": "mini-clip",
    "refer": "mini-refer",
    "instances": "mini-instances",
    "chat": "mini-chat",
    "farmland": "mini-fsvlm",
    "embeddings": "mini-clip",
}


@dataclass
class _Entry:
    lock: threading.Lock = field(default_factory=threading.Lock)
    model: Any = None


class ModelCache:
    """``with cache.use("mini-clip", "segment") as model:`` gives the loaded
    :class:`rsvl.api.Model`, loading it on first use, and holds its lock."""

    def __init__(self, device: str = "cpu", loader: Callable[[str, str], Any] | None = None) -> None:
        self.device = device
        self.loader = loader or (lambda name, device: api.load(name, device=device))
        self._entries: dict[str, _Entry] = {}
        self._guard = threading.Lock()

    def card(self, name: str | None, task: str) -> ModelCard:
        """The card of ``name`` (or the task's default), refused unless it serves ``task``."""
        card = registry.get_card(name or DEFAULT_MODELS[task])
        wanted = "search" if task == "embeddings" else task
        serves = wanted in card.tasks or (wanted == "segment" and "farmland" in card.tasks)
        if task == "embeddings":
            serves = "search" in card.tasks or "classify" in card.tasks
        if not serves:
            others = ", ".join(c.name for c in registry.list_cards(task=wanted)) or "none"
            raise UnknownModelError(f"model {card.name} does not serve {task} (it serves {', '.join(card.tasks)}).",
                                    hint=f"Models for {task}: {others}.")
        return card

    @contextmanager
    def use(self, name: str | None, task: str) -> Iterator[Any]:
        card = self.card(name, task)
        with self._guard:
            entry = self._entries.setdefault(card.name, _Entry())
        with entry.lock:
            if entry.model is None:
                entry.model = self.loader(card.name, self.device)
            yield entry.model

    def loaded(self) -> list[str]:
        with self._guard:
            return sorted(n for n, e in self._entries.items() if e.model is not None)


def model_list(loaded: list[str]) -> list[dict[str, Any]]:
    """Every card as ``GET /v1/models`` shows it (OpenAI's list shape plus rsvl's fields)."""
    rows = []
    for card in registry.list_cards():
        rows.append({
            "id": card.name,
            "object": "model",
            "owned_by": "rsvl",
            "family": card.family,
            "architecture": card.architecture,
            "tasks": list(card.tasks),
            "licence": card.licence,
            "weights": weights_state(card),
            "weights_present": bool(is_available_offline(card)),
            "loaded": card.name in loaded,
        })
    return rows
