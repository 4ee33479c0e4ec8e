"""LISA / FSVLM checkpoint layouts -> the merged state dict :class:`~.network.LisaNet` loads.

Two layouts are read:

* **merged** (``merge_lora_weights_and_save_hf_model.py``'s ``save_pretrained``, what
  ``xinlai/LISA-7B-v1`` publishes): the keys :class:`~.network.LisaNet` has, sharded or not.
  ``vision_tower`` keys are absent (upstream's merge drops them) and dropped when present.
* **unmerged** (``zero_to_fp32.py``'s ``pytorch_model.bin`` of a LoRA training run): the
  peft-wrapped model, every key under ``base_model.model.``; LoRA pairs
  ``<layer>.lora_A.default.weight`` (r x in) / ``<layer>.lora_B.default.weight`` (out x r) on
  ``q_proj`` and ``v_proj`` of every LLaMA block, their base weight at ``<layer>.weight`` (peft
  0.4, LISA's pin) or ``<layer>.base_layer.weight`` (peft >= 0.7).

**Merge:** explicit, without peft: ``W' = W + (B @ A) * (lora_alpha / r)`` in float32, cast
back to ``W``'s dtype, which is what peft's ``merge_and_unload`` computes for a plain LoRA
Linear (no DoRA, no rsLoRA, ``fan_in_fan_out=False``: LISA's ``LoraConfig``). ``r`` is read
from ``A``'s rows; ``lora_alpha`` is not stored in the file: it comes from an
``adapter_config.json`` beside it when there is one, else upstream's default 16.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from rsvl.errors import CheckpointMismatchError

PEFT_PREFIX = "base_model.model."
#: key fragments never loaded: derived buffers, the CLIP tower (read from its own repository)
DROPPED: tuple[str, ...] = ("rotary_emb.inv_freq", "model.vision_tower.", "visual_model.pixel_mean",
                            "visual_model.pixel_std")
#: the prefixes of a merged LISA checkpoint
PARTS: tuple[str, ...] = ("model.embed_tokens.", "model.layers.", "model.norm.", "lm_head.",
                          "model.mm_projector.", "model.visual_model.", "model.text_hidden_fcs.")
_LORA = re.compile(r"^(.*)\.lora_([AB])\.([^.]+)\.weight$")
#: upstream's --lora_alpha default
DEFAULT_LORA_ALPHA = 16.0


@dataclass(frozen=True)
class LoraReport:
    """What :func:`merge_lora` did."""

    layers: int
    rank: int
    alpha: float
    targets: tuple[str, ...]


def is_unmerged(sd: Mapping[str, Tensor]) -> bool:
    """True for a peft-wrapped (LoRA) training state dict."""
    return any(k.startswith(PEFT_PREFIX) for k in sd) or any(_LORA.match(k) for k in sd)


def merge_lora(sd: Mapping[str, Tensor], lora_alpha: float = DEFAULT_LORA_ALPHA,
               source: str = "The checkpoint") -> tuple[dict[str, Tensor], LoraReport]:
    """The merged state dict of an unmerged (peft LoRA) one; see the module doc."""
    plain: dict[str, Tensor] = {}
    pairs: dict[str, dict[str, Tensor]] = {}
    adapters: set[str] = set()
    for key, value in sd.items():
        k = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        m = _LORA.match(k)
        if m:
            pairs.setdefault(m.group(1), {})[m.group(2)] = value
            adapters.add(m.group(3))
            continue
        plain[k.replace(".base_layer.", ".")] = value
    if len(adapters) > 1:
        raise CheckpointMismatchError(
            f"{source} holds several LoRA adapters ({', '.join(sorted(adapters))}); rsvl merges one.",
            hint="Save the training run's single 'default' adapter.",
        )
    ranks: set[int] = set()
    targets: set[str] = set()
    for layer, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise CheckpointMismatchError(
                f"{source}: LoRA layer {layer} has lora_{''.join(ab)} without its partner.",
                hint="The file is incomplete; convert the DeepSpeed checkpoint again (zero_to_fp32.py).",
            )
        a, b = ab["A"], ab["B"]
        base_key = layer + ".weight"
        if base_key not in plain:
            raise CheckpointMismatchError(
                f"{source}: LoRA layer {layer} has no base weight ({base_key}).",
                hint="The file is incomplete; convert the DeepSpeed checkpoint again (zero_to_fp32.py).",
            )
        w = plain[base_key]
        if a.ndim != 2 or b.ndim != 2 or b.shape[1] != a.shape[0] or (b.shape[0], a.shape[1]) != tuple(w.shape):
            raise CheckpointMismatchError(
                f"{source}: LoRA layer {layer} has A {tuple(a.shape)} and B {tuple(b.shape)}, which do "
                f"not fit its weight {tuple(w.shape)}.",
                hint="The file is not a LoRA training output of this model.",
            )
        rank = int(a.shape[0])
        ranks.add(rank)
        targets.add(layer.rsplit(".", 1)[-1])
        delta = (b.float() @ a.float()) * (float(lora_alpha) / rank)
        plain[base_key] = (w.float() + delta).to(w.dtype)
    report = LoraReport(layers=len(pairs), rank=min(ranks) if ranks else 0, alpha=float(lora_alpha),
                        targets=tuple(sorted(targets)))
    return plain, report


def clean_state_dict(sd: Mapping[str, Tensor], source: str = "The checkpoint") -> dict[str, Tensor]:
    """The merged state dict without the keys never loaded; keys of no LISA part are refused
    by name (what :func:`~rsvl.models.checkpoint.load_strict` then checks is shapes)."""
    out: dict[str, Tensor] = {}
    unknown: list[str] = []
    for key, value in sd.items():
        if any(frag in key for frag in DROPPED):
            continue
        if key.startswith(PARTS):
            out[key] = value
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointMismatchError(
            f"{source} has {len(unknown)} key(s) that are no part of a LISA model: "
            f"{', '.join(sorted(unknown)[:8])}.",
            hint="Point --weights at a LISA / FSVLM folder (model.*, model.visual_model.*, "
            "model.text_hidden_fcs.*, lm_head).",
        )
    for need, what in (("model.embed_tokens.weight", "the LLaMA"),
                       ("model.text_hidden_fcs.0.2.weight", "text_hidden_fcs"),
                       ("model.visual_model.image_encoder.patch_embed.proj.weight", "SAM")):
        if need not in out:
            raise CheckpointMismatchError(
                f"{source} has no {need}: {what} is missing, so it is not a LISA / FSVLM checkpoint.",
                hint="A LLaVA folder has no SAM or [SEG] head; point --weights at the merged LISA / "
                "FSVLM folder (or its unmerged pytorch_model.bin).",
            )
    return out


def projector_of(sd: Mapping[str, Tensor]) -> tuple[str, int]:
    """(``linear`` or ``mlp2x_gelu``, input width) from the projector's keys."""
    if "model.mm_projector.weight" in sd:
        return "linear", int(sd["model.mm_projector.weight"].shape[1])
    if "model.mm_projector.0.weight" in sd:
        return "mlp2x_gelu", int(sd["model.mm_projector.0.weight"].shape[1])
    raise CheckpointMismatchError(
        "The checkpoint has no model.mm_projector weights.",
        hint="Point --weights at the merged LISA / FSVLM folder.",
    )


def sam_part(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``model.visual_model.*`` without the prefix (segment-anything's key names)."""
    pre = "model.visual_model."
    return {k[len(pre):]: v for k, v in sd.items() if k.startswith(pre)}


def cast(sd: Mapping[str, Tensor], dtype: torch.dtype) -> dict[str, Tensor]:
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}


__all__ = ["DEFAULT_LORA_ALPHA", "LoraReport", "PEFT_PREFIX", "clean_state_dict", "is_unmerged",
           "merge_lora", "projector_of", "sam_part"]
