"""FIANet: referring segmentation of remote-sensing images ("the large storage tank next to
the road" -> mask), re-implemented after Lei et al., TGRS 2024 (Shaosifan/FIANet, ``lavt_one``).

Architecture (module and parameter names follow the upstream checkpoint, which is the
contract; see ``../shared/reference/farslip-fsvlm-fianet.md`` section 3):

* ``text_encoder``: a transformers ``BertModel`` without pooler, run **three times** on the
  same token ids with three attention masks: the whole sentence (context, ``l``), the
  ground-object words (``t``) and the spatial-position phrases (``p``). The padding mask is
  applied as upstream's BERT does, an additive ``(1 - mask) * -10000`` on the scores.
* ``backbone``: a Swin Transformer (Swin-B: embed 128, depths 2-2-18-2, heads 4-8-16-32,
  window 12, drop path 0.3) whose every stage, after its Swin blocks, fuses language:

  - channel gate ``g = sigmoid(fc2(relu(fc1(mean_HW x))))`` (reduction C/8);
  - ``x_res = PWAM(x, l)`` (LAVT's pixel-word attention: ``GELU(conv(x)) * SILA(x, l)``,
    conv, GELU); ``ctx = tanh_gate(x_res) * x_res``;
  - object-position branch (OPAB): ``go = SILA(x, t)`` gated by its own tanh gate;
    ``sp = SILA(x, p)`` turned into a spatial attention ``sigmoid(conv3x3([mean_c; max_c]))``;
    ``op = go * att``;
  - ``x = x + (ctx + op) * g``, then patch merging into the next stage.

  Each stage sends its PWAM output ``x_res`` (not ``x``) through ``norm{i}`` to the decoder;
  the four maps then go through TMEM (text-aware multi-scale enhancement: pool all scales to
  the coarsest grid, 1x1 conv to a quarter of the channels, ``num_tmem`` blocks of
  ``x + SILA(LN x, l)`` and ``+ FFN(LN x)``, BN, 1x1 conv back, split per scale and fuse
  each scale with a scale-aware gate).
* ``classifier``: LAVT's ``SimpleDecoding`` (three top-down fusions, two conv3x3-BN-ReLU
  each, width 4*embed) ending in a 1x1 conv to **2 logits** at 1/4 resolution, upsampled
  bilinearly (``align_corners=True``) to the input size.

What the optimizer sees (:meth:`FianetModel.param_groups`) is upstream's: the whole backbone
(no weight decay on ``norm`` / ``absolute_pos_embed`` / ``relative_position_bias_table``
parameters), the classifier, and BERT layers 0-9 only; BERT's embeddings and layers 10-11
keep their pretrained values.

Checkpoints
-----------
* FIANet training checkpoints (``{'model': state_dict, 'optimizer', 'epoch', 'args', ...}``,
  keys prefixed ``backbone.`` / ``classifier.`` / ``text_encoder.``) load strictly with
  :func:`load_fianet_state_dict`; :func:`read_fianet_checkpoint` reads them with
  ``torch.load(weights_only=True)`` (``argparse.Namespace`` and numpy scalars allowed, since
  upstream pickles its ``args``) or safetensors. The authors publish no weights.
* Training starts from the Swin-B ImageNet-22k checkpoint
  (``swin_base_patch4_window12_384_22k.pth``, original Microsoft layout, or timm's layout)
  and bert-base-uncased (Hugging Face layout): :func:`load_swin_pretrained`,
  :func:`load_bert_pretrained`, :func:`init_fianet_pretrained`.

Tokenizer: BERT WordPiece (``transformers.BertTokenizer``, lower-cased) from the
bert-base-uncased ``vocab.txt``; the two role masks come from :mod:`rsvl.data.refer_text`
(upstream's NLTK-based rules, re-implemented offline). Maximum length 22 tokens for RRSIS-D
and 20 for RefSegRS, as upstream.
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rsvl.data.refer_text import (
    REFSEGRS_CLASS_NAMES,
    REFSEGRS_MAX_TOKENS,
    RRSISD_CLASS_NAMES,
    RRSISD_MAX_TOKENS,
    text_role_masks,
)
from rsvl.errors import (
    CheckpointMismatchError,
    InputNotFoundError,
    PromptError,
    UnknownModelError,
    WeightsNotFoundError,
)
from rsvl.models.cards import pick_card
from rsvl.models.fianet.cards import CARDS

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "FianetConfig",
    "FianetModel",
    "build_fianet",
    "infer_fianet_config",
    "init_fianet_pretrained",
    "load_bert_pretrained",
    "load_fianet",
    "load_fianet_state_dict",
    "load_swin_pretrained",
    "read_fianet_checkpoint",
    "read_vocab",
]

#: ImageNet normalisation on the 0-1 scale (upstream ``T.Normalize``)
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

#: BERT's additive mask value in the transformers 3.0.2 copy that LAVT / FIANet vendor
_BERT_MASK_VALUE = -10000.0
#: value SILA adds to the scores of masked words (``1e4 * mask - 1e4``)
_SILA_MASK_VALUE = 1e4


# --------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FianetConfig:
    """Architecture and text settings. The defaults are the published RRSIS-D model."""

    image_size: int = 480
    patch_size: int = 4
    in_chans: int = 3
    embed_dim: int = 128
    depths: tuple[int, ...] = (2, 2, 18, 2)
    num_heads: tuple[int, ...] = (4, 8, 16, 32)
    window_size: int = 12
    mlp_ratio: float = 4.0
    drop_path_rate: float = 0.3
    #: heads of the language attentions per stage (upstream ``--mha``, default 1-1-1-1)
    fusion_heads: tuple[int, ...] = (1, 1, 1, 1)
    fusion_drop: float = 0.0
    #: TMEM blocks: 3 for RRSIS-D, 1 for RefSegRS
    num_tmem: int = 3
    # BERT (bert-base-uncased by default)
    vocab_size: int = 30522
    text_hidden_size: int = 768
    text_layers: int = 12
    text_heads: int = 12
    text_intermediate_size: int = 3072
    text_max_positions: int = 512
    text_type_vocab_size: int = 2
    text_dropout: float = 0.1
    #: BERT layers 0..n-1 are trained; embeddings and later layers stay frozen
    text_trainable_layers: int = 10
    # tokenizer / role masks
    max_tokens: int = RRSISD_MAX_TOKENS
    class_names: tuple[str, ...] = RRSISD_CLASS_NAMES
    mask_alignment: Literal["upstream", "corrected"] = "upstream"
    dataset: str = "rrsisd"

    def __post_init__(self) -> None:
        n = len(self.depths)
        if len(self.num_heads) != n or len(self.fusion_heads) != n:
            raise ValueError("depths, num_heads and fusion_heads need one entry per stage")
        for i, (h, fh) in enumerate(zip(self.num_heads, self.fusion_heads, strict=True)):
            dim = self.embed_dim * 2**i
            if dim % h or dim % fh:
                raise ValueError(f"stage {i}: {dim} channels are not divisible by the heads")
        if self.text_hidden_size % self.text_heads:
            raise ValueError("text_hidden_size must be divisible by text_heads")
        if self.mask_alignment not in ("upstream", "corrected"):
            raise ValueError("mask_alignment is 'upstream' or 'corrected'")

    @property
    def num_features(self) -> tuple[int, ...]:
        return tuple(self.embed_dim * 2**i for i in range(len(self.depths)))

    @classmethod
    def rrsisd(cls, **overrides: Any) -> FianetConfig:
        """Upstream's RRSIS-D settings (``--num_tmem 3``, 22 tokens, the DIOR class list)."""
        return replace(cls(), **overrides)

    @classmethod
    def refsegrs(cls, **overrides: Any) -> FianetConfig:
        """Upstream's RefSegRS settings (``--num_tmem 1``, 20 tokens, its class list)."""
        base = cls(
            num_tmem=1,
            max_tokens=REFSEGRS_MAX_TOKENS,
            class_names=REFSEGRS_CLASS_NAMES,
            dataset="refsegrs",
        )
        return replace(base, **overrides)

    @classmethod
    def tiny(cls, **overrides: Any) -> FianetConfig:
        """A few-thousand-parameter model for tests: 64 px, Swin dim 16, 2-layer BERT of 32."""
        base = cls(
            image_size=64,
            embed_dim=16,
            depths=(1, 1, 2, 1),
            num_heads=(1, 2, 2, 4),
            window_size=4,
            drop_path_rate=0.0,
            num_tmem=1,
            vocab_size=128,
            text_hidden_size=32,
            text_layers=2,
            text_heads=2,
            text_intermediate_size=64,
            text_max_positions=64,
            text_dropout=0.0,
            dataset="tiny",
        )
        return replace(base, **overrides)


