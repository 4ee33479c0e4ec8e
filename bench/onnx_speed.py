"""ONNX Runtime for the built-in models' frozen towers, against the towers as built and as
rsvl ships them, measured in one run on the same weights and inputs.

    pip install -e ".[bench]"          # onnx, onnxruntime
    python bench/onnx_speed.py         # ~3 min on 2 cores

The towers are what mini-clip, mini-refer, mini-chat and mini-fsvlm spend their time in:
EfficientNet-Lite0 (mini-clip's: through its 1x1 head) and MiniLM's BERT. Paths:

* ``as built`` (the reference): timm's Lite0 and transformers' BERT, eager, float32;
* ``rsvl (shipped)``: what ``rsvl.load`` runs: Lite0 with its BatchNorms folded,
  channels-last, scripted; the BERT traced (``rsvl.models.mini.compiled``);
* ``ONNX Runtime``: the folded Lite0 / the BERT exported with ``torch.onnx.export`` (opset
  17, dynamic batch and size) and run by ONNX Runtime's CPU provider with all graph
  optimisations, as many intra-op threads as torch.

Inputs: ``classify`` 8 tiles of 256 px, ``dense`` 2 tiles of 512 px (image tower), ``text``
8 prompts (BERT, padded to the longest). Differences from the reference, in float64: the
largest ``1 - cos`` between pooled features per image (global mean of the three maps) or
mean-pooled word states per text, and the largest absolute difference of any map or word
state value.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from timing import interleaved  # bench/timing.py (this folder is on sys.path)

HERE = Path(__file__).resolve().parent


def _maps(maps) -> list[torch.Tensor]:
    return [torch.as_tensor(np.asarray(m)).double() for m in maps]


def _pooled(maps: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([m.mean((2, 3)) for m in maps], dim=1)


def _max_abs(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))


def _cos_gap(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((1 - F.cosine_similarity(a.double(), b.double(), dim=1)).max())


def _session(path: Path, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def bench(args: argparse.Namespace, folder: Path) -> list[dict]:
    from rsvl.models.mini.clip import image_tower_for_clip
    from rsvl.models.mini.compiled import compiled_image_tower, compiled_minilm
    from rsvl.models.mini.towers import MiniLMTower, mean_pool

    rng = np.random.default_rng(0)
    tiles = torch.from_numpy(rng.standard_normal((8, 3, 256, 256), dtype=np.float32))
    big = torch.from_numpy(rng.standard_normal((2, 3, 512, 512), dtype=np.float32))
    texts = [f"a satellite image of {w}" for w in ("farmland", "a forest", "a river", "dense residential buildings",
                                                   "an airport", "a harbour with ships", "a road", "a beach")]

    built = image_tower_for_clip().eval()
    fused = image_tower_for_clip().fuse_for_inference()
    shipped = compiled_image_tower("lite0-head", lambda: image_tower_for_clip().fuse_for_inference())
    onnx_image = folder / "lite0-head.onnx"
    with torch.inference_mode():
        torch.onnx.export(fused, (tiles[:1],), str(onnx_image), input_names=["x"], output_names=["f8", "f16", "f32"],
                          dynamic_axes={"x": {0: "b", 2: "h", 3: "w"}}, opset_version=17, dynamo=False)
    ort_image = _session(onnx_image, args.threads)

    eager_text = MiniLMTower()
    traced = compiled_minilm()
    tok = eager_text.tokenizer(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
    ids, mask = tok["input_ids"], tok["attention_mask"]
    onnx_text = folder / "minilm.onnx"

    class Words(torch.nn.Module):  # keyword call: BertModel's positional arguments vary by version
        def __init__(self, bert: torch.nn.Module) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    with torch.inference_mode():
        torch.onnx.export(Words(eager_text.bert).eval(), (ids, mask), str(onnx_text), input_names=["input_ids", "attention_mask"],
                          output_names=["last_hidden_state"], opset_version=17, dynamo=False,
                          dynamic_axes={"input_ids": {0: "b", 1: "n"}, "attention_mask": {0: "b", 1: "n"}})
    ort_text = _session(onnx_text, args.threads)

    def text_rows(states) -> list[torch.Tensor]:
        return [torch.as_tensor(np.asarray(states)).double()]

    groups = {
        "classify": (len(tiles), {
            "as built (reference)": lambda: _maps(built(tiles)),
            "rsvl (shipped)": lambda: _maps(shipped(tiles)),
            "ONNX Runtime": lambda: _maps(ort_image.run(None, {"x": tiles.numpy()})),
        }),
        "dense": (big.shape[0] * 512 * 512 / 1e6, {
            "as built (reference)": lambda: _maps(built(big)),
            "rsvl (shipped)": lambda: _maps(shipped(big)),
            "ONNX Runtime": lambda: _maps(ort_image.run(None, {"x": big.numpy()})),
        }),
        "text": (len(texts), {
            "as built (reference)": lambda: text_rows(eager_text.bert(input_ids=ids, attention_mask=mask)
                                                      .last_hidden_state),
            "rsvl (shipped)": lambda: text_rows(traced[0](ids, mask).last_hidden_state),
            "ONNX Runtime": lambda: text_rows(ort_text.run(None, {"input_ids": ids.numpy(),
                                                                  "attention_mask": mask.numpy()})[0]),
        }),
    }
    rows = []
    with torch.inference_mode():
        for kind, (n, fns) in groups.items():
            res = interleaved(fns, args.repeats)
            ref_s, ref_out = next(iter(res.values()))
            pool = (lambda o: mean_pool(o[0], mask)) if kind == "text" else _pooled
            for path, (sec, out) in res.items():
                rows.append({"model": "mini towers", "kind": kind, "path": path, "rate": round(n / sec, 3),
                             "vs_reference": round(ref_s / sec, 2),
                             "max_cos_distance": max(0.0, _cos_gap(pool(ref_out), pool(out))),
                             "max_abs_diff": _max_abs(ref_out, out)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", type=Path, default=HERE / "results" / "onnx_speed.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import onnxruntime

    with tempfile.TemporaryDirectory() as tmp:
        rows = bench(args, Path(tmp))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"threads": args.threads, "repeats": args.repeats, "torch": torch.__version__,
                                     "onnxruntime": onnxruntime.__version__, "platform": platform.platform(),
                                     "rows": rows}, indent=2))
    unit = {"classify": "img/s", "dense": "MPix/s", "text": "texts/s"}
    print("| tower | path | rate | vs reference | max 1 - cos (pooled) | max abs diff (maps / word states) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        tower = "Lite0 + head" if r["kind"] != "text" else "MiniLM BERT"
        print(f"| {tower} ({r['kind']}) | {r['path']} | {r['rate']:.2f} {unit[r['kind']]} | "
              f"{r['vs_reference']:.2f}x | {r['max_cos_distance']:.2g} | {r['max_abs_diff']:.2g} |")


if __name__ == "__main__":
    main()
