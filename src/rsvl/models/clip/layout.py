"""Checkpoint layouts of the open_clip-format CLIPs: reading, key normalisation, description.

The published checkpoints are read as they are:

* FarSLIP / SkyCLIP training checkpoints ``{'epoch', 'state_dict': {'module.…'}, 'optimizer'}``;
* bare state dicts (RemoteCLIP, GeoRSCLIP), ``{'model': …}`` / ``{'state_dict': …}`` wrappers;
* open_clip's own files (``open_clip_pytorch_model.bin`` / ``.safetensors``) and JIT-free
  OpenAI state dicts (the ``input_resolution``/``context_length``/``vocab_size`` entries are
  dropped);
* open_clip ``CustomTextCLIP`` files (``text.*`` keys), mapped onto ``CLIP``'s names.

Files are read by :mod:`rsvl.models.checkpoint` (safetensors or ``torch.load(weights_only=True)``).

**Long-text (Long-CLIP) text towers** (FarSLIP2) keep 248 positions in two tables:
``positional_embedding`` for the first 20 positions and ``positional_embedding_res`` for the
rest (``mask1`` / ``mask2`` buffers select them). :func:`to_long_text_state_dict` stretches a
77-position model into that layout the way FarSLIP's ``load_from_clip`` does.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from rsvl.models.checkpoint import read_file, strip_prefixes, unwrap

#: default number of leading positions that use ``positional_embedding`` in a Long-CLIP tower
LONG_CLIP_KEEP = 20

#: entries of OpenAI / old open_clip files that are not parameters of open_clip's CLIP
DROP_KEYS: tuple[str, ...] = ("input_resolution", "context_length", "vocab_size", "attn_mask")
_CUSTOM_TEXT_MAP = {
    "text.token_embedding.": "token_embedding.",
    "text.positional_embedding": "positional_embedding",
    "text.transformer.": "transformer.",
    "text.ln_final.": "ln_final.",
    "text.text_projection": "text_projection",
}
#: (vision width, patch, layers) -> open_clip name, for hints in mismatch messages
_KNOWN_VITS = {
    (768, 16, 12): "ViT-B-16",
    (768, 32, 12): "ViT-B-32",
    (1024, 14, 24): "ViT-L-14",
    (1280, 14, 32): "ViT-H-14",
}


# ============================================================================================
# reading checkpoint files
# ============================================================================================


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a checkpoint file into a flat ``{name: tensor}`` dict (not yet key-normalised).

    Unwraps ``{'state_dict': …}``, ``{'model': …}`` (and nested) training checkpoints and
    tolerates the plain entries of OpenAI files (``input_resolution`` ...). A TorchScript
    archive is refused with a pointer to the JIT-free open_clip file.
    """
    obj = read_file(path, "Checkpoint")
    return unwrap(obj, f"Checkpoint {Path(path)}", tolerated=DROP_KEYS)


def normalise_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip DDP / torch.compile prefixes, drop non-parameter entries, map the
    CustomTextCLIP ``text.*`` layout onto CLIP's."""
    out = strip_prefixes(sd)
    for key in DROP_KEYS:
        out.pop(key, None)
    out.pop("text.transformer.embeddings.position_ids", None)
    if "token_embedding.weight" not in out and "text.token_embedding.weight" in out:
        mapped = {}
        for k, v in out.items():
            for old, new in _CUSTOM_TEXT_MAP.items():
                if k.startswith(old):
                    k = new + k[len(old) :]
                    break
            mapped[k] = v
        out = mapped
    return out


# ============================================================================================
# inspecting a state dict
# ============================================================================================


def _count_blocks(sd: Mapping[str, Any], prefix: str) -> int:
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    idx = {int(m.group(1)) for k in sd if (m := pat.match(k))}
    return max(idx) + 1 if idx else 0


