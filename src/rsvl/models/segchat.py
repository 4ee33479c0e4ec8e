"""The interface every language-guided segmentation model (LISA family) offers the tasks.

A chat model whose answer contains a ``[SEG]`` token: the last-layer hidden state that
predicts ``[SEG]`` is projected (``text_hidden_fcs``) into a prompt for a mask decoder.
Published LISA / FSVLM checkpoints (``rsvl.models.lisa``) and the built-in mini-fsvlm
(``rsvl.models.mini.fsvlm``) both implement :class:`SegChatModel`, so ``rsvl segment
--model fsvlm-7b "Please segment the farmland."``, ``rsvl eval farmland`` and the service
never care which family answers.

Images cross this boundary as one uint8 RGB array shaped (H, W, 3); each model applies its
own resize, padding and normalisation, and returns mask logits at that array's size
(``> 0`` is inside, the upstream threshold).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:  # annotations only
    import numpy as np

#: FSVLM's inference question (test.py); the per-image description goes in front of it
FARMLAND_QUESTION = "Please segment the farmland."


@dataclass
class SegAnswer:
    """One answer of a segmentation chat model."""

    #: the generated text (``[SEG]`` included when the model produced it)
    text: str
    #: float32 (H, W) mask logits at the input image's size, one per ``[SEG]`` in the answer
    #: (LISA can emit several); empty when the answer has no ``[SEG]``
    masks: list[np.ndarray] = field(default_factory=list)
    prompt_tokens: int = 0
    new_tokens: int = 0
    total_s: float = 0.0

    @property
    def logits(self) -> np.ndarray | None:
        """The first mask's logits, or None when the model answered without ``[SEG]``."""
        return self.masks[0] if self.masks else None


@runtime_checkable
class SegChatModel(Protocol):
    name: str
    #: side of the square window the model wants from a raster (the streaming runner's tile)
    image_size: int

    def seg_chat(
        self,
        image: np.ndarray,
        prompt: str,
        *,
        max_new_tokens: int = 32,
        force_seg: bool = False,
    ) -> SegAnswer:
        """Answer ``prompt`` about ``image`` (H, W, 3 uint8 RGB) and decode every ``[SEG]``.

        ``force_seg``: teacher-force the answer ``"[SEG]."`` instead of generating (LISA's
        validation protocol, and a fast path for tiling a raster where every window gets the
        same request): the mask comes from the state that predicts ``[SEG]``."""
        ...
