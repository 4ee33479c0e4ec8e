"""Speed of the built-in mini-chat on this CPU, next to its own language model run by
transformers' ``generate`` in the same run (the reference).

    python bench/chat_speed.py            # ~2 min on 2 cores

* mini-chat: ``chat()`` on UCM-sized images (256 px): time to first token, generated tokens
  per second, answers per second for short answers.
* reference: SmolLM2-135M-Instruct alone (no image), ``generate`` greedy with the same number
  of prompt tokens (random token ids) and as many new tokens as mini-chat's answer had.
* raster: ``rsvl chat`` on a synthetic 1024x1024 GeoTIFF (16 windows of 256 px), windows per
  second end to end (reading, the model, combining).

The ratio mini-chat / reference says what the image tower, the projector and rsvl's decoding
loop cost on top of the language model itself.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--json", type=Path, default=HERE / "results" / "chat_speed.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import rasterio
    from rasterio.transform import from_origin

    from rsvl.models.mini.chat import load_mini_chat
    from rsvl.tasks.chat import chat as chat_task

    t0 = time.perf_counter()
    model = load_mini_chat()
    load_s = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)
    question = "Describe this image in detail."

    # mini-chat: a description (the longest answers it gives); the reference then makes as
    # many tokens as mini-chat did
    ttft, tps, prompt_tokens, made = [], [], 0, []
    with torch.inference_mode():
        model.chat(image, question, max_new_tokens=4)  # warm-up
        for _ in range(args.repeats):
            a = model.chat(image, question, max_new_tokens=args.new_tokens)
            ttft.append(a.first_token_s)
            tps.append((a.new_tokens - 1) / max(1e-9, a.total_s - a.first_token_s))
            prompt_tokens = a.prompt_tokens
            made.append(a.new_tokens)
    new_tokens = max(2, int(np.median(made)))

    # reference: the language model alone through transformers' generate
    lm = model.causal_lm
    ids = torch.from_numpy(rng.integers(100, 40000, (1, prompt_tokens))).long()
    ref_ttft, ref_tps = [], []
    with torch.inference_mode():
        lm.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)
        for _ in range(args.repeats):
            t = time.perf_counter()
            lm.generate(ids, max_new_tokens=1, min_new_tokens=1, do_sample=False)
            first = time.perf_counter() - t
            t = time.perf_counter()
            lm.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
            total = time.perf_counter() - t
            ref_ttft.append(first)
            ref_tps.append((new_tokens - 1) / max(1e-9, total - first))

    # short answers (what presence / counting questions produce), answers per second
    with torch.inference_mode():
        t = time.perf_counter()
        for _ in range(args.repeats):
            model.chat(image, "Is there a ship in this image?", max_new_tokens=8)
        answers_per_s = args.repeats / (time.perf_counter() - t)

    # a raster: 1024 x 1024, 16 windows
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "scene.tif"
        data = rng.integers(0, 255, (3, 1024, 1024), dtype=np.uint8)
        with rasterio.open(path, "w", driver="GTiff", width=1024, height=1024, count=3, dtype="uint8",
                           crs="EPSG:32617", transform=from_origin(400000, 3300000, 0.3, 0.3)) as ds:
            ds.write(data)
        t = time.perf_counter()
        result = chat_task(model, path, "Is there a ship in this image?", gsd=0, max_new_tokens=8)
        raster_s = time.perf_counter() - t
        windows = len(result.windows)

    rows = {
        "load_s": load_s,
        "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens,
        "mini_chat": {"ttft_s": float(np.median(ttft)), "tokens_per_s": float(np.median(tps))},
        "reference_smollm2_generate": {"ttft_s": float(np.median(ref_ttft)), "tokens_per_s": float(np.median(ref_tps))},
        "short_answers_per_s": answers_per_s,
        "raster_1024": {"windows": windows, "seconds": raster_s, "windows_per_s": windows / raster_s},
        "threads": args.threads,
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
    }
    rows["ratio_tokens_per_s"] = rows["mini_chat"]["tokens_per_s"] / rows["reference_smollm2_generate"]["tokens_per_s"]
    rows["ratio_ttft"] = rows["mini_chat"]["ttft_s"] / rows["reference_smollm2_generate"]["ttft_s"]
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(rows, indent=2))
    print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
