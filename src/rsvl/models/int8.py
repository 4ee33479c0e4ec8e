"""Dynamic int8 linear layers on the CPU: the shared step of every ``--fast`` path.

``torch.ao.quantization.quantize_dynamic`` with per-channel int8 weights: activations are
quantised per batch at run time and the int8 GEMMs run in oneDNN (x86; else FBGEMM) or
QNNPACK (ARM). Used by the CLIP towers (:mod:`rsvl.models.clip.fast`) and SAM's ViT
(:mod:`rsvl.models.sam.fast`); what it costs in accuracy is measured per model in
``BENCHMARKS.md``.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from rsvl.errors import DeviceError


def quantize_linear(net: nn.Module) -> nn.Module:
    """``net`` (float32, eval) with every ``nn.Linear`` as a dynamic int8 linear layer
    (per-channel weight scales), in place."""
    engines = torch.backends.quantized.supported_engines
    # oneDNN was the fastest of the three x86 engines on the AVX2 CPU this was measured on
    # (ViT-B-16 image tower, same accuracy); QNNPACK on ARM
    engine = next((e for e in ("onednn", "x86", "fbgemm", "qnnpack") if e in engines), None)
    if engine is None:
        raise DeviceError(
            "--fast needs PyTorch's int8 kernels (FBGEMM or QNNPACK), and this PyTorch build has none.",
            hint="Run without --fast, or install the PyTorch wheel from pytorch.org for this CPU.",
        )
    quantize = getattr(getattr(torch.ao, "quantization", None), "quantize_dynamic", None)
    if quantize is None:  # deprecated upstream in favour of torchao; present up to 2.14 at least
        raise DeviceError(
            f"--fast uses torch.ao.quantization.quantize_dynamic, which PyTorch {torch.__version__} no longer has.",
            hint="Run without --fast, or install a PyTorch release that still ships it.",
        )
    torch.backends.quantized.engine = engine
    with warnings.catch_warnings():
        # its deprecation notices (eager quantisation moves to torchao) are not the user's to act on
        warnings.filterwarnings("ignore", message=r"torch\.ao\.quantization is deprecated")
        warnings.filterwarnings("ignore", message=r".*quantize_per_(tensor|channel).*deprecated")
        net = quantize(
            net, {nn.Linear: torch.ao.quantization.per_channel_dynamic_qconfig}, dtype=torch.qint8, inplace=True
        )
    for mod in net.modules():
        if isinstance(mod, torch.ao.nn.quantized.dynamic.Linear):
            # open_clip asks a block's first MLP layer for the activation dtype (its int8 hook)
            mod.int8_original_dtype = torch.float32
    return net


def is_int8(net: nn.Module) -> bool:
    """Whether any linear layer of ``net`` runs in int8 (:func:`quantize_linear`)."""
    return any(isinstance(m, torch.ao.nn.quantized.dynamic.Linear) for m in net.modules())


__all__ = ["is_int8", "quantize_linear"]
