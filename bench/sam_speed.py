"""SAM speed on this CPU: rsvl's SAM against segment-anything on the same random weights,
measured in one run, each path with its largest embedding difference from the reference.

    python bench/sam_speed.py                 # ViT-B, 3 rounds: ~6 min on 2 cores
    python bench/sam_speed.py --repeats 1     # a smoke run

Same weights everywhere: one segment-anything ``sam_model_registry[arch]()`` network
(random init; its zero-initialised relative-position tables are given random values so
that they weigh in the differences), loaded into rsvl with ``load_sam`` from its state dict
(Meta's checkpoint layout). Same input: one 1024 x 768 uint8 RGB image.

* ``image``: ``set_image`` of each library's predictor (resize to 1024 on the longest side,
  normalise, pad, image encoder), images/s. segment-anything's ``SamPredictor`` is the
  reference; rsvl's ``SamPredictor`` float32 and with ``--fast`` (int8 linear layers in the
  ViT, :mod:`rsvl.models.sam.fast`); and PyTorch's ``quantize_dynamic`` applied as is to
  segment-anything's encoder (what int8 alone gives on the reference code).
* ``prompt``: ``predict`` with one box, single mask, on the embedded image: boxes/s.

Differences: for ``image``, the largest ``1 - cos`` between a path's and the reference's
256-d embedding vectors over the 64 x 64 grid; for ``prompt``, the largest absolute
difference of the low-resolution mask logits.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from timing import interleaved  # bench/timing.py (this folder is on sys.path)

HERE = Path(__file__).resolve().parent


def _cos_gap(a: torch.Tensor, b: torch.Tensor) -> float:
    # float64: float32 rounding alone leaves ~1e-6 between identical 256-d vectors
    return float((1 - F.cosine_similarity(a.double().flatten(2), b.double().flatten(2), dim=1)).max())


def bench(arch: str, args: argparse.Namespace) -> list[dict]:
    from segment_anything import SamPredictor as MetaPredictor
    from segment_anything import sam_model_registry

    from rsvl.models.sam.build import load_sam
    from rsvl.models.sam.predictor import SamPredictor

    torch.manual_seed(0)
    meta = sam_model_registry[arch]().eval()
    with torch.no_grad():
        for name, p in meta.named_parameters():
            if "rel_pos" in name:
                p.normal_(0, 0.02)
    sd = meta.state_dict()
    ours = load_sam(copy.deepcopy(sd), arch)
    fast = load_sam(copy.deepcopy(sd), arch, fast=True)
    meta_q = copy.deepcopy(meta)
    torch.ao.quantization.quantize_dynamic(meta_q.image_encoder, {torch.nn.Linear}, dtype=torch.qint8, inplace=True)

    img = np.random.default_rng(0).integers(0, 256, (768, 1024, 3), dtype=np.uint8)
    box = np.array([100.0, 150.0, 420.0, 500.0])
    preds = {
        "segment-anything (reference)": ("meta", MetaPredictor(meta)),
        "rsvl": ("rsvl", SamPredictor(ours)),
        "rsvl --fast (int8 linear)": ("rsvl", SamPredictor(fast)),
        "segment-anything + quantize_dynamic": ("meta", MetaPredictor(meta_q)),
    }

    def embed(kind: str, p) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            p.set_image(img)
            return p.features if kind == "rsvl" else p.get_image_embedding()
        return run

    def prompt(kind: str, p) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            if kind == "rsvl":
                return torch.as_tensor(p.predict(box=box, multimask=False, return_logits=True)[2])
            return torch.as_tensor(p.predict(box=box, multimask_output=False, return_logits=True)[2])
        return run

    rows = []
    with torch.inference_mode():
        res = interleaved({n: embed(k, p) for n, (k, p) in preds.items()}, args.repeats)
        ref_s, ref_out = next(iter(res.values()))
        for path, (sec, out) in res.items():
            rows.append({"arch": arch, "path": path, "kind": "image", "rate": round(1 / sec, 4),
                         "seconds": round(sec, 2), "vs_reference": round(ref_s / sec, 2),
                         "max_cos_distance": round(_cos_gap(ref_out, out), 6)})
        res = interleaved({n: prompt(k, p) for n, (k, p) in preds.items()}, max(args.repeats, 5))
        ref_s, ref_out = next(iter(res.values()))
        for path, (sec, out) in res.items():
            rows.append({"arch": arch, "path": path, "kind": "prompt", "rate": round(1 / sec, 2),
                         "vs_reference": round(ref_s / sec, 2),
                         "max_abs_logit_diff": round(float((out.float() - ref_out.float()).abs().max()), 4)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="vit_b", choices=["vit_b", "vit_l", "vit_h"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="timed rounds per path (interleaved; medians)")
    ap.add_argument("--json", type=Path, default=HERE / "results" / "sam_speed.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = bench(args.arch, args)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"threads": args.threads, "repeats": args.repeats, "torch": torch.__version__,
                                     "platform": platform.platform(),
                                     "quantized_engine": torch.backends.quantized.engine, "rows": rows}, indent=2))
    print("| model | task | path | rate | vs reference | difference |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        unit = "img/s" if r["kind"] == "image" else "boxes/s"
        diff = (f"1 - cos {r['max_cos_distance']:.2g}" if "max_cos_distance" in r
                else f"max abs logit {r['max_abs_logit_diff']:.2g}")
        print(f"| SAM {r['arch']} | {r['kind']} | {r['path']} | {r['rate']:.3g} {unit} | "
              f"{r['vs_reference']:.2f}x | {diff} |")


if __name__ == "__main__":
    main()
