"""Segment Anything (SAM): one implementation for all of rsvl.

Our own ``nn.Module``s for SAM's ViT image encoder, prompt encoder and two-way mask decoder,
SAM's pre/post-processing (longest side to 1024, pixel mean/std, bottom-right padding, masks
back to the original size), a small predictor, and a loader for both published checkpoint
layouts:

* ``meta``: Meta's ``sam_vit_{b,l,h}_*.pth`` state dicts (segment-anything key names). rsvl's
  modules use these names, so such a file loads as it is.
* ``hf``: Hugging Face ``SamModel`` (``facebook/sam-vit-*``; transformers key names, the layout
  RSPrompter uses). Keys are translated one to one; nothing is dropped silently.

Loading is strict: any missing, unexpected or mis-shaped key raises
:class:`rsvl.errors.CheckpointMismatchError` naming the keys as they are spelled in the file.
Checkpoints are read with ``safetensors`` or ``torch.load(weights_only=True)`` only.

Nothing in ``rsvl`` imports this module at ``import rsvl`` time.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rsvl.errors import (
    BandSelectionError,
    CheckpointMismatchError,
    InputNotFoundError,
    PromptError,
    RsvlError,
    UnknownModelError,
)
from rsvl.models.cards import pick_card
from rsvl.models.sam.cards import CARDS, SAM_CARDS

__all__ = [
    "SAM_CARDS",
    "load_sam_model",
    "SAM_CONFIGS",
    "SAM_PIXEL_MEAN",
    "SAM_PIXEL_STD",
    "ImageEncoderViT",
    "MaskDecoder",
    "PromptEncoder",
    "ResizeLongestSide",
    "Sam",
    "SamConfig",
    "SamPredictor",
    "TwoWayTransformer",
    "build_sam",
    "detect_sam_layout",
    "hf_key_for",
    "infer_sam_config",
    "load_sam",
    "load_sam_state_dict",
    "read_sam_checkpoint",
    "sam_config_from_hf",
]

#: SAM's input normalisation (ImageNet mean/std on the 0-255 scale), RGB order.
SAM_PIXEL_MEAN: tuple[float, float, float] = (123.675, 116.28, 103.53)
SAM_PIXEL_STD: tuple[float, float, float] = (58.395, 57.12, 57.375)

Layout = Literal["meta", "hf"]


# --------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SamConfig:
    """Every size of a SAM model. The defaults are SAM ViT-B at 1024 px."""

    image_size: int = 1024
    patch_size: int = 16
    in_chans: int = 3
    encoder_embed_dim: int = 768
    encoder_depth: int = 12
    encoder_num_heads: int = 12
    encoder_global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11)
    window_size: int = 14
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    use_abs_pos: bool = True
    use_rel_pos: bool = True
    encoder_ln_eps: float = 1e-6
    #: channels of the image embedding, of every prompt token and of the decoder
    prompt_embed_dim: int = 256
    mask_in_chans: int = 16
    decoder_depth: int = 2
    decoder_num_heads: int = 8
    decoder_mlp_dim: int = 2048
    attention_downsample_rate: int = 2
    num_multimask_outputs: int = 3
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 256
    #: eps of the LayerNorms inside the two-way blocks: 1e-5 in segment-anything,
    #: 1e-6 in transformers' SamModel (the final-attention norm is 1e-5 in both)
    decoder_ln_eps: float = 1e-5

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "encoder_global_attn_indexes", tuple(self.encoder_global_attn_indexes)
        )
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}"
            )
        if self.encoder_embed_dim % self.encoder_num_heads:
            raise ValueError("encoder_num_heads must divide encoder_embed_dim")
        internal = self.prompt_embed_dim // self.attention_downsample_rate
        if self.prompt_embed_dim % self.decoder_num_heads or internal % self.decoder_num_heads:
            raise ValueError("decoder_num_heads must divide the decoder's attention widths")

    @property
    def embedding_size(self) -> int:
        """Side of the image-embedding grid (64 for 1024 px, patch 16)."""
        return self.image_size // self.patch_size

    @property
    def low_res_size(self) -> int:
        """Side of the decoder's low-resolution masks (4 x the embedding grid: 256)."""
        return 4 * self.embedding_size

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


SAM_CONFIGS: dict[str, SamConfig] = {
    "vit_b": SamConfig(
        encoder_embed_dim=768,
        encoder_depth=12,
        encoder_num_heads=12,
        encoder_global_attn_indexes=(2, 5, 8, 11),
    ),
    "vit_l": SamConfig(
        encoder_embed_dim=1024,
        encoder_depth=24,
        encoder_num_heads=16,
        encoder_global_attn_indexes=(5, 11, 17, 23),
    ),
    "vit_h": SamConfig(
        encoder_embed_dim=1280,
        encoder_depth=32,
        encoder_num_heads=16,
        encoder_global_attn_indexes=(7, 15, 23, 31),
    ),
}

_NAME_ALIASES = {"base": "vit_b", "large": "vit_l", "huge": "vit_h", "b": "vit_b", "l": "vit_l", "h": "vit_h"}


def _config_by_name(name: str) -> SamConfig:
    key = name.lower().replace("-", "_").removeprefix("sam_")
    key = _NAME_ALIASES.get(key.removeprefix("vit_"), key)
    if key not in SAM_CONFIGS:
        raise UnknownModelError(
            f"Unknown SAM architecture {name!r}.", hint=f"Use one of {sorted(SAM_CONFIGS)}."
        )
    return SAM_CONFIGS[key]