# --------------------------------------------------------------------------------------
# Swin building blocks (upstream / Swin-Seg names and behaviour)
# --------------------------------------------------------------------------------------


class DropPath(nn.Module):
    """Stochastic depth per sample (identity in eval mode)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        return x * x.new_empty(shape).bernoulli_(keep) / keep


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


def _relative_position_index(window: int) -> Tensor:
    r = torch.arange(window, device="cpu")  # on the CPU even under a meta / cuda device context
    coords = torch.stack(torch.meshgrid(r, r, indexing="ij"))
    flat = coords.flatten(1)
    rel = (flat[:, :, None] - flat[:, None, :]).permute(1, 2, 0) + (window - 1)
    return rel[..., 0] * (2 * window - 1) + rel[..., 1]


class WindowAttention(nn.Module):
    """Window multi-head self-attention with a relative position bias table."""

    def __init__(self, dim: int, window: int, num_heads: int) -> None:
        super().__init__()
        self.window = window
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * window - 1) ** 2, num_heads)
        )
        # persistent, as upstream: FIANet checkpoints carry it
        self.register_buffer("relative_position_index", _relative_position_index(window))
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        """``x``: (B, nW, N, C) windows; ``mask``: (nW, N, N) additive or None."""
        b, nw, n, c = x.shape
        h = self.num_heads
        qkv = self.qkv(x).reshape(b, nw, n, 3, h, c // h).permute(3, 0, 1, 4, 2, 5)
        q, k, v = qkv[0], qkv[1], qkv[2]  # (B, nW, h, N, d)
        n2 = self.window * self.window
        bias = self.relative_position_bias_table[self.relative_position_index.reshape(-1)]
        bias = bias.reshape(n2, n2, h).permute(2, 0, 1)  # (h, N, N)
        attn_mask = bias.unsqueeze(0) if mask is None else bias.unsqueeze(0) + mask.unsqueeze(1)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask.to(q.dtype), scale=self.scale
        )
        return self.proj(out.transpose(2, 3).reshape(b, nw, n, c))


def _to_windows(x: Tensor, w: int) -> Tensor:
    b, hp, wp, c = x.shape
    x = x.reshape(b, hp // w, w, wp // w, w, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (hp // w) * (wp // w), w * w, c)


def _from_windows(x: Tensor, w: int, hp: int, wp: int) -> Tensor:
    b, _, _, c = x.shape
    x = x.reshape(b, hp // w, wp // w, w, w, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, hp, wp, c)


def _shift_mask(hp: int, wp: int, window: int, shift: int, device: torch.device) -> Tensor:
    """Swin's (nW, N, N) mask for shifted windows (-100 between regions), as upstream."""
    img = torch.zeros(1, hp, wp, 1, device=device)
    cnt = 0
    for hs in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
        for ws in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
            img[:, hs, ws, :] = cnt
            cnt += 1
    win = _to_windows(img, window).reshape(-1, window * window)
    diff = win.unsqueeze(1) - win.unsqueeze(2)
    return diff.masked_fill(diff != 0, -100.0).masked_fill(diff == 0, 0.0)


