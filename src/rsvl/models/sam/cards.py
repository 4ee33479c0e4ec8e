"""Model cards of the published SAM checkpoints (pure data: no torch import).

``SAM_CARDS`` lists them as plain dicts and ``CARDS`` as :class:`rsvl.models.cards.ModelCard`s
(family ``sam``), which :mod:`rsvl.models.registry` collects.

Provenance: Meta publishes no checksum for ``sam_vit_*.pth`` (the hex suffix of each filename
is not documented as a hash), so ``sha256`` is None. Hugging Face revisions are pinned only
where a full commit holding the file was read from a public tree page (``facebook/sam-vit-base``
@ d0d9250, the commit that added ``model.safetensors``); the others follow ``main``.
"""

from __future__ import annotations

from typing import Any

from rsvl.models.cards import ModelCard, WeightsSource

#: SAM's normalisation on the 0-1 scale (the model applies it on 0-255: 123.675 / 58.395 ...)
SAM_MEAN_01: tuple[float, float, float] = (0.485, 0.456, 0.406)
SAM_STD_01: tuple[float, float, float] = (0.229, 0.224, 0.225)

_META_URL = "https://dl.fbaipublicfiles.com/segment_anything/"
_HF_REVISIONS: dict[str, str | None] = {
    "base": "d0d9250bd6a38ebbb901aa29e8d37787e366f7be",  # "Adding safetensors variant (#5)"
    "large": None,
    "huge": None,
}
_TASKS: tuple[str, ...] = ()  # a component (RSPrompter, SAM-det, FSVLM), not a task model

SAM_CARDS: list[dict[str, Any]] = [
    {
        "name": f"sam-vit-{arch}",
        "architecture": f"vit_{arch}",
        "layout": "meta",
        "repo": "facebookresearch/segment-anything",
        "url": _META_URL + filename,
        "hf_repo": None,
        "filename": filename,
        "revision": None,
        "sha256": None,
        "licence": "Apache-2.0",
        "description": f"Segment Anything ViT-{arch.upper()} (Meta release, SA-1B), "
        "segment-anything state dict.",
    }
    for arch, filename in (
        ("b", "sam_vit_b_01ec64.pth"),
        ("l", "sam_vit_l_0b3195.pth"),
        ("h", "sam_vit_h_4b8939.pth"),
    )
] + [
    {
        "name": f"sam-vit-{size}-hf",
        "architecture": f"vit_{size[0]}",
        "layout": "hf",
        "repo": f"facebook/sam-vit-{size}",
        "url": f"https://huggingface.co/facebook/sam-vit-{size}",
        "hf_repo": f"facebook/sam-vit-{size}",
        "filename": "model.safetensors",
        "revision": _HF_REVISIONS[size],
        "sha256": None,
        "licence": "Apache-2.0",
        "description": f"Segment Anything ViT-{size[0].upper()} in the transformers SamModel "
        "layout (the layout RSPrompter loads).",
    }
    for size in ("base", "large", "huge")
]


def _to_card(d: dict[str, Any]) -> ModelCard:
    if d["hf_repo"]:
        source = WeightsSource(
            filename=d["filename"],  # model.safetensors: a snapshot folder works as --weights
            hf_repo=d["hf_repo"],
            hf_filename=d["filename"],
            revision=d["revision"],
        )
        pin = (
            f"Revision {d['revision'][:7]} holds model.safetensors (read from its tree page). "
            if d["revision"]
            else "Revision not pinned: no full commit holding model.safetensors could be "
            "confirmed offline, so downloads follow 'main'. "
        )
    else:
        source = WeightsSource(filename=d["filename"], url=d["url"])
        pin = "Plain download from Meta's CDN: no version pin. "
    return ModelCard(
        name=d["name"],
        family="sam",
        architecture=d["architecture"],
        source=source,
        licence=d["licence"],
        description=d["description"],
        sha256=d["sha256"],
        mean=SAM_MEAN_01,
        std=SAM_STD_01,
        image_size=1024,
        context_length=None,
        tasks=_TASKS,
        notes=pin + "No published sha256. Longest side resized to 1024 (bilinear), "
        "normalised, zero-padded bottom/right to 1024 x 1024.",
        metadata={"layout": d["layout"], "repo": d["repo"], "url": d["url"]},
    )


CARDS: tuple[ModelCard, ...] = tuple(_to_card(d) for d in SAM_CARDS)

__all__ = ["SAM_CARDS", "SAM_MEAN_01", "CARDS", "SAM_STD_01"]