def sam_config_from_hf(config: Mapping[str, Any]) -> SamConfig:
    """Translate a transformers ``SamConfig`` (its ``to_dict()`` / ``config.json``)."""
    vis = dict(config.get("vision_config") or {})
    pe = dict(config.get("prompt_encoder_config") or {})
    md = dict(config.get("mask_decoder_config") or {})

    def side(v: Any, default: int) -> int:
        if v is None:
            return default
        return int(v[0] if isinstance(v, list | tuple) else v)

    hidden = int(vis.get("hidden_size", 768))
    return SamConfig(
        image_size=side(vis.get("image_size"), 1024),
        patch_size=side(vis.get("patch_size"), 16),
        in_chans=int(vis.get("num_channels", 3)),
        encoder_embed_dim=hidden,
        encoder_depth=int(vis.get("num_hidden_layers", 12)),
        encoder_num_heads=int(vis.get("num_attention_heads", 12)),
        encoder_global_attn_indexes=tuple(vis.get("global_attn_indexes", (2, 5, 8, 11))),
        window_size=int(vis.get("window_size", 14)),
        mlp_ratio=float(vis.get("mlp_dim") or hidden * float(vis.get("mlp_ratio", 4.0))) / hidden,
        qkv_bias=bool(vis.get("qkv_bias", True)),
        use_abs_pos=bool(vis.get("use_abs_pos", True)),
        use_rel_pos=bool(vis.get("use_rel_pos", True)),
        encoder_ln_eps=float(vis.get("layer_norm_eps", 1e-6)),
        prompt_embed_dim=int(pe.get("hidden_size", vis.get("output_channels", 256))),
        mask_in_chans=int(pe.get("mask_input_channels", 16)),
        decoder_depth=int(md.get("num_hidden_layers", 2)),
        decoder_num_heads=int(md.get("num_attention_heads", 8)),
        decoder_mlp_dim=int(md.get("mlp_dim", 2048)),
        attention_downsample_rate=int(md.get("attention_downsample_rate", 2)),
        num_multimask_outputs=int(md.get("num_multimask_outputs", 3)),
        iou_head_depth=int(md.get("iou_head_depth", 3)),
        iou_head_hidden_dim=int(md.get("iou_head_hidden_dim", 256)),
        decoder_ln_eps=float(md.get("layer_norm_eps", 1e-6)),
    )


# --------------------------------------------------------------------------------------
# shared blocks
# --------------------------------------------------------------------------------------


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of a (B, C, H, W) tensor."""

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        x = (x - mean) / torch.sqrt(var + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class MLPBlock(nn.Module):
    def __init__(self, dim: int, hidden: int, act: type[nn.Module]) -> None:
        super().__init__()
        self.lin1 = nn.Linear(dim, hidden)
        self.lin2 = nn.Linear(hidden, dim)
        self.act = act()

    def forward(self, x: Tensor) -> Tensor:
        return self.lin2(self.act(self.lin1(x)))


class MLP(nn.Module):
    """``num_layers`` linear layers with ReLU between them (hypernetworks, IoU head)."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int, num_layers: int) -> None:
        super().__init__()
        dims_in = [in_dim] + [hidden] * (num_layers - 1)
        dims_out = [hidden] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims_in, dims_out, strict=True))

    def forward(self, x: Tensor) -> Tensor:
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < last:
                x = F.relu(x)
        return x


# --------------------------------------------------------------------------------------
# image encoder
# --------------------------------------------------------------------------------------


def _rel_pos_table(q_size: int, k_size: int, table: Tensor) -> Tensor:
    """(q_size, k_size, head_dim) embeddings of the relative offsets between q and k."""
    length = 2 * max(q_size, k_size) - 1
    if table.shape[0] != length:  # a different input size than trained: resample linearly
        table = F.interpolate(table.T[None], size=length, mode="linear")[0].T
    q_ratio = max(k_size / q_size, 1.0)
    k_ratio = max(q_size / k_size, 1.0)
    q_idx = torch.arange(q_size, device=table.device)[:, None] * q_ratio
    k_idx = torch.arange(k_size, device=table.device)[None, :] * k_ratio
    offsets = q_idx - k_idx + (k_size - 1) * k_ratio
    return table[offsets.long()]


class EncoderAttention(nn.Module):
    """Multi-head self-attention on a (B, H, W, C) grid with decomposed relative positions."""

    def __init__(
        self, dim: int, num_heads: int, qkv_bias: bool, use_rel_pos: bool, grid: int
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = head_dim**-0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.use_rel_pos = use_rel_pos
        if use_rel_pos:
            self.rel_pos_h = nn.Parameter(torch.zeros(2 * grid - 1, head_dim))
            self.rel_pos_w = nn.Parameter(torch.zeros(2 * grid - 1, head_dim))

    def forward(self, x: Tensor) -> Tensor:
        b, h, w, c = x.shape
        n = h * w
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, N, hd)
        bias = None
        if self.use_rel_pos:
            rh = _rel_pos_table(h, h, self.rel_pos_h)  # (h, h, hd)
            rw = _rel_pos_table(w, w, self.rel_pos_w)  # (w, w, hd)
            grid_q = q.reshape(b, self.num_heads, h, w, -1)
            bias_h = torch.einsum("bnhwc,hkc->bnhwk", grid_q, rh)
            bias_w = torch.einsum("bnhwc,wkc->bnhwk", grid_q, rw)
            bias = (bias_h[..., :, None] + bias_w[..., None, :]).reshape(b, self.num_heads, n, n)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)
        out = out.transpose(1, 2).reshape(b, h, w, c)
        return self.proj(out)


