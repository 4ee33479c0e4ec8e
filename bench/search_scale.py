"""`rsvl search` at archive scale: flat, IVF and HNSW indexes of 10k, 100k and 1M vectors.

    OMP_NUM_THREADS=1 python bench/search_scale.py                       # 10k and 100k, ~5 min
    OMP_NUM_THREADS=1 python bench/search_scale.py --sizes 1000000       # 1M: ~1 h, ~5 GB RAM

For every size and index type, the index is built as `rsvl index build --index-type TYPE`
builds it (``rsvl.index.store.write_index``: same FAISS types and default settings), written
to a temporary folder and opened as `rsvl search` opens it (``EmbeddingIndex.open``). Then:

* build s: choosing, training and filling the FAISS index, and writing the folder;
* open s, file MB and RSS MB on open (resident memory added by opening the index);
* search alone: p50 / p99 ms of ``EmbeddingIndex.search`` for one query vector, k=10;
* per text query: p50 / p99 ms of mini-clip's ``encode_text`` for one prompt followed by
  the search (what `rsvl search INDEX "text"` does once the model and index are loaded);
* recall@10 of the approximate types against exact search (the flat index of the same
  vectors), on query vectors drawn like the data.

The reference is the exact flat index measured in the same run: each row gives its search
time as a ratio of the flat index's.

Vectors are synthetic unit vectors at mini-clip's embedding dim (256): a mixture of
``n / 100`` Gaussian clusters (unit-norm centres plus noise of norm ~1: cosine ~0.7 to the
centre), normalised, so that
nearest neighbours exist as they do between embeddings of real tiles; uniform random
unit vectors (``--uniform``) have no neighbourhood structure and are the worst case for
any approximate index.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

HERE = Path(__file__).resolve().parent
PROMPTS = ["a stadium next to a river", "dense residential area", "an airport with two runways",
           "farmland with irrigation circles", "a harbour with ships", "a forest", "a parking lot",
           "a bridge over a river", "storage tanks", "a golf course"]


def vectors(n: int, dim: int, seed: int, uniform: bool, centres: np.ndarray | None = None,
            chunk: int = 100_000) -> np.ndarray:
    """``n`` unit float32 vectors, made in chunks so 1M x 256 never needs float64 copies."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, dim), np.float32)
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        v = rng.standard_normal((m, dim), dtype=np.float32)
        if not uniform:
            v = centres[rng.integers(0, len(centres), m)] + v / np.sqrt(dim)
        out[start:start + m] = v / np.linalg.norm(v, axis=1, keepdims=True)
    return out


def table(n: int, dim: int):
    import pyarrow as pa

    from rsvl.index.store import metadata_schema

    schema = metadata_schema()
    cols = {f.name: pa.nulls(n, f.type) for f in schema}
    cols.update(id=pa.array(np.arange(n), pa.int64()), source=pa.array(np.full(n, "synthetic.tif", object)),
                kind=pa.array(np.full(n, "tile", object)), model=pa.array(np.full(n, "mini-clip", object)),
                dim=pa.array(np.full(n, dim, np.int32)))
    return pa.table([cols[f.name] for f in schema], schema=schema)


