"""``--fast`` for SAM on the CPU: the ViT image encoder with int8 linear layers.

The image encoder is nearly all of SAM's time (a 1024 x 1024 image through ViT-B is about
370 GFLOPs; a prompt through the decoder well under 1 %), and its linear layers (q/k/v and
output projections, MLPs) most of the encoder's. They become dynamic int8 layers
(:func:`rsvl.models.int8.quantize_linear`); the patch embedding, relative positions,
attention itself and the convolution neck stay float32. LoRA adapters (RSPrompter trained
with ``--lora``) are merged into their linear layers first, so the int8 weights are the
adapted ones. Speed and the embedding difference: ``bench/sam_speed.py``, BENCHMARKS.md.
"""

from __future__ import annotations

from torch import nn

from rsvl.models.int8 import quantize_linear


def merge_adapters(net: nn.Module) -> int:
    """Merge every peft LoRA layer of ``net`` into its base linear layer and put the base
    layer in its place, in place; returns how many were merged."""
    swaps = []
    for parent in net.modules():
        for name, child in parent.named_children():
            if hasattr(child, "base_layer") and callable(getattr(child, "merge", None)):
                swaps.append((parent, name, child))
    for parent, name, child in swaps:
        child.merge()
        setattr(parent, name, child.get_base_layer())
    return len(swaps)


def accelerate_encoder(encoder: nn.Module) -> nn.Module:
    """SAM's image encoder (float32, on the CPU) with LoRA merged and int8 linear layers, in
    place, in eval mode."""
    encoder = encoder.float().eval()
    merge_adapters(encoder)
    for p in encoder.parameters():
        p.requires_grad = False
    quantize_linear(encoder)
    return encoder


__all__ = ["accelerate_encoder", "merge_adapters"]