def describe_state_dict(sd: Mapping[str, torch.Tensor]) -> str:
    """One line on what a CLIP state dict looks like (used in mismatch messages)."""
    parts: list[str] = []
    if "visual.attnpool.c_proj.weight" in sd:
        stages = [_count_blocks(sd, f"visual.layer{i}.") for i in range(1, 5)]
        pos = sd.get("visual.attnpool.positional_embedding")
        px = f", {int(math.isqrt(pos.shape[0] - 1)) * 32} px" if pos is not None else ""
        parts.append(f"vision ModifiedResNet stages {stages}{px}")
    elif "visual.conv1.weight" in sd and "visual.class_embedding" in sd:
        w = sd["visual.conv1.weight"]
        width, patch = int(w.shape[0]), int(w.shape[-1])
        layers = _count_blocks(sd, "visual.transformer.resblocks.")
        pos = sd.get("visual.positional_embedding")
        px = f", {int(math.isqrt(pos.shape[0] - 1)) * patch} px" if pos is not None else ""
        guess = _KNOWN_VITS.get((width, patch, layers))
        parts.append(
            f"vision ViT width {width}, patch {patch}, {layers} layers{px}"
            + (f" (= open_clip {guess})" if guess else "")
        )
    elif any(k.startswith("visual.") for k in sd):
        parts.append("an unrecognised vision tower")
    else:
        parts.append("no 'visual.*' weights (not an open_clip CLIP state dict?)")
    pos_t = sd.get("positional_embedding")
    if pos_t is not None:
        long = "positional_embedding_res" in sd
        parts.append(
            f"text context {pos_t.shape[0]}, width {pos_t.shape[1]}, "
            f"{_count_blocks(sd, 'transformer.resblocks.')} layers"
            + (" (Long-CLIP: positional_embedding_res)" if long else "")
        )
    if "text_projection" in sd:
        parts.append(f"embed dim {sd['text_projection'].shape[-1]}")
    return "; ".join(parts)


def text_layout(sd: Mapping[str, torch.Tensor]) -> tuple[int | None, bool]:
    """(text context length stored in the file, has a Long-CLIP second table)."""
    pos = sd.get("positional_embedding")
    ctx = int(pos.shape[0]) if pos is not None and pos.ndim == 2 else None
    return ctx, "positional_embedding_res" in sd


# ============================================================================================
# Long-CLIP tables
# ============================================================================================


def long_clip_positional_tables(
    pos: torch.Tensor, keep: int = LONG_CLIP_KEEP
) -> tuple[torch.Tensor, torch.Tensor]:
    """Long-CLIP's stretch of a short text positional table (FarSLIP ``load_from_clip``).

    The first ``keep`` rows are kept; every later gap between rows ``i`` and ``i + 1`` is
    filled with 4 linearly interpolated rows (weights 0, 1/4, 2/4, 3/4), and 4 rows
    extrapolated past the last one close the table: 77 rows -> ``4 * 77 - 3 * 20 = 248``.
    Returns ``(positional_embedding, positional_embedding_res)`` (equal copies: training then
    freezes the first and fine-tunes the second). Only for building a long-text model from a
    short one; published long-text checkpoints are loaded as stored.
    """
    length = pos.shape[0]
    if not 0 < keep < length - 1:
        raise ValueError(f"keep must be in 1..{length - 2}, got {keep}")
    w = torch.arange(4, dtype=pos.dtype, device=pos.device).view(1, 4, 1) / 4
    a, b = pos[keep : length - 1].unsqueeze(1), pos[keep + 1 : length].unsqueeze(1)
    middle = ((1 - w) * a + w * b).reshape(-1, pos.shape[1])
    last, step = pos[length - 1], pos[length - 1] - pos[length - 2]
    tail = last.unsqueeze(0) + w.view(4, 1) * step.unsqueeze(0)
    table = torch.cat([pos[:keep], middle, tail], dim=0)
    return table, table.clone()


def to_long_text_state_dict(
    state_dict: Mapping[str, torch.Tensor], keep: int = LONG_CLIP_KEEP
) -> dict[str, torch.Tensor]:
    """A short-context CLIP state dict turned into FarSLIP's Long-CLIP layout
    (``positional_embedding`` / ``positional_embedding_res`` / ``mask1`` / ``mask2``)."""
    sd = normalise_state_dict(state_dict)
    if "positional_embedding_res" in sd:
        return sd
    pos, pos_res = long_clip_positional_tables(sd["positional_embedding"], keep)
    mask1 = torch.zeros(pos.shape[0], 1, dtype=pos.dtype)
    mask1[:keep] = 1
    sd.update(positional_embedding=pos, positional_embedding_res=pos_res)
    sd.update(mask1=mask1, mask2=1 - mask1)
    return sd


__all__ = [
    "DROP_KEYS",
    "LONG_CLIP_KEEP",
    "describe_state_dict",
    "long_clip_positional_tables",
    "normalise_state_dict",
    "read_checkpoint",
    "text_layout",
    "to_long_text_state_dict",
]