def _to_windows(x: Tensor, size: int) -> tuple[Tensor, tuple[int, int]]:
    b, h, w, c = x.shape
    ph, pw = -h % size, -w % size
    if ph or pw:
        x = F.pad(x, (0, 0, 0, pw, 0, ph))
    hp, wp = h + ph, w + pw
    x = x.reshape(b, hp // size, size, wp // size, size, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, size, size, c), (hp, wp)


def _from_windows(win: Tensor, size: int, padded: tuple[int, int], hw: tuple[int, int]) -> Tensor:
    hp, wp = padded
    c = win.shape[-1]
    b = win.shape[0] // ((hp // size) * (wp // size))
    x = win.reshape(b, hp // size, wp // size, size, size, c).permute(0, 1, 3, 2, 4, 5)
    x = x.reshape(b, hp, wp, c)
    return x[:, : hw[0], : hw[1]]


class EncoderBlock(nn.Module):
    def __init__(self, cfg: SamConfig, window_size: int) -> None:
        super().__init__()
        dim = cfg.encoder_embed_dim
        self.window_size = window_size
        self.norm1 = nn.LayerNorm(dim, eps=cfg.encoder_ln_eps)
        self.attn = EncoderAttention(
            dim,
            cfg.encoder_num_heads,
            cfg.qkv_bias,
            cfg.use_rel_pos,
            window_size if window_size > 0 else cfg.embedding_size,
        )
        self.norm2 = nn.LayerNorm(dim, eps=cfg.encoder_ln_eps)
        self.mlp = MLPBlock(dim, int(dim * cfg.mlp_ratio), nn.GELU)

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x
        x = self.norm1(x)
        if self.window_size > 0:
            hw = (x.shape[1], x.shape[2])
            x, padded = _to_windows(x, self.window_size)
            x = _from_windows(self.attn(x), self.window_size, padded, hw)
        else:
            x = self.attn(x)
        x = shortcut + x
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, patch: int, in_chans: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch, stride=patch)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).permute(0, 2, 3, 1)  # (B, H, W, C)


