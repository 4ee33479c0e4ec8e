"""Building the open_clip network a card describes: from a checkpoint or with random init.

The text tower is shaped to what the checkpoint holds: a text ``positional_embedding`` with
more rows than the config builds that many positions, and a ``positional_embedding_res``
entry builds FarSLIP/Long-CLIP's second table (:class:`LongTextCLIP`), never squashed to 77.
With the two tables the token input is ``tok + pos * mask1 + pos_res * mask2`` where
``mask1`` selects the first 20 positions (taken from the stored ``mask1``/``mask2`` buffers
when present).

Loading is strict (:func:`rsvl.models.checkpoint.mismatch_report`): what does not fit raises
:class:`~rsvl.errors.CheckpointMismatchError` naming the keys, the architecture tried and
what the file looks like.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from rsvl.errors import CheckpointMismatchError, UnknownModelError
from rsvl.models.cards import ModelCard
from rsvl.models.checkpoint import mismatch_report
from rsvl.models.clip.layout import (
    LONG_CLIP_KEEP,
    describe_state_dict,
    normalise_state_dict,
    text_layout,
)

log = logging.getLogger(__name__)

_MISMATCH_HINT = (
    "Check that --weights points at this model's file (`rsvl models` lists each model's file), "
    "or pick the model whose architecture matches the file."
)


class LongTextCLIP(open_clip.CLIP):
    """open_clip ``CLIP`` with FarSLIP/Long-CLIP's second positional table: text input =
    token + pos·mask1 + pos_res·mask2 (248 positions)."""

    def __init__(self, *args: Any, keep_len: int = LONG_CLIP_KEEP, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        n_pos, width = self.positional_embedding.shape
        self.positional_embedding_res = nn.Parameter(torch.zeros(n_pos, width))
        mask1 = torch.zeros(n_pos, 1)
        mask1[:keep_len] = 1
        self.register_buffer("mask1", mask1)
        self.register_buffer("mask2", 1 - mask1)

    def encode_text(self, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        cast_dtype = self.transformer.get_cast_dtype()
        x = self.token_embedding(text).to(cast_dtype)
        x = (
            x
            + (self.positional_embedding * self.mask1).to(cast_dtype)
            + (self.positional_embedding_res * self.mask2).to(cast_dtype)
        )
        batch_first = getattr(self.transformer, "batch_first", False)
        if not batch_first:
            x = x.transpose(0, 1)
        x = self.transformer(x, attn_mask=self.attn_mask)
        if not batch_first:
            x = x.transpose(0, 1)
        x = self.ln_final(x)
        x = x[torch.arange(x.shape[0], device=x.device), text.argmax(dim=-1)]
        if isinstance(self.text_projection, nn.Linear):
            x = self.text_projection(x)
        elif self.text_projection is not None:
            x = x @ self.text_projection
        return F.normalize(x, dim=-1) if normalize else x


def model_config(card: ModelCard, model_cfg: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A copy of the open_clip config (``{embed_dim, vision_cfg, text_cfg, ...}``) of
    ``card.architecture``, or of ``model_cfg`` when given."""
    if model_cfg is not None:
        return copy.deepcopy(dict(model_cfg))
    if card.architecture not in open_clip.list_models():  # never resolve hf-hub: names here
        raise UnknownModelError(
            f"Model {card.name!r} names open_clip architecture {card.architecture!r}, "
            "which this open_clip installation does not define.",
            hint="Upgrade open_clip_torch, or pass model_cfg= with the architecture's config.",
        )
    cfg = open_clip.get_model_config(card.architecture)
    assert cfg is not None
    return copy.deepcopy(cfg)


def _split_config(
    card: ModelCard, model_cfg: Mapping[str, Any] | None, quick_gelu: bool | None
) -> tuple[dict[str, Any], bool]:
    """(CLIP constructor config, QuickGELU?): the card's activation unless overridden; an
    open_clip ``*-quickgelu`` config also turns it on."""
    cfg = model_config(card, model_cfg)
    cfg.pop("custom_text", None)
    cfg_quick_gelu = bool(cfg.pop("quick_gelu", False))
    qg = (card.quick_gelu or cfg_quick_gelu) if quick_gelu is None else bool(quick_gelu)
    return cfg, qg


def build_random(
    card: ModelCard,
    *,
    quick_gelu: bool | None = None,
    model_cfg: Mapping[str, Any] | None = None,
) -> nn.Module:
    """open_clip ``CLIP`` of ``card`` with open_clip's random initialisation (float32)."""
    cfg, qg = _split_config(card, model_cfg, quick_gelu)
    if any(k in cfg.get("text_cfg", {}) for k in ("hf_model_name", "hf_tokenizer_name")):
        raise UnknownModelError(
            f"open_clip {card.architecture} has a Hugging Face text tower; rsvl builds "
            "CLIPs with open_clip's own text transformer.",
            hint="Use a CLIP architecture such as ViT-B-32 or ViT-B-16.",
        )
    log.info("%s: random initialisation (%s)", card.name, "QuickGELU" if qg else "nn.GELU")
    return open_clip.CLIP(**cfg, quick_gelu=qg)


