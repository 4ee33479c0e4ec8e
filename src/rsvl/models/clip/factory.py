"""The family's two entry points: ``build`` (architecture, random or given weights: what
training starts from) and ``load_clip`` (a checkpoint as published, ready for the tasks).

A name is a registered card (``farslip2-vit-b16``) or a bare open_clip architecture
(``ViT-B-32``, ``ViT-B-16-quickgelu``; with ``model_cfg`` any name) for models the user trained.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import open_clip
import torch
from torch import nn

from rsvl.errors import UnknownModelError
from rsvl.models.cards import ModelCard, find_card
from rsvl.models.clip.cards import CARDS, open_clip_architecture_card
from rsvl.models.clip.layout import read_checkpoint, to_long_text_state_dict
from rsvl.models.clip.model import ClipModel
from rsvl.models.clip.network import build_clip, build_random
from rsvl.models.weights import resolve_weights


def _sized(card: ModelCard, cfg: Mapping[str, Any]) -> ModelCard:
    """``card`` with the input size and context length of the open_clip config ``cfg``."""
    size = cfg.get("vision_cfg", {}).get("image_size", card.image_size)
    ctx = cfg.get("text_cfg", {}).get("context_length", card.context_length)
    return replace(
        card,
        image_size=int(size if isinstance(size, int) else size[0]),
        context_length=int(ctx),
        quick_gelu=card.quick_gelu or bool(cfg.get("quick_gelu", False)),
    )


def architecture_card(name: str, model_cfg: Mapping[str, Any] | None = None) -> ModelCard | None:
    """An unregistered card for a bare open_clip architecture name (``--model ViT-S-32
    --weights final.pt``, e.g. the output of ``rsvl train clip``), with the input size and
    context length of open_clip's config (or of ``model_cfg``, which makes any name an
    architecture); None when open_clip has no such architecture and no ``model_cfg`` is given."""
    known = list(open_clip.list_models())
    if model_cfg is not None:
        base = name.strip()
        known.append(base[: -len("-quickgelu")] if base.lower().endswith("-quickgelu") else base)
    card = open_clip_architecture_card(name, known)
    if card is None:
        return None
    cfg = model_cfg if model_cfg is not None else open_clip.get_model_config(card.architecture)
    return _sized(card, cfg or {})


def card_for(
    name: str | ModelCard,
    *,
    model_cfg: Mapping[str, Any] | None = None,
    quick_gelu: bool | None = None,
) -> ModelCard:
    """The card ``build`` follows for ``name``: the card itself, a registered CLIP card, or
    an :func:`architecture_card` (whose activation ``quick_gelu`` sets when given)."""
    if isinstance(name, ModelCard):
        return name
    card = find_card(CARDS, name) or architecture_card(name, model_cfg)
    if card is None:
        raise UnknownModelError(
            f"{name!r} is neither an rsvl CLIP model nor an open_clip architecture.",
            hint="`rsvl models` lists rsvl's models; open_clip architectures are e.g. ViT-B-32, "
            "ViT-B-16, ViT-S-32 (open_clip.list_models()).",
        )
    return card if quick_gelu is None else replace(card, quick_gelu=bool(quick_gelu))


def _own_parameters(net: nn.Module) -> nn.Module:
    """Give ``net`` float32 tensors of its own (a loaded network may share storage with a
    memory-mapped checkpoint file)."""
    net = net.float()
    with torch.no_grad():
        for p in net.parameters():
            p.data = p.data.clone()
        for mod in net.modules():
            for key, buf in list(mod.named_buffers(recurse=False)):
                setattr(mod, key, buf.clone())
    return net


def build(
    name: str | ModelCard,
    *,
    weights: str | Path | None = None,
    quick_gelu: bool | None = None,
    long_text: bool | None = None,
    model_cfg: Mapping[str, Any] | None = None,
) -> nn.Module:
    """The open_clip network of ``name`` (float32, train mode): what training starts from.

    In a Long-CLIP text tower the first positional table is frozen (FarSLIP trains only
    ``positional_embedding_res``).

    Args:
        name: a registered CLIP card (name or card) or an open_clip architecture name.
        weights: a checkpoint to start from (any layout :func:`load_clip` reads); None builds
            open_clip's random initialisation.
        quick_gelu: QuickGELU (True) or nn.GELU (False) instead of the card's activation.
        long_text: turn a 77-position text tower into FarSLIP's 248-position Long-CLIP layout
            (``load_from_clip``); a long-text checkpoint is detected and kept as it is. None
            (the default): a random network follows the card (Long-CLIP when its context
            length exceeds 77, as FarSLIP stage 2), a checkpoint is taken as stored.
        model_cfg: an open_clip architecture config (``{embed_dim, vision_cfg, text_cfg}``)
            used instead of the architecture's own (tests, custom configs).
    """
    card = card_for(name, model_cfg=model_cfg, quick_gelu=quick_gelu)
    if weights is None:
        net = build_random(card, quick_gelu=quick_gelu, model_cfg=model_cfg)
        if long_text or (long_text is None and card.context_length > 77):
            sd = to_long_text_state_dict(net.state_dict())
            net = build_clip(card, sd, quick_gelu=quick_gelu, model_cfg=model_cfg)
    else:
        path = resolve_weights(card, weights)
        sd = read_checkpoint(path)
        if long_text:
            sd = to_long_text_state_dict(sd)
        net = build_clip(card, sd, quick_gelu=quick_gelu, model_cfg=model_cfg, source=path)
        net = _own_parameters(net)
    if hasattr(net, "positional_embedding_res"):  # Long-CLIP: pos frozen, pos_res trains
        net.positional_embedding.requires_grad_(False)
    return net.float().train()


def load_clip(
    name_or_card: str | ModelCard,
    weights: str | Path | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = None,
    *,
    quick_gelu: bool | None = None,
    model_cfg: Mapping[str, Any] | None = None,
    fast: bool = False,
) -> ClipModel:
    """Load a registered RS CLIP (or any open_clip-format card) ready for the tasks.

    ``weights`` is the user's ``--weights`` (else rsvl's cache / a download, see
    :func:`rsvl.models.weights.resolve_weights`). ``dtype`` defaults to bfloat16 on CUDA and
    float32 elsewhere. ``quick_gelu`` overrides the card's activation; ``model_cfg`` overrides
    the open_clip architecture config (an ``{embed_dim, vision_cfg, text_cfg}`` dict).
    ``fast`` (``--fast``) runs every linear layer in int8 on the CPU
    (:mod:`rsvl.models.clip.fast`; speed and accuracy in BENCHMARKS.md).
    """
    card = card_for(name_or_card)
    path = resolve_weights(card, weights)
    sd = read_checkpoint(path)
    model = build_clip(card, sd, quick_gelu=quick_gelu, model_cfg=model_cfg, source=path)
    return ClipModel(model, card, device=device, dtype=dtype, fast=fast)


__all__ = ["architecture_card", "build", "card_for", "load_clip"]
