"""The interface every chat (vision-language) model in rsvl offers to the tasks.

Published LLaVA-family models (VHM, GeoChat: ``rsvl.models.llava``) and the built-in
mini-chat (``rsvl.models.mini.chat``) both implement :class:`ChatModel`, so ``rsvl chat``,
``rsvl eval chat``, the service and the Ray runner never care which family answers.

Images cross this boundary as one uint8 RGB array shaped (H, W, 3); each model applies its
own padding, resize and normalisation. Boxes come back as fractions of that array's width
and height (x1, y1, x2, y2 in [0, 1]), whatever the model's own output convention (VHM's
integers in 0-1000, GeoChat's 0-100 with an angle): the model parses its text, the callers
convert fractions to pixels or map coordinates.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:  # annotations only
    import numpy as np

#: VHM's task families (the tag RSEvalKit prepends to the question): classification, RSVQA,
#: visual grounding, the honesty family (presence, colour, position) and everything else
TASK_KINDS: tuple[str, ...] = ("cls", "vqa", "vg", "idk", "it")


@dataclass(frozen=True)
class Box:
    """A box the model named, as fractions of the image (x1, y1, x2, y2 in [0, 1])."""

    x1: float
    y1: float
    x2: float
    y2: float
    #: rotation in degrees for oriented boxes (GeoChat's ``|θ``), 0 for axis-aligned ones
    angle: float = 0.0
    #: the object's name when the answer gives one, else ""
    label: str = ""


@dataclass
class ChatAnswer:
    """One generated answer and what rsvl could read from it."""

    text: str
    #: boxes parsed from the text in the model's own format, as image fractions
    boxes: list[Box] = field(default_factory=list)
    #: tokens in the prompt (image tokens included) and tokens generated
    prompt_tokens: int = 0
    new_tokens: int = 0
    #: seconds to the first generated token and in total
    first_token_s: float = 0.0
    total_s: float = 0.0


@runtime_checkable
class ChatModel(Protocol):
    name: str
    #: side of the square the vision tower sees (images are padded or resized to it)
    image_size: int

    def chat(
        self,
        image: np.ndarray,
        question: str,
        *,
        history: Sequence[tuple[str, str]] = (),
        task: str | None = None,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        on_text: Callable[[str], None] | None = None,
    ) -> ChatAnswer:
        """Answer ``question`` about ``image`` (H, W, 3 uint8 RGB).

        ``history``: earlier (question, answer) turns about the same image. ``task``: one of
        :data:`TASK_KINDS` when the caller knows the question's family (the evaluation
        does), so models trained with task tags get the right one; ``None`` lets the model
        decide. ``temperature`` 0 is greedy decoding. ``on_text`` receives each new piece
        of decoded text as it is generated (for streaming)."""
        ...
