"""The on-disk embedding index: a folder with a FAISS index, a Parquet table and a manifest.

Layout of an index folder::

    manifest.json              model, dim, normalisation, count, index type, files, settings
    vectors-000001.faiss       L2-normalised float32 embeddings (inner product = cosine)
    metadata-000001.parquet    one row per vector, in the FAISS order

The FAISS index type is chosen by ``IndexConfig.index_type``:

* ``auto`` (default): exact ``IndexFlatIP`` up to ``ivf_threshold`` vectors, an
  ``IndexIVFFlat`` trained on the data above it (``bench/search_scale.py`` measures the
  choice);
* ``flat``: always exact;
* ``ivf``: ``IndexIVFFlat`` with ``nlist`` lists, ``nprobe`` probed per query;
* ``hnsw``: ``IndexHNSWFlat`` (a graph of ``hnsw_m`` neighbours per vector, built with
  ``ef_construction`` and searched with ``ef_search`` candidates), no training.

What was chosen (type, nlist/nprobe or the HNSW settings) is recorded in the manifest, and
what was asked in ``index_config`` so that ``add`` rebuilds the same kind. Every type stores
the full vectors, so an index can be rebuilt (e.g. on ``add``) without re-embedding anything.

Writes never leave a half-written index under the final name: a new index is written to a
temporary sibling folder and renamed into place; an existing index gets a new generation of
files and then its manifest is replaced atomically (``os.replace``), after which the old
generation is deleted. A crash leaves either the old index or the new one, plus at most a
few orphan files that the next write removes.

Nothing here knows about models or rasters.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from rsvl import __version__
from rsvl.errors import (
    IndexCorruptError,
    IndexNotFoundError,
    IndexOptionError,
    ModelMismatchError,
    OutputError,
)
from rsvl.io import TMP_MARK, atomic_dir, atomic_path, write_text

MANIFEST = "manifest.json"
#: largest manifest.json an index may have (rsvl's are about 1 KB)
MANIFEST_MAX_BYTES = 1 << 20
FORMAT = "rsvl-index"
FORMAT_VERSION = 1
#: above this many vectors an IVF index is built instead of an exact flat one
DEFAULT_IVF_THRESHOLD = 50_000
#: the index types ``IndexConfig.index_type`` (and ``rsvl index build --index-type``) accepts
INDEX_TYPES = ("auto", "flat", "ivf", "hnsw")
#: HNSW defaults: neighbours per vector, candidates while building and while searching
DEFAULT_HNSW_M = 32
DEFAULT_EF_CONSTRUCTION = 80
DEFAULT_EF_SEARCH = 64

_GEN_FILE = re.compile(r"^(vectors|metadata)-(\d{6})\.(faiss|parquet)(\.tmp)?$")


__all__ = [
    "DEFAULT_EF_CONSTRUCTION",
    "DEFAULT_EF_SEARCH",
    "DEFAULT_HNSW_M",
    "DEFAULT_IVF_THRESHOLD",
    "INDEX_TYPES",
    "EmbeddingIndex",
    "IndexConfig",
    "check_output",
    "make_faiss_index",
    "metadata_schema",
    "write_index",
]


def _build_hint(path: str | os.PathLike[str]) -> str:
    return f"Build it first: `rsvl index build SOURCES... -o {path}`."


#: the metadata columns, in order (see module doc of rsvl.tasks.search for their meaning)
def metadata_schema() -> pa.Schema:
    return pa.schema(
        [
            ("id", pa.int64()),
            ("source", pa.string()),
            ("source_size", pa.int64()),
            ("source_mtime_ns", pa.int64()),
            ("kind", pa.string()),  # "image" (whole file) | "tile"
            ("row", pa.int32()),
            ("col", pa.int32()),
            ("win_col", pa.int64()),
            ("win_row", pa.int64()),
            ("win_width", pa.int64()),
            ("win_height", pa.int64()),
            ("valid_fraction", pa.float32()),
            ("crs", pa.string()),
            ("geometry", pa.binary()),  # WKB footprint in the source CRS
            ("geometry_4326", pa.binary()),  # WKB footprint in EPSG:4326
            ("model", pa.string()),
            ("dim", pa.int32()),
        ]
    )


@dataclass(frozen=True)
class IndexConfig:
    """How the FAISS index is chosen (see the module doc). None: derived from the count or
    the defaults. :meth:`check` raises :class:`IndexOptionError` for values rsvl cannot build."""

    ivf_threshold: int = DEFAULT_IVF_THRESHOLD
    nlist: int | None = None
    nprobe: int | None = None
    index_type: str = "auto"
    hnsw_m: int | None = None
    ef_construction: int | None = None
    ef_search: int | None = None

    def check(self) -> IndexConfig:
        """This config, its index type lower-cased; raises on values rsvl cannot build."""
        kind = str(self.index_type).lower()
        if kind not in INDEX_TYPES:
            raise IndexOptionError(f"unknown index type {self.index_type!r}.",
                                   hint=f"Use one of: {', '.join(INDEX_TYPES)}.")
        for name, low, high in (("ivf_threshold", 0, None), ("nlist", 1, None), ("nprobe", 1, None),
                                ("hnsw_m", 2, 256), ("ef_construction", 1, None), ("ef_search", 1, None)):
            value = getattr(self, name)
            if value is None:
                continue
            if int(value) < low or (high is not None and int(value) > high):
                bound = f"between {low} and {high}" if high is not None else f"at least {low}"
                raise IndexOptionError(f"{name.replace('_', ' ')} must be {bound}, got {value}.",
                                       hint="Leave it out to use the default.")
        return IndexConfig(self.ivf_threshold, self.nlist, self.nprobe, kind, self.hnsw_m,
                           self.ef_construction, self.ef_search)

    def to_manifest(self) -> dict[str, Any]:
        """What was asked, as recorded under ``index_config`` in the manifest."""
        return {"type": self.index_type, "threshold": int(self.ivf_threshold), "nlist": self.nlist,
                "nprobe": self.nprobe, "hnsw_m": self.hnsw_m, "ef_construction": self.ef_construction,
                "ef_search": self.ef_search}

    @classmethod
    def from_manifest(cls, manifest: Mapping[str, Any]) -> IndexConfig:
        """The config an index was asked with (indexes written before ``index_config``
        recorded only the IVF settings, under ``ivf_config``)."""
        asked = manifest.get("index_config") or manifest.get("ivf_config") or {}
        threshold = asked.get("threshold", manifest.get("ivf_threshold", DEFAULT_IVF_THRESHOLD))
        return cls(int(threshold), asked.get("nlist"), asked.get("nprobe"), str(asked.get("type") or "auto"),
                   asked.get("hnsw_m"), asked.get("ef_construction"), asked.get("ef_search"))


def _normalise(vectors: np.ndarray) -> np.ndarray:
    v = np.ascontiguousarray(vectors, dtype=np.float32)
    if v.ndim != 2:
        raise ValueError(f"embeddings must be (N, D), got shape {v.shape}")
    norms = np.linalg.norm(v, axis=1, keepdims=True)
    return np.ascontiguousarray(v / np.maximum(norms, 1e-12), dtype=np.float32)


def make_faiss_index(vectors: np.ndarray, config: IndexConfig = IndexConfig()) -> tuple[Any, dict[str, Any]]:
    """An inner-product index of the configured type holding ``vectors``, and what was chosen."""
    config = config.check()
    n, d = vectors.shape
    kind = config.index_type
    if kind == "auto":
        kind = "flat" if n <= config.ivf_threshold else "ivf"
    chosen: dict[str, Any] = {"index_type": "", "exact": False, "nlist": None, "nprobe": None,
                              "hnsw_m": None, "ef_construction": None, "ef_search": None}
    if kind == "flat" or n == 0:
        index = faiss.IndexFlatIP(d)
        index.add(vectors)
        return index, {**chosen, "index_type": "flat-ip", "exact": True}
    if kind == "hnsw":
        m = int(config.hnsw_m or DEFAULT_HNSW_M)
        index = faiss.IndexHNSWFlat(d, m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = int(config.ef_construction or DEFAULT_EF_CONSTRUCTION)
        index.hnsw.efSearch = int(config.ef_search or DEFAULT_EF_SEARCH)
        index.add(vectors)
        return index, {**chosen, "index_type": "hnsw-flat", "hnsw_m": m,
                       "ef_construction": int(index.hnsw.efConstruction), "ef_search": int(index.hnsw.efSearch)}
    # FAISS wants >= 39 training points per list; sqrt-scaled lists otherwise.
    nlist = config.nlist or int(round(4 * math.sqrt(n)))
    nlist = max(1, min(nlist, n // 39 if n >= 39 else 1))
    nprobe = min(config.nprobe or max(1, int(math.ceil(nlist / 16))), nlist)
    quantizer = faiss.IndexFlatIP(d)
    index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = 1234
    index.train(vectors)
    index.add(vectors)
    index.nprobe = nprobe
    return index, {**chosen, "index_type": "ivf-flat", "nlist": nlist, "nprobe": nprobe}


#: the FAISS index types ``rsvl index build`` writes (flat, IVF-flat and HNSW-flat, inner product)
FAISS_FOURCCS = (b"IxFI", b"IwFl", b"IHNf")


def check_faiss_header(path: Path, count: int, dim: int, rebuild: str, *, hnsw_m: int | None = None) -> None:
    """Refuse a vectors file that is not what the manifest describes before FAISS parses it.

    FAISS trusts the sizes in a file: a crafted header asks it for terabytes (or makes it read
    past the data). The file must be an index type rsvl writes, with the manifest's dimension
    and count, and no larger than such an index can be (float32 vectors, an IVF quantizer of
    at most ``count`` centroids, ids, an HNSW graph of ``hnsw_m`` neighbours per vector per
    level, and a few KB of headers)."""
    head = b""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(16)
    except OSError as exc:
        raise IndexCorruptError(f"{path}: unreadable ({exc}).", hint=rebuild) from exc
    if len(head) < 16 or head[:4] not in FAISS_FOURCCS:
        raise IndexCorruptError(f"{path} is not a FAISS index rsvl writes (type {head[:4]!r}).", hint=rebuild)
    d, ntotal = struct.unpack("<i", head[4:8])[0], struct.unpack("<q", head[8:16])[0]
    if d != dim or ntotal != count:
        raise IndexCorruptError(
            f"{path}: the file says {ntotal} vectors of dim {d}, the manifest {count} of dim {dim}.", hint=rebuild)
    graph = 16 * max(int(hnsw_m or 0), 0)  # level 0 holds 2M ids, the upper levels ~M/(M-1) more
    limit = 3 * 4 * dim * max(count, 1) + (16 + graph) * max(count, 1) + (1 << 20)
    if size > limit:
        raise IndexCorruptError(f"{path}: {size} bytes, more than an index of {count} x {dim} vectors can be.",
                                hint=rebuild)


def _array(vector: Any) -> np.ndarray:
    """A zero-copy numpy view of a FAISS std::vector."""
    n = int(vector.size())
    return faiss.rev_swig_ptr(vector.data(), n) if n else np.zeros(0, np.int64)


def check_hnsw_graph(index: Any, path: Path, count: int, rebuild: str) -> None:
    """Refuse an HNSW graph FAISS would walk out of bounds: a crafted file's neighbour ids,
    offsets, levels or entry point are used by ``search`` without any check."""
    h = index.hnsw
    levels, offsets, neighbors = _array(h.levels), _array(h.offsets), _array(h.neighbors)
    cum = _array(h.cum_nneighbor_per_level).astype(np.int64)
    problem = None
    if index.storage is None or index.storage.ntotal != count or index.storage.d != index.d:
        problem = "its vector storage does not hold the index's vectors"
    elif len(levels) != count or len(offsets) != count + 1:
        problem = f"{len(levels)} levels and {len(offsets)} offsets for {count} vectors"
    elif count and (levels.min() < 1 or levels.max() >= len(cum)):
        problem = "a vector's level is out of range"
    elif count and (offsets[0] != 0 or int(offsets[-1]) != len(neighbors)
                    or not np.array_equal(np.diff(offsets.astype(np.int64)), cum[levels])):
        problem = "the neighbour lists do not match the levels"
    elif len(neighbors) and (neighbors.min() < -1 or neighbors.max() >= count):
        problem = "a neighbour id is out of range"
    elif count and not (0 <= h.entry_point < count and h.max_level == int(levels.max()) - 1):
        problem = "the entry point or top level is out of range"
    if problem:
        raise IndexCorruptError(f"{path}: not a valid HNSW graph ({problem}).", hint=rebuild)


class EmbeddingIndex:
    """An index folder opened for reading: manifest, metadata table and FAISS index."""

    def __init__(self, path: Path, manifest: dict[str, Any], metadata: Any, faiss_index: Any) -> None:
        self.path = path
        self.manifest = manifest
        self.metadata = metadata  # pyarrow.Table, row i <-> FAISS vector i
        self._faiss = faiss_index

    # -- opening -----------------------------------------------------------------------------

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> EmbeddingIndex:
        p = Path(path)
        if not p.exists():
            raise IndexNotFoundError(f"{p}: no index here.", hint=_build_hint(p))
        if not p.is_dir():
            raise IndexCorruptError(f"{p} is a file, not an rsvl index folder.", hint=_build_hint(p))
        mpath = p / MANIFEST
        if not mpath.exists():
            raise IndexNotFoundError(f"{p} is not an rsvl index (no {MANIFEST}).", hint=_build_hint(p))
        rebuild = f"Rebuild it: `rsvl index build SOURCES... -o {p} --overwrite`."
        try:
            if mpath.stat().st_size > MANIFEST_MAX_BYTES:  # rsvl writes ~1 KB; never read a huge one
                raise ValueError(f"{mpath.stat().st_size} bytes, more than any manifest rsvl writes")
            manifest = json.loads(mpath.read_text())
        except (OSError, ValueError) as exc:
            raise IndexCorruptError(f"{mpath} is unreadable ({exc}).", hint=rebuild) from exc
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise IndexCorruptError(f"{mpath} is not an rsvl index manifest.", hint=rebuild)
        if int(manifest.get("format_version", 0)) > FORMAT_VERSION:
            raise IndexCorruptError(
                f"{p} was written by a newer rsvl (index format {manifest.get('format_version')}).",
                hint="Upgrade rsvl, or rebuild the index with this version.",
            )
        try:
            files = manifest["files"]
            vpath, mdpath = p / files["vectors"], p / files["metadata"]
            count, dim = int(manifest["count"]), int(manifest["dim"])
        except (KeyError, TypeError, ValueError) as exc:
            raise IndexCorruptError(f"{mpath} lacks {exc}.", hint=rebuild) from exc
        for f in (vpath, mdpath):
            if not f.exists():
                raise IndexCorruptError(f"{p}: {f.name} is missing.", hint=rebuild)
        hnsw_m = manifest.get("hnsw_m")
        if hnsw_m is not None and not (isinstance(hnsw_m, int) and 2 <= hnsw_m <= 256):
            raise IndexCorruptError(f"{mpath}: hnsw_m {hnsw_m!r} is not a valid HNSW setting.", hint=rebuild)
        check_faiss_header(vpath, count, dim, rebuild, hnsw_m=hnsw_m)
        try:
            index = faiss.read_index(str(vpath))
        except Exception as exc:  # faiss raises RuntimeError with a C++ message
            raise IndexCorruptError(f"{vpath}: FAISS cannot read it ({str(exc).strip().splitlines()[0]}).", hint=rebuild) from exc
        if isinstance(index, faiss.IndexHNSW):
            check_hnsw_graph(index, vpath, count, rebuild)
        try:
            meta = pq.read_table(mdpath)
        except Exception as exc:
            raise IndexCorruptError(f"{mdpath}: not a readable Parquet file ({exc}).", hint=rebuild) from exc
        if index.ntotal != count or meta.num_rows != count or index.d != dim:
            raise IndexCorruptError(
                f"{p}: manifest says {count} vectors of dim {dim}, FAISS holds {index.ntotal} of dim "
                f"{index.d}, metadata {meta.num_rows} rows.",
                hint=rebuild,
            )
        missing = set(metadata_schema().names) - set(meta.column_names)
        if missing:
            raise IndexCorruptError(f"{mdpath} lacks columns {sorted(missing)}.", hint=rebuild)
        if manifest.get("nprobe") and hasattr(index, "nprobe"):
            index.nprobe = int(manifest["nprobe"])
        if manifest.get("ef_search") and hasattr(index, "hnsw"):
            index.hnsw.efSearch = max(1, int(manifest["ef_search"]))
        return cls(p, manifest, meta, index)

    # -- properties ----------------------------------------------------------------------------

    @property
    def count(self) -> int:
        return int(self.manifest["count"])

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    @property
    def model(self) -> str:
        return str(self.manifest["model"])

    @property
    def settings(self) -> dict[str, Any]:
        return dict(self.manifest.get("settings") or {})

    def check_model(self, name: str, what: str = "query") -> None:
        if name != self.model:
            raise ModelMismatchError(
                f"index {self.path} was built with model {self.model}, not {name}: "
                f"embeddings of different models are not comparable.",
                hint=f"Use --model {self.model} to {what} it, or build a new index with {name}.",
            )

    # -- data --------------------------------------------------------------------------------

    def vectors(self) -> np.ndarray:
        """All stored embeddings, (count, dim) float32, in metadata order."""
        if self.count == 0:
            return np.zeros((0, self.dim), np.float32)
        index = self._faiss
        try:
            ivf = faiss.extract_index_ivf(index)
        except Exception:
            ivf = None
        if ivf is not None:
            ivf.make_direct_map()
        return np.asarray(index.reconstruct_n(0, index.ntotal), dtype=np.float32)

    def search(self, queries: np.ndarray, k: int, nprobe: int | None = None,
               ef_search: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Cosine scores (Q, k') and row positions (Q, k'), best first; k' = min(k, count).

        ``nprobe`` (IVF) and ``ef_search`` (HNSW, raised to at least k') override the
        index's settings for this and later searches; other index types ignore them.
        Positions of missing results (IVF with too few probed lists) are -1.
        """
        q = _normalise(np.atleast_2d(queries))
        if q.shape[1] != self.dim:
            raise ModelMismatchError(f"query embedding has dim {q.shape[1]}, index {self.path} has dim {self.dim}.")
        k = max(1, min(int(k), self.count))
        if nprobe is not None and hasattr(self._faiss, "nprobe"):
            self._faiss.nprobe = max(1, int(nprobe))
        if hasattr(self._faiss, "hnsw"):
            if ef_search is not None:
                self._faiss.hnsw.efSearch = max(1, int(ef_search))
            self._faiss.hnsw.efSearch = max(self._faiss.hnsw.efSearch, k)
        scores, rows = self._faiss.search(q, k)
        return scores, rows

    def rows(self, positions: np.ndarray | list[int]) -> list[dict[str, Any]]:
        """Metadata rows (as dicts) at the given positions."""
        pos = [int(i) for i in positions]
        return self.metadata.take(pos).to_pylist() if pos else []


