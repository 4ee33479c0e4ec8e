"""Helpers of the service tests (tests/serve): one model loader for the whole session (each
shipped mini model loads once however many apps the tests build) and small images."""

from __future__ import annotations

import base64
import io
import threading
from typing import Any

import numpy as np
from PIL import Image

import rsvl

_MODELS: dict[str, Any] = {}
_LOCK = threading.Lock()


def shared_loader(name: str, device: str) -> Any:
    """rsvl.load, once per model for the whole test session."""
    with _LOCK:
        if name not in _MODELS:
            _MODELS[name] = rsvl.load(name, device=device)
        return _MODELS[name]


def png_bytes(size: int = 48, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def png_b64(size: int = 48, seed: int = 0) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(size, seed)).decode()