def build_clip(
    card: ModelCard,
    state_dict: Mapping[str, torch.Tensor],
    *,
    quick_gelu: bool | None = None,
    model_cfg: Mapping[str, Any] | None = None,
    source: str | Path | None = None,
) -> nn.Module:
    """Build the open_clip network ``card`` describes, shaped to the text layout found in
    ``state_dict``, and load ``state_dict`` into it strictly.

    The parameters are the state dict's own tensors (no copy; they keep the file's dtype -
    :class:`~rsvl.models.clip.model.ClipModel` casts to the dtype it runs in).
    """
    sd = normalise_state_dict(state_dict)
    cfg, qg = _split_config(card, model_cfg, quick_gelu)
    text_cfg = dict(cfg.get("text_cfg", {}))
    ctx, long_text = text_layout(sd)
    if ctx is not None and ctx != text_cfg.get("context_length", 77):
        log.info("%s: text context %s taken from the checkpoint", card.name, ctx)
        text_cfg["context_length"] = ctx
    cfg["text_cfg"] = text_cfg

    keep = LONG_CLIP_KEEP
    if long_text and sd.get("mask1") is not None:
        keep = int(sd["mask1"].sum().item())

    def construct() -> nn.Module:
        if long_text:
            return LongTextCLIP(**copy.deepcopy(cfg), quick_gelu=qg, keep_len=keep)
        return open_clip.CLIP(**copy.deepcopy(cfg), quick_gelu=qg)

    tried = (
        f"open_clip {card.architecture} ({'QuickGELU' if qg else 'nn.GELU'}, text context "
        f"{text_cfg.get('context_length', 77)}{', Long-CLIP' if long_text else ''})"
    )
    # Build on the meta device (no random init, no second copy of the weights), check the file
    # against it, then take the file's tensors as the parameters. Anything unusual falls back
    # to an ordinary CPU build.
    try:
        with torch.device("meta"):
            model = construct()
    except Exception:  # pragma: no cover - depends on the open_clip version
        model = construct()
    check_clip_keys(model, sd, card=card, tried=tried, source=source, long_text=long_text)
    if not _assign_weights(model, sd, keep):  # pragma: no cover - see _assign_weights
        model = construct()
        model.load_state_dict(sd, strict=False)
    return model.eval()


def _assign_weights(model: nn.Module, sd: dict[str, torch.Tensor], keep: int) -> bool:
    """Load ``sd`` into a (meta) model by assignment and rebuild the derivable buffers the file
    does not hold. False when something would stay unmaterialised (caller rebuilds on CPU)."""
    if not any(t.is_meta for t in model.state_dict(keep_vars=True).values()):
        model.load_state_dict(sd, strict=False)
        return True
    model.load_state_dict(sd, strict=False, assign=True)
    for module in model.modules():
        for name, buf in list(module.named_buffers(recurse=False)):
            if buf is None or not buf.is_meta:
                continue
            if name == "attn_mask":  # causal text mask, as open_clip builds it
                value = torch.full(tuple(buf.shape), float("-inf")).triu_(1)
            elif name in ("mask1", "mask2"):
                first = torch.zeros(tuple(buf.shape))
                first[:keep] = 1
                value = first if name == "mask1" else 1 - first
            elif name == "num_batches_tracked":
                value = torch.zeros((), dtype=torch.long)
            else:
                return False
            setattr(module, name, value.to(buf.dtype))
    remaining = [n for n, t in model.named_parameters() if t.is_meta]
    remaining += [n for n, t in model.named_buffers() if t.is_meta]
    return not remaining


def check_clip_keys(
    model: nn.Module,
    sd: dict[str, torch.Tensor],
    *,
    card: ModelCard,
    tried: str,
    source: str | Path | None = None,
    long_text: bool = False,
) -> None:
    """Raise :class:`~rsvl.errors.CheckpointMismatchError` unless ``sd`` fits ``model``
    exactly; the message names the architecture tried and describes the file. A stored
    ``logit_scale`` of another shape (scalar vs ``[1]``) is reshaped in place."""
    expected = model.state_dict()
    if "logit_scale" in sd and "logit_scale" in expected:
        sd["logit_scale"] = sd["logit_scale"].reshape(expected["logit_scale"].shape)
    # derivable buffers a file may lack without changing the function
    optional = {k for k in expected if k.endswith("num_batches_tracked")}
    if long_text:
        optional |= {"mask1", "mask2"}
    report = mismatch_report(expected, sd, optional=optional)
    if report:
        where = f"Checkpoint {source}" if source else "The checkpoint"
        raise CheckpointMismatchError(
            f"{where} does not fit model {card.name!r} built as {tried}: {report}. "
            f"The file looks like: {describe_state_dict(sd)}.",
            hint=_MISMATCH_HINT,
        )


__all__ = ["LongTextCLIP", "build_clip", "build_random", "check_clip_keys", "model_config"]