class ImageEncoderViT(nn.Module):
    """SAM's ViT: windowed attention with a few global layers, then a 2-conv neck."""

    def __init__(self, cfg: SamConfig) -> None:
        super().__init__()
        self.img_size = cfg.image_size
        dim = cfg.encoder_embed_dim
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.in_chans, dim)
        self.pos_embed: nn.Parameter | None = None
        if cfg.use_abs_pos:
            g = cfg.embedding_size
            self.pos_embed = nn.Parameter(torch.zeros(1, g, g, dim))
        self.blocks = nn.ModuleList(
            EncoderBlock(cfg, 0 if i in cfg.encoder_global_attn_indexes else cfg.window_size)
            for i in range(cfg.encoder_depth)
        )
        out = cfg.prompt_embed_dim
        self.neck = nn.Sequential(
            nn.Conv2d(dim, out, kernel_size=1, bias=False),
            LayerNorm2d(out),
            nn.Conv2d(out, out, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(out),
        )

    def forward(
        self, x: Tensor, return_hidden_states: bool = False
    ) -> Tensor | tuple[Tensor, list[Tensor]]:
        """(B, 3, S, S) normalised pixels -> (B, prompt_dim, S/16, S/16).

        With ``return_hidden_states`` also returns the channels-last (B, h, w, C) tokens after
        the position embedding and after every block (depth + 1 tensors), as transformers'
        ``SamVisionEncoder(output_hidden_states=True)`` does (RSPrompter's aggregator uses them).
        """
        x = self.patch_embed(x)
        if self.pos_embed is not None:
            pos = self.pos_embed
            if pos.shape[1:3] != x.shape[1:3]:  # other input size: resample the table
                pos = F.interpolate(
                    pos.permute(0, 3, 1, 2), size=x.shape[1:3], mode="bicubic", align_corners=False
                ).permute(0, 2, 3, 1)
            x = x + pos
        hidden = [x]
        for blk in self.blocks:
            x = blk(x)
            if return_hidden_states:
                hidden.append(x)
        out = self.neck(x.permute(0, 3, 1, 2))
        return (out, hidden) if return_hidden_states else out


# --------------------------------------------------------------------------------------
# prompt encoder
# --------------------------------------------------------------------------------------


class PositionEmbeddingRandom(nn.Module):
    """Random-Fourier position encoding: [sin, cos](2 pi (2c - 1) G), G ~ N(0, 1) (2, C/2)."""

    def __init__(self, num_pos_feats: int) -> None:
        super().__init__()
        self.register_buffer("positional_encoding_gaussian_matrix", torch.randn(2, num_pos_feats))

    def encode(self, coords: Tensor) -> Tensor:
        """Coordinates in [0, 1]^2, shape (..., 2) -> (..., C)."""
        g: Tensor = self.positional_encoding_gaussian_matrix
        proj = 2 * math.pi * ((2 * coords.to(g.dtype) - 1) @ g)
        return torch.cat([proj.sin(), proj.cos()], dim=-1)

    def dense(self, h: int, w: int) -> Tensor:
        """(C, h, w) encoding of the centres of an h x w grid."""
        g: Tensor = self.positional_encoding_gaussian_matrix
        ys = (torch.arange(h, device=g.device, dtype=g.dtype) + 0.5) / h
        xs = (torch.arange(w, device=g.device, dtype=g.dtype) + 0.5) / w
        grid = torch.stack(
            [xs[None, :].expand(h, w), ys[:, None].expand(h, w)], dim=-1
        )  # (h, w, 2) as (x, y)
        return self.encode(grid).permute(2, 0, 1)

    def encode_pixels(self, coords: Tensor, image_size: tuple[int, int]) -> Tensor:
        """Pixel coordinates (x, y) in the padded input frame -> (..., C)."""
        scale = torch.tensor(
            [1.0 / image_size[1], 1.0 / image_size[0]], device=coords.device, dtype=torch.float32
        )
        return self.encode(coords.float() * scale)


class PromptEncoder(nn.Module):
    """Points, boxes and dense mask prompts -> sparse tokens and a dense embedding."""

    def __init__(self, cfg: SamConfig) -> None:
        super().__init__()
        dim = cfg.prompt_embed_dim
        self.embed_dim = dim
        self.input_image_size = (cfg.image_size, cfg.image_size)
        self.image_embedding_size = (cfg.embedding_size, cfg.embedding_size)
        self.pe_layer = PositionEmbeddingRandom(dim // 2)
        # 0: negative point, 1: positive point, 2: box top-left, 3: box bottom-right
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, dim) for _ in range(4))
        self.not_a_point_embed = nn.Embedding(1, dim)
        self.mask_input_size = (4 * cfg.embedding_size, 4 * cfg.embedding_size)
        c = cfg.mask_in_chans
        self.mask_downscaling = nn.Sequential(
            nn.Conv2d(1, c // 4, kernel_size=2, stride=2),
            LayerNorm2d(c // 4),
            nn.GELU(),
            nn.Conv2d(c // 4, c, kernel_size=2, stride=2),
            LayerNorm2d(c),
            nn.GELU(),
            nn.Conv2d(c, dim, kernel_size=1),
        )
        self.no_mask_embed = nn.Embedding(1, dim)

    def get_dense_pe(self) -> Tensor:
        """(1, C, h, w) positional encoding of the image-embedding grid."""
        return self.pe_layer.dense(*self.image_embedding_size)[None]

    def embed_points(self, points: Tensor, labels: Tensor, pad: bool) -> Tensor:
        """(B, N, 2) pixel coords, (B, N) labels in {1, 0, -1 (not a point), -10 (padding)}."""
        points = points.float() + 0.5  # centre of the pixel
        if pad:
            points = torch.cat([points, points.new_zeros(points.shape[0], 1, 2)], dim=1)
            labels = torch.cat([labels, labels.new_full((labels.shape[0], 1), -1)], dim=1)
        emb = self.pe_layer.encode_pixels(points, self.input_image_size)
        lab = labels[..., None]
        emb = torch.where(lab == -1, self.not_a_point_embed.weight, emb)
        emb = torch.where(lab == -10, torch.zeros_like(emb), emb)
        emb = emb + (lab == 0) * self.point_embeddings[0].weight
        emb = emb + (lab == 1) * self.point_embeddings[1].weight
        return emb

    def embed_boxes(self, boxes: Tensor) -> Tensor:
        """(B, 4) xyxy pixel boxes -> (B, 2, C) corner tokens."""
        corners = boxes.float().reshape(-1, 2, 2) + 0.5
        emb = self.pe_layer.encode_pixels(corners, self.input_image_size)
        return torch.stack(
            [emb[:, 0] + self.point_embeddings[2].weight[0], emb[:, 1] + self.point_embeddings[3].weight[0]],
            dim=1,
        )

    def embed_masks(self, masks: Tensor) -> Tensor:
        """(B, 1, 4h, 4w) low-res mask logits -> (B, C, h, w)."""
        return self.mask_downscaling(masks)

    def forward(
        self,
        points: tuple[Tensor, Tensor] | None = None,
        boxes: Tensor | None = None,
        masks: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Returns sparse (B, T, C) and dense (B, C, h, w) embeddings."""
        if points is not None:
            bs = points[0].shape[0]
        elif boxes is not None:
            bs = boxes.shape[0]
        elif masks is not None:
            bs = masks.shape[0]
        else:
            bs = 1
        w = self.no_mask_embed.weight
        sparse = torch.empty((bs, 0, self.embed_dim), device=w.device, dtype=w.dtype)
        if points is not None:
            sparse = torch.cat([sparse, self.embed_points(*points, pad=boxes is None)], dim=1)
        if boxes is not None:
            sparse = torch.cat([sparse, self.embed_boxes(boxes)], dim=1)
        if masks is not None:
            dense = self.embed_masks(masks)
        else:
            dense = w.reshape(1, -1, 1, 1).expand(bs, -1, *self.image_embedding_size)
        return sparse, dense


# --------------------------------------------------------------------------------------
# mask decoder
# --------------------------------------------------------------------------------------


class DecoderAttention(nn.Module):
    """Attention whose q/k/v are projected to ``dim // downsample`` channels."""

    def __init__(self, dim: int, num_heads: int, downsample: int = 1) -> None:
        super().__init__()
        self.num_heads = num_heads
        inner = dim // downsample
        self.q_proj = nn.Linear(dim, inner)
        self.k_proj = nn.Linear(dim, inner)
        self.v_proj = nn.Linear(dim, inner)
        self.out_proj = nn.Linear(inner, dim)

    def _heads(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        return x.reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        q = self._heads(self.q_proj(q))
        k = self._heads(self.k_proj(k))
        v = self._heads(self.v_proj(v))
        out = F.scaled_dot_product_attention(q, k, v)
        b, _, n, _ = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, n, -1))


class TwoWayBlock(nn.Module):
    def __init__(self, cfg: SamConfig, skip_first_layer_pe: bool) -> None:
        super().__init__()
        dim, heads, eps = cfg.prompt_embed_dim, cfg.decoder_num_heads, cfg.decoder_ln_eps
        rate = cfg.attention_downsample_rate
        self.self_attn = DecoderAttention(dim, heads)
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.cross_attn_token_to_image = DecoderAttention(dim, heads, rate)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = MLPBlock(dim, cfg.decoder_mlp_dim, nn.ReLU)
        self.norm3 = nn.LayerNorm(dim, eps=eps)
        self.norm4 = nn.LayerNorm(dim, eps=eps)
        self.cross_attn_image_to_token = DecoderAttention(dim, heads, rate)
        self.skip_first_layer_pe = skip_first_layer_pe

    def forward(
        self, queries: Tensor, keys: Tensor, query_pe: Tensor, key_pe: Tensor
    ) -> tuple[Tensor, Tensor]:
        if self.skip_first_layer_pe:
            queries = self.self_attn(queries, queries, queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q, q, queries)
        queries = self.norm1(queries)
        q, k = queries + query_pe, keys + key_pe
        queries = self.norm2(queries + self.cross_attn_token_to_image(q, k, keys))
        queries = self.norm3(queries + self.mlp(queries))
        q, k = queries + query_pe, keys + key_pe
        keys = self.norm4(keys + self.cross_attn_image_to_token(k, q, queries))
        return queries, keys


class TwoWayTransformer(nn.Module):
    def __init__(self, cfg: SamConfig) -> None:
        super().__init__()
        dim = cfg.prompt_embed_dim
        self.layers = nn.ModuleList(TwoWayBlock(cfg, i == 0) for i in range(cfg.decoder_depth))
        self.final_attn_token_to_image = DecoderAttention(
            dim, cfg.decoder_num_heads, cfg.attention_downsample_rate
        )
        self.norm_final_attn = nn.LayerNorm(dim)

    def forward(self, image: Tensor, image_pe: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """image, image_pe (B, C, h, w); tokens (B, T, C) -> tokens, image tokens (B, hw, C)."""
        keys = image.flatten(2).transpose(1, 2)
        key_pe = image_pe.flatten(2).transpose(1, 2)
        queries = tokens
        for layer in self.layers:
            queries, keys = layer(queries, keys, tokens, key_pe)
        attn = self.final_attn_token_to_image(queries + tokens, keys + key_pe, keys)
        return self.norm_final_attn(queries + attn), keys


class MaskDecoder(nn.Module):
    """Two-way transformer + upscaling + hypernetwork MLPs + IoU head."""

    def __init__(self, cfg: SamConfig) -> None:
        super().__init__()
        dim = cfg.prompt_embed_dim
        self.num_multimask_outputs = cfg.num_multimask_outputs
        self.num_mask_tokens = cfg.num_multimask_outputs + 1
        self.transformer = TwoWayTransformer(cfg)
        self.iou_token = nn.Embedding(1, dim)
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, dim)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(dim, dim // 4, kernel_size=2, stride=2),
            LayerNorm2d(dim // 4),
            nn.GELU(),
            nn.ConvTranspose2d(dim // 4, dim // 8, kernel_size=2, stride=2),
            nn.GELU(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList(
            MLP(dim, dim, dim // 8, 3) for _ in range(self.num_mask_tokens)
        )
        self.iou_prediction_head = MLP(
            dim, cfg.iou_head_hidden_dim, self.num_mask_tokens, cfg.iou_head_depth
        )

    def forward(
        self,
        image_embeddings: Tensor,
        image_pe: Tensor,
        sparse_prompt_embeddings: Tensor,
        dense_prompt_embeddings: Tensor,
        multimask_output: bool,
    ) -> tuple[Tensor, Tensor]:
        """Predict masks for B prompt sets.

        image_embeddings: (1, C, h, w) shared by every prompt set, or (B, C, h, w) one per set;
        image_pe: (1, C, h, w); sparse (B, T, C); dense (B, C, h, w).
        Returns low-res mask logits (B, M, 4h, 4w) and IoU predictions (B, M), with M = 3
        (multimask) or 1.
        """
        nb = sparse_prompt_embeddings.shape[0]
        out_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        tokens = torch.cat(
            [out_tokens[None].expand(nb, -1, -1), sparse_prompt_embeddings.to(out_tokens.dtype)],
            dim=1,
        )
        src = image_embeddings
        if src.shape[0] != nb:
            if src.shape[0] != 1:
                raise ValueError(
                    f"{src.shape[0]} image embeddings for {nb} prompt sets: give one, or one per set"
                )
            src = src.expand(nb, -1, -1, -1)
        src = src + dense_prompt_embeddings
        pos = image_pe.expand(nb, -1, -1, -1)
        b, c, h, w = src.shape
        hs, img = self.transformer(src, pos, tokens)
        iou_out = hs[:, 0]
        mask_out = hs[:, 1 : 1 + self.num_mask_tokens]
        up = self.output_upscaling(img.transpose(1, 2).reshape(b, c, h, w))
        hyper = torch.stack(
            [mlp(mask_out[:, i]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], dim=1
        )
        bu, cu, hu, wu = up.shape
        masks = (hyper @ up.reshape(bu, cu, hu * wu)).reshape(bu, -1, hu, wu)
        iou = self.iou_prediction_head(iou_out)
        sl = slice(1, None) if multimask_output else slice(0, 1)
        return masks[:, sl], iou[:, sl]


# --------------------------------------------------------------------------------------
# the model and its pre/post-processing
# --------------------------------------------------------------------------------------


class ResizeLongestSide:
    """Resize so that the longest side is ``target_length`` (SAM's input transform).

    Images are resized with PIL's bilinear filter, as segment-anything does; coordinates and
    boxes are scaled per axis by the same factors.
    """

    def __init__(self, target_length: int = 1024) -> None:
        self.target_length = target_length

    @staticmethod
    def get_preprocess_shape(old_h: int, old_w: int, long_side: int) -> tuple[int, int]:
        scale = long_side / max(old_h, old_w)
        # as segment-anything, but never 0 (it fails on a 1 x 300 sliver; we give 1 x 1024)
        return max(1, int(old_h * scale + 0.5)), max(1, int(old_w * scale + 0.5))

    def target_shape(self, original_size: tuple[int, int]) -> tuple[int, int]:
        return self.get_preprocess_shape(original_size[0], original_size[1], self.target_length)

    def apply_image(self, image: np.ndarray) -> np.ndarray:
        """uint8 (H, W, 3) -> uint8 (h, w, 3) with max(h, w) == target_length."""
        from PIL import Image

        h, w = self.target_shape((image.shape[0], image.shape[1]))
        return np.array(Image.fromarray(image).resize((w, h), Image.Resampling.BILINEAR))

    def apply_coords(
        self, coords: np.ndarray | Tensor, original_size: tuple[int, int]
    ) -> np.ndarray | Tensor:
        """(..., 2) x/y pixel coordinates in the original image -> resized frame (float)."""
        old_h, old_w = original_size
        new_h, new_w = self.target_shape(original_size)
        if isinstance(coords, Tensor):
            out_t = coords.clone().float()
            out_t[..., 0] = out_t[..., 0] * (new_w / old_w)
            out_t[..., 1] = out_t[..., 1] * (new_h / old_h)
            return out_t
        out = np.array(coords, dtype=np.float64, copy=True)
        out[..., 0] = out[..., 0] * (new_w / old_w)
        out[..., 1] = out[..., 1] * (new_h / old_h)
        return out

    def apply_boxes(
        self, boxes: np.ndarray | Tensor, original_size: tuple[int, int]
    ) -> np.ndarray | Tensor:
        """(B, 4) xyxy boxes in the original image -> resized frame."""
        return self.apply_coords(boxes.reshape(-1, 2, 2), original_size).reshape(-1, 4)


class Sam(nn.Module):
    """SAM: image encoder + prompt encoder + mask decoder (segment-anything attribute names)."""

    mask_threshold: float = 0.0

    def __init__(self, cfg: SamConfig) -> None:
        super().__init__()
        self.config = cfg
        self.image_encoder = ImageEncoderViT(cfg)
        self.prompt_encoder = PromptEncoder(cfg)
        self.mask_decoder = MaskDecoder(cfg)
        self.register_buffer("pixel_mean", torch.tensor(SAM_PIXEL_MEAN).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(SAM_PIXEL_STD).view(-1, 1, 1), False)

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    @property
    def img_size(self) -> int:
        return self.config.image_size

    def preprocess(self, x: Tensor) -> Tensor:
        """(B, 3, h, w) 0-255 RGB, already resized (longest side = image_size) -> normalised
        and zero-padded at the bottom/right to (B, 3, image_size, image_size)."""
        x = (x.to(self.pixel_mean.dtype) - self.pixel_mean) / self.pixel_std
        h, w = x.shape[-2:]
        return F.pad(x, (0, self.img_size - w, 0, self.img_size - h))

    def encode_image(self, pixel_values: Tensor) -> Tensor:
        """Normalised padded (B, 3, S, S) -> image embeddings (B, C, S/16, S/16)."""
        out = self.image_encoder(pixel_values)
        assert isinstance(out, Tensor)
        return out

    def forward(self, pixel_values: Tensor) -> Tensor:
        return self.encode_image(pixel_values)

    def decode(
        self,
        image_embeddings: Tensor,
        point_coords: Tensor | None = None,
        point_labels: Tensor | None = None,
        boxes: Tensor | None = None,
        mask_input: Tensor | None = None,
        multimask_output: bool = True,
    ) -> tuple[Tensor, Tensor]:
        """Prompts in the padded input frame (pixels of the resized image) -> low-res logits
        (B, M, 4h, 4w) and IoU predictions (B, M). Shapes: points (B, N, 2), labels (B, N),
        boxes (B, 4), mask_input (B, 1, 4h, 4w); image_embeddings (1 or B, C, h, w)."""
        points = None
        if point_coords is not None:
            if point_labels is None:
                raise PromptError("Point prompts need labels (1 foreground, 0 background).")
            points = (point_coords, point_labels)
        sparse, dense = self.prompt_encoder(points=points, boxes=boxes, masks=mask_input)
        if sparse.shape[0] == 1 and image_embeddings.shape[0] > 1:
            sparse = sparse.expand(image_embeddings.shape[0], -1, -1)
            dense = dense.expand(image_embeddings.shape[0], -1, -1, -1)
        return self.mask_decoder(
            image_embeddings,
            self.prompt_encoder.get_dense_pe(),
            sparse,
            dense,
            multimask_output,
        )

    def postprocess_masks(
        self, masks: Tensor, input_size: tuple[int, int], original_size: tuple[int, int]
    ) -> Tensor:
        """Low-res logits (B, M, 4h, 4w) -> logits at the original (H, W): upscale to the padded
        input, crop the padding (``input_size`` = resized image size), resize to the original."""
        s = self.img_size
        masks = F.interpolate(masks.float(), (s, s), mode="bilinear", align_corners=False)
        masks = masks[..., : input_size[0], : input_size[1]]
        return F.interpolate(masks, tuple(original_size), mode="bilinear", align_corners=False)


def build_sam(config: SamConfig | str = "vit_b") -> Sam:
    """A randomly initialised SAM of the given architecture (name or :class:`SamConfig`)."""
    cfg = _config_by_name(config) if isinstance(config, str) else config
    return Sam(cfg).eval()


# --------------------------------------------------------------------------------------
# predictor
# --------------------------------------------------------------------------------------


class SamPredictor:
    """Embed an image once, then predict masks for any number of prompts.

    >>> predictor = SamPredictor(load_sam("sam_vit_b_01ec64.pth"))
    >>> predictor.set_image(rgb)                      # uint8 (H, W, 3)
    >>> masks, iou, low_res = predictor.predict(points=[[500, 375]], point_labels=[1])

    Coordinates are (x, y) pixels of the original image. One prompt set gives masks
    (M, H, W) bool, iou (M,), low_res (M, 256, 256) logits; batched boxes (N, 4) (optionally
    with points (N, K, 2)) give (N, M, H, W), (N, M), (N, M, 256, 256). M = 3 with
    ``multimask`` else 1.
    """

    def __init__(self, model: Sam) -> None:
        self.model = model.eval()
        self.transform = ResizeLongestSide(model.img_size)
        self.reset_image()

    def reset_image(self) -> None:
        self.features: Tensor | None = None
        self.original_size: tuple[int, int] | None = None
        self.input_size: tuple[int, int] | None = None

    @property
    def device(self) -> torch.device:
        return self.model.device

    @torch.inference_mode()
    def set_image(self, image: np.ndarray) -> None:
        """Compute the embedding of a uint8 RGB (H, W, 3) image."""
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] != 3:
            raise BandSelectionError(
                f"SAM expects an RGB image shaped (H, W, 3); got {image.shape}.",
                hint="Select three bands (e.g. --bands 3,2,1) before segmenting.",
            )
        if image.dtype != np.uint8:
            raise RsvlError(
                f"SAM expects uint8 pixels; got {image.dtype}.",
                hint="Scale the image to 0-255 (e.g. with a percentile stretch) first.",
            )
        if min(image.shape[:2]) < 1:
            raise RsvlError(f"The image is empty: shape {image.shape}.")
        resized = self.transform.apply_image(np.ascontiguousarray(image))
        x = torch.as_tensor(resized, device=self.device).permute(2, 0, 1)[None]
        x = self.model.preprocess(x)
        self.features = self.model.encode_image(x)
        self.original_size = (int(image.shape[0]), int(image.shape[1]))
        self.input_size = (int(resized.shape[0]), int(resized.shape[1]))

    @torch.inference_mode()
    def predict(
        self,
        points: np.ndarray | Sequence[Any] | None = None,
        point_labels: np.ndarray | Sequence[Any] | None = None,
        box: np.ndarray | Sequence[Any] | None = None,
        mask_input: np.ndarray | Tensor | None = None,
        multimask: bool = True,
        return_logits: bool = False,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Masks, IoU predictions and low-res logits for one prompt set or a batch of boxes.

        points (K, 2) or (N, K, 2) x/y; point_labels (K,) or (N, K) with 1 = foreground,
        0 = background; box (4,) or (N, 4) xyxy; mask_input (1, 256, 256) or (N, 1, 256, 256)
        low-res logits from an earlier call. ``return_logits`` gives float logits instead of
        boolean masks.
        """
        if self.features is None or self.original_size is None or self.input_size is None:
            raise RsvlError("No image set.", hint="Call set_image(image) before predict().")
        if (points is None) != (point_labels is None):
            raise PromptError("Give point_labels with points (1 foreground, 0 background).")
        dev = self.device
        batched = False
        pts_t = lab_t = box_t = mask_t = None
        if points is not None:
            pts = np.asarray(points, dtype=np.float64)
            lab = np.asarray(point_labels)
            if pts.shape[-1] != 2 or pts.ndim not in (2, 3) or lab.shape != pts.shape[:-1]:
                raise PromptError(
                    f"points must be (K, 2) or (N, K, 2) with labels (K,) or (N, K); "
                    f"got {pts.shape} and {lab.shape}."
                )
            batched = batched or pts.ndim == 3
            pts = pts[None] if pts.ndim == 2 else pts
            lab = lab[None] if lab.ndim == 1 else lab
            pts = self.transform.apply_coords(pts, self.original_size)
            pts_t = torch.as_tensor(pts, dtype=torch.float32, device=dev)
            lab_t = torch.as_tensor(lab, dtype=torch.int64, device=dev)
        if box is not None:
            b = np.asarray(box, dtype=np.float64)
            if b.shape[-1] != 4 or b.ndim not in (1, 2):
                raise PromptError(f"box must be (4,) or (N, 4) xyxy; got {b.shape}.")
            batched = batched or b.ndim == 2
            b = self.transform.apply_boxes(b.reshape(-1, 4), self.original_size)
            box_t = torch.as_tensor(b, dtype=torch.float32, device=dev)
        if mask_input is not None:
            m = torch.as_tensor(np.asarray(mask_input), dtype=torch.float32, device=dev)
            batched = batched or m.ndim == 4
            mask_t = m[None] if m.ndim == 3 else m
        sizes = {t.shape[0] for t in (pts_t, box_t, mask_t) if t is not None}
        n = max(sizes) if sizes else 1
        if sizes - {1, n}:
            raise PromptError(f"Batched prompts disagree on the batch size: {sorted(sizes)}.")
        if pts_t is not None and lab_t is not None and pts_t.shape[0] != n:
            pts_t, lab_t = pts_t.expand(n, -1, -1), lab_t.expand(n, -1)
        if box_t is not None and box_t.shape[0] != n:
            box_t = box_t.expand(n, -1)
        if mask_t is not None and mask_t.shape[0] != n:
            mask_t = mask_t.expand(n, -1, -1, -1)

        low_res, iou = self.model.decode(
            self.features, pts_t, lab_t, box_t, mask_t, multimask_output=multimask
        )
        full = self.model.postprocess_masks(low_res, self.input_size, self.original_size)
        masks = full if return_logits else full > self.model.mask_threshold
        out = (masks.cpu().numpy(), iou.float().cpu().numpy(), low_res.float().cpu().numpy())
        if not batched:
            out = (out[0][0], out[1][0], out[2][0])
        return out


# --------------------------------------------------------------------------------------
# checkpoints: reading, layout detection, key translation, config inference
# --------------------------------------------------------------------------------------

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


def _unwrap(obj: Any, source: str) -> dict[str, Tensor]:
    """Accept a bare state dict or one wrapped under 'state_dict' / 'model'."""
    if isinstance(obj, Mapping):
        for wrapper in ("state_dict", "model"):
            inner = obj.get(wrapper)
            if isinstance(inner, Mapping) and inner and all(
                isinstance(v, Tensor) for v in inner.values()
            ):
                obj = inner
                break
        tensors = {str(k): v for k, v in obj.items() if isinstance(v, Tensor)}
        if tensors:
            return tensors
    raise CheckpointMismatchError(
        f"{source} holds no tensors: it is not a SAM state dict.",
        hint="Pass a sam_vit_*.pth file from Meta or a facebook/sam-vit-* checkpoint.",
    )


def read_sam_checkpoint(path: str | Path) -> tuple[dict[str, Tensor], dict[str, Any] | None]:
    """Read a SAM checkpoint safely: (state dict, transformers config dict or None).

    ``path`` is a ``.safetensors`` file, a ``.pth``/``.bin``/``.pt`` file (read with
    ``torch.load(weights_only=True)``), or a folder written by ``SamModel.save_pretrained``
    (``model.safetensors`` or ``pytorch_model.bin`` plus ``config.json``).
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise InputNotFoundError(
            f"SAM checkpoint not found: {p}",
            hint="Download sam_vit_b_01ec64.pth (or a facebook/sam-vit-* snapshot) and give its path.",
        )
    hf_config: dict[str, Any] | None = None
    if p.is_dir():
        cfg_file = p / "config.json"
        if cfg_file.is_file():
            hf_config = json.loads(cfg_file.read_text())
        for name in ("model.safetensors", "pytorch_model.bin"):
            if (p / name).is_file():
                p = p / name
                break
        else:
            raise InputNotFoundError(
                f"{p} has no model.safetensors or pytorch_model.bin.",
                hint="Point at the checkpoint file itself, or at a SamModel.save_pretrained folder.",
            )
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            sd = load_file(str(p), device="cpu")
        except Exception as exc:  # corrupt header, truncated file
            raise CheckpointMismatchError(f"Cannot read {p} as safetensors: {exc}") from exc
        return _unwrap(sd, str(p)), hf_config
    try:
        obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointMismatchError(
            f"Cannot read {p} with torch.load(weights_only=True): {exc}",
            hint="rsvl loads plain tensor state dicts only (no pickled code).",
        ) from exc
    return _unwrap(obj, str(p)), hf_config


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


def _list(names: Sequence[str], limit: int = 12) -> str:
    names = sorted(names)
    more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


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

    def shown(ours: str) -> str:
        return hf_key_for(ours, cfg) if layout == "hf" else ours

    ours = {names[k]: v for k, v in sd.items()}
    file_name = {names[k]: k for k in sd}
    expected = model.state_dict()
    missing = [shown(k) for k in expected if k not in ours]
    unexpected = [file_name[k] for k in ours if k not in expected]
    bad_shape = [
        f"{file_name[k]} {tuple(ours[k].shape)} (model {tuple(v.shape)})"
        for k, v in expected.items()
        if k in ours and ours[k].shape != v.shape
    ]
    if missing or unexpected or bad_shape:
        parts = []
        if missing:
            parts.append(f"missing keys: {_list(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_list(unexpected)}")
        if bad_shape:
            parts.append(f"shape mismatches: {_list(bad_shape)}")
        raise CheckpointMismatchError(
            f"SAM checkpoint ({layout} layout) does not match the architecture "
            f"(embed {cfg.encoder_embed_dim}, depth {cfg.encoder_depth}): " + "; ".join(parts) + ".",
            hint="Check that the file and the chosen model size (vit_b / vit_l / vit_h) agree.",
        )
    converted = {k: v.to(expected[k].dtype) for k, v in ours.items()}
    model.load_state_dict(converted, strict=True)
    return layout


def load_sam(
    source: str | Path | Mapping[str, Tensor],
    config: SamConfig | str | None = None,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> Sam:
    """Build a SAM and load a checkpoint in either published layout.

    ``source`` is a path (see :func:`read_sam_checkpoint`) or an in-memory state dict.
    ``config`` is a :class:`SamConfig`, a name (``vit_b``/``vit_l``/``vit_h``), or None to take
    it from a transformers ``config.json`` next to the weights, else from the tensor shapes.
    """
    hf_config = None
    if isinstance(source, Mapping):
        sd = _unwrap(source, "the state dict")
    else:
        sd, hf_config = read_sam_checkpoint(source)
    layout = detect_sam_layout(sd)
    if isinstance(config, str):
        cfg = _config_by_name(config)
        if layout == "hf":
            cfg = replace(cfg, decoder_ln_eps=1e-6)
    elif config is not None:
        cfg = config
    elif hf_config is not None:
        cfg = sam_config_from_hf(hf_config)
    else:
        cfg = infer_sam_config(sd, layout)
    model = Sam(cfg)
    load_sam_state_dict(model, sd, layout)
    model = model.to(device=device)
    if dtype is not None:
        model = model.to(dtype=dtype)
    return model.eval()


def load_sam_model(
    name_or_card: Any,
    weights: str | Path | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> Sam:
    """Load a registered SAM card (``sam-vit-b``, ``sam-vit-base-hf`` ...) ready for use.

    ``weights`` is the user's local file (else rsvl's cache / a download, see
    :func:`rsvl.models.weights.resolve_weights`).
    """
    from rsvl.models.weights import resolve_weights

    card = pick_card(CARDS, name_or_card, "sam")
    if card.family != "sam":
        raise UnknownModelError(
            f"{card.name} is a {card.family} model, not SAM.",
            hint="Run `rsvl models` to list the SAM cards (family sam).",
        )
    path = resolve_weights(card, weights)
    return load_sam(path, card.architecture, device=device, dtype=dtype)
