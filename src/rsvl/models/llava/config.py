"""A VHM / GeoChat ``config.json`` (LLaVA-1.5 style) as a transformers ``LlavaConfig``.

The file is read as plain JSON: its ``model_type`` ("vhm", "llava", "geochat") and
``architectures`` name classes transformers does not have and are ignored. What matters is
the LLaMA shape (hidden size, layers, heads ...) and the multimodal fields:

* ``mm_vision_select_layer``: a list (VHM's ``[8, 16, 24]``: those CLIP hidden states are
  concatenated) or one index (GeoChat's ``-2``). This, not the folder's name, tells the two
  variants apart (:func:`detect_variant`);
* ``mm_projector_type``: only ``mlp2x_gelu`` (Linear -> GELU -> Linear) is supported;
* ``mm_vision_select_feature``: ``patch`` (CLS dropped), transformers' strategy "default".

The vision tower's shape comes from its own ``config.json`` (a ``clip_vision_model`` or a
full ``clip`` config whose ``vision_config`` is used) or, when there is none, from the shapes
of its weights (:func:`infer_vision_fields`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

from rsvl.errors import CheckpointMismatchError

#: LlamaConfig fields taken from a LLaVA config.json when present
LLAMA_FIELDS: tuple[str, ...] = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "max_position_embeddings",
    "rms_norm_eps",
    "rope_theta",
    "hidden_act",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "initializer_range",
    "attention_bias",
)
#: CLIPVisionConfig fields taken from a vision tower's config.json when present
CLIP_FIELDS: tuple[str, ...] = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "image_size",
    "patch_size",
    "hidden_act",
    "layer_norm_eps",
    "projection_dim",
    "num_channels",
)
#: the two variants this family loads
VARIANTS: tuple[str, ...] = ("vhm", "geochat")


def read_json(path: str | Path, what: str) -> dict[str, Any]:
    """A JSON object from ``path``, or a one-line :class:`CheckpointMismatchError`."""
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointMismatchError(
            f"{what} {p} is not readable JSON ({exc}).",
            hint="Download the file again from the model's repository.",
        ) from exc
    if not isinstance(data, dict):
        raise CheckpointMismatchError(
            f"{what} {p} does not hold a JSON object.",
            hint="Download the file again from the model's repository.",
        )
    return data


def detect_variant(cfg: Mapping[str, Any]) -> str:
    """ "vhm" when the config concatenates several CLIP layers, else "geochat" (one layer)."""
    layer = cfg.get("mm_vision_select_layer")
    if isinstance(layer, (list, tuple)):
        return "vhm"
    if layer is None:
        raise CheckpointMismatchError(
            "config.json has no mm_vision_select_layer: it is not a LLaVA-style chat model.",
            hint="Point --weights at the folder of VHM (FitzPC/vhm_7B) or GeoChat "
            "(MBZUAI/geochat-7B).",
        )
    return "geochat"


def select_layers(cfg: Mapping[str, Any]) -> int | list[int]:
    layer = cfg["mm_vision_select_layer"]
    return [int(v) for v in layer] if isinstance(layer, (list, tuple)) else int(layer)


def check_multimodal(cfg: Mapping[str, Any]) -> None:
    """Refuse the LLaVA options this loader does not implement, by name."""
    projector = cfg.get("mm_projector_type", "linear")
    if projector != "mlp2x_gelu":
        raise CheckpointMismatchError(
            f"config.json has mm_projector_type={projector!r}; "
            "rsvl loads mlp2x_gelu projectors only.",
            hint="VHM and GeoChat use mlp2x_gelu; check that the folder is one of them.",
        )
    feature = cfg.get("mm_vision_select_feature", "patch")
    if feature != "patch":
        raise CheckpointMismatchError(
            f"config.json has mm_vision_select_feature={feature!r}; "
            "only 'patch' (CLS dropped) is supported.",
            hint="VHM and GeoChat use 'patch'; check that the folder is one of them.",
        )
    if cfg.get("mm_use_im_start_end"):
        raise CheckpointMismatchError(
            "config.json has mm_use_im_start_end=true (<im_start>/<im_end> around the image), "
            "which rsvl does not implement.",
            hint="VHM and GeoChat use mm_use_im_start_end=false; check the folder.",
        )


def text_config(cfg: Mapping[str, Any], vocab_size: int) -> LlamaConfig:
    """The LLaMA of a LLaVA config.json, with ``vocab_size`` rows (the image token added)."""
    fields = {k: cfg[k] for k in LLAMA_FIELDS if k in cfg and cfg[k] is not None}
    fields["vocab_size"] = vocab_size
    fields.setdefault("num_key_value_heads", fields.get("num_attention_heads"))
    fields["tie_word_embeddings"] = False
    fields["rope_scaling"] = cfg.get("rope_scaling")
    if fields["rope_scaling"] is None:
        fields.pop("rope_scaling")
    return LlamaConfig(**fields)


def vision_fields_from_json(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """CLIPVisionConfig fields from a ``clip_vision_model`` or ``clip`` config.json."""
    if cfg.get("model_type") == "clip" or "vision_config" in cfg:
        cfg = cfg.get("vision_config") or {}
    return {k: cfg[k] for k in CLIP_FIELDS if k in cfg and cfg[k] is not None}


def infer_vision_fields(sd: Mapping[str, Tensor], prefix: str = "vision_model.") -> dict[str, Any]:
    """CLIPVisionConfig fields read from a CLIP vision state dict's shapes (heads: width / 64,
    as in every OpenAI CLIP ViT; activation quick_gelu, OpenAI's)."""
    try:
        patch = sd[prefix + "embeddings.patch_embedding.weight"]
        pos = sd[prefix + "embeddings.position_embedding.weight"]
        fc1 = sd[prefix + "encoder.layers.0.mlp.fc1.weight"]
    except KeyError as exc:
        raise CheckpointMismatchError(
            f"The vision tower weights lack {exc.args[0]}: they are not a CLIP vision model.",
            hint="Use the vision tower named on the model's card (`rsvl models`).",
        ) from exc
    layers = {
        k[len(prefix + "encoder.layers.") :].split(".")[0]
        for k in sd
        if k.startswith(prefix + "encoder.layers.")
    }
    width, patch_size = int(patch.shape[0]), int(patch.shape[-1])
    side = math.isqrt(int(pos.shape[0]) - 1)
    return {
        "hidden_size": width,
        "intermediate_size": int(fc1.shape[0]),
        "num_hidden_layers": len(layers),
        "num_attention_heads": max(1, width // 64),
        "patch_size": patch_size,
        "image_size": side * patch_size,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
    }


def llava_config(
    cfg: Mapping[str, Any],
    vision_fields: Mapping[str, Any],
    *,
    image_size: int,
    image_token_id: int,
) -> LlavaConfig:
    """The ``LlavaConfig`` of a LLaVA config.json: the vision tower at ``image_size`` (336 for
    VHM, 504 for GeoChat), the text vocabulary extended by the image token."""
    check_multimodal(cfg)
    vision = CLIPVisionConfig(**{**dict(vision_fields), "image_size": image_size})
    text = text_config(cfg, vocab_size=image_token_id + 1)
    layers = select_layers(cfg)
    n_patches = (image_size // vision.patch_size) ** 2
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=image_token_id,
        image_seq_length=n_patches,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=layers,
        multimodal_projector_bias=True,
        tie_word_embeddings=False,
    )


__all__ = [
    "VARIANTS",
    "check_multimodal",
    "detect_variant",
    "infer_vision_fields",
    "llava_config",
    "read_json",
    "select_layers",
    "text_config",
    "vision_fields_from_json",
]
