"""FIANet checkpoints: reading upstream's training files, the architecture they imply, the
strict load, and the pretrained starting point of training (Swin-B ImageNet-22k in the
Microsoft or timm layout, bert-base-uncased in the Hugging Face layout)."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from rsvl.errors import CheckpointMismatchError, InputNotFoundError
from rsvl.models.checkpoint import check_keys, load_strict, read_state_dict
from rsvl.models.fianet.config import FianetConfig
from rsvl.models.fianet.model import FianetModel, build_fianet

#: keys a FIANet file may hold that carry nothing (newer transformers buffers, an unused pooler)
_IGNORABLE = re.compile(
    r"^text_encoder\.(embeddings\.position_ids|embeddings\.token_type_ids|pooler\..*)$"
)


def read_fianet_checkpoint(path: str | Path) -> dict[str, Tensor]:
    """The state dict of a FIANet checkpoint: ``{'model': ...}`` training files (``optimizer``,
    ``args`` ... ignored), a bare state dict or a ``.safetensors`` file; a DDP ``module.``
    prefix is stripped. Keys keep their ``backbone.`` / ``classifier.`` / ``text_encoder.``
    prefixes."""
    return read_state_dict(path, "FIANet checkpoint", wrappers=("model", "state_dict"),
                           hint="rsvl loads plain tensor state dicts only; re-save the 'model' dict with "
                           "torch.save({'model': ckpt['model']}, path) where the file is trusted.")


def _count(sd: Mapping[str, Tensor], pattern: str) -> int:
    rx = re.compile(pattern)
    found = {int(m.group(1)) for k in sd if (m := rx.match(k))}
    return max(found) + 1 if found else 0


def infer_fianet_config(
    state_dict: Mapping[str, Tensor], base: FianetConfig | None = None
) -> FianetConfig:
    """Architecture read off a FIANet state dict's shapes; text settings come from ``base``.

    Head counts of BERT are not visible in shapes: ``hidden / 64`` is assumed (BERT-base).
    The language-attention head counts (``--mha``) are not visible either: ``base``'s are kept.
    """
    base = base or FianetConfig()
    sd = state_dict

    def get(key: str) -> Tensor:
        if key not in sd:
            raise CheckpointMismatchError(
                f"Not a FIANet checkpoint: missing key {key!r}.",
                hint="Pass a FIANet training checkpoint (model_best_*.pth) or its 'model' dict.",
            )
        return sd[key]

    pe = get("backbone.patch_embed.proj.weight")
    n_stages = _count(sd, r"backbone\.layers\.(\d+)\.")
    if n_stages == 0:
        get("backbone.layers.0.blocks.0.norm1.weight")
    depths = tuple(_count(sd, rf"backbone\.layers\.{i}\.blocks\.(\d+)\.") for i in range(n_stages))
    tables = [get(f"backbone.layers.{i}.blocks.0.attn.relative_position_bias_table") for i in range(n_stages)]
    window = (int(round(math.sqrt(tables[0].shape[0]))) + 1) // 2
    word = get("text_encoder.embeddings.word_embeddings.weight")
    hidden = word.shape[1]
    fusion = base.fusion_heads if len(base.fusion_heads) == n_stages else (1,) * n_stages
    return replace(
        base,
        patch_size=pe.shape[-1],
        in_chans=pe.shape[1],
        embed_dim=pe.shape[0],
        depths=depths,
        num_heads=tuple(t.shape[1] for t in tables),
        window_size=window,
        fusion_heads=fusion,
        num_tmem=_count(sd, r"backbone\.tmem\.block\.(\d+)\."),
        vocab_size=word.shape[0],
        text_hidden_size=hidden,
        text_layers=_count(sd, r"text_encoder\.encoder\.layer\.(\d+)\."),
        text_heads=max(1, hidden // 64),
        text_intermediate_size=get("text_encoder.encoder.layer.0.intermediate.dense.weight").shape[0],
        text_max_positions=get("text_encoder.embeddings.position_embeddings.weight").shape[0],
        text_type_vocab_size=get("text_encoder.embeddings.token_type_embeddings.weight").shape[0],
    )


def load_fianet_state_dict(model: FianetModel, state_dict: Mapping[str, Tensor]) -> None:
    """Load a FIANet state dict strictly: any missing, unexpected or mis-shaped key raises
    :class:`CheckpointMismatchError` naming it (only ``text_encoder`` buffers of newer
    transformers versions and an unused BERT pooler are skipped)."""
    sd = {k: v for k, v in state_dict.items() if not _IGNORABLE.match(k)}
    load_strict(
        model,
        sd,
        what="FIANet checkpoint does not match the model",
        hint="Check that the file is a FIANet (lavt_one) checkpoint of the chosen settings "
        "(Swin-B window 12, BERT-base, --num_tmem 3 for RRSIS-D / 1 for RefSegRS).",
    )


#: Swin classification checkpoint keys with no counterpart in FIANet's backbone
_SWIN_UNUSED = re.compile(r"^(head\..*|norm\.(weight|bias)|absolute_pos_embed|.*\.attn_mask)$")


def _swin_owned(key: str) -> bool:
    """True for backbone keys that a Swin classification checkpoint provides."""
    return key.startswith("patch_embed.") or bool(
        re.match(r"layers\.\d+\.(blocks\.\d+\.|downsample\.)", key)
    )


def load_swin_pretrained(model: FianetModel, path: str | Path | Mapping[str, Tensor]) -> list[str]:
    """Initialise the Swin part of ``model.backbone`` from an ImageNet Swin checkpoint.

    Accepts the original layout (``swin_base_patch4_window12_384_22k.pth``:
    ``{'model': ...}``, patch merging at the *end* of stage i) as upstream LAVT's
    ``mmcv_custom.load_checkpoint`` reads it (``module.`` / ``backbone.`` stripped), and
    timm's layout (merging at the *start* of stage i+1, ``head.fc``). Relative position
    tables of another window size are resized bicubically as upstream does; the
    ``relative_position_index`` buffers are recomputed. Every Swin key of the model must be in
    the file with the right shape and every file key must be used (classifier head, final
    norm and ``attn_mask`` buffers excepted); else :class:`CheckpointMismatchError`.

    Returns the model keys left at their random init (fusion modules, ``norm0-3``, TMEM).
    """
    if isinstance(path, Mapping):
        sd = {str(k): v for k, v in path.items()}
    else:
        sd = read_state_dict(path, "Swin checkpoint", wrappers=("model", "state_dict"))
    sd = {re.sub(r"^(module\.)?(backbone\.)?", "", k): v for k, v in sd.items()}
    timm_layout = "layers.0.downsample.reduction.weight" not in sd and any(
        re.match(r"layers\.\d+\.downsample\.", k) for k in sd
    )
    if timm_layout:
        sd = {
            re.sub(r"^layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) - 1}.downsample", k): v
            for k, v in sd.items()
        }
    target = model.backbone.state_dict()
    sd = {k: v for k, v in sd.items() if not _SWIN_UNUSED.match(k) and "relative_position_index" not in k}
    for k, v in list(sd.items()):
        if k.endswith("relative_position_bias_table") and k in target and v.shape != target[k].shape:
            l1, h1 = v.shape
            l2, h2 = target[k].shape
            if h1 == h2:
                s1, s2 = int(math.isqrt(l1)), int(math.isqrt(l2))
                grid = v.permute(1, 0).reshape(1, h1, s1, s1)
                sd[k] = F.interpolate(grid, size=(s2, s2), mode="bicubic").reshape(h2, l2).permute(1, 0)
    owned = {k for k in target if _swin_owned(k) and "relative_position_index" not in k}
    check_keys(
        {k: target[k] for k in owned},
        sd,
        what="Swin checkpoint does not match the backbone",
        hint="FIANet uses Swin-B (embed 128, depths 2-2-18-2): swin_base_patch4_window12_384_22k.pth.",
    )
    with torch.no_grad():
        for k in owned:
            target[k].copy_(sd[k].to(target[k].dtype))
    return sorted(k for k in target if k not in owned and "relative_position_index" not in k)


def load_bert_pretrained(model: FianetModel, path: str | Path | Mapping[str, Tensor]) -> None:
    """Initialise ``model.text_encoder`` from a Hugging Face BERT checkpoint (bert-base-uncased:
    ``pytorch_model.bin`` / ``model.safetensors`` / a snapshot folder; ``bert.`` prefix, old
    ``LayerNorm.gamma/beta`` names accepted; MLM/NSP heads, the pooler and position buffers
    dropped). Strict otherwise. A folder's ``vocab.txt`` also becomes the tokenizer."""
    folder: Path | None = None
    if isinstance(path, Mapping):
        sd = {str(k): v for k, v in path.items()}
    else:
        p = Path(path).expanduser()
        if not p.exists():
            raise InputNotFoundError(f"BERT checkpoint not found: {p}", hint="Check the path.")
        folder = p if p.is_dir() else p.parent
        sd = read_state_dict(p, "BERT checkpoint", wrappers=("state_dict", "model"))
    out: dict[str, Tensor] = {}
    for k, v in sd.items():
        k = re.sub(r"^(bert\.|text_encoder\.)", "", k)
        if k.startswith(("cls.", "pooler.")) or k in ("embeddings.position_ids", "embeddings.token_type_ids"):
            continue
        k = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", k)
        k = re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", k)
        out[k] = v
    load_strict(
        model.text_encoder,
        out,
        what="BERT checkpoint does not match the text encoder",
        hint="FIANet uses bert-base-uncased (12 layers, hidden 768).",
        shown=lambda k: f"text_encoder.{k}",
    )
    if folder is not None and (folder / "vocab.txt").is_file():
        model.set_vocab(folder / "vocab.txt")


def init_fianet_pretrained(
    config: FianetConfig,
    swin: str | Path | Mapping[str, Tensor],
    bert: str | Path | Mapping[str, Tensor],
    vocab: str | Path | None = None,
) -> FianetModel:
    """Upstream's starting point for training: random init, Swin from ``swin``, BERT from
    ``bert`` (the tokenizer from ``vocab`` or the BERT folder's ``vocab.txt``)."""
    model = build_fianet(config)
    load_swin_pretrained(model, swin)
    load_bert_pretrained(model, bert)
    if vocab is not None:
        model.set_vocab(vocab)
    return model


__all__ = [
    "infer_fianet_config",
    "init_fianet_pretrained",
    "load_bert_pretrained",
    "load_fianet_state_dict",
    "load_swin_pretrained",
    "read_fianet_checkpoint",
]
