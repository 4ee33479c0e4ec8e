"""FIANet's two entry points: :func:`build` (the architecture, random or initialised from
Swin-B 22k and bert-base-uncased: what training starts from) and :func:`load_fianet` (a
card's checkpoint as upstream's ``train.py`` writes it)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from torch import Tensor

from rsvl.errors import UnknownModelError, WeightsNotFoundError
from rsvl.models.cards import ModelCard, pick_card
from rsvl.models.fianet.cards import BERT_VOCAB_URL, CARDS
from rsvl.models.fianet.config import FianetConfig
from rsvl.models.fianet.convert import (
    infer_fianet_config,
    init_fianet_pretrained,
    load_fianet_state_dict,
    read_fianet_checkpoint,
)
from rsvl.models.fianet.model import FianetModel, build_fianet
from rsvl.models.fianet.text import VOCAB_FILENAME
from rsvl.models.weights import cache_path, resolve_weights


def card_config(card: ModelCard) -> FianetConfig:
    """The published settings a card describes (RRSIS-D or RefSegRS) at its image size."""
    meta = dict(getattr(card, "metadata", {}) or {})
    dataset = meta.get("dataset", "rrsisd")
    base = FianetConfig.refsegrs() if dataset == "refsegrs" else FianetConfig.rrsisd()
    return replace(base, image_size=int(getattr(card, "image_size", base.image_size)))


def build(
    name: str | ModelCard = "fianet-rrsisd",
    *,
    swin: str | Path | Mapping[str, Tensor] | None = None,
    bert: str | Path | Mapping[str, Tensor] | None = None,
    vocab: str | Path | None = None,
    config: FianetConfig | None = None,
    **overrides: Any,
) -> FianetModel:
    """A FIANet of a card's settings, as training starts from it.

    Args:
        name: the card (``fianet-rrsisd``, ``fianet-refsegrs``) whose settings to use.
        swin: Swin-B ImageNet-22k checkpoint (``swin_base_patch4_window12_384_22k.pth``).
        bert: bert-base-uncased (weights file or snapshot folder; a folder's vocab.txt becomes
            the tokenizer).
        vocab: a BERT ``vocab.txt`` for the tokenizer.
        config: the whole :class:`FianetConfig` instead of the card's (``FianetConfig.tiny()``).
        **overrides: :class:`FianetConfig` fields (``num_tmem=1``, ``embed_dim=32`` ...).

    Without ``swin`` and ``bert`` the weights are random (upstream's ``init_weights()``); with
    both, upstream's starting point. One without the other is refused.
    """
    card = pick_card(CARDS, name, "fianet")
    cfg = replace(config or card_config(card), **overrides)
    if swin is None and bert is None:
        return build_fianet(cfg, vocab=vocab)
    if swin is None or bert is None:
        raise WeightsNotFoundError(
            "FIANet's pretrained start needs both the Swin and the BERT weights.",
            hint="Pass --swin swin_base_patch4_window12_384_22k.pth and --bert BERT_FOLDER_OR_FILE.",
        )
    return init_fianet_pretrained(cfg, swin, bert, vocab)


def load_fianet(card: Any, weights: str | Path | None = None, device: str = "cpu", **kw: Any) -> FianetModel:
    """Build a FIANet card's model from its checkpoint (``rsvl.load`` calls this).

    ``weights``: the FIANet checkpoint (else rsvl's cache). The BERT vocabulary is ``vocab=``,
    else ``vocab.txt`` next to the checkpoint, else in the card's cache folder. Other keyword
    arguments override :class:`FianetConfig` fields (e.g. ``mask_alignment="corrected"``).
    """

    if weights is None and isinstance(card, (str, Path)) and Path(card).expanduser().is_file():
        # load_fianet(PATH): a checkpoint given without a card -> the RRSIS-D card's settings
        weights, card = card, "fianet-rrsisd"
    card = pick_card(CARDS, card, "fianet")
    if card.family != "fianet":
        raise UnknownModelError(
            f"{card.name} is a {card.family} model, not FIANet.",
            hint="Run `rsvl models` to list the referring-segmentation models (family fianet).",
        )
    vocab = kw.pop("vocab", None)
    dtype = kw.pop("dtype", None)
    if weights is None and not cache_path(card).is_file():
        raise WeightsNotFoundError(
            f"Model {card.name!r} has no public weights: the FIANet authors publish none.",
            hint=f"Train it (or get a checkpoint from its authors) and pass --weights PATH, or "
            f"place the file as {cache_path(card)} with bert-base-uncased's vocab.txt beside it.",
        )
    path = resolve_weights(card, weights)
    sd = read_fianet_checkpoint(path)
    cfg = infer_fianet_config(sd, card_config(card))
    if kw:
        cfg = replace(cfg, **kw)
    model = FianetModel(cfg)
    load_fianet_state_dict(model, sd)
    model.name = card.name
    candidates = [Path(vocab)] if vocab is not None else [
        Path(path).parent / VOCAB_FILENAME,
        cache_path(card).parent / VOCAB_FILENAME,
    ]
    for cand in candidates:
        if cand.is_file() or (cand.is_dir() and (cand / VOCAB_FILENAME).is_file()):
            model.set_vocab(cand)
            break
    else:
        raise WeightsNotFoundError(
            f"BERT vocabulary for {card.name!r} not found (looked at "
            + ", ".join(str(c) for c in candidates) + ").",
            hint=f"Download bert-base-uncased's vocab.txt ({BERT_VOCAB_URL}) and place it next "
            "to the checkpoint, or pass vocab=PATH.",
        )
    model = model.to(device=device)
    if dtype is not None:
        model = model.to(dtype=dtype)
    return model.eval()


__all__ = ["build", "card_config", "load_fianet"]
