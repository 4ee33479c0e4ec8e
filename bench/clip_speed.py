"""CLIP speed on this CPU: rsvl's paths against plain open_clip on the same random weights,
measured in one run, each with its largest embedding difference from the float32 reference.

    python bench/clip_speed.py                          # ViT-B-16, ViT-B-32, mini-clip: ~10 min on 2 cores
    python bench/clip_speed.py --arch mini-clip         # one architecture (its rows replace
                                                        # that architecture's rows in the JSON)

Rows (same inputs, same weights: one open_clip network, random init, in the layout the
published checkpoints use; rsvl paths load a deep copy of it):

* ``open_clip`` (the reference): ``model.encode_image`` on an already resized, normalised
  float32 batch (224 px): the network alone, no preprocessing charged to it.
* ``rsvl``: ``ClipModel.encode_image`` from uint8 256 px tiles (resize and normalise included),
  what ``rsvl classify`` / ``index build`` run per batch; ``rsvl --fast``: the same with
  int8 linear layers (``rsvl.models.clip.fast``).
* the other CPU paths tried, on the reference network: bfloat16 autocast, channels-last,
  ``torch.compile`` (inductor; compile time reported apart), and int8 dynamic quantisation
  of ``nn.Linear`` alone (PyTorch's attention keeps its q/k/v projection unquantised).
* dense: ``dense_features`` on 512 px tiles (what ``rsvl segment`` runs per tile), MPix/s,
  rsvl float32 as its reference (open_clip has no dense path).

* mini-clip: the shipped model (Lite0's BatchNorms folded into its convolutions, channels-last)
  against the same heads on the tower as timm builds it.

Differences: for every path, the largest cosine distance ``1 - cos`` between its L2-normalised
embedding and the float32 reference's embedding of the same image (and text), over the batch.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from timing import interleaved  # bench/timing.py (this folder is on sys.path)

HERE = Path(__file__).resolve().parent


def _cos_gap(a: torch.Tensor, b: torch.Tensor) -> float:
    a = F.normalize(a.float().flatten(1) if a.ndim == 2 else a.float(), dim=-1 if a.ndim == 2 else 1)
    b = F.normalize(b.float().flatten(1) if b.ndim == 2 else b.float(), dim=-1 if b.ndim == 2 else 1)
    return float((1 - (a * b).sum(dim=-1 if a.ndim == 2 else 1)).max())


def bench_arch(arch: str, card_name: str, args: argparse.Namespace) -> list[dict]:
    import open_clip

    from rsvl.models.clip import from_open_clip

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    tiles = rng.integers(0, 256, (args.batch, 3, 256, 256), dtype=np.uint8)
    big = rng.integers(0, 256, (max(1, args.batch // 4), 3, 512, 512), dtype=np.uint8)
    texts = [f"a satellite image of {w}" for w in ("farmland", "a forest", "a river", "buildings",
                                                   "an airport", "a harbour", "a road", "a beach")]

    ref = open_clip.create_model(arch, pretrained=None).eval()
    tok = open_clip.get_tokenizer(arch)(texts)
    rsvl_float = from_open_clip(copy.deepcopy(ref), card_name)
    rsvl_fast = from_open_clip(copy.deepcopy(ref), card_name, fast=True)
    x224 = rsvl_float.preprocess(tiles)  # the reference's input: resized and normalised once

    rows: list[dict] = []

    def autocast_bf16():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return ref.encode_image(x224)

    cl = copy.deepcopy(ref).to(memory_format=torch.channels_last)
    x_cl = x224.contiguous(memory_format=torch.channels_last)
    q_plain = torch.ao.quantization.quantize_dynamic(copy.deepcopy(ref), {torch.nn.Linear}, dtype=torch.qint8)
    mpix = big.shape[0] * 512 * 512 / 1e6
    groups = {
        "classify": (len(tiles), {
            "open_clip (reference)": lambda: ref.encode_image(x224),
            "rsvl": lambda: rsvl_float.encode_image(tiles),
            "rsvl --fast (int8 linear)": lambda: rsvl_fast.encode_image(tiles),
            "bfloat16 autocast": autocast_bf16,
            "channels-last": lambda: cl.encode_image(x_cl),
            "int8 nn.Linear only (quantize_dynamic)": lambda: q_plain.encode_image(x224),
        }),
        "text": (len(texts), {
            "open_clip (reference)": lambda: ref.encode_text(tok),
            "rsvl": lambda: rsvl_float.encode_text(texts),
            "rsvl --fast (int8 linear)": lambda: rsvl_fast.encode_text(texts),
        }),
        "dense": (mpix, {
            "rsvl (dense reference)": lambda: rsvl_float.dense_features(big),
            "rsvl --fast (int8 linear)": lambda: rsvl_fast.dense_features(big),
        }),
    }
    with torch.inference_mode():
        for kind, (n_items, fns) in groups.items():
            res = interleaved(fns, args.repeats)
            ref_s, ref_out = next(iter(res.values()))
            for path, (sec, out) in res.items():
                rows.append({"arch": arch, "path": path, "kind": kind, "rate": round(n_items / sec, 3),
                             "vs_reference": round(ref_s / sec, 2),
                             "max_cos_distance": round(_cos_gap(ref_out, out), 6)})

    if not args.no_compile:
        try:
            comp = torch.compile(copy.deepcopy(ref).visual)
            t0 = time.perf_counter()
            with torch.inference_mode():
                comp(x224)
                compile_s = time.perf_counter() - t0
                res = interleaved({"ref": lambda: ref.encode_image(x224), "compiled": lambda: comp(x224)},
                                   args.repeats)
            (ref_s, ref_out), (sec, out) = res["ref"], res["compiled"]
            rows.append({"arch": arch, "path": "torch.compile (inductor)", "kind": "classify",
                         "rate": round(len(tiles) / sec, 3), "vs_reference": round(ref_s / sec, 2),
                         "max_cos_distance": round(_cos_gap(ref_out, out), 6), "compile_s": round(compile_s, 1)})
        except Exception as exc:  # noqa: BLE001 - a bench reports what failed and goes on
            rows.append({"arch": arch, "path": "torch.compile (inductor)", "kind": "classify",
                         "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"})
    return rows


def bench_mini(args: argparse.Namespace) -> list[dict]:
    """mini-clip as loaded (Lite0's BatchNorms folded, channels-last) against the same model
    with its tower as built (the reference: plain timm modules)."""
    from rsvl.models.mini.clip import DEFAULT_WEIGHTS, MiniClip, load_heads, load_mini_clip

    rng = np.random.default_rng(0)
    tiles = rng.integers(0, 256, (args.batch * 2, 3, 256, 256), dtype=np.uint8)
    big = rng.integers(0, 256, (max(1, args.batch // 4), 3, 512, 512), dtype=np.uint8)
    texts = [f"a satellite image of {w}" for w in ("farmland", "a forest", "a river", "buildings",
                                                   "an airport", "a harbour", "a road", "a beach")]
    plain = MiniClip(load_heads(DEFAULT_WEIGHTS)).eval()
    shipped = load_mini_clip()
    int8_text = MiniClip(load_heads(DEFAULT_WEIGHTS), image_tower=plain.image_tower).eval()
    torch.ao.quantization.quantize_dynamic(int8_text.text_tower, {torch.nn.Linear: torch.ao.quantization.per_channel_dynamic_qconfig},
                                           dtype=torch.qint8, inplace=True)
    mpix = big.shape[0] * 512 * 512 / 1e6
    rows = []
    with torch.inference_mode():
        for kind, n_items, fns in (
            ("classify", len(tiles), {"timm tower as built (reference)": lambda: plain.encode_image(tiles),
                                      "rsvl (BatchNorm folded, channels-last)": lambda: shipped.encode_image(tiles)}),
            ("dense", mpix, {"timm tower as built (reference)": lambda: plain.dense_features(big),
                             "rsvl (BatchNorm folded, channels-last)": lambda: shipped.dense_features(big)}),
            ("text", len(texts), {"MiniLM as built (reference)": lambda: plain.encode_text(texts),
                                  "MiniLM int8 linear (tried, not used)": lambda: int8_text.encode_text(texts)}),
        ):
            res = interleaved(fns, args.repeats)
            ref_s, ref_out = next(iter(res.values()))
            for path, (sec, out) in res.items():
                rows.append({"arch": "mini-clip", "path": path, "kind": kind, "rate": round(n_items / sec, 3),
                             "vs_reference": round(ref_s / sec, 2),
                             "max_cos_distance": round(_cos_gap(ref_out, out), 8)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", nargs="+", default=["ViT-B-16", "ViT-B-32", "mini-clip"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5, help="timed rounds per path (interleaved; medians)")
    ap.add_argument("--quick", action="store_true", help="one repeat (a smoke run)")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile (it needs a C++ compiler)")
    ap.add_argument("--json", type=Path, default=HERE / "results" / "clip_speed.json")
    args = ap.parse_args()
    if args.quick:
        args.repeats = 1
    torch.set_num_threads(args.threads)
    cards = {"ViT-B-16": "openai-vit-b16", "ViT-B-32": "openai-vit-b32"}
    rows = []
    for arch in args.arch:
        rows += bench_mini(args) if arch == "mini-clip" else bench_arch(arch, cards[arch], args)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    if args.json.is_file():  # keep the rows of architectures not measured in this run
        kept = [r for r in json.loads(args.json.read_text()).get("rows", []) if r.get("arch") not in args.arch]
        rows = kept + rows
    args.json.write_text(json.dumps({"threads": args.threads, "batch": args.batch, "repeats": args.repeats,
                                     "torch": torch.__version__, "platform": platform.platform(),
                                     "quantized_engine": torch.backends.quantized.engine, "rows": rows}, indent=2))
    unit = {"classify": "img/s", "text": "texts/s", "dense": "MPix/s"}
    print("| model | task | path | rate | vs reference | max 1 - cos |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        if "rate" not in r:
            print(f"| {r['arch']} | {r['kind']} | {r['path']} | failed: {r['error']} | | |")
            continue
        extra = f" (compile {r['compile_s']} s)" if "compile_s" in r else ""
        print(f"| {r['arch']} | {r['kind']} | {r['path']}{extra} | {r['rate']:.2f} {unit[r['kind']]} | "
              f"{r['vs_reference']:.2f}x | {r['max_cos_distance']:.2g} |")


if __name__ == "__main__":
    main()