# -- writing -------------------------------------------------------------------------------


def _current_generation(path: Path) -> int:
    gens = [int(m.group(2)) for f in path.iterdir() if (m := _GEN_FILE.match(f.name))]
    return max(gens, default=0)


def _write_generation(folder: Path, gen: int, index: Any, metadata: Any) -> dict[str, str]:
    """Write one generation of files, each flushed to disk before it takes its final name."""
    names = {"vectors": f"vectors-{gen:06d}.faiss", "metadata": f"metadata-{gen:06d}.parquet"}
    with atomic_path(folder / names["vectors"], fsync=True) as tmp:
        faiss.write_index(index, str(tmp))
    with atomic_path(folder / names["metadata"], fsync=True) as tmp:
        pq.write_table(metadata, tmp)
    return names


def _write_manifest(folder: Path, manifest: Mapping[str, Any]) -> None:
    write_text(folder / MANIFEST, json.dumps(manifest, indent=2, allow_nan=False) + "\n", fsync=True)


def check_output(path: str | os.PathLike[str], *, replace: bool = False) -> None:
    """Raise :class:`OutputError` now if :func:`write_index` would refuse ``path`` later."""
    p = Path(path)
    if not p.exists():
        if not p.parent.exists():
            raise OutputError(f"{p.parent}: output folder does not exist.", hint="Create it first.")
        return
    if not p.is_dir():
        raise OutputError(f"{p} exists and is a file.", hint="Choose another index folder name.")
    is_index = (p / MANIFEST).exists()
    if not is_index and any(p.iterdir()):
        raise OutputError(f"{p} exists and is not an rsvl index.", hint="Choose a new or empty folder.")
    if is_index and not replace:
        raise OutputError(
            f"{p} already holds an index.",
            hint=f"Pass --overwrite to rebuild it, or add sources with `rsvl index add {p} SOURCES...`.",
        )


