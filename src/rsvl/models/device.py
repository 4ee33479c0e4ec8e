"""The one place a requested device is checked against the machine.

``--device cuda`` on a machine without a usable GPU would otherwise fail deep inside torch
(``Torch not compiled with CUDA enabled`` / ``no CUDA GPUs are available``) with a
traceback; here it is one line that says what to pass instead.
"""

from __future__ import annotations

import torch

from rsvl.errors import DeviceError


def check_device(device: str | torch.device | None) -> str:
    """``device`` as a string torch accepts, after checking that this machine has it.

    ``None`` and ``"auto"`` give ``"cuda"`` when a GPU is usable, else ``"cpu"``.
    """
    text = "auto" if device is None else str(device).strip().lower()
    if text in ("", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if text == "gpu":
        text = "cuda"
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError) as exc:
        raise DeviceError(f"unknown device {device!r}.", hint="Pass --device cpu, cuda, cuda:N or auto.") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"--device {device} was asked for, but this machine has no usable CUDA GPU.",
                              hint="Pass --device cpu (or auto, which uses a GPU only when there is one).")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise DeviceError(f"--device {device}: this machine has {count} CUDA GPU(s), numbered 0-{count - 1}.",
                              hint="Pass --device cuda:0 (or another index below the count).")
    elif dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise DeviceError(f"--device {device} was asked for, but this machine has no usable MPS device.",
                              hint="Pass --device cpu.")
    return text


__all__ = ["check_device"]
