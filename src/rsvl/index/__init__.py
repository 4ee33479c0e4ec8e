"""Embedding index: FAISS vectors + Parquet metadata + JSON manifest in one folder.

See :mod:`rsvl.index.store`. Building and querying an index from images and rasters is the
task :mod:`rsvl.tasks.search`.
"""

from __future__ import annotations

from rsvl.errors import IndexCorruptError, IndexNotFoundError, ModelMismatchError
from rsvl.index.store import (
    DEFAULT_IVF_THRESHOLD,
    EmbeddingIndex,
    IndexConfig,
    write_index,
)

__all__ = [
    "DEFAULT_IVF_THRESHOLD",
    "EmbeddingIndex",
    "IndexConfig",
    "IndexCorruptError",
    "IndexNotFoundError",
    "ModelMismatchError",
    "write_index",
]
