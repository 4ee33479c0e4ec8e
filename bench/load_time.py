"""Seconds to first result: import and load time of every built-in model in fresh processes.

    OMP_NUM_THREADS=1 python bench/load_time.py                 # ~2-4 min on 2 cores
    OMP_NUM_THREADS=1 python bench/load_time.py --repeats 5 --models mini-clip

Each measurement is a new Python process (nothing cached in memory, the OS file cache warm
after the first): it times ``import rsvl`` and then ``rsvl.load(name)`` (which imports
rsvl's API, the tasks and the model's family, reads the weights and builds the network),
and reports which heavy libraries the load pulled in. The reference, measured in the same
run the same way, is a process that only imports torch: no model can load faster than that,
so ``load / torch`` says how much rsvl adds on top of the floor. Medians of ``--repeats``.

mini-fsvlm is measured when its weights ship with this checkout, and skipped otherwise.

``--reference-src PATH`` also measures every model with another checkout's ``src`` (e.g. the
main branch before a change), interleaved with this one's in the same run, and reports
``after / before``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODELS = ["mini-clip", "mini-refer", "mini-instances", "mini-chat", "mini-fsvlm"]
HEAVY = ["torch", "open_clip", "transformers", "torchvision", "timm", "torch._dynamo", "scipy", "faiss"]

CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
{body}
out = {{"total_s": time.perf_counter() - t0}}
out.update(times)
out["imported"] = [m for m in {heavy!r} if m in sys.modules]
print("RESULT " + json.dumps(out))
"""

REFERENCE = """
times = {}
import torch
times["import_torch_s"] = time.perf_counter() - t0
"""

LOAD = """
times = {{}}
import rsvl
t1 = time.perf_counter()
times["import_rsvl_s"] = t1 - t0
model = rsvl.load({name!r})
times["load_s"] = time.perf_counter() - t1
"""


def run(body: str, src: Path | None = None) -> dict:
    code = CHILD.format(body=body, heavy=HEAVY)
    env = os.environ.copy()
    if src is not None:
        env["PYTHONPATH"] = str(src)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    return {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1]}


def shipped(name: str, src: Path | None = None) -> bool:
    """Whether ``name`` is registered and its weights are available here."""
    code = ("from rsvl.models import registry\nfrom rsvl.models.weights import resolve_weights\n"
            f"card = registry.get_card({name!r})\nresolve_weights(card)\n")
    env = {**os.environ, "RSVL_OFFLINE": "1"}  # never download to find out
    if src is not None:
        env["PYTHONPATH"] = str(src)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, env=env).returncode == 0


def median(rows: list[dict], key: str) -> float | None:
    values = [r[key] for r in rows if key in r]
    return round(statistics.median(values), 3) if values else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=MODELS)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--label", default="", help="name of this run in the JSON")
    ap.add_argument("--reference-src", type=Path, default=None,
                    help="another checkout's src folder, measured the same way in the same run")
    ap.add_argument("--json", type=Path, default=HERE / "results" / "load_time.json")
    args = ap.parse_args()

    run(REFERENCE)  # warm the OS file cache once
    ref = [run(REFERENCE) for _ in range(args.repeats)]
    torch_s = median(ref, "import_torch_s")
    rows = [{"model": "(reference) import torch", "total_s": torch_s, "vs_torch": 1.0}]
    print(json.dumps(rows[0]), flush=True)
    for name in args.models:
        if not shipped(name):
            print(json.dumps({"model": name, "skipped": "not registered or weights not shipped"}), flush=True)
            continue
        trees = [("this", None)] + ([("reference", args.reference_src)] if args.reference_src else [])
        for _, src in trees:
            run(LOAD.format(name=name), src)  # warm-up (and conversions into the cache, if any)
        got: dict[str, list[dict]] = {label: [] for label, _ in trees}
        for _ in range(args.repeats):  # interleaved, so both see the same machine load
            for label, src in trees:
                got[label].append(run(LOAD.format(name=name), src))
        for label, _ in trees:
            g = got[label]
            row = {"model": name, "src": label, "import_rsvl_s": median(g, "import_rsvl_s"),
                   "load_s": median(g, "load_s"), "total_s": median(g, "total_s"),
                   "runs": [round(x.get("total_s", -1), 3) for x in g], "imported": g[0].get("imported"),
                   "errors": [x["error"] for x in g if "error" in x]}
            row["vs_torch"] = round(row["total_s"] / torch_s, 2) if row["total_s"] and torch_s else None
            rows.append(row)
            print(json.dumps(row), flush=True)
        if args.reference_src and rows[-1]["total_s"] and rows[-2]["total_s"]:
            rows[-2]["vs_reference"] = round(rows[-2]["total_s"] / rows[-1]["total_s"], 3)
    machine = {"python": platform.python_version(), "cpus": os.cpu_count(), "load_average": os.getloadavg(),
               "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "repeats": args.repeats,
               # relative to this checkout: no machine path in the committed results
               "reference_src": os.path.relpath(args.reference_src, HERE.parent) if args.reference_src else None}
    previous = json.loads(args.json.read_text()) if args.json.exists() else {}
    runs = [r for r in previous.get("runs", []) if r.get("label") != args.label]
    runs.append({"label": args.label, "machine": machine, "rows": rows})
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"runs": runs}, indent=2) + "\n")


if __name__ == "__main__":
    main()
