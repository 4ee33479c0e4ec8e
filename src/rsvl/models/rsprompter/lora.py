"""LoRA adapters on the SAM ViT (peft) and freezing."""

from __future__ import annotations

from torch import nn

from rsvl.errors import RsvlError


def apply_lora(encoder: nn.Module, r: int = 16, alpha: int = 32, dropout: float = 0.05) -> nn.Module:
    """Add peft LoRA adapters to every ``qkv`` Linear of a SAM ViT; only they stay trainable."""
    # lazy: peft pulls in transformers (about 5 s measured on this machine, more than
    # torch itself), and only LoRA training needs it; the registry imports this family
    try:
        from peft import LoraConfig, inject_adapter_in_model  # lazy: see the comment above
    except ImportError as exc:  # pragma: no cover - peft is a dependency
        raise RsvlError("LoRA needs the peft package.", hint="pip install peft") from exc
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=["qkv"], bias="none")
    inject_adapter_in_model(cfg, encoder)
    for name, p in encoder.named_parameters():
        p.requires_grad = "lora_" in name
    return encoder


def freeze(module: nn.Module) -> None:
    """Stop gradients to every parameter of ``module``."""
    for p in module.parameters():
        p.requires_grad = False
