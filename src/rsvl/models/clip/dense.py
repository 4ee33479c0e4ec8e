"""Dense (per-location) features of an open_clip image tower, for open-vocabulary segmentation.

The training-free OVSS recipe shared by FarSLIP/RS-OVSS and SegEarth-OV: ViT blocks
``0..L-2`` run normally, the last block is replaced by ``out_proj(A · v)`` on ``ln_1(x)`` with
``A = softmax(qqᵀs) + softmax(kkᵀs) + softmax(vvᵀs)`` (``attn="segearth"``), without residual
and MLP, then ``ln_post`` and ``proj``. :func:`last_block_attention` is that replaced block;
``rsvl train clip`` uses it for FarSLIP's patch-to-crop distillation. ModifiedResNet (RN50)
towers use MaskCLIP's value path through the attention pool.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from rsvl.models.clip.fast import in_projection

#: attention used in the last block by ``dense_features``
DenseAttention = Literal["segearth", "sclip", "clearclip", "maskclip", "vanilla"]
DENSE_ATTENTIONS: tuple[str, ...] = ("segearth", "sclip", "clearclip", "maskclip", "vanilla")


def last_block_attention(attn_mod: nn.Module, x: torch.Tensor, kind: str) -> torch.Tensor:
    """``out_proj(A · v)`` with training-free attention ``kind`` on batch-first ``x`` (B, L, C).

    ``kind``: ``"segearth"`` = qq+kk+vv, ``"sclip"`` = qq+kk, ``"clearclip"`` = qq,
    ``"maskclip"`` = identity (v itself), ``"vanilla"`` = qk.
    """
    b, n, c = x.shape
    heads = int(attn_mod.num_heads)
    hd = c // heads
    scale = hd**-0.5
    q, k, v = in_projection(attn_mod, x).chunk(3, dim=-1)
    q, k, v = (t.reshape(b, n, heads, hd).transpose(1, 2) for t in (q, k, v))

    def sm(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        return ((left @ right.transpose(-2, -1)) * scale).softmax(dim=-1)

    if kind == "segearth":
        out = (sm(q, q) + sm(k, k) + sm(v, v)) @ v
    elif kind == "sclip":
        out = (sm(q, q) + sm(k, k)) @ v
    elif kind == "clearclip":
        out = sm(q, q) @ v
    elif kind == "vanilla":
        out = sm(q, k) @ v
    elif kind == "maskclip":
        out = v
    else:
        raise ValueError(f"attn must be one of {DENSE_ATTENTIONS}, got {kind!r}")
    out = out.transpose(1, 2).reshape(b, n, c)
    return attn_mod.out_proj(out)


def resize_pos_embed(table: torch.Tensor, gh: int, gw: int, grid: tuple[int, int]) -> torch.Tensor:
    """Class row + spatial rows of a positional table, bicubically resized to (gh, gw) when
    the grid differs from the training ``grid``."""
    if (gh, gw) == tuple(grid):
        return table
    cls_row, spatial = table[:1], table[1:]
    dim = spatial.shape[-1]
    spatial = spatial.reshape(1, grid[0], grid[1], dim).permute(0, 3, 1, 2).float()
    spatial = F.interpolate(spatial, size=(gh, gw), mode="bicubic", align_corners=False)
    spatial = spatial.permute(0, 2, 3, 1).reshape(gh * gw, dim).to(table.dtype)
    return torch.cat([cls_row, spatial], dim=0)


def _batch_first(visual: Any) -> bool:
    return bool(getattr(visual.transformer, "batch_first", False))


def vit_trunk(visual: Any, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """Batch-first tokens (B, 1 + gh·gw, C) of an open_clip ViT after blocks ``0..L-2``, and
    the grid (gh, gw), for normalised ``x`` whose sides are multiples of the patch (the
    positional table is resized when the grid differs from the training grid)."""
    v = visual
    if getattr(v, "attn_pool", None) is not None or getattr(v, "final_ln_after_pool", False):
        raise NotImplementedError("dense features need a CLIP ViT with CLS pooling")
    x = v.conv1(x)
    gh, gw = x.shape[-2:]
    x = x.flatten(2).transpose(1, 2)
    cls = v.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)
    x = torch.cat([cls, x], dim=1)
    grid = tuple(getattr(v, "grid_size", (gh, gw)))
    x = x + resize_pos_embed(v.positional_embedding, gh, gw, grid).to(x.dtype)
    x = v.ln_pre(x)
    batch_first = _batch_first(v)
    if not batch_first:
        x = x.transpose(0, 1)
    for blk in v.transformer.resblocks[:-1]:
        x = blk(x)
    if not batch_first:
        x = x.transpose(0, 1)
    return x, (int(gh), int(gw))


def vit_global(visual: Any, h: torch.Tensor) -> torch.Tensor:
    """(B, D) global embedding from :func:`vit_trunk`'s tokens: the CLS of the unmodified
    last block, ``ln_post``, ``proj`` (what ``encode_image`` computes)."""
    v = visual
    last = v.transformer.resblocks[-1]
    g = last(h) if _batch_first(v) else last(h.transpose(0, 1)).transpose(0, 1)
    g = v.ln_post(g[:, 0])
    return g @ v.proj if v.proj is not None else g


def vit_dense_head(
    visual: Any, h: torch.Tensor, attn: str = "segearth", ignore_residual: bool = True
) -> torch.Tensor:
    """(B, 1 + gh·gw, D) from :func:`vit_trunk`'s tokens with the last block replaced by
    :func:`last_block_attention` (``ignore_residual=False`` keeps its residual and MLP),
    then ``ln_post`` and ``proj``."""
    v = visual
    last = v.transformer.resblocks[-1]
    y = last_block_attention(last.attn, last.ln_1(h), attn)
    if not ignore_residual:
        y = h + last.ls_1(y)
        y = y + last.ls_2(last.mlp(last.ln_2(y)))
    y = v.ln_post(y)
    return y @ v.proj if v.proj is not None else y


def vit_dense(
    visual: Any, x: torch.Tensor, attn: str = "segearth", ignore_residual: bool = True
) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
    """(CLS (B, D), patch tokens (B, gh·gw, D), (gh, gw)) of an open_clip ViT on normalised
    ``x``: :func:`vit_trunk` then :func:`vit_dense_head`."""
    h, grid = vit_trunk(visual, x)
    y = vit_dense_head(visual, h, attn, ignore_residual)
    return y[:, 0], y[:, 1:], grid


def resnet_dense(visual: Any, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
    """(CLS (B, D), location tokens (B, gh·gw, D), (gh, gw)) of an open_clip ModifiedResNet:
    the attention pool's own query for the CLS, MaskCLIP's value path per location."""
    r = visual
    feat = r.layer4(r.layer3(r.layer2(r.layer1(r.stem(x)))))
    gh, gw = feat.shape[-2:]
    ap = r.attnpool
    side = int(math.isqrt(ap.positional_embedding.shape[0] - 1))
    pos = resize_pos_embed(ap.positional_embedding, gh, gw, (side, side)).to(feat.dtype)
    t = feat.flatten(2).transpose(1, 2)  # (B, HW, C)
    t = torch.cat([t.mean(dim=1, keepdim=True), t], dim=1) + pos
    # CLS: the attention pool's own query (mean token), with the resized positional table
    seq = t.transpose(0, 1)  # (1 + HW, B, C)
    cls, _ = F.multi_head_attention_forward(
        query=seq[:1],
        key=seq,
        value=seq,
        embed_dim_to_check=seq.shape[-1],
        num_heads=ap.num_heads,
        q_proj_weight=ap.q_proj.weight,
        k_proj_weight=ap.k_proj.weight,
        v_proj_weight=ap.v_proj.weight,
        in_proj_weight=None,
        in_proj_bias=torch.cat([ap.q_proj.bias, ap.k_proj.bias, ap.v_proj.bias]),
        bias_k=None,
        bias_v=None,
        add_zero_attn=False,
        dropout_p=0.0,
        out_proj_weight=ap.c_proj.weight,
        out_proj_bias=ap.c_proj.bias,
        use_separate_proj_weight=True,
        training=False,
        need_weights=False,
    )
    # dense: MaskCLIP's value path, each location through v_proj and c_proj
    tokens = ap.c_proj(ap.v_proj(t[:, 1:]))
    return cls[0], tokens, (int(gh), int(gw))


__all__ = [
    "DENSE_ATTENTIONS",
    "DenseAttention",
    "last_block_attention",
    "resize_pos_embed",
    "resnet_dense",
    "vit_dense",
    "vit_dense_head",
    "vit_global",
    "vit_trunk",
]
