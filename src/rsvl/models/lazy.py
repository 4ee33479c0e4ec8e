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
from types import ModuleType
from typing import Any


class FamilyModule(ModuleType):
    """A family package whose function ``build`` (say) lives in a sub-module ``build``.

    Importing a sub-module sets it as an attribute of its package, which would hide the
    function of the same name once anything imports ``rsvl.models.<family>.build``; the
    package keeps the function instead (what ``from .build import build`` in an eager
    ``__init__`` gave)."""

    def __setattr__(self, attr: str, value: Any) -> None:
        names = self.__dict__.get("lazy_names", {})
        if isinstance(value, ModuleType) and names.get(attr) == attr and value.__name__ == f"{self.__name__}.{attr}":
            value = getattr(value, attr)
        super().__setattr__(attr, value)


def lazy_names(package: str, names: Mapping[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``package`` that imports ``names[name]`` (a sub-module
    of the package) on first access of ``name`` and keeps the value in the package."""
    module = sys.modules[package]
    module.lazy_names = dict(names)
    module.__class__ = FamilyModule

    def __getattr__(name: str) -> Any:
        module = names.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{module}"), name)
        setattr(sys.modules[package], name, value)
        return value

    return __getattr__


__all__ = ["FamilyModule", "lazy_names"]