class SwinTransformerBlock(nn.Module):
    """Pre-norm (shifted) window attention + MLP; pads H, W up to multiples of the window."""

    def __init__(
        self, dim: int, num_heads: int, window: int, shift: int, mlp_ratio: float, drop_path: float
    ) -> None:
        super().__init__()
        self.window = window
        self.shift = shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window, num_heads)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor, hw: tuple[int, int], mask: Tensor | None) -> Tensor:
        """``x``: (B, H*W, C) tokens."""
        h, w = hw
        b, _, c = x.shape
        shortcut = x
        x = self.norm1(x).reshape(b, h, w, c)
        ws = self.window
        pad_r, pad_b = (ws - w % ws) % ws, (ws - h % ws) % ws
        x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        hp, wp = h + pad_b, w + pad_r
        if self.shift > 0:
            x = torch.roll(x, shifts=(-self.shift, -self.shift), dims=(1, 2))
        x = self.attn(_to_windows(x, ws), mask if self.shift > 0 else None)
        x = _from_windows(x, ws, hp, wp)
        if self.shift > 0:
            x = torch.roll(x, shifts=(self.shift, self.shift), dims=(1, 2))
        x = x[:, :h, :w, :].reshape(b, h * w, c)
        x = shortcut + self.drop_path(x)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchMerging(nn.Module):
    """2x2 neighbourhood concat (order x00, x10, x01, x11) -> LN -> linear 4C -> 2C."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x: Tensor, hw: tuple[int, int]) -> Tensor:
        h, w = hw
        b, _, c = x.shape
        x = x.reshape(b, h, w, c)
        if h % 2 or w % 2:
            x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
        return self.reduction(self.norm(x.reshape(b, -1, 4 * c)))


class PatchEmbed(nn.Module):
    def __init__(self, patch: int, in_chans: int, dim: int) -> None:
        super().__init__()
        self.patch = patch
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch, stride=patch)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        p = self.patch
        if w % p or h % p:
            x = F.pad(x, (0, (p - w % p) % p, 0, (p - h % p) % p))
        x = self.proj(x)
        b, c, gh, gw = x.shape
        x = self.norm(x.flatten(2).transpose(1, 2))
        return x.transpose(1, 2).reshape(b, c, gh, gw)


# --------------------------------------------------------------------------------------
# Language fusion modules
# --------------------------------------------------------------------------------------


class SpatialImageLanguageAttention(nn.Module):
    """SILA: pixels attend to words. Q = IN(conv(x)); K, V = conv(words) * mask; softmax over
    words with ``-1e4`` on masked ones and scale ``key_channels ** -0.5``; out = IN(conv)."""

    def __init__(
        self, v_in: int, l_in: int, key_channels: int, value_channels: int, num_heads: int = 1
    ) -> None:
        super().__init__()
        self.key_channels = key_channels
        self.value_channels = value_channels
        self.num_heads = num_heads
        self.f_key = nn.Sequential(nn.Conv1d(l_in, key_channels, 1))
        self.f_query = nn.Sequential(nn.Conv1d(v_in, key_channels, 1), nn.InstanceNorm1d(key_channels))
        self.f_value = nn.Sequential(nn.Conv1d(l_in, value_channels, 1))
        self.W = nn.Sequential(
            nn.Conv1d(value_channels, value_channels, 1), nn.InstanceNorm1d(value_channels)
        )

    def forward(self, x: Tensor, words: Tensor, mask: Tensor) -> Tensor:
        """``x``: (B, HW, C); ``words``: (B, C_l, N); ``mask``: (B, N, 1). Returns (B, HW, Cv)."""
        b, hw = x.shape[:2]
        h = self.num_heads
        m = mask.permute(0, 2, 1)  # (B, 1, N)
        query = self.f_query(x.permute(0, 2, 1)).permute(0, 2, 1)  # (B, HW, Ck)
        key = self.f_key(words) * m
        value = self.f_value(words) * m
        n = value.shape[-1]
        query = query.reshape(b, hw, h, self.key_channels // h).permute(0, 2, 1, 3)
        key = key.reshape(b, h, self.key_channels // h, n)
        value = value.reshape(b, h, self.value_channels // h, n)
        sim = torch.matmul(query, key) * self.key_channels**-0.5
        sim = sim + (_SILA_MASK_VALUE * m.unsqueeze(1) - _SILA_MASK_VALUE)
        sim = F.softmax(sim, dim=-1)
        out = torch.matmul(sim, value.permute(0, 1, 3, 2))  # (B, h, HW, Cv/h)
        out = out.permute(0, 2, 1, 3).reshape(b, hw, self.value_channels)
        return self.W(out.permute(0, 2, 1)).permute(0, 2, 1)


class PWAM(nn.Module):
    """LAVT's pixel-word attention module."""

    def __init__(self, dim: int, l_in: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        self.vis_project = nn.Sequential(nn.Conv1d(dim, dim, 1), nn.GELU(), nn.Dropout(dropout))
        self.image_lang_att = SpatialImageLanguageAttention(dim, l_in, dim, dim, num_heads)
        self.project_mm = nn.Sequential(nn.Conv1d(dim, dim, 1), nn.GELU(), nn.Dropout(dropout))

    def forward(self, x: Tensor, words: Tensor, mask: Tensor) -> Tensor:
        vis = self.vis_project(x.permute(0, 2, 1))
        lang = self.image_lang_att(x, words, mask).permute(0, 2, 1)
        return self.project_mm(vis * lang).permute(0, 2, 1)


def _tanh_gate(dim: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(dim, dim, bias=False), nn.ReLU(), nn.Linear(dim, dim, bias=False), nn.Tanh()
    )


class OPAB(nn.Module):
    """Object-position alignment block: ground-object attention gated by a spatial map from
    the spatial-phrase attention."""

    def __init__(self, dim: int, l_in: int, num_heads: int) -> None:
        super().__init__()
        self.dim = dim
        self.go_cross_attn = SpatialImageLanguageAttention(dim, l_in, dim, dim, num_heads)
        self.go_tanh_gating = _tanh_gate(dim)
        #: defined upstream and saved in its checkpoints, never used in forward
        self.go_embedding = nn.Linear(dim, dim, bias=False)
        self.sp_cross_attn = SpatialImageLanguageAttention(dim, l_in, dim, dim, num_heads)
        self.conv1 = nn.Conv2d(2, 1, 3, padding=1, bias=False)

    def spatial_attention(
        self, x: Tensor, hw: tuple[int, int], words: Tensor, mask: Tensor
    ) -> Tensor:
        """(B, H*W, 1) map in (0, 1) from the spatial-phrase words."""
        b = x.shape[0]
        h, w = hw
        sp = self.sp_cross_attn(x, words, mask).reshape(b, h, w, self.dim).permute(0, 3, 1, 2)
        sp = torch.cat([sp.mean(dim=1, keepdim=True), sp.amax(dim=1, keepdim=True)], dim=1)
        return torch.sigmoid(self.conv1(sp)).permute(0, 2, 3, 1).reshape(b, h * w, 1)

    def forward(
        self, x: Tensor, hw: tuple[int, int], t: Tensor, t_mask: Tensor, p: Tensor, p_mask: Tensor
    ) -> Tensor:
        go = self.go_cross_attn(x, t, t_mask)
        go = self.go_tanh_gating(go) * go
        return go * self.spatial_attention(x, hw, p, p_mask)


@dataclass
class _Text:
    """The three BERT passes: features (B, C, N) and masks (B, N, 1) as floats."""

    l: Tensor  # noqa: E741 - upstream's name
    l_mask: Tensor
    t: Tensor
    t_mask: Tensor
    p: Tensor
    p_mask: Tensor


class MMBasicLayer(nn.Module):
    """One Swin stage followed by FIANet's language fusion (upstream ``MMBasicLayer``)."""

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        window: int,
        mlp_ratio: float,
        drop_path: Sequence[float],
        downsample: bool,
        l_in: int,
        fusion_heads: int,
        fusion_drop: float,
    ) -> None:
        super().__init__()
        self.window = window
        self.shift = window // 2
        self.blocks = nn.ModuleList(
            SwinTransformerBlock(
                dim, num_heads, window, 0 if i % 2 == 0 else window // 2, mlp_ratio, drop_path[i]
            )
            for i in range(depth)
        )
        reduced = dim // 8
        self.fc1 = nn.Linear(dim, reduced)
        self.fc2 = nn.Linear(reduced, dim)
        self.context_pixel_attn = PWAM(dim, l_in, fusion_heads, fusion_drop)
        self.context_tanh_gate = _tanh_gate(dim)
        self.object_position_align_blk = OPAB(dim, l_in, fusion_heads)
        self.downsample = PatchMerging(dim) if downsample else None

    def forward(
        self, x: Tensor, hw: tuple[int, int], text: _Text
    ) -> tuple[Tensor, Tensor, tuple[int, int]]:
        """Returns (PWAM output for the decoder, input of the next stage, its H, W)."""
        h, w = hw
        hp = math.ceil(h / self.window) * self.window
        wp = math.ceil(w / self.window) * self.window
        mask = _shift_mask(hp, wp, self.window, self.shift, x.device) if len(self.blocks) > 1 else None
        for blk in self.blocks:
            x = blk(x, hw, mask)
        gate = torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean(dim=1)))))  # (B, C)
        x_res = self.context_pixel_attn(x, text.l, text.l_mask)
        ctx = self.context_tanh_gate(x_res) * x_res
        op = self.object_position_align_blk(x, hw, text.t, text.t_mask, text.p, text.p_mask)
        x = x + (ctx + op) * gate.unsqueeze(1)
        if self.downsample is not None:
            return x_res, self.downsample(x, hw), ((h + 1) // 2, (w + 1) // 2)
        return x_res, x, hw


# --------------------------------------------------------------------------------------
# TMEM
# --------------------------------------------------------------------------------------


class _HSigmoid(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return F.relu6(x + 3.0) / 6.0


class ScaleAwareGate(nn.Module):
    """``BN(conv(local)) * up(hsigmoid(BN(conv(global)))) + up(BN(conv(global)))``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.local_embedding = nn.Conv2d(channels, channels, 1)
        self.bn1 = nn.BatchNorm2d(channels)
        self.global_embedding = nn.Conv2d(channels, channels, 1)
        self.bn2 = nn.BatchNorm2d(channels)
        self.global_act = nn.Conv2d(channels, channels, 1)
        self.bn3 = nn.BatchNorm2d(channels)
        self.act = _HSigmoid()

    def forward(self, x_local: Tensor, x_global: Tensor) -> Tensor:
        size = x_local.shape[-2:]
        local = self.bn1(self.local_embedding(x_local))
        glob = F.interpolate(
            self.bn2(self.global_embedding(x_global)), size=size, mode="bilinear", align_corners=False
        )
        act = F.interpolate(
            self.act(self.bn3(self.global_act(x_global))), size=size, mode="bilinear", align_corners=False
        )
        return local * act + glob


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(0.0), nn.Linear(hidden, dim), nn.Dropout(0.0)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class TMEMBlock(nn.Module):
    def __init__(self, dim: int, l_in: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.tma = SpatialImageLanguageAttention(dim, l_in, dim, dim, 1)
        self.norm2 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, 2 * dim)

    def forward(self, x: Tensor, words: Tensor, mask: Tensor) -> Tensor:
        b, c, h, w = x.shape
        x = x.flatten(2).transpose(1, 2)
        x = x + self.tma(self.norm1(x), words, mask)
        x = x + self.ff(self.norm2(x))
        return x.reshape(b, h, w, c).permute(0, 3, 1, 2)


class TMEM(nn.Module):
    """Text-aware multi-scale enhancement over the four stage outputs."""

    def __init__(self, channels: Sequence[int], num_blocks: int, l_in: int) -> None:
        super().__init__()
        dim = sum(channels)
        self.channels = list(channels)
        hidden = dim // 4
        self.down_channel = nn.Conv2d(dim, hidden, 1)
        self.up_channel = nn.Conv2d(hidden, dim, 1)
        self.block = nn.ModuleList(TMEMBlock(hidden, l_in) for _ in range(num_blocks))
        self.bn = nn.BatchNorm2d(hidden)
        self.fusion = nn.ModuleList(ScaleAwareGate(c) for c in channels)

    def forward(self, feats: Sequence[Tensor], words: Tensor, mask: Tensor) -> list[Tensor]:
        size = feats[-1].shape[-2:]
        out = torch.cat([F.adaptive_avg_pool2d(f, size) for f in feats], dim=1)
        out = self.down_channel(out)
        for blk in self.block:
            out = blk(out, words, mask)
        out = self.up_channel(self.bn(out))
        parts = out.split(self.channels, dim=1)
        return [fuse(f, g) for fuse, f, g in zip(self.fusion, feats, parts, strict=True)]


# --------------------------------------------------------------------------------------
# Backbone, decoder, model
# --------------------------------------------------------------------------------------


class MultiModalSwinTransformer(nn.Module):
    def __init__(self, cfg: FianetConfig) -> None:
        super().__init__()
        self.num_features = list(cfg.num_features)
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.in_chans, cfg.embed_dim)
        total = sum(cfg.depths)  # stochastic depth rises linearly over all blocks
        dpr = [cfg.drop_path_rate * i / max(total - 1, 1) for i in range(total)]
        self.layers = nn.ModuleList()
        n = len(cfg.depths)
        for i in range(n):
            start = sum(cfg.depths[:i])
            self.layers.append(
                MMBasicLayer(
                    dim=self.num_features[i],
                    depth=cfg.depths[i],
                    num_heads=cfg.num_heads[i],
                    window=cfg.window_size,
                    mlp_ratio=cfg.mlp_ratio,
                    drop_path=dpr[start : start + cfg.depths[i]],
                    downsample=i < n - 1,
                    l_in=cfg.text_hidden_size,
                    fusion_heads=cfg.fusion_heads[i],
                    fusion_drop=cfg.fusion_drop,
                )
            )
        for i, c in enumerate(self.num_features):
            self.add_module(f"norm{i}", nn.LayerNorm(c))
        self.tmem = TMEM(self.num_features, cfg.num_tmem, cfg.text_hidden_size)

    def init_weights(self) -> None:
        """Upstream's ``init_weights()``: trunc-normal(0.02) linears with zero bias, unit LNs."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def stages(self, x: Tensor, text: _Text) -> list[Tensor]:
        """Per-stage PWAM outputs after ``norm{i}``, as (B, C_i, H_i, W_i) maps."""
        x = self.patch_embed(x)
        hw = (x.shape[2], x.shape[3])
        x = x.flatten(2).transpose(1, 2)
        outs = []
        for i, layer in enumerate(self.layers):
            x_res, x, next_hw = layer(x, hw, text)
            y = getattr(self, f"norm{i}")(x_res)
            outs.append(y.reshape(-1, hw[0], hw[1], self.num_features[i]).permute(0, 3, 1, 2))
            hw = next_hw
        return outs

    def forward(self, x: Tensor, text: _Text) -> list[Tensor]:
        return self.tmem(self.stages(x, text), text.l, text.l_mask)


class SimpleDecoding(nn.Module):
    """LAVT's decoder: three top-down fusions of two conv3x3-BN-ReLU, then 1x1 conv to 2."""

    def __init__(self, c4_dims: int, factor: int = 2) -> None:
        super().__init__()
        hidden = c4_dims // factor
        c3, c2, c1 = c4_dims // factor, c4_dims // factor**2, c4_dims // factor**3
        for tag, cin in (("4", c4_dims + c3), ("3", hidden + c2), ("2", hidden + c1)):
            self.add_module(f"conv1_{tag}", nn.Conv2d(cin, hidden, 3, padding=1, bias=False))
            self.add_module(f"bn1_{tag}", nn.BatchNorm2d(hidden))
            self.add_module(f"conv2_{tag}", nn.Conv2d(hidden, hidden, 3, padding=1, bias=False))
            self.add_module(f"bn2_{tag}", nn.BatchNorm2d(hidden))
        self.conv1_1 = nn.Conv2d(hidden, 2, 1)

    def _fuse(self, tag: str, x: Tensor, skip: Tensor) -> Tensor:
        if x.shape[-2] < skip.shape[-2] or x.shape[-1] < skip.shape[-1]:
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=True)
        x = torch.cat([x, skip], dim=1)
        x = F.relu(getattr(self, f"bn1_{tag}")(getattr(self, f"conv1_{tag}")(x)))
        return F.relu(getattr(self, f"bn2_{tag}")(getattr(self, f"conv2_{tag}")(x)))

    def forward(self, x_c4: Tensor, x_c3: Tensor, x_c2: Tensor, x_c1: Tensor) -> Tensor:
        x = self._fuse("4", x_c4, x_c3)
        x = self._fuse("3", x, x_c2)
        x = self._fuse("2", x, x_c1)
        return self.conv1_1(x)


def _bert_config(cfg: FianetConfig) -> Any:
    from transformers import BertConfig

    return BertConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.text_hidden_size,
        num_hidden_layers=cfg.text_layers,
        num_attention_heads=cfg.text_heads,
        intermediate_size=cfg.text_intermediate_size,
        max_position_embeddings=cfg.text_max_positions,
        type_vocab_size=cfg.text_type_vocab_size,
        hidden_dropout_prob=cfg.text_dropout,
        attention_probs_dropout_prob=cfg.text_dropout,
        hidden_act="gelu",
        layer_norm_eps=1e-12,
    )


