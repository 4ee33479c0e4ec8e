"""Published LLaVA / VHM / GeoChat checkpoints -> transformers ``LlavaForConditionalGeneration``.

Upstream layout (``VHMLlamaForCausalLM`` / ``GeoChatLlamaForCausalLM``, LLaVA-1.5)::

    model.embed_tokens.weight, model.layers.N.*, model.norm.weight, lm_head.weight   (LLaMA)
    model.mm_projector.0.{weight,bias}, model.mm_projector.2.{weight,bias}           (projector)
    model.vision_tower.vision_tower.vision_model.*     (GeoChat may carry its tower; VHM never)
    vision_model.*                                     (a separate CLIPVisionModel folder)

transformers' key names moved between releases (``language_model.model.*`` before 4.52,
``model.language_model.*`` after; the vision tower is a ``CLIPVisionModel`` or, in 5.x, its
inner transformer), so the target prefixes are read from the model itself
(:func:`layout_of`) instead of being hard-coded.

Conversions: ``rotary_emb.inv_freq`` and CLIP's ``position_ids`` buffers are dropped (derived
from the config); the token embeddings and ``lm_head`` get one row more for ``<image>`` (the
mean row: its value never matters in the input, and its logit is masked when generating);
GeoChat's position embeddings are interpolated from 24 x 24 to 36 x 36 patches exactly as
GeoChat's ``clip_interpolate_embeddings`` does (bicubic, ``align_corners=True``, CLS row kept).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from rsvl.errors import CheckpointMismatchError, WeightsNotFoundError
from rsvl.models.checkpoint import read_file, unwrap
from rsvl.models.llava.config import read_json

#: index files of a sharded folder, in order of preference
INDEX_FILES: tuple[str, ...] = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
#: single-file weights of a folder, in order of preference
SINGLE_FILES: tuple[str, ...] = ("model.safetensors", "pytorch_model.bin")
#: key fragments that are derived buffers, never weights
DROPPED: tuple[str, ...] = ("rotary_emb.inv_freq", "embeddings.position_ids")

_EMBEDDED_TOWER = "model.vision_tower.vision_tower."


@dataclass(frozen=True)
class LlavaLayout:
    """Where each part's weights live in a transformers Llava model's state dict."""

    text: str  # + embed_tokens.weight / layers.N.* / norm.weight
    lm_head: str  # the lm_head weight key
    projector: str  # + linear_1.weight ...
    vision: (
        str  # + embeddings.patch_embedding.weight ... (CLIP's vision_model.* without the prefix)
    )


def layout_of(net: nn.Module) -> LlavaLayout:
    """The key prefixes of ``net`` (any transformers release with
    ``LlavaForConditionalGeneration``)."""
    keys = list(net.state_dict())

    def prefix(suffix: str) -> str:
        found = [k[: -len(suffix)] for k in keys if k.endswith(suffix)]
        if len(found) != 1:
            raise RuntimeError(f"cannot find {suffix!r} in the Llava model's keys")
        return found[0]

    return LlavaLayout(
        text=prefix("embed_tokens.weight"),
        lm_head=prefix("lm_head.weight") + "lm_head.weight",
        projector=prefix("linear_1.weight"),
        vision=prefix("embeddings.patch_embedding.weight"),
    )


# --------------------------------------------------------------------------------------------
# reading folders
# --------------------------------------------------------------------------------------------


def _shard_path(folder: Path, name: str) -> Path | None:
    path = folder / name
    if path.is_file():
        return path
    alt = path.with_suffix(
        ".safetensors"
    )  # refs/pr/1 of vhm_7B: the .bin index, .safetensors shards
    return alt if alt.is_file() else None


def weight_files(folder: str | Path, what: str = "Model folder") -> list[Path]:
    """The weight files of a Hugging Face style folder: the shards its index names, or its
    single weights file. Missing files raise :class:`WeightsNotFoundError` naming each one."""
    root = Path(folder)
    for index in INDEX_FILES:
        if (root / index).is_file():
            data = read_json(root / index, "Index")
            weight_map = data.get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointMismatchError(
                    f"Index {root / index} has no weight_map.",
                    hint="Download the index file again.",
                )
            names = sorted(set(map(str, weight_map.values())))
            found = {n: _shard_path(root, n) for n in names}
            missing = [n for n, p in found.items() if p is None]
            if missing:
                raise WeightsNotFoundError(
                    f"{what} {root} lacks {len(missing)} of the {len(names)} weight shards its "
                    f"{index} names: {', '.join(missing)}.",
                    hint=f"Download {', '.join(missing)} from the model's repository into {root}.",
                )
            return [p for p in found.values() if p is not None]
    for name in SINGLE_FILES:
        if (root / name).is_file():
            return [root / name]
    raise WeightsNotFoundError(
        f"{what} {root} has no weights ({' or '.join(INDEX_FILES + SINGLE_FILES)}).",
        hint=f"Download the model's files into {root}.",
    )


def read_weights(folder: str | Path, what: str = "Model folder") -> dict[str, Tensor]:
    """Every tensor of a folder's weight files, read safely (rsvl.models.checkpoint)."""
    sd: dict[str, Tensor] = {}
    for path in weight_files(folder, what):
        part = unwrap(read_file(path, "Checkpoint shard"), f"Checkpoint shard {path}")
        clash = sorted(set(part) & set(sd))
        if clash:
            raise CheckpointMismatchError(
                f"Checkpoint shard {path} repeats keys of another shard: {clash[:5]}.",
                hint="Download the folder's files again.",
            )
        sd.update(part)
    return sd


# --------------------------------------------------------------------------------------------
# splitting and converting
# --------------------------------------------------------------------------------------------


