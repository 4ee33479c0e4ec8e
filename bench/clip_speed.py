"""Speed of the built-in mini-clip on this CPU, next to open_clip ViT-B-16 (random weights)
measured in the same run.

    python bench/clip_speed.py            # ~2 min on 2 cores

* classify: ``encode_image`` on 256x256 uint8 tiles (each model applies its own resize),
  images per second.
* dense: ``dense_features`` (what ``rsvl segment`` runs per tile) on 512x512 tiles,
  megapixels per second.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent


def _rate(fn, batch: np.ndarray, repeats: int) -> float:
    fn(batch)  # warm-up
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn(batch)
    return repeats * len(batch) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path, default=HERE / "results" / "clip_speed.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import open_clip

    from rsvl.models.clip import from_open_clip
    from rsvl.models.mini.clip import load_mini_clip
    from rsvl.models.registry import get_card

    rng = np.random.default_rng(0)
    small = rng.integers(0, 255, (args.batch, 3, 256, 256), dtype=np.uint8)
    large = rng.integers(0, 255, (max(1, args.batch // 4), 3, 512, 512), dtype=np.uint8)
    oc = open_clip.create_model("ViT-B-16", pretrained=None)
    models = {
        "mini-clip": load_mini_clip(),
        "open_clip ViT-B-16 (random)": from_open_clip(oc, get_card("openai-vit-b16")),
    }
    rows = []
    with torch.inference_mode():
        for name, m in models.items():
            ips = _rate(m.encode_image, small, args.repeats)
            dense_ips = _rate(m.dense_features, large, args.repeats)
            rows.append({"model": name, "classify_img_per_s": round(ips, 2),
                         "dense_mpix_per_s": round(dense_ips * 512 * 512 / 1e6, 3)})
    ref = rows[1]
    for r in rows:
        r["classify_vs_vit_b16"] = round(r["classify_img_per_s"] / ref["classify_img_per_s"], 2)
        r["dense_vs_vit_b16"] = round(r["dense_mpix_per_s"] / ref["dense_mpix_per_s"], 2)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"threads": args.threads, "platform": platform.platform(), "rows": rows}, indent=2))
    print("| model | classify img/s (256 px) | dense MPix/s (512 px tiles) | classify vs ViT-B-16 | dense vs ViT-B-16 |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['classify_img_per_s']:.1f} | {r['dense_mpix_per_s']:.2f} | "
              f"{r['classify_vs_vit_b16']:.2f}x | {r['dense_vs_vit_b16']:.2f}x |")


if __name__ == "__main__":
    main()