class FianetModel(nn.Module):
    """FIANet: ``forward(images, text)`` -> (B, 2, S, S) logits (channel 1 = the referent)."""

    name: str
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __init__(self, config: FianetConfig) -> None:
        super().__init__()
        from transformers import BertModel

        self.config = config
        self.name = f"fianet-{config.dataset}"
        self.image_size = config.image_size
        self.mean = IMAGENET_MEAN
        self.std = IMAGENET_STD
        self.backbone = MultiModalSwinTransformer(config)
        self.classifier = SimpleDecoding(8 * config.embed_dim)
        self.text_encoder = BertModel(_bert_config(config), add_pooling_layer=False)
        self.tokenizer: Any = None

    # ---------------------------------------------------------------- text
    def set_vocab(self, vocab: str | Path) -> None:
        """Use the BERT WordPiece vocabulary ``vocab`` (a ``vocab.txt`` or a folder with one)."""
        from transformers import BertTokenizer

        words = read_vocab(vocab)
        if len(words) > self.config.vocab_size:
            raise CheckpointMismatchError(
                f"{vocab} has {len(words)} tokens but the text encoder embeds "
                f"{self.config.vocab_size}.",
                hint="Use the vocab.txt of the BERT the model was trained from (bert-base-uncased).",
            )
        self.tokenizer = BertTokenizer(vocab=words, do_lower_case=True)

    def tokenize(self, expressions: list[str]) -> dict[str, Tensor]:
        """Token ids and the three role masks, each (B, L) int64 with L = ``max_tokens``.

        ``attention_mask``: the sentence; ``object_mask``: the ground-object words;
        ``spatial_mask``: the spatial phrases (the attention mask when none is found).
        """
        if self.tokenizer is None:
            cached = _hf_cached_vocab() if self.config.vocab_size == 30522 else None
            if cached is None:
                raise WeightsNotFoundError(
                    "FIANet has no tokenizer: the BERT vocabulary (vocab.txt) was not given.",
                    hint=f"Download bert-base-uncased's vocab.txt ({BERT_VOCAB_URL}) and place "
                    "it next to the weights, or call set_vocab(PATH).",
                )
            self.set_vocab(cached)
        if isinstance(expressions, str):
            expressions = [expressions]
        rows = []
        for text in expressions:
            if not isinstance(text, str) or not text.strip():
                raise PromptError(
                    "A referring expression is empty.",
                    hint='Describe the object, e.g. "the storage tank on the left".',
                )
            rows.append(
                text_role_masks(
                    text.strip(),
                    self.tokenizer,
                    class_names=self.config.class_names,
                    max_tokens=self.config.max_tokens,
                    alignment=self.config.mask_alignment,
                )
            )
        if not rows:
            raise PromptError("No referring expression was given.")

        def stack(attr: str) -> Tensor:
            return torch.stack([torch.as_tensor(getattr(r, attr), dtype=torch.long) for r in rows])

        return {
            "input_ids": stack("input_ids"),
            "attention_mask": stack("attention_mask"),
            "object_mask": stack("target_mask"),
            "spatial_mask": stack("position_mask"),
        }

    def _bert(self, ids: Tensor, mask: Tensor) -> Tensor:
        emb = self.text_encoder.embeddings(input_ids=ids)
        additive = (1.0 - mask[:, None, None, :].to(emb.dtype)) * _BERT_MASK_VALUE
        return self.text_encoder.encoder(emb, attention_mask=additive).last_hidden_state

    def encode_text(self, text: Mapping[str, Tensor]) -> _Text:
        """The three masked BERT passes (upstream ``lavt_one``)."""
        for key in ("input_ids", "attention_mask", "object_mask", "spatial_mask"):
            if key not in text:
                raise PromptError(
                    f"text is missing {key!r}.", hint="Build it with FianetModel.tokenize()."
                )
        device = self.classifier.conv1_1.weight.device
        dtype = self.classifier.conv1_1.weight.dtype
        ids = text["input_ids"].to(device)
        feats = []
        for key in ("attention_mask", "object_mask", "spatial_mask"):
            m = text[key].to(device)
            feats.append((self._bert(ids, m).permute(0, 2, 1).to(dtype), m.to(dtype).unsqueeze(-1)))
        (l, lm), (t, tm), (p, pm) = feats  # noqa: E741
        return _Text(l, lm, t, tm, p, pm)

    # ---------------------------------------------------------------- image
    def forward_features(self, images: Tensor, text: Mapping[str, Tensor]) -> dict[str, Any]:
        """Intermediate results: ``text`` (the three passes), ``stages`` (PWAM outputs after
        ``norm{i}``), ``tmem`` (the maps sent to the decoder) and ``logits`` at 1/4 size."""
        tx = self.encode_text(text)
        stages = self.backbone.stages(images, tx)
        fused = self.backbone.tmem(stages, tx.l, tx.l_mask)
        logits = self.classifier(fused[3], fused[2], fused[1], fused[0])
        return {"text": tx, "stages": stages, "tmem": fused, "logits": logits}

    def forward(self, images: Tensor, text: dict[str, Tensor]) -> Tensor:
        """``images``: (B, 3, S, S) normalised; returns logits (B, 2, S, S)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
        tx = self.encode_text(text)
        feats = self.backbone(images, tx)
        logits = self.classifier(feats[3], feats[2], feats[1], feats[0])
        return F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=True)

    @torch.no_grad()
    def predict(self, images: Tensor, text: dict[str, Tensor]) -> Tensor:
        """Boolean masks (B, S, S): argmax of the two logits, as upstream evaluates."""
        return self(images, text).argmax(1).bool()

    # ---------------------------------------------------------------- training
    def param_groups(self, lr: float, weight_decay: float) -> list[dict]:
        """AdamW groups as upstream ``train.py`` builds them.

        backbone (no decay on ``norm`` / ``absolute_pos_embed`` / ``relative_position_bias_table``
        names, substring match as upstream), backbone (decay), classifier, BERT layers
        ``0 .. text_trainable_layers-1``. BERT's embeddings and later layers are not optimised
        upstream; here they are also set ``requires_grad=False`` (same result, no wasted
        gradients).
        """
        no_decay, decay = [], []
        for name, p in self.backbone.named_parameters():
            if not p.requires_grad:
                continue
            if "norm" in name or "absolute_pos_embed" in name or "relative_position_bias_table" in name:
                no_decay.append(p)
            else:
                decay.append(p)
        n_train = min(self.config.text_trainable_layers, len(self.text_encoder.encoder.layer))
        bert: list[nn.Parameter] = []
        for p in self.text_encoder.parameters():
            p.requires_grad_(False)
        for i in range(n_train):
            for p in self.text_encoder.encoder.layer[i].parameters():
                p.requires_grad_(True)
                bert.append(p)
        return [
            {"params": no_decay, "lr": lr, "weight_decay": 0.0, "name": "backbone_no_decay"},
            {"params": decay, "lr": lr, "weight_decay": weight_decay, "name": "backbone"},
            {
                "params": [p for p in self.classifier.parameters() if p.requires_grad],
                "lr": lr,
                "weight_decay": weight_decay,
                "name": "classifier",
            },
            {"params": bert, "lr": lr, "weight_decay": weight_decay, "name": "text_encoder"},
        ]


def build_fianet(config: FianetConfig, *, vocab: str | Path | None = None) -> FianetModel:
    """A randomly initialised FIANet (backbone initialised as upstream ``init_weights()``).

    ``vocab``: a BERT ``vocab.txt`` for :meth:`FianetModel.tokenize`; without it the tokenizer
    is found lazily (see :meth:`FianetModel.tokenize`) or set later with ``set_vocab``.
    """
    model = FianetModel(config)
    model.backbone.init_weights()
    if vocab is not None:
        model.set_vocab(vocab)
    return model


# --------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------

#: keys a FIANet file may hold that carry nothing (newer transformers buffers, an unused pooler)
_IGNORABLE = re.compile(
    r"^text_encoder\.(embeddings\.position_ids|embeddings\.token_type_ids|pooler\..*)$"
)


def _list(names: Sequence[str], limit: int = 12) -> str:
    more = f" ... (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _safe_torch_load(p: Path) -> Any:
    """``torch.load(weights_only=True)``; upstream's ``args`` (a Namespace) and numpy scalars
    are allowed as data, nothing that runs code."""
    import numpy as np

    allowed: list[Any] = [argparse.Namespace, np.dtype]
    core = getattr(np, "_core", None) or getattr(np, "core", None)
    scalar = getattr(getattr(core, "multiarray", None), "scalar", None)
    if scalar is not None:
        allowed.append(scalar)
    allowed.extend(
        getattr(np.dtypes, n) for n in ("Float64DType", "Float32DType", "Int64DType")
        if hasattr(getattr(np, "dtypes", None), n)
    )
    with torch.serialization.safe_globals(allowed):
        return torch.load(str(p), map_location="cpu", weights_only=True)


def _read_state_dict(path: str | Path, what: str, wrappers: Sequence[str]) -> dict[str, Tensor]:
    p = Path(path).expanduser()
    if not p.is_file():
        raise InputNotFoundError(f"{what} not found: {p}", hint="Check the path.")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            obj: Any = load_file(str(p), device="cpu")
        except Exception as exc:
            raise CheckpointMismatchError(f"Cannot read {p} as safetensors: {exc}") from exc
    else:
        try:
            obj = _safe_torch_load(p)
        except Exception as exc:
            raise CheckpointMismatchError(
                f"Cannot read {p} with torch.load(weights_only=True): {exc}",
                hint="rsvl loads plain tensor state dicts only; re-save the 'model' dict with "
                "torch.save({'model': ckpt['model']}, path) where the file is trusted.",
            ) from exc
    if isinstance(obj, Mapping):
        for key in wrappers:
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner:
                obj = inner
                break
        sd = {str(k): v for k, v in obj.items() if isinstance(v, Tensor)}
        if sd:
            if all(k.startswith("module.") for k in sd):
                sd = {k[len("module."):]: v for k, v in sd.items()}
            return sd
    raise CheckpointMismatchError(f"{p} holds no tensors: it is not a {what}.")


def read_fianet_checkpoint(path: str | Path) -> dict[str, Tensor]:
    """The state dict of a FIANet checkpoint: ``{'model': ...}`` training files (``optimizer``,
    ``args`` ... ignored), a bare state dict or a ``.safetensors`` file; a DDP ``module.``
    prefix is stripped. Keys keep their ``backbone.`` / ``classifier.`` / ``text_encoder.``
    prefixes."""
    return _read_state_dict(path, "FIANet checkpoint", ("model", "state_dict"))


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


def _strict_load(
    module: nn.Module, sd: Mapping[str, Tensor], what: str, hint: str, prefix: str = ""
) -> None:
    expected = module.state_dict()
    missing = [prefix + k for k in expected if k not in sd]
    unexpected = [prefix + k for k in sd if k not in expected]
    bad = [
        f"{prefix}{k} {tuple(sd[k].shape)} (model {tuple(v.shape)})"
        for k, v in expected.items()
        if k in sd and sd[k].shape != v.shape
    ]
    if missing or unexpected or bad:
        parts = []
        if missing:
            parts.append(f"missing keys: {_list(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_list(unexpected)}")
        if bad:
            parts.append(f"shape mismatches: {_list(bad)}")
        raise CheckpointMismatchError(f"{what} does not match the model: " + "; ".join(parts) + ".", hint=hint)
    module.load_state_dict({k: v.to(expected[k].dtype) for k, v in sd.items()}, strict=True)


def load_fianet_state_dict(model: FianetModel, state_dict: Mapping[str, Tensor]) -> None:
    """Load a FIANet state dict strictly: any missing, unexpected or mis-shaped key raises
    :class:`CheckpointMismatchError` naming it (only ``text_encoder`` buffers of newer
    transformers versions and an unused BERT pooler are skipped)."""
    sd = {k: v for k, v in state_dict.items() if not _IGNORABLE.match(k)}
    _strict_load(
        model,
        sd,
        "FIANet checkpoint",
        hint="Check that the file is a FIANet (lavt_one) checkpoint of the chosen settings "
        "(Swin-B window 12, BERT-base, --num_tmem 3 for RRSIS-D / 1 for RefSegRS).",
    )


# --------------------------------------------------------------------------------------
# Pretrained initialisation (Swin-B 22k, bert-base-uncased)
# --------------------------------------------------------------------------------------

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
        sd = _read_state_dict(path, "Swin checkpoint", ("model", "state_dict"))
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
    missing = sorted(owned - sd.keys())
    unexpected = sorted(k for k in sd if k not in owned)
    bad = [
        f"{k} {tuple(sd[k].shape)} (model {tuple(target[k].shape)})"
        for k in sorted(owned & sd.keys())
        if sd[k].shape != target[k].shape
    ]
    if missing or unexpected or bad:
        parts = []
        if missing:
            parts.append(f"missing keys: {_list(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_list(unexpected)}")
        if bad:
            parts.append(f"shape mismatches: {_list(bad)}")
        raise CheckpointMismatchError(
            "Swin checkpoint does not match the backbone: " + "; ".join(parts) + ".",
            hint="FIANet uses Swin-B (embed 128, depths 2-2-18-2): "
            "swin_base_patch4_window12_384_22k.pth.",
        )
    with torch.no_grad():
        for k in owned:
            target[k].copy_(sd[k].to(target[k].dtype))
    return sorted(k for k in target if k not in owned and "relative_position_index" not in k)


def _bert_file(path: Path) -> Path:
    if path.is_dir():
        for name in ("model.safetensors", "pytorch_model.bin"):
            if (path / name).is_file():
                return path / name
        raise InputNotFoundError(
            f"{path} has no model.safetensors or pytorch_model.bin.",
            hint="Point at a bert-base-uncased snapshot folder or its weights file.",
        )
    return path


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
        sd = _read_state_dict(_bert_file(p), "BERT checkpoint", ("state_dict", "model"))
    out: dict[str, Tensor] = {}
    for k, v in sd.items():
        k = re.sub(r"^(bert\.|text_encoder\.)", "", k)
        if k.startswith(("cls.", "pooler.")) or k in ("embeddings.position_ids", "embeddings.token_type_ids"):
            continue
        k = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", k)
        k = re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", k)
        out[k] = v
    _strict_load(
        model.text_encoder,
        out,
        "BERT checkpoint",
        hint="FIANet uses bert-base-uncased (12 layers, hidden 768).",
        prefix="text_encoder.",
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


# --------------------------------------------------------------------------------------
# Vocabulary and the card loader
# --------------------------------------------------------------------------------------

VOCAB_FILENAME = "vocab.txt"
BERT_VOCAB_URL = "https://huggingface.co/google-bert/bert-base-uncased/resolve/main/vocab.txt"


def read_vocab(path: str | Path) -> dict[str, int]:
    """A BERT ``vocab.txt`` (one token per line, id = line number) as a dict."""
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / VOCAB_FILENAME
    if not p.is_file():
        raise WeightsNotFoundError(
            f"BERT vocabulary not found: {p}",
            hint=f"Download bert-base-uncased's vocab.txt ({BERT_VOCAB_URL}) and place it there.",
        )
    vocab: dict[str, int] = {}
    with open(p, encoding="utf-8") as fh:
        for i, line in enumerate(fh):
            vocab.setdefault(line.rstrip("\n"), i)
    if not vocab:
        raise WeightsNotFoundError(f"{p} is empty.", hint=f"Use bert-base-uncased's vocab.txt ({BERT_VOCAB_URL}).")
    return vocab


def _hf_cached_vocab() -> Path | None:
    """bert-base-uncased's ``vocab.txt`` if the Hugging Face cache already holds it (no
    network)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - a transformers dependency
        return None
    for repo in ("google-bert/bert-base-uncased", "bert-base-uncased"):
        try:
            found = try_to_load_from_cache(repo, VOCAB_FILENAME)
        except Exception:  # a malformed cache must not break tokenizing
            continue
        if isinstance(found, str) and Path(found).is_file():
            return Path(found)
    return None


