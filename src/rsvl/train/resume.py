"""Resuming a Lightning run from its own checkpoint, safely.

Lightning's ``Trainer.fit(ckpt_path=...)`` unpickles the checkpoint. It is told
``weights_only=True`` explicitly (the default has changed between torch and Lightning
versions), so a file that pickles Python objects is refused, never executed; the refusal is
the same one-line :class:`rsvl.errors.CheckpointMismatchError` that
:mod:`rsvl.models.checkpoint` gives, not torch's multi-line advice to turn the safety off.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

from rsvl.models.checkpoint import refused_objects

RESUME_HINT = ("A resume checkpoint is written by rsvl's own training run: delete it (and "
               "drop --resume) to start again, or resume from the run's own last.ckpt.")


def fit(trainer: Any, module: Any, *args: Any, ckpt_path: str | Path | None = None, **kwargs: Any) -> None:
    """``trainer.fit(module, *args, **kwargs)``, resuming from ``ckpt_path`` (if given)
    with the weights-only unpickler."""
    if ckpt_path is None:
        trainer.fit(module, *args, **kwargs)
        return
    try:
        trainer.fit(module, *args, ckpt_path=str(ckpt_path), weights_only=True, **kwargs)
    except pickle.UnpicklingError as exc:
        raise refused_objects(Path(ckpt_path), "Resume checkpoint", exc, RESUME_HINT) from exc


__all__ = ["RESUME_HINT", "fit"]
