"""SAM's architecture as data: :class:`SamConfig` (every size of a SAM model) and its
translation from a transformers ``SamConfig`` (``config.json``)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any


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
