"""The interface every image-text (CLIP-like) model in rsvl offers to the tasks.

Published RS CLIPs (``rsvl.models.clip.ClipModel``) and the built-in mini-clip (``rsvl.models.mini.clip``)
both implement it, so classify / search / segment never care which family they run.

Images cross this boundary as uint8 RGB arrays shaped (B, 3, H, W): the tasks and the
geospatial layer produce exactly that, and each model applies its own resize and
normalisation in ``preprocess``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:  # annotations only: the protocol itself needs neither
    import numpy as np
    import torch


@runtime_checkable
class ImageTextModel(Protocol):
    name: str
    #: side of the square input the image tower expects (e.g. 224)
    image_size: int
    #: multiplier of cosine similarities before a softmax (100 for CLIP zero-shot)
    logit_scale: float

    def encode_image(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) uint8 RGB -> (B, D) L2-normalised embeddings in the joint space."""
        ...

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """N strings -> (N, D) L2-normalised embeddings in the joint space."""
        ...

    def dense_features(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) uint8 RGB -> (B, D, h, w) L2-normalised per-location embeddings
        in the joint space (h, w = the model's feature grid for that input)."""
        ...