def _card_config(card: Any) -> FianetConfig:
    meta = dict(getattr(card, "metadata", {}) or {})
    dataset = meta.get("dataset", "rrsisd")
    base = FianetConfig.refsegrs() if dataset == "refsegrs" else FianetConfig.rrsisd()
    return replace(base, image_size=int(getattr(card, "image_size", base.image_size)))


def load_fianet(card: Any, weights: str | Path | None = None, device: str = "cpu", **kw: Any) -> FianetModel:
    """Build a FIANet card's model from its checkpoint (``rsvl.load`` calls this).

    ``weights``: the FIANet checkpoint (else rsvl's cache). The BERT vocabulary is ``vocab=``,
    else ``vocab.txt`` next to the checkpoint, else in the card's cache folder. Other keyword
    arguments override :class:`FianetConfig` fields (e.g. ``mask_alignment="corrected"``).
    """
    from rsvl.models.weights import cache_path, resolve_weights

    if weights is None and isinstance(card, (str, Path)) and Path(card).expanduser().is_file():
        # load_fianet(PATH): a checkpoint given without a card -> the RRSIS-D card's settings
        weights, card = card, "fianet-rrsisd"
    card = pick_card(CARDS, card, "fianet")
    if card.family != "fianet":
        raise UnknownModelError(
            f"{card.name} is a {card.family} model, not FIANet.",
            hint="Run `rsvl models` to list the referring-segmentation models (family fianet).",
        )
    vocab = kw.pop("vocab", None)
    dtype = kw.pop("dtype", None)
    if weights is None and not cache_path(card).is_file():
        raise WeightsNotFoundError(
            f"Model {card.name!r} has no public weights: the FIANet authors publish none.",
            hint=f"Train it (or get a checkpoint from its authors) and pass --weights PATH, or "
            f"place the file as {cache_path(card)} with bert-base-uncased's vocab.txt beside it.",
        )
    path = resolve_weights(card, weights)
    sd = read_fianet_checkpoint(path)
    cfg = infer_fianet_config(sd, _card_config(card))
    if kw:
        cfg = replace(cfg, **kw)
    model = FianetModel(cfg)
    load_fianet_state_dict(model, sd)
    model.name = card.name
    candidates = [Path(vocab)] if vocab is not None else [
        Path(path).parent / VOCAB_FILENAME,
        cache_path(card).parent / VOCAB_FILENAME,
    ]
    for cand in candidates:
        if cand.is_file() or (cand.is_dir() and (cand / VOCAB_FILENAME).is_file()):
            model.set_vocab(cand)
            break
    else:
        raise WeightsNotFoundError(
            f"BERT vocabulary for {card.name!r} not found (looked at "
            + ", ".join(str(c) for c in candidates) + ").",
            hint=f"Download bert-base-uncased's vocab.txt ({BERT_VOCAB_URL}) and place it next "
            "to the checkpoint, or pass vocab=PATH.",
        )
    model = model.to(device=device)
    if dtype is not None:
        model = model.to(dtype=dtype)
    return model.eval()
