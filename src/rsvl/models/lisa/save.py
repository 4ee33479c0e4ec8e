"""Writing LISA / FSVLM folders: the two layouts :mod:`.convert` reads.

* :func:`save_merged`: the published layout (what upstream's
  ``merge_lora_weights_and_save_hf_model.py`` leaves after ``save_pretrained``): ``config.json``
  (``model_type: "llava"``, ``architectures: ["LISAForCausalLM"]``, the LLaMA shape, ``out_dim``,
  ``train_mask_decoder``, ``vision_tower``), the merged weights as safetensors (one file, or
  ``model-0000N-of-0000M.safetensors`` shards with ``model.safetensors.index.json`` above
  ``max_shard_bytes``), and the tokenizer files (``tokenizer.model`` copied from the base,
  ``added_tokens.json`` with ``[SEG]`` and the image markers). No ``vision_tower`` keys, as
  upstream's merge drops them.
* :func:`save_unmerged`: the training output as upstream's ``zero_to_fp32.py`` writes it:
  one ``pytorch_model.bin`` (plain tensors, readable with ``weights_only=True``) holding the
  peft-wrapped state dict, every key under ``base_model.model.``, the LoRA pairs as
  ``<layer>.lora_{A,B}.default.weight`` and their base weight at ``<layer>.weight`` (peft
  0.4's spelling, LISA's pin); beside it the same ``config.json`` and tokenizer files and an
  ``adapter_config.json`` whose ``lora_alpha`` the loader reads for the merge.

Both folders are written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from rsvl.io import atomic_dir, atomic_path
from rsvl.models.lisa.tokenizer import LisaTokenizer

#: tokenizer files copied from the base folder when present (added_tokens.json is rewritten)
TOKENIZER_FILES: tuple[str, ...] = ("tokenizer.model", "special_tokens_map.json", "tokenizer_config.json")
#: save_pretrained's default shard size
MAX_SHARD_BYTES = 5 * 1024**3


def lisa_config(base: Mapping[str, Any], *, vocab_size: int, vision_width: int, out_dim: int,
                vision_tower: str, dtype: torch.dtype, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A LISA ``config.json`` dict: the base LLaVA's fields plus what LISA's ``save_pretrained``
    adds (see the module doc)."""
    cfg = dict(base)
    cfg.update({
        "model_type": "llava", "architectures": ["LISAForCausalLM"], "vocab_size": int(vocab_size),
        "mm_hidden_size": int(vision_width), "out_dim": int(out_dim), "train_mask_decoder": True,
        "vision_tower": str(vision_tower), "mm_vision_select_layer": int(base.get("mm_vision_select_layer", -2)),
        "mm_use_im_start_end": bool(base.get("mm_use_im_start_end", True)),
        "torch_dtype": str(dtype).replace("torch.", ""),
    })
    cfg.update(dict(extra or {}))
    return cfg


def write_tokenizer(folder: Path, tokenizer: LisaTokenizer, source: Path) -> None:
    """The base folder's tokenizer files and an ``added_tokens.json`` with every added token."""
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, folder / name)
    (folder / "added_tokens.json").write_text(json.dumps(dict(sorted(tokenizer.added.items(), key=lambda kv: kv[1]))))


def _shards(sd: Mapping[str, Tensor], max_bytes: int) -> list[dict[str, Tensor]]:
    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for key, value in sd.items():
        n = value.numel() * value.element_size()
        if shards[-1] and size + n > max_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = value
        size += n
    return shards


def save_merged(folder: str | Path, sd: Mapping[str, Tensor], config: Mapping[str, Any], tokenizer: LisaTokenizer,
                tokenizer_source: str | Path, *, dtype: torch.dtype | None = None,
                max_shard_bytes: int = MAX_SHARD_BYTES) -> Path:
    """Write a merged folder (see the module doc); ``folder`` is replaced when it exists."""
    final = Path(folder)
    final.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().cpu().contiguous()
               for k, v in sd.items()}
    cfg = dict(config)
    if dtype is not None:
        cfg["torch_dtype"] = str(dtype).replace("torch.", "")
    with _replacing(final) as tmp:
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        shards = _shards(tensors, max_shard_bytes)
        if len(shards) == 1:
            save_file(shards[0], str(tmp / "model.safetensors"), metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, shard in enumerate(shards, 1):
                name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(tmp / name), metadata={"format": "pt"})
                weight_map.update(dict.fromkeys(shard, name))
            total = sum(v.numel() * v.element_size() for v in tensors.values())
            (tmp / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        write_tokenizer(tmp, tokenizer, Path(tokenizer_source))
    return final


def save_unmerged(folder: str | Path, peft_sd: Mapping[str, Tensor], config: Mapping[str, Any],
                  tokenizer: LisaTokenizer, tokenizer_source: str | Path, *, r: int, lora_alpha: float,
                  lora_dropout: float, target_modules: Sequence[str], base: str = "") -> Path:
    """Write the unmerged training output (see the module doc); ``peft_sd`` is a peft
    model's state dict (``base_model.model.*`` keys, any peft release's spelling)."""
    final = Path(folder)
    final.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k.replace(".base_layer.", "."): v.detach().cpu().contiguous() for k, v in peft_sd.items()}
    adapter = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": int(r), "lora_alpha": float(lora_alpha),
               "lora_dropout": float(lora_dropout), "target_modules": list(target_modules), "bias": "none",
               "fan_in_fan_out": False, "inference_mode": True, "base_model_name_or_path": base}
    with _replacing(final) as tmp:
        (tmp / "config.json").write_text(json.dumps(dict(config), indent=2))
        (tmp / "adapter_config.json").write_text(json.dumps(adapter, indent=2))
        with atomic_path(tmp / "pytorch_model.bin") as path:
            torch.save(tensors, path)
        write_tokenizer(tmp, tokenizer, Path(tokenizer_source))
    return final


@contextmanager
def _replacing(final: Path) -> Iterator[Path]:
    """A temporary folder renamed onto ``final`` when the block succeeds (an older ``final``
    is removed only then)."""
    staged = final.parent / (final.name + ".new")
    shutil.rmtree(staged, ignore_errors=True)
    with atomic_dir(staged) as tmp:
        yield tmp
    if final.exists():
        shutil.rmtree(final)
    staged.rename(final)


__all__ = ["MAX_SHARD_BYTES", "lisa_config", "save_merged", "save_unmerged", "write_tokenizer"]
