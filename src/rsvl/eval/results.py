"""Shared pieces of every protocol: class names as prompts, results, settings, subsets."""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rsvl import __version__
from rsvl.data.scenes import read_rgb
from rsvl.errors import OutputError
from rsvl.io import write_text
from rsvl.models.preprocess import square_image
from rsvl.models.registry import get_card
from rsvl.models.weights import is_available_offline, resolve_weights, sha256_file

Progress = Callable[[int], None] | None



#: Dataset class names written without spaces -> the words used in prompts. The one place
#: where benchmark folder names become readable (UC Merced, AID, NWPU-RESISC45, PatternNet).
PROMPT_NAMES: dict[str, str] = {
    "baseballdiamond": "baseball diamond",
    "denseresidential": "dense residential",
    "golfcourse": "golf course",
    "mediumresidential": "medium residential",
    "mobilehomepark": "mobile home park",
    "parkinglot": "parking lot",
    "sparseresidential": "sparse residential",
    "storagetanks": "storage tanks",
    "tenniscourt": "tennis court",
    "bareland": "bare land",
    "baseballfield": "baseball field",
    "railwaystation": "railway station",
    "storagetank": "storage tank",
    "basketballcourt": "basketball court",
    "footballfield": "football field",
    "oiltank": "oil tank",
    "oilgasfield": "oil gas field",
    "closedroad": "closed road",
    "crosswalk": "crosswalk",
    "ferryterminal": "ferry terminal",
    "christmastreefarm": "christmas tree farm",
    "coastalmansion": "coastal mansion",
    "nursinghome": "nursing home",
    "shippingyard": "shipping yard",
    "solarpanel": "solar panel",
    "swimmingpool": "swimming pool",
    "transformerstation": "transformer station",
    "wastewatertreatmentplant": "wastewater treatment plant",
}

_CAMEL = re.compile(r"(?<=[a-z])(?=[A-Z])")


def prompt_name(name: str) -> str:
    """The readable form of a dataset class name: ``PROMPT_NAMES``, else ``_``/``-`` and
    CamelCase split into words (``BaseballField`` -> ``baseball field``)."""
    key = name.strip()
    if key.lower() in PROMPT_NAMES:
        return PROMPT_NAMES[key.lower()]
    words = _CAMEL.sub(" ", key).replace("_", " ").replace("-", " ")
    return " ".join(words.split()).lower()




@dataclass
class EvalResult:
    """One evaluation: ``metrics`` (every number) and ``settings`` (how it was run)."""
    task: str
    metrics: dict[str, Any]
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return finite({"task": self.task, "metrics": self.metrics, "settings": self.settings})


def finite(x: Any) -> Any:
    """NaN/inf -> None (JSON has no NaN), numpy scalars -> Python, recursively."""
    if isinstance(x, dict):
        return {str(k): finite(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [finite(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, Path):
        return str(x)
    return x


def write_result(result: EvalResult, path: str | Path, overwrite: bool = True) -> Path:
    """Write ``result.to_dict()`` as JSON, atomically (temporary name, then rename)."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputError(f"{path} exists.", hint="Pass --overwrite or choose another name.")
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_text(path, json.dumps(result.to_dict(), indent=2, allow_nan=False) + "\n")


def base_settings(task: str, dataset: str | Path) -> dict[str, Any]:

    return {"task": task, "rsvl_version": __version__, "dataset": str(Path(dataset).resolve())}


def model_settings(model: Any, model_name: str | None = None, weights: str | Path | None = None) -> dict[str, Any]:
    """Model name, weights file and sha256 (explicit ``weights``, else the model card's file
    when it is available offline; None when unknown)."""
    name = model_name or getattr(model, "name", None) or type(model).__name__
    path: Path | None = Path(weights) if weights is not None else None
    if path is None:
        try:

            card = get_card(name)
            if is_available_offline(card):
                path = resolve_weights(card)
        except Exception:  # a test model, or a card without a file: no weights to record
            path = None
    sha = None
    if path is not None and path.is_file():

        sha = sha256_file(path)
    return {"model": name, "weights": None if path is None else str(path.resolve()), "weights_sha256": sha}


def subset_indices(n: int, limit: int | None) -> np.ndarray:
    """``limit`` evenly spaced indices of ``range(n)`` (all when ``limit`` is None or >= n).

    Readers list samples grouped by class, so the first N would be one class; evenly spaced
    indices cover them all and are the same on every run.
    """
    if limit is None or limit >= n:
        return np.arange(n)
    if limit < 1:
        raise ValueError("limit must be >= 1")
    return np.unique(np.round(np.linspace(0, n - 1, limit)).astype(np.int64))


def load_square(path: Path, size: int) -> np.ndarray:

    return square_image(np.ascontiguousarray(read_rgb(path).transpose(2, 0, 1)), size)


def sample_settings(n_used: int, n_dataset: int, limit: int | None, batch_size: int) -> dict[str, Any]:
    """The settings every protocol records about which samples it scored and how."""
    return {
        "n_samples": n_used,
        "n_dataset": n_dataset,
        "limit": limit,
        "subset": "evenly spaced" if n_used < n_dataset else "all",
        "batch_size": batch_size,
    }


def finish(task: str, metrics: dict[str, Any], settings: dict[str, Any], t0: float) -> EvalResult:
    """The protocol's :class:`EvalResult`, with the wall time since ``t0`` in its settings."""
    settings["seconds"] = round(time.perf_counter() - t0, 3)
    return EvalResult(task, metrics, settings)

