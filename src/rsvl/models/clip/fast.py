"""``--fast`` on the CPU: an open_clip network with int8 weights in every linear layer.

Two steps, in place, at load time:

1. Every ``nn.MultiheadAttention`` of the transformers becomes :class:`ProjAttention`:
   the same packed ``in_proj`` / ``out_proj`` weights as ``nn.Linear`` layers and
   ``F.scaled_dot_product_attention`` (same outputs up to float rounding). PyTorch's
   attention keeps its input projection as a bare parameter, which dynamic quantisation
   cannot reach; as linear layers it can, and the projections are a third of a ViT block's
   multiply-adds.
2. ``torch.ao.quantization.quantize_dynamic`` with per-channel int8 weights on every
   ``nn.Linear`` of the transformers (attention projections, MLPs): activations are
   quantised per batch at run time, the int8 GEMMs run in oneDNN (x86; else FBGEMM) or
   QNNPACK (ARM). The final projections, patch embedding and layer norms stay
   float.

What it costs is accuracy, stated in ``BENCHMARKS.md`` (``bench/clip_speed.py`` reports the
largest cosine distance between the float and int8 embeddings of the same inputs). It
applies to float32 models on the CPU only; CUDA has its own fast path (bfloat16, the default
there).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rsvl.models.int8 import quantize_linear


class ProjAttention(nn.Module):
    """Self-attention with its projections as ``nn.Linear`` (quantisable), a drop-in for the
    ``nn.MultiheadAttention`` of an open_clip ``ResidualAttentionBlock``."""

    def __init__(self, mha: nn.MultiheadAttention) -> None:
        super().__init__()
        if not getattr(mha, "_qkv_same_embed_dim", True) or mha.in_proj_weight is None:
            raise ValueError("ProjAttention needs packed q/k/v projection weights")
        e = int(mha.embed_dim)
        self.num_heads = int(mha.num_heads)
        self.embed_dim = e
        self.batch_first = bool(mha.batch_first)
        bias = mha.in_proj_bias is not None
        self.in_proj = nn.Linear(e, 3 * e, bias=bias)
        self.out_proj = nn.Linear(e, e, bias=mha.out_proj.bias is not None)
        with torch.no_grad():
            self.in_proj.weight.copy_(mha.in_proj_weight)
            if bias:
                self.in_proj.bias.copy_(mha.in_proj_bias)
            self.out_proj.weight.copy_(mha.out_proj.weight)
            if mha.out_proj.bias is not None:
                self.out_proj.bias.copy_(mha.out_proj.bias)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor | None = None,
        value: torch.Tensor | None = None,
        need_weights: bool = False,
        attn_mask: torch.Tensor | None = None,
        **_: object,
    ) -> tuple[torch.Tensor, None]:
        if (key is not None and key is not query) or (value is not None and value is not query):
            raise NotImplementedError("ProjAttention is self-attention only (key and value are the query)")
        x = query if self.batch_first else query.transpose(0, 1)
        b, n, c = x.shape
        h = self.num_heads
        q, k, v = self.in_proj(x).reshape(b, n, 3, h, c // h).permute(2, 0, 3, 1, 4)
        if attn_mask is not None and attn_mask.dtype != torch.bool:
            attn_mask = attn_mask.to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        out = self.out_proj(out.transpose(1, 2).reshape(b, n, c))
        return (out if self.batch_first else out.transpose(0, 1)), None


def in_projection(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """q, k, v packed along the last axis: ``attn``'s input projection of ``x`` (an
    ``nn.MultiheadAttention`` or a :class:`ProjAttention`, float or int8)."""
    if isinstance(attn, ProjAttention):
        return attn.in_proj(x)
    return F.linear(x, attn.in_proj_weight, attn.in_proj_bias)


def split_attention(net: nn.Module) -> int:
    """Replace every packed-projection ``nn.MultiheadAttention`` in ``net`` by a
    :class:`ProjAttention` in place; returns how many were replaced."""
    swaps = []
    for parent in net.modules():
        for name, child in parent.named_children():
            if isinstance(child, nn.MultiheadAttention) and child._qkv_same_embed_dim:
                swaps.append((parent, name, child))
    for parent, name, child in swaps:
        setattr(parent, name, ProjAttention(child))
    return len(swaps)


def accelerate_cpu(net: nn.Module) -> nn.Module:
    """The ``--fast`` CPU path for an open_clip network (float32, eval mode, in place): in
    each transformer (image and text towers), :func:`split_attention` then
    :func:`quantize_linear`. A ModifiedResNet's convolutions and attention pool stay float
    (the dense path reads the pool's weights)."""
    net = net.float().eval()
    towers = [m for m in net.modules() if isinstance(getattr(m, "resblocks", None), nn.ModuleList)]
    for tower in towers:
        split_attention(tower)
        quantize_linear(tower)
    return net


__all__ = ["ProjAttention", "accelerate_cpu", "in_projection", "quantize_linear", "split_attention"]