@dataclass
class LlavaParts:
    """A published checkpoint split into its three components (upstream key names)."""

    #: LLaMA keys as in LlamaForCausalLM: model.embed_tokens.weight, model.layers.*, lm_head.weight
    text: dict[str, Tensor]
    #: "0.weight", "0.bias", "2.weight", "2.bias" of ``model.mm_projector``
    projector: dict[str, Tensor]
    #: CLIP keys "vision_model.*" when the checkpoint carries its tower, else empty
    vision: dict[str, Tensor]


def split_checkpoint(sd: Mapping[str, Tensor], source: str = "The checkpoint") -> LlavaParts:
    """Sort a LLaVA-style state dict into LLaMA, projector and (embedded) vision tower;
    derived buffers are dropped and anything else is refused by name."""
    parts = LlavaParts({}, {}, {})
    unknown = []
    for key, value in sd.items():
        if any(frag in key for frag in DROPPED):
            continue
        if key.startswith("model.mm_projector."):
            parts.projector[key[len("model.mm_projector.") :]] = value
        elif key.startswith(_EMBEDDED_TOWER + "vision_model."):
            parts.vision[key[len(_EMBEDDED_TOWER) :]] = value
        elif (
            key.startswith(("model.embed_tokens.", "model.layers.", "model.norm."))
            or key == "lm_head.weight"
        ):
            parts.text[key] = value
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointMismatchError(
            f"{source} has {len(unknown)} key(s) that are no part of a LLaVA-1.5 model: "
            f"{', '.join(sorted(unknown)[:8])}.",
            hint="Point --weights at a VHM or GeoChat folder (LLaMA + model.mm_projector).",
        )
    if "model.embed_tokens.weight" not in parts.text:
        raise CheckpointMismatchError(
            f"{source} has no model.embed_tokens.weight: it is not a LLaMA checkpoint.",
            hint="Point --weights at a VHM or GeoChat folder.",
        )
    if set(parts.projector) != {"0.weight", "0.bias", "2.weight", "2.bias"}:
        raise CheckpointMismatchError(
            f"{source} has no complete mlp2x_gelu projector "
            "(model.mm_projector.{0,2}.{weight,bias}; "
            f"found {sorted(parts.projector) or 'none'}).",
            hint="The folder must hold the fine-tuned model with its projector "
            "(FitzPC/vhm_7B, MBZUAI/geochat-7B).",
        )
    return parts


def vision_from_folder_weights(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The ``vision_model.*`` tensors of a CLIP folder's weights (a ``CLIPVisionModel``, or a
    full ``CLIPModel`` whose text tower and projections are left out)."""
    out = {
        k: v
        for k, v in sd.items()
        if k.startswith("vision_model.") and not any(f in k for f in DROPPED)
    }
    if not out:
        raise CheckpointMismatchError(
            "The vision tower weights have no vision_model.* keys: "
            "they are not a CLIP vision model.",
            hint="Use the vision tower named on the model's card (`rsvl models`).",
        )
    return out


def interpolate_position_embedding(weight: Tensor, new_side: int) -> Tensor:
    """CLIP position embeddings (1 + s*s, D) resampled to (1 + new_side**2, D) as GeoChat
    does: the CLS row kept, the s x s grid resized bicubically with ``align_corners=True``."""
    n, dim = weight.shape
    side = math.isqrt(n - 1)
    if side * side != n - 1:
        raise CheckpointMismatchError(
            f"position embeddings of {n - 1} patches are not a square grid.",
            hint="Use the CLIP vision tower named on the model's card.",
        )
    if side == new_side:
        return weight
    cls_row, grid = weight[:1], weight[1:]
    grid = grid.float().T.reshape(1, dim, side, side)
    grid = nn.functional.interpolate(grid, size=new_side, mode="bicubic", align_corners=True)
    grid = grid.reshape(dim, new_side * new_side).T.to(weight.dtype)
    return torch.cat([cls_row, grid], dim=0)


def add_rows(weight: Tensor, rows: int) -> Tensor:
    """``weight`` with ``rows`` more rows equal to its mean row."""
    if rows <= 0:
        return weight
    mean = weight.float().mean(dim=0, keepdim=True).to(weight.dtype)
    return torch.cat([weight, mean.expand(rows, -1)], dim=0)


def to_llava_state_dict(
    parts: LlavaParts,
    vision: Mapping[str, Tensor],
    layout: LlavaLayout,
    *,
    vocab_size: int,
    patches_per_side: int,
) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The state dict of a transformers Llava model with ``layout`` and the file's spelling of
    each key (for mismatch reports). ``vocab_size`` includes the image token;
    ``patches_per_side`` is the tower's grid at the card's image size."""
    out: dict[str, Tensor] = {}
    shown: dict[str, str] = {}
    for key, value in parts.text.items():
        if key == "lm_head.weight":
            new = layout.lm_head
        else:
            new = layout.text + key[len("model.") :]
        if key in ("lm_head.weight", "model.embed_tokens.weight"):
            value = add_rows(value, vocab_size - value.shape[0])
        out[new], shown[new] = value, key
    for key, value in parts.projector.items():
        new = layout.projector + ("linear_1." if key.startswith("0.") else "linear_2.") + key[2:]
        out[new], shown[new] = value, "model.mm_projector." + key
    for key, value in vision.items():
        inner = key[len("vision_model.") :]
        if inner == "embeddings.position_embedding.weight":
            value = interpolate_position_embedding(value, patches_per_side)
        new = layout.vision + inner
        out[new], shown[new] = value, key
    return out, shown


__all__ = [
    "LlavaLayout",
    "LlavaParts",
    "add_rows",
    "interpolate_position_embedding",
    "layout_of",
    "read_weights",
    "split_checkpoint",
    "to_llava_state_dict",
    "vision_from_folder_weights",
    "weight_files",
]
