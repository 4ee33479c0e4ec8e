"""FIANet's architecture and text settings (:class:`FianetConfig`): the published RRSIS-D
and RefSegRS settings and a tiny one for tests."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Literal

from rsvl.data.refer_text import (
    REFSEGRS_CLASS_NAMES,
    REFSEGRS_MAX_TOKENS,
    RRSISD_CLASS_NAMES,
    RRSISD_MAX_TOKENS,
)

#: ImageNet normalisation on the 0-1 scale (upstream ``T.Normalize``)
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


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


__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "FianetConfig"]
