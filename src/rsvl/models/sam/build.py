"""Building and loading SAM: per-variant builders that are pure config, one private builder,
a dict registry (segment-anything's ``build_sam.py``), and the family's ``build`` / ``load``.

``build(name, **overrides)`` gives a randomly initialised SAM of a card's (or an
architecture's) size; ``overrides`` replace :class:`SamConfig` fields (a test shrinks ViT-L to
two blocks this way and keeps every key name). ``load(card, weights, device)`` reads the card's
checkpoint (Meta or transformers layout) strictly.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from rsvl.errors import UnknownModelError
from rsvl.models.cards import ModelCard, pick_card
from rsvl.models.checkpoint import read_state_dict
from rsvl.models.sam.cards import CARDS
from rsvl.models.sam.config import SamConfig, sam_config_from_hf
from rsvl.models.sam.convert import (
    detect_sam_layout,
    infer_sam_config,
    load_sam_state_dict,
    read_sam_checkpoint,
)
from rsvl.models.sam.fast import accelerate_encoder
from rsvl.models.sam.sam import Sam
from rsvl.models.weights import resolve_weights

#: the fields of each published size that differ from :class:`SamConfig`'s (ViT-B) defaults
SAM_VARIANTS: dict[str, dict[str, Any]] = {
    "vit_b": {
        "encoder_embed_dim": 768,
        "encoder_depth": 12,
        "encoder_num_heads": 12,
        "encoder_global_attn_indexes": (2, 5, 8, 11),
    },
    "vit_l": {
        "encoder_embed_dim": 1024,
        "encoder_depth": 24,
        "encoder_num_heads": 16,
        "encoder_global_attn_indexes": (5, 11, 17, 23),
    },
    "vit_h": {
        "encoder_embed_dim": 1280,
        "encoder_depth": 32,
        "encoder_num_heads": 16,
        "encoder_global_attn_indexes": (7, 15, 23, 31),
    },
}
#: the published sizes as configs
SAM_CONFIGS: dict[str, SamConfig] = {k: SamConfig(**v) for k, v in SAM_VARIANTS.items()}


log = logging.getLogger(__name__)


def build_sam_vit_b(**overrides: Any) -> Sam:
    """SAM ViT-B (Meta's ``sam_vit_b``), randomly initialised."""
    return _build_sam(SAM_VARIANTS["vit_b"], overrides)


def build_sam_vit_l(**overrides: Any) -> Sam:
    """SAM ViT-L (Meta's ``sam_vit_l``), randomly initialised."""
    return _build_sam(SAM_VARIANTS["vit_l"], overrides)


def build_sam_vit_h(**overrides: Any) -> Sam:
    """SAM ViT-H (Meta's ``sam_vit_h``), randomly initialised."""
    return _build_sam(SAM_VARIANTS["vit_h"], overrides)


def _build_sam(variant: Mapping[str, Any], overrides: Mapping[str, Any]) -> Sam:
    """The one builder: the variant's :class:`SamConfig` fields with the caller's overrides
    (which win), then the model in eval mode."""
    return Sam(SamConfig(**{**variant, **overrides})).eval()


#: architecture name -> builder (segment-anything's ``sam_model_registry``)
SAM_BUILDERS: dict[str, Callable[..., Sam]] = {
    "vit_b": build_sam_vit_b,
    "vit_l": build_sam_vit_l,
    "vit_h": build_sam_vit_h,
}

_NAME_ALIASES = {"base": "vit_b", "large": "vit_l", "huge": "vit_h", "b": "vit_b", "l": "vit_l", "h": "vit_h"}


def sam_config(name: str, **overrides: Any) -> SamConfig:
    """The :class:`SamConfig` of an architecture (``vit_b``, ``sam-vit-l``, ``huge`` ...),
    with ``overrides`` replacing fields."""
    key = name.lower().replace("-", "_").removeprefix("sam_")
    key = _NAME_ALIASES.get(key.removeprefix("vit_"), key)
    if key not in SAM_CONFIGS:
        raise UnknownModelError(
            f"Unknown SAM architecture {name!r}.", hint=f"Use one of {sorted(SAM_CONFIGS)}."
        )
    return replace(SAM_CONFIGS[key], **overrides) if overrides else SAM_CONFIGS[key]


def build_sam(config: SamConfig | str = "vit_b", **overrides: Any) -> Sam:
    """A randomly initialised SAM of the given architecture (name or :class:`SamConfig`),
    ``overrides`` replacing config fields."""
    cfg = config if isinstance(config, SamConfig) else sam_config(config)
    return _build_sam(cfg.to_dict(), overrides)


def load_sam(
    source: str | Path | Mapping[str, Tensor],
    config: SamConfig | str | None = None,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    fast: bool = False,
    **overrides: Any,
) -> Sam:
    """Build a SAM and load a checkpoint in either published layout.

    ``source`` is a path (see :func:`~rsvl.models.sam.convert.read_sam_checkpoint`) or an
    in-memory state dict. ``config`` is a :class:`SamConfig`, a name (``vit_b``/``vit_l``/
    ``vit_h``, ``overrides`` replacing its fields), or None to take it from a transformers
    ``config.json`` next to the weights, else from the tensor shapes. ``fast`` (``--fast``,
    float32 on the CPU only) runs the image encoder's linear layers in int8
    (:mod:`rsvl.models.sam.fast`).
    """
    hf_config = None
    if isinstance(source, Mapping):
        sd = read_state_dict(source, "SAM state dict", wrappers=("state_dict", "model"))
    else:
        sd, hf_config = read_sam_checkpoint(source)
    layout = detect_sam_layout(sd)
    if isinstance(config, str):
        if layout == "hf":  # transformers' SamModel uses 1e-6 inside the two-way blocks
            overrides = {"decoder_ln_eps": 1e-6, **overrides}
        cfg = sam_config(config, **overrides)
    elif config is not None:
        cfg = config
    elif hf_config is not None:
        cfg = sam_config_from_hf(hf_config)
    else:
        cfg = infer_sam_config(sd, layout)
    model = Sam(cfg)
    load_sam_state_dict(model, sd, layout)
    model = model.to(device=device)
    if dtype is not None:
        model = model.to(dtype=dtype)
    return make_fast(model.eval()) if fast else model.eval()


def make_fast(model: Sam) -> Sam:
    """``model`` with :func:`~rsvl.models.sam.fast.accelerate_encoder` applied when it runs
    float32 on the CPU (``model.fast`` says whether it was); elsewhere unchanged (bfloat16 is
    the fast path on CUDA)."""
    p = next(model.image_encoder.parameters())
    model.fast = p.device.type == "cpu" and p.dtype == torch.float32
    if model.fast:
        accelerate_encoder(model.image_encoder)
    else:
        log.warning("--fast is an int8 path for float32 on the CPU; this SAM runs %s on %s as it is "
                    "(on CUDA, bfloat16 is the fast path).", str(p.dtype).replace("torch.", ""), p.device)
    return model


def build(name: str, **overrides: Any) -> Sam:
    """A randomly initialised SAM of a card (``sam-vit-l``) or architecture (``vit_l``);
    ``overrides`` replace :class:`SamConfig` fields."""
    arch = next((c.architecture for c in CARDS if c.name == name), name)
    return build_sam(arch, **overrides)


def load(
    card: ModelCard | str,
    weights: str | Path | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    fast: bool = False,
    **overrides: Any,
) -> Sam:
    """A published SAM checkpoint (``sam-vit-b``, ``sam-vit-base-hf`` ...) ready for use.

    ``weights`` is the user's local file (else rsvl's cache / a download, see
    :func:`rsvl.models.weights.resolve_weights`). ``overrides`` replace fields of the card's
    :class:`SamConfig` (tests shrink ViT-L/H this way).
    """
    card = pick_card(CARDS, card, "sam")
    if card.family != "sam":
        raise UnknownModelError(
            f"{card.name} is a {card.family} model, not SAM.",
            hint="Run `rsvl models` to list the SAM cards (family sam).",
        )
    path = resolve_weights(card, weights)
    return load_sam(path, card.architecture, device=device, dtype=dtype, fast=fast, **overrides)
