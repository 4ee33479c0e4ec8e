"""rsvl: remote-sensing vision-language models on real georeferenced rasters.

Importing rsvl is cheap: torch and the model families are imported only when a model is
loaded, so ``rsvl info`` and the geospatial layer work without touching them.
"""

from __future__ import annotations

__version__ = "0.1.0"

from rsvl.errors import RsvlError

__all__ = ["RsvlError", "__version__", "load"]


def __getattr__(name: str):
    if name == "load":
        # lazy: rsvl.api imports torch and every model family (see rsvl.cli for the cost);
        # `import rsvl` stays cheap for the CLI and the geospatial layer
        from rsvl.api import load

        return load
    raise AttributeError(f"module 'rsvl' has no attribute {name!r}")
