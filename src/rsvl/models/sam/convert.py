"""SAM checkpoints: reading (Meta ``.pth``, transformers ``model.safetensors`` or a
``save_pretrained`` folder), layout detection, the Meta <-> transformers ``SamModel`` key
mapping, architecture inference from shapes, and the strict load.

* ``meta``: Meta's ``sam_vit_{b,l,h}_*.pth`` state dicts (segment-anything key names). rsvl's
  modules use these names, so such a file loads as it is.
* ``hf``: Hugging Face ``SamModel`` (``facebook/sam-vit-*``; transformers key names, the layout
  RSPrompter uses). Keys are translated one to one; nothing is dropped silently.

Loading is strict (:func:`rsvl.models.checkpoint.load_strict`): any missing, unexpected or
mis-shaped key raises :class:`rsvl.errors.CheckpointMismatchError` naming the keys as they are
spelled in the file.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from rsvl.errors import CheckpointMismatchError
from rsvl.models.checkpoint import load_strict, read_file, resolve_file, unwrap
from rsvl.models.sam.config import SamConfig
from rsvl.models.sam.sam import Sam

Layout = Literal["meta", "hf"]

# (our / segment-anything name, transformers name) rewrites; MLP layer names are handled
# separately because they depend on the MLP's depth.
_META_TO_HF: list[tuple[str, str]] = [
    (r"^prompt_encoder\.pe_layer\.positional_encoding_gaussian_matrix$",
     "shared_image_embedding.positional_embedding"),
    (r"^image_encoder\.patch_embed\.proj\.", "vision_encoder.patch_embed.projection."),
    (r"^image_encoder\.blocks\.(\d+)\.norm(\d)\.", r"vision_encoder.layers.\1.layer_norm\2."),
    (r"^image_encoder\.blocks\.", "vision_encoder.layers."),
    (r"^image_encoder\.neck\.0\.", "vision_encoder.neck.conv1."),
    (r"^image_encoder\.neck\.1\.", "vision_encoder.neck.layer_norm1."),
    (r"^image_encoder\.neck\.2\.", "vision_encoder.neck.conv2."),
    (r"^image_encoder\.neck\.3\.", "vision_encoder.neck.layer_norm2."),
    (r"^image_encoder\.", "vision_encoder."),
    (r"^prompt_encoder\.point_embeddings\.", "prompt_encoder.point_embed."),
    (r"^prompt_encoder\.mask_downscaling\.0\.", "prompt_encoder.mask_embed.conv1."),
    (r"^prompt_encoder\.mask_downscaling\.1\.", "prompt_encoder.mask_embed.layer_norm1."),
    (r"^prompt_encoder\.mask_downscaling\.3\.", "prompt_encoder.mask_embed.conv2."),
    (r"^prompt_encoder\.mask_downscaling\.4\.", "prompt_encoder.mask_embed.layer_norm2."),
    (r"^prompt_encoder\.mask_downscaling\.6\.", "prompt_encoder.mask_embed.conv3."),
    (r"^(mask_decoder\.transformer\.layers\.\d+)\.norm(\d)\.", r"\1.layer_norm\2."),
    (r"^mask_decoder\.transformer\.norm_final_attn\.",
     "mask_decoder.transformer.layer_norm_final_attn."),
    (r"^mask_decoder\.output_upscaling\.0\.", "mask_decoder.upscale_conv1."),
    (r"^mask_decoder\.output_upscaling\.1\.", "mask_decoder.upscale_layer_norm."),
    (r"^mask_decoder\.output_upscaling\.3\.", "mask_decoder.upscale_conv2."),
]
_MLP_META = re.compile(
    r"^(mask_decoder\.(?:output_hypernetworks_mlps\.\d+|iou_prediction_head))\.layers\.(\d+)\.(.+)$"
)
_MLP_HF = re.compile(
    r"^(mask_decoder\.(?:output_hypernetworks_mlps\.\d+|iou_prediction_head))\."
    r"(proj_in|proj_out|layers\.(\d+))\.(.+)$"
)
#: the transformers copy of the Fourier matrix, tied to shared_image_embedding
_HF_TIED = "prompt_encoder.shared_embedding.positional_embedding"
#: non-persistent buffers that some re-saved Meta checkpoints carry
_META_OPTIONAL = ("pixel_mean", "pixel_std")


def hf_key_for(key: str, config: SamConfig) -> str:
    """The transformers ``SamModel`` name of one of our (segment-anything) parameter names."""
    m = _MLP_META.match(key)
    if m:
        prefix, idx, rest = m.group(1), int(m.group(2)), m.group(3)
        depth = config.iou_head_depth if prefix.endswith("iou_prediction_head") else 3
        if idx == 0:
            name = "proj_in"
        elif idx == depth - 1:
            name = "proj_out"
        else:
            name = f"layers.{idx - 1}"
        return f"{prefix}.{name}.{rest}"
    for pattern, repl in _META_TO_HF:
        new, n = re.subn(pattern, repl, key)
        if n:
            return new
    return key


def _hf_to_meta_keys(keys: Sequence[str]) -> dict[str, str]:
    """Map every transformers key to our name (keys no rule knows are kept as they are)."""
    depth: dict[str, int] = {}
    for k in keys:
        m = _MLP_HF.match(k)
        if m and m.group(3) is not None:
            depth[m.group(1)] = max(depth.get(m.group(1), 2), int(m.group(3)) + 3)
    out: dict[str, str] = {}
    for k in keys:
        out[k] = _hf_to_meta_one(k, depth)
    return out


_HF_TO_META: list[tuple[str, str]] = [
    (r"^shared_image_embedding\.positional_embedding$",
     "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"),
    (r"^vision_encoder\.patch_embed\.projection\.", "image_encoder.patch_embed.proj."),
    (r"^vision_encoder\.layers\.(\d+)\.layer_norm(\d)\.", r"image_encoder.blocks.\1.norm\2."),
    (r"^vision_encoder\.layers\.", "image_encoder.blocks."),
    (r"^vision_encoder\.neck\.conv1\.", "image_encoder.neck.0."),
    (r"^vision_encoder\.neck\.layer_norm1\.", "image_encoder.neck.1."),
    (r"^vision_encoder\.neck\.conv2\.", "image_encoder.neck.2."),
    (r"^vision_encoder\.neck\.layer_norm2\.", "image_encoder.neck.3."),
    (r"^vision_encoder\.", "image_encoder."),
    (r"^prompt_encoder\.point_embed\.", "prompt_encoder.point_embeddings."),
    (r"^prompt_encoder\.mask_embed\.conv1\.", "prompt_encoder.mask_downscaling.0."),
    (r"^prompt_encoder\.mask_embed\.layer_norm1\.", "prompt_encoder.mask_downscaling.1."),
    (r"^prompt_encoder\.mask_embed\.conv2\.", "prompt_encoder.mask_downscaling.3."),
    (r"^prompt_encoder\.mask_embed\.layer_norm2\.", "prompt_encoder.mask_downscaling.4."),
    (r"^prompt_encoder\.mask_embed\.conv3\.", "prompt_encoder.mask_downscaling.6."),
    (r"^(mask_decoder\.transformer\.layers\.\d+)\.layer_norm(\d)\.", r"\1.norm\2."),
    (r"^mask_decoder\.transformer\.layer_norm_final_attn\.",
     "mask_decoder.transformer.norm_final_attn."),
    (r"^mask_decoder\.upscale_conv1\.", "mask_decoder.output_upscaling.0."),
    (r"^mask_decoder\.upscale_layer_norm\.", "mask_decoder.output_upscaling.1."),
    (r"^mask_decoder\.upscale_conv2\.", "mask_decoder.output_upscaling.3."),
]


def _hf_to_meta_one(key: str, depth: Mapping[str, int]) -> str:
    m = _MLP_HF.match(key)
    if m:
        prefix, which, idx, rest = m.groups()
        n = depth.get(prefix, 2)
        if which == "proj_in":
            i = 0
        elif which == "proj_out":
            i = n - 1
        else:
            i = int(idx) + 1
        return f"{prefix}.layers.{i}.{rest}"
    for pattern, repl in _HF_TO_META:
        new, c = re.subn(pattern, repl, key)
        if c:
            return new
    return key


def detect_sam_layout(state_dict: Mapping[str, Any]) -> Layout:
    """``"meta"`` (segment-anything names) or ``"hf"`` (transformers ``SamModel`` names)."""
    keys = list(state_dict)
    if any(k.startswith(("vision_encoder.", "shared_image_embedding.")) for k in keys):
        return "hf"
    if any(k.startswith("image_encoder.") for k in keys):
        return "meta"
    if any(k.startswith("prompt_encoder.") or k.startswith("mask_decoder.") for k in keys):
        if any(".point_embed." in k or ".mask_embed." in k or "upscale_conv" in k for k in keys):
            return "hf"
        return "meta"
    sample = ", ".join(sorted(keys)[:5]) or "(no keys)"
    raise CheckpointMismatchError(
        f"Not a SAM checkpoint: expected keys under image_encoder.* (segment-anything) or "
        f"vision_encoder.* (transformers SamModel); found {sample}...",
        hint="Pass a sam_vit_*.pth file from Meta or a facebook/sam-vit-* checkpoint.",
    )


def _require(sd: Mapping[str, Tensor], key: str, shown: str) -> Tensor:
    if key not in sd:
        raise CheckpointMismatchError(
            f"Cannot infer the SAM architecture: missing key {shown!r}.",
            hint="The file is truncated or not a SAM checkpoint; or pass config= explicitly.",
        )
    return sd[key]


def infer_sam_config(
    state_dict: Mapping[str, Tensor],
    layout: Layout | None = None,
    *,
    decoder_num_heads: int = 8,
    encoder_num_heads: int | None = None,
) -> SamConfig:
    """Read the architecture off a state dict's shapes (either layout).

    Attention head counts are not visible in shapes except through the encoder's relative
    position tables; the decoder's defaults to 8 (every published SAM).
    """
    layout = layout or detect_sam_layout(state_dict)
    if layout == "hf":
        names = _hf_to_meta_keys(list(state_dict))
        sd = {names[k]: v for k, v in state_dict.items()}
        shown = {v: k for k, v in names.items()}
    else:
        sd = dict(state_dict)
        shown = {}

    def get(key: str) -> Tensor:
        return _require(sd, key, shown.get(key, hf_key_for(key, SamConfig()) if layout == "hf" else key))

    patch_w = get("image_encoder.patch_embed.proj.weight")
    dim, in_chans, patch = patch_w.shape[0], patch_w.shape[1], patch_w.shape[2]
    depth = 1 + max(
        (int(m.group(1)) for k in sd if (m := re.match(r"image_encoder\.blocks\.(\d+)\.", k))),
        default=-1,
    )
    if depth == 0:
        get("image_encoder.blocks.0.norm1.weight")
    pos = sd.get("image_encoder.pos_embed")
    use_rel = "image_encoder.blocks.0.attn.rel_pos_h" in sd
    neck = get("image_encoder.neck.0.weight")
    prompt_dim = neck.shape[0]
    if pos is not None:
        grid = pos.shape[1]
    else:  # no absolute table: assume the global layers' tables give the grid, else 1024 px
        grid = 1024 // patch
        if use_rel:
            grid = max((sd[f"image_encoder.blocks.{i}.attn.rel_pos_h"].shape[0] + 1) // 2 for i in range(depth))
    lengths = []
    for i in range(depth):
        t = sd.get(f"image_encoder.blocks.{i}.attn.rel_pos_h")
        lengths.append(None if t is None else (t.shape[0] + 1) // 2)
    global_idx = tuple(i for i, n in enumerate(lengths) if n == grid)
    windows = {n for n in lengths if n is not None and n != grid}
    window = windows.pop() if len(windows) == 1 else (grid if not windows else 14)
    if use_rel:
        head_dim = sd["image_encoder.blocks.0.attn.rel_pos_h"].shape[1]
        enc_heads = encoder_num_heads or dim // head_dim
    else:
        enc_heads = encoder_num_heads or {768: 12, 1024: 16, 1280: 16}.get(dim, 8)
    mlp_hidden = get("image_encoder.blocks.0.mlp.lin1.weight").shape[0]
    qkv_bias = "image_encoder.blocks.0.attn.qkv.bias" in sd
    mask_in = get("prompt_encoder.mask_downscaling.3.weight").shape[0]
    dec_depth = 1 + max(
        (int(m.group(1)) for k in sd if (m := re.match(r"mask_decoder\.transformer\.layers\.(\d+)\.", k))),
        default=-1,
    )
    dec_mlp = get("mask_decoder.transformer.layers.0.mlp.lin1.weight").shape[0]
    inner = get("mask_decoder.transformer.layers.0.cross_attn_token_to_image.q_proj.weight").shape[0]
    n_tokens = get("mask_decoder.mask_tokens.weight").shape[0]
    iou_depth = 1 + max(
        (int(m.group(1)) for k in sd if (m := re.match(r"mask_decoder\.iou_prediction_head\.layers\.(\d+)\.", k))),
        default=0,
    )
    iou_hidden = get("mask_decoder.iou_prediction_head.layers.0.weight").shape[0]
    try:
        return SamConfig(
            image_size=grid * patch,
            patch_size=patch,
            in_chans=in_chans,
            encoder_embed_dim=dim,
            encoder_depth=depth,
            encoder_num_heads=enc_heads,
            encoder_global_attn_indexes=global_idx,
            window_size=window,
            mlp_ratio=mlp_hidden / dim,
            qkv_bias=qkv_bias,
            use_abs_pos=pos is not None,
            use_rel_pos=use_rel,
            prompt_embed_dim=prompt_dim,
            mask_in_chans=mask_in,
            decoder_depth=dec_depth,
            decoder_num_heads=decoder_num_heads,
            decoder_mlp_dim=dec_mlp,
            attention_downsample_rate=prompt_dim // inner,
            num_multimask_outputs=n_tokens - 1,
            iou_head_depth=iou_depth,
            iou_head_hidden_dim=iou_hidden,
            decoder_ln_eps=1e-6 if layout == "hf" else 1e-5,
        )
    except ValueError as exc:
        raise CheckpointMismatchError(f"Inconsistent SAM checkpoint shapes: {exc}") from exc


_READ_HINT = "Pass a sam_vit_*.pth file from Meta or a facebook/sam-vit-* checkpoint."


def read_sam_checkpoint(path: str | Path) -> tuple[dict[str, Tensor], dict[str, Any] | None]:
    """Read a SAM checkpoint safely: (state dict, transformers config dict or None).

    ``path`` is a ``.safetensors`` file, a ``.pth``/``.bin``/``.pt`` file (read with
    ``torch.load(weights_only=True)``), or a folder written by ``SamModel.save_pretrained``
    (``model.safetensors`` or ``pytorch_model.bin`` plus ``config.json``).
    """
    p = Path(path).expanduser()
    hf_config: dict[str, Any] | None = None
    if p.is_dir() and (p / "config.json").is_file():
        hf_config = json.loads((p / "config.json").read_text())
    file = resolve_file(p, "SAM checkpoint")
    obj = read_file(file, "SAM checkpoint")
    sd = unwrap(obj, f"SAM checkpoint {file}", wrappers=("state_dict", "model"))
    return sd, hf_config


def load_sam_state_dict(
    model: Sam, state_dict: Mapping[str, Tensor], layout: Layout | None = None
) -> Layout:
    """Load a Meta or transformers state dict into ``model``, strictly.

    Raises :class:`CheckpointMismatchError` naming every missing, unexpected or mis-shaped
    key (spelled as in the file's layout). Returns the layout it found.
    """
    layout = layout or detect_sam_layout(state_dict)
    cfg = model.config
    sd = dict(state_dict)
    if layout == "hf":
        tied = sd.pop(_HF_TIED, None)
        main = "shared_image_embedding.positional_embedding"
        if tied is not None:
            if main not in sd:
                sd[main] = tied
            elif tied.shape != sd[main].shape or not torch.equal(tied, sd[main]):
                raise CheckpointMismatchError(
                    f"{_HF_TIED} differs from {main}; in SamModel they are one tied tensor.",
                    hint="The checkpoint was edited or corrupted.",
                )
        names = _hf_to_meta_keys(list(sd))
    else:
        for k in _META_OPTIONAL:
            sd.pop(k, None)
        names = {k: k for k in sd}
    ours = {names[k]: v for k, v in sd.items()}
    file_name = {names[k]: k for k in sd}

    def shown(key: str) -> str:
        if key in file_name:
            return file_name[key]
        return hf_key_for(key, cfg) if layout == "hf" else key

    load_strict(
        model,
        ours,
        what=f"SAM checkpoint ({layout} layout) does not match the architecture "
        f"(embed {cfg.encoder_embed_dim}, depth {cfg.encoder_depth})",
        shown=shown,
        hint="Check that the file and the chosen model size (vit_b / vit_l / vit_h) agree.",
    )
    return layout