def pct(values: list[float], q: float) -> float:
    return round(float(np.percentile(values, q)) * 1000, 3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--types", nargs="+", default=["flat", "ivf", "hnsw"])
    ap.add_argument("--queries", type=int, default=200, help="queries timed per index")
    ap.add_argument("--uniform", action="store_true", help="uniform random unit vectors instead of clusters")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    ap.add_argument("--tmp", type=Path, default=None, help="folder for the temporary indexes")
    ap.add_argument("--json", type=Path, default=HERE / "results" / "search_scale.json")
    args = ap.parse_args()

    import faiss
    import torch

    from rsvl.index.store import EmbeddingIndex, IndexConfig, write_index
    from rsvl.models import registry

    faiss.omp_set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    proc = psutil.Process()
    model = registry.load("mini-clip")
    with torch.inference_mode():
        model.encode_text(["warm-up"])
        dim = int(model.encode_text(["warm-up"]).shape[1])

    rows = []
    previous = json.loads(args.json.read_text()) if args.json.exists() else {}
    for n in args.sizes:
        rng = np.random.default_rng(n)
        centres = rng.standard_normal((max(n // 100, 1), dim)).astype(np.float32)
        centres /= np.linalg.norm(centres, axis=1, keepdims=True)
        data = vectors(n, dim, 1, args.uniform, centres)
        queries = vectors(args.queries, dim, 2, args.uniform, centres)
        truth = None
        flat_search_p50 = None
        for kind in args.types:
            gc.collect()
            with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
                path = Path(tmp) / "idx"
                t0 = time.perf_counter()
                write_index(path, data, table(n, dim), {"model": "mini-clip"}, config=IndexConfig(index_type=kind))
                build_s = time.perf_counter() - t0
                gc.collect()
                rss0 = proc.memory_info().rss
                t0 = time.perf_counter()
                idx = EmbeddingIndex.open(path)
                open_s = time.perf_counter() - t0
                rss_open = (proc.memory_info().rss - rss0) / 2**20
                file_mb = sum(f.stat().st_size for f in path.iterdir() if f.suffix == ".faiss") / 2**20
                idx.search(queries[:1], 10)  # warm-up
                found, search_t = [], []
                for q in queries:
                    t0 = time.perf_counter()
                    _, r = idx.search(q[None], 10)
                    search_t.append(time.perf_counter() - t0)
                    found.append(r[0])
                found = np.stack(found)
                if kind == "flat":
                    truth, flat_search_p50 = found, float(np.median(search_t))
                recall = None
                if truth is not None:
                    recall = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, truth, strict=True)]))
                text_t, encode_t = [], []
                with torch.inference_mode():
                    for i in range(min(args.queries, 100)):
                        t0 = time.perf_counter()
                        qv = model.encode_text([PROMPTS[i % len(PROMPTS)]]).float().numpy()
                        t1 = time.perf_counter()
                        idx.search(qv, 10)
                        t2 = time.perf_counter()
                        text_t.append(t2 - t0)
                        encode_t.append(t1 - t0)
                m = idx.manifest
                row = {
                    "n": n, "type": kind, "index_type": m["index_type"], "dim": dim,
                    "settings": {k: m.get(k) for k in ("nlist", "nprobe", "hnsw_m", "ef_construction", "ef_search")},
                    "build_s": round(build_s, 2), "open_s": round(open_s, 3), "file_mb": round(file_mb, 1),
                    "rss_open_mb": round(rss_open, 1),
                    "search_p50_ms": pct(search_t, 50), "search_p99_ms": pct(search_t, 99),
                    "text_query_p50_ms": pct(text_t, 50), "text_query_p99_ms": pct(text_t, 99),
                    "encode_text_p50_ms": pct(encode_t, 50),
                    "search_vs_flat": (round(float(np.median(search_t)) / flat_search_p50, 4)
                                       if flat_search_p50 else None),
                    "recall_at_10": recall,
                    "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                }
                print(json.dumps(row), flush=True)
                rows.append(row)
                del idx
        del data
    machine = {"python": platform.python_version(), "faiss": faiss.__version__, "threads": args.threads,
               "cpus": os.cpu_count(), "load_average": os.getloadavg(), "uniform": args.uniform,
               "queries": args.queries}
    # rows of other sizes from earlier runs are kept, so 10k/100k and 1M can be run apart
    kept = [r for r in previous.get("rows", []) if r["n"] not in set(args.sizes) or r.get("uniform") != args.uniform]
    for r in rows:
        r["uniform"] = args.uniform
    result = {"machine": machine, "runs": previous.get("runs", []) + [{**machine, "sizes": args.sizes}],
              "rows": sorted(kept + rows, key=lambda r: (r.get("uniform", False), r["n"], args.types.index(r["type"])
                                                          if r["type"] in args.types else 9))}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
