"""Family packages whose names are imported on first use.

A family package (``rsvl.models.clip`` ...) lists its cards at import time and nothing else:
the modules behind its other names import open_clip, transformers or torchvision, which cost
seconds each, and a process that loads one built-in model needs none of the other families'
libraries (``bench/load_time.py``; the numbers are in BENCHMARKS.md). The package gives its
names and their modules to :func:`lazy_names`, which becomes its module ``__getattr__``
(PEP 562): ``from rsvl.models.clip import ClipModel`` and ``clip.load_clip`` work as before.
An import error in a family still surfaces at once, at the first use of the family (and in
``tests/models/test_families.py``, which imports every name of every family).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any


def lazy_names(package: str, names: Mapping[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``package`` that imports ``names[name]`` (a sub-module
    of the package) on first access of ``name`` and keeps the value in the package."""

    def __getattr__(name: str) -> Any:
        module = names.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{module}"), name)
        setattr(sys.modules[package], name, value)
        return value

    return __getattr__


__all__ = ["lazy_names"]
