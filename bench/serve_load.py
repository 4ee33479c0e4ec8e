"""Load on ``rsvl serve``: N concurrent clients on loopback against a real uvicorn process.

Each client loops over a mix of requests for ``--seconds``: classify a small inline image
(mini-clip), a short chat answer (mini-chat, ``--chat-tokens`` tokens) and a segment job on
the bundled sample (submitted, then polled to the end). Reports p50/p99 latency per kind,
errors, requests/s, and the server's peak RSS (its process tree, sampled every 0.2 s).

    python bench/serve_load.py --clients 1 4 8 --seconds 30

The models load once before timing (a warm-up request of each kind); the service runs one
job at a time (``--jobs 1``) and one request per model at a time (its lock), so latency
under load is mostly queueing: the point is that it stays bounded and error-free.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import psutil
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def png_b64(size: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(port: int, state: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "RSVL_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "rsvl.cli", "--quiet", "serve", "--port", str(port), "--root", str(REPO / "examples"),
           "--state", str(state), "--jobs", "1"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    end = time.monotonic() + 180
    while time.monotonic() < end:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.kill()
    raise SystemExit("the server did not start: " + proc.stderr.read().decode()[-2000:])


class RSS:
    def __init__(self, pid: int) -> None:
        self.proc, self.peak, self.stop = psutil.Process(pid), 0, threading.Event()
        threading.Thread(target=self.run, daemon=True).start()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                total = self.proc.memory_info().rss + sum(c.memory_info().rss for c in self.proc.children(recursive=True))
                self.peak = max(self.peak, total)
            except psutil.Error:
                pass
            time.sleep(0.2)


def one(client: httpx.Client, kind: str, seed: int, chat_tokens: int) -> None:
    if kind == "classify":
        r = client.post("/v1/classify", json={"image": png_b64(64, seed), "classes": "forest, water, road, buildings"})
    elif kind == "chat":
        r = client.post("/v1/chat/completions", json={
            "model": "mini-chat", "max_tokens": chat_tokens,
            "messages": [{"role": "user", "content": [
                {"type": "text", "text": "What is in this image?"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64," + png_b64(64, seed)}}]}]})
    else:
        r = client.post("/jobs", json={"task": "segment", "source": "OSBS_029.tif",
                                       "params": {"classes": "trees, grass, road"}})
        r.raise_for_status()
        job = r.json()
        while job["state"] not in ("done", "failed", "cancelled"):
            time.sleep(0.1)
            job = client.get(f"/jobs/{job['id']}").json()
        if job["state"] != "done":
            raise RuntimeError(job.get("error"))
        return
    r.raise_for_status()


def run_level(base: str, clients: int, seconds: float, chat_tokens: int) -> dict:
    lat: dict[str, list[float]] = {"classify": [], "chat": [], "job": []}
    errors: dict[str, int] = {k: 0 for k in lat}
    stop = time.monotonic() + seconds
    kinds = ["classify", "classify", "chat", "job"]

    def worker(i: int) -> None:
        with httpx.Client(base_url=base, timeout=600) as c:
            n = i
            while time.monotonic() < stop:
                kind = kinds[n % len(kinds)]
                t0 = time.perf_counter()
                try:
                    one(c, kind, n, chat_tokens)
                    lat[kind].append(time.perf_counter() - t0)
                except Exception as exc:
                    errors[kind] += 1
                    if sum(errors.values()) <= 3:
                        print(f"error ({kind}): {str(exc)[:300]} {getattr(getattr(exc, 'response', None), 'text', '')[:300]}",
                              file=sys.stderr)
                n += 1

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    out = {"clients": clients, "wall_s": round(wall, 1), "errors": errors,
           "requests_per_s": round(sum(len(v) for v in lat.values()) / wall, 2)}
    for k, v in lat.items():
        if v:
            q = statistics.quantiles(v, n=100) if len(v) > 1 else [v[0]] * 99
            out[k] = {"n": len(v), "p50_s": round(statistics.median(v), 3), "p99_s": round(q[98], 3)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--chat-tokens", type=int, default=8)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "serve_load.json")
    args = ap.parse_args()
    port = free_port()
    with tempfile.TemporaryDirectory() as state:
        proc = start_server(port, Path(state))
        try:
            base = f"http://127.0.0.1:{port}"
            rss = RSS(proc.pid)
            with httpx.Client(base_url=base, timeout=600) as c:  # warm-up: every model loads once
                for kind in ("classify", "chat", "job"):
                    one(c, kind, 0, args.chat_tokens)
            idle = rss.peak
            levels = [run_level(base, n, args.seconds, args.chat_tokens) for n in args.clients]
            rss.stop.set()
            doc = {"cpu_count": os.cpu_count(), "rss_after_warmup_mb": round(idle / 2**20),
                   "peak_rss_mb": round(rss.peak / 2**20), "chat_tokens": args.chat_tokens, "levels": levels}
        finally:
            proc.terminate()
            proc.wait(30)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1))
    print(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
