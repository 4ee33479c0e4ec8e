"""The index store's FAISS index types: flat, IVF, HNSW (round trip, recall, manifest, errors)."""

from __future__ import annotations

import json
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pytest

from rsvl.errors import IndexCorruptError, IndexOptionError
from rsvl.index.store import (
    EmbeddingIndex,
    IndexConfig,
    check_hnsw_graph,
    make_faiss_index,
    metadata_schema,
    write_index,
)


def _unit(n: int, d: int, seed: int = 0) -> np.ndarray:
    """Clustered unit vectors (like embeddings: neighbours exist), float32."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(n // 50, 1), d))
    v = centres[rng.integers(0, len(centres), n)] + 0.5 * rng.standard_normal((n, d))
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)


def _table(n: int, d: int) -> pa.Table:
    schema = metadata_schema()
    cols = {f.name: pa.nulls(n, f.type) for f in schema}
    cols.update(id=pa.array(np.arange(n), pa.int64()), source=pa.array([f"s{i}.png" for i in range(n)]),
                kind=pa.array(["image"] * n), model=pa.array(["m"] * n), dim=pa.array([d] * n, pa.int32()))
    return pa.table([cols[f.name] for f in schema], schema=schema)


def _write(path, v, config):
    return write_index(path, v, _table(len(v), v.shape[1]), {"model": "m"}, config=config)


def _recall(approx_rows: np.ndarray, exact_rows: np.ndarray) -> float:
    hits = sum(len(set(a.tolist()) & set(e.tolist())) for a, e in zip(approx_rows, exact_rows, strict=True))
    return hits / exact_rows.size


@pytest.mark.parametrize("kind, expected", [("flat", "flat-ip"), ("ivf", "ivf-flat"), ("hnsw", "hnsw-flat")])
def test_round_trip_keeps_vectors_type_and_results(tmp_path, kind, expected):
    v = _unit(600, 16)
    idx = _write(tmp_path / "idx", v, IndexConfig(index_type=kind, hnsw_m=8))
    again = EmbeddingIndex.open(tmp_path / "idx")
    assert again.manifest["index_type"] == expected and again.count == 600 and again.dim == 16
    assert again.manifest["index_config"]["type"] == kind
    np.testing.assert_allclose(again.vectors(), v, atol=1e-6)
    s1, r1 = idx.search(v[:5], 3)
    s2, r2 = again.search(v[:5], 3)
    np.testing.assert_array_equal(r1, r2)
    assert (r2[:, 0] == np.arange(5)).all()  # a stored vector finds itself first
    np.testing.assert_allclose(s2[:, 0], 1.0, atol=1e-5)


def test_auto_keeps_the_threshold_rule():
    v = _unit(400, 8)
    assert make_faiss_index(v, IndexConfig(ivf_threshold=400))[1]["index_type"] == "flat-ip"
    assert make_faiss_index(v, IndexConfig(ivf_threshold=399))[1]["index_type"] == "ivf-flat"
    assert make_faiss_index(v, IndexConfig(ivf_threshold=10, index_type="hnsw"))[1]["index_type"] == "hnsw-flat"
    assert make_faiss_index(v, IndexConfig(ivf_threshold=10, index_type="flat"))[1]["exact"] is True


def test_hnsw_and_ivf_recall_against_flat():
    v, q = _unit(3000, 32, seed=1), _unit(50, 32, seed=2)
    exact, _ = make_faiss_index(v, IndexConfig(index_type="flat"))
    _, truth = exact.search(q, 10)
    hnsw, chosen = make_faiss_index(v, IndexConfig(index_type="hnsw"))
    assert chosen["hnsw_m"] == 32 and chosen["ef_search"] == 64 and chosen["exact"] is False
    assert _recall(hnsw.search(q, 10)[1], truth) >= 0.9
    ivf, chosen = make_faiss_index(v, IndexConfig(index_type="ivf"))
    assert _recall(ivf.search(q, 10)[1], truth) >= 0.6
    ivf.nprobe = chosen["nlist"]  # every list probed: exact
    assert _recall(ivf.search(q, 10)[1], truth) == 1.0


def test_manifest_records_hnsw_settings_and_add_keeps_them(tmp_path):
    v = _unit(200, 8)
    cfg = IndexConfig(index_type="hnsw", hnsw_m=12, ef_construction=50, ef_search=30)
    _write(tmp_path / "idx", v, cfg)
    m = json.loads((tmp_path / "idx" / "manifest.json").read_text())
    assert (m["index_type"], m["hnsw_m"], m["ef_construction"], m["ef_search"]) == ("hnsw-flat", 12, 50, 30)
    assert m["nlist"] is None and m["nprobe"] is None and m["exact"] is False
    assert IndexConfig.from_manifest(m) == cfg
    idx = EmbeddingIndex.open(tmp_path / "idx")
    assert idx._faiss.hnsw.efSearch == 30
    idx.search(v[:1], 10, ef_search=5)
    assert idx._faiss.hnsw.efSearch == 10  # never fewer candidates than results
    # an index written before index_config: its IVF settings still rebuild the same kind
    old = {"ivf_threshold": 7, "ivf_config": {"threshold": 7, "nlist": 3, "nprobe": 2}}
    assert IndexConfig.from_manifest(old) == IndexConfig(7, 3, 2)


@pytest.mark.parametrize("config, message", [
    (IndexConfig(index_type="annoy"), "unknown index type 'annoy'"),
    (IndexConfig(index_type="hnsw", hnsw_m=1), "hnsw m must be between 2 and 256"),
    (IndexConfig(index_type="ivf", nprobe=0), "nprobe must be at least 1"),
    (IndexConfig(index_type="hnsw", ef_search=0), "ef search must be at least 1"),
])
def test_bad_options_are_refused_before_anything_is_written(tmp_path, config, message):
    with pytest.raises(IndexOptionError, match=message):
        _write(tmp_path / "idx", _unit(20, 4), config)
    assert not (tmp_path / "idx").exists()


@pytest.mark.parametrize("field, message", [("neighbors", "neighbo.*out of range"),
                                            ("entry_point", "entry.?point"), ("levels", "level")])
def test_crafted_hnsw_graph_is_refused(tmp_path, field, message):
    """FAISS walks the graph without bounds checks at search time: ids, levels and the entry
    point of a crafted file must be refused when the index is opened (by rsvl's check, or by
    FAISS's own in versions that have one)."""
    v = _unit(100, 8)
    _write(tmp_path / "idx", v, IndexConfig(index_type="hnsw", hnsw_m=4))
    vpath = next((tmp_path / "idx").glob("vectors-*.faiss"))
    index = faiss.read_index(str(vpath))
    if field == "entry_point":
        index.hnsw.entry_point = 10**6
    else:
        vec = getattr(index.hnsw, field)
        faiss.rev_swig_ptr(vec.data(), vec.size())[0] = 10**6
    faiss.write_index(index, str(vpath))
    with pytest.raises(IndexCorruptError, match=f"(?i){message}"):
        EmbeddingIndex.open(tmp_path / "idx")


def test_rsvl_checks_the_graph_itself_where_faiss_does_not():
    """Older FAISS versions (the pyproject allows >= 1.8) read a graph without checking it."""
    index, _ = make_faiss_index(_unit(100, 8), IndexConfig(index_type="hnsw", hnsw_m=4))
    check_hnsw_graph(index, Path("x.faiss"), 100, "rebuild")  # what rsvl builds passes
    with pytest.raises(IndexCorruptError, match="storage does not hold"):
        check_hnsw_graph(index, Path("x.faiss"), 101, "rebuild")
    faiss.rev_swig_ptr(index.hnsw.levels.data(), 100)[3] = 99
    with pytest.raises(IndexCorruptError, match="level is out of range"):
        check_hnsw_graph(index, Path("x.faiss"), 100, "rebuild")
    faiss.rev_swig_ptr(index.hnsw.levels.data(), 100)[3] = 1
    faiss.rev_swig_ptr(index.hnsw.neighbors.data(), index.hnsw.neighbors.size())[5] = 100
    with pytest.raises(IndexCorruptError, match="neighbour id is out of range|do not match the levels"):
        check_hnsw_graph(index, Path("x.faiss"), 100, "rebuild")