def write_index(
    path: str | os.PathLike[str],
    vectors: np.ndarray,
    metadata: Any,
    manifest: Mapping[str, Any],
    *,
    config: IndexConfig = IndexConfig(),
    replace: bool = False,
) -> EmbeddingIndex:
    """Write (or atomically replace, with ``replace=True``) the index at ``path``.

    ``vectors`` (N, D) are re-normalised; ``metadata`` is a pyarrow Table of N rows in the
    :func:`metadata_schema`; ``manifest`` holds at least ``model`` and may add ``settings``
    and other keys. count, dim, index type, files and version are filled in here.
    """
    p = Path(path)
    v = _normalise(vectors) if len(vectors) else np.zeros((0, int(manifest.get("dim", 0) or 1)), np.float32)
    if metadata.num_rows != len(v):
        raise ValueError(f"{metadata.num_rows} metadata rows for {len(v)} vectors")
    metadata = metadata.select(metadata_schema().names).cast(metadata_schema())
    index, chosen = make_faiss_index(v, config)
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    man: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "rsvl_version": __version__,
        **dict(manifest),
        "dim": int(v.shape[1]),
        "count": int(len(v)),
        "normalisation": "l2",
        "metric": "inner_product",
        **chosen,
        "ivf_threshold": int(config.ivf_threshold),
        "ivf_config": {"threshold": int(config.ivf_threshold), "nlist": config.nlist, "nprobe": config.nprobe},
        "index_config": config.check().to_manifest(),
        "updated": now,
    }
    man.setdefault("created", now)
    check_output(p, replace=replace)
    if p.exists():
        # New generation of files, then one atomic manifest replace, then clean up.
        gen = _current_generation(p) + 1
        man["files"] = _write_generation(p, gen, index, metadata)
        _write_manifest(p, man)
        keep = set(man["files"].values()) | {MANIFEST}
        for f in p.iterdir():
            orphan = _GEN_FILE.match(f.name) or f.name == MANIFEST + ".tmp" or TMP_MARK in f.name
            if f.name not in keep and orphan and f.is_file():
                f.unlink(missing_ok=True)
        return EmbeddingIndex.open(p)
    with atomic_dir(p) as tmp:
        man["files"] = _write_generation(tmp, 1, index, metadata)
        _write_manifest(tmp, man)
    return EmbeddingIndex.open(p)
