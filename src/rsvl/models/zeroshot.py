"""Zero-shot heads of image-text models: templates, text classifiers, synonym pooling.

Shared by every task that scores images or pixels against class names (classify,
segment) and by the evaluation harness, as open_clip's ``zero_shot_classifier`` is.

A class list (``rsvl.data.classes``) names each class by one or more synonyms. Every
synonym becomes one text query: its embedding is the renormalised mean of the embeddings of
the synonym written into each template, as in CLIP's zero-shot protocol. Scores of the
synonyms of one class are max-pooled. Probabilities are the softmax over the classes of
``logit_scale x cosine``: the model's own (learned) logit scale unless a protocol fixes one
(FarSLIP's fixes 100, :data:`FARSLIP_LOGIT_SCALE`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from rsvl.data.classes import ClassSpec, expand_synonyms
from rsvl.errors import PromptError

#: FarSLIP's zero-shot classification templates (its default protocol)
FARSLIP_TEMPLATES: tuple[str, ...] = ("a satellite photo of {}.", "a satellite image of {}")

#: FarSLIP's zero-shot protocol scores with a fixed ``100 x cosine`` (open_clip's zero-shot
#: evaluation), whatever logit scale the checkpoint learned
FARSLIP_LOGIT_SCALE = 100.0


def imagenet_templates() -> tuple[str, ...]:
    """The 80 OpenAI ImageNet templates (used by the RS-OVSS protocol), from open_clip."""
    # lazy: importing open_clip costs seconds (see rsvl.models.clip); every task imports
    # this module, and only the RS-OVSS protocol wants these templates
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    return tuple(t("{}") for t in OPENAI_IMAGENET_TEMPLATES)


def resolve_templates(templates: str | Sequence[str] | None, model: object) -> tuple[str, ...]:
    """``None`` -> the model's own default (``model.default_templates``) or FarSLIP's pair;
    ``"imagenet"`` -> the 80 ImageNet templates; ``"farslip"``; or an explicit list
    (each containing ``{}``)."""
    if templates is None:
        own = getattr(model, "default_templates", None)
        return tuple(own) if own else FARSLIP_TEMPLATES
    if isinstance(templates, str):
        key = templates.strip().lower()
        if key == "imagenet":
            return imagenet_templates()
        if key == "farslip":
            return FARSLIP_TEMPLATES
        if key in ("none", "raw"):
            return ("{}",)
        templates = [templates]
    out = tuple(templates)
    bad = [t for t in out if "{}" not in t]
    if not out or bad:
        raise PromptError(
            f"template {bad[0] if bad else ''!r} has no '{{}}' where the class name goes.",
            hint="Write templates like 'an aerial image of {}.' or use 'imagenet' / 'farslip'.",
        )
    return out


def text_classifier(model, classes: Sequence[ClassSpec], templates: Sequence[str]) -> tuple[torch.Tensor, list[int]]:
    """(P, D) normalised query embeddings, one per synonym, and each query's class index."""
    names, index = expand_synonyms(classes)
    texts = [t.format(n) for n in names for t in templates]
    with torch.no_grad():
        emb = model.encode_text(texts).float()
    emb = emb.reshape(len(names), len(templates), -1)
    emb = torch.nn.functional.normalize(emb, dim=-1).mean(dim=1)
    return torch.nn.functional.normalize(emb, dim=-1), index


def pool_synonyms(scores: torch.Tensor, index: Sequence[int], n_classes: int, dim: int = 1) -> torch.Tensor:
    """Max over the synonyms of each class along ``dim``: (..., P, ...) -> (..., K, ...)."""
    idx = torch.as_tensor(index, device=scores.device)
    parts = [scores.index_select(dim, (idx == k).nonzero().flatten()).amax(dim=dim, keepdim=True) for k in range(n_classes)]
    return torch.cat(parts, dim=dim)


class ZeroShotClassifier:
    """Embeds the class prompts once; ``scores(images uint8 (B,3,H,W)) -> (B, K)`` probabilities.

    ``logit_scale`` multiplies the cosine before the softmax: None = the model's own
    ``model.logit_scale``; a protocol passes its fixed one (FarSLIP: 100). It changes the
    probabilities, never the ranking.
    """

    def __init__(
        self, model: Any, classes: Sequence[ClassSpec], templates: str | Sequence[str] | None = None,
        logit_scale: float | None = None,
    ) -> None:
        self.model = model
        self.classes = list(classes)
        self.templates = resolve_templates(templates, model)
        self.logit_scale = float(model.logit_scale if logit_scale is None else logit_scale)
        self.queries, self.index = text_classifier(model, self.classes, self.templates)

    def scores(self, images: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            emb = self.model.encode_image(images).float()
            logits = emb @ self.queries.to(emb.device).T * self.logit_scale
            logits = pool_synonyms(logits, self.index, len(self.classes), dim=1)
            return logits.softmax(dim=1).cpu().numpy()
