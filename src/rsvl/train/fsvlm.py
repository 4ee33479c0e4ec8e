"""``rsvl train fsvlm --model mini-fsvlm``: train the built-in mini-fsvlm on a FIT-layout folder.

Data: FSVLM's layout (``{train,val}/{img,lbl,json}``, :mod:`rsvl.data.farmseg`), as
``rsvl data farmland`` writes it from the real pixel labels in ``../shared/data``. A request
is FSVLM's farmland question with the image's description in front, or the label's own
``question`` ("Please segment the storage tanks."). The answer is ``"[SEG]."``.

mini-chat's tower and language model are frozen (:mod:`rsvl.models.mini.fsvlm`), so their
outputs are computed once per sample and kept in memory: the Lite0 maps at strides 8/16/32,
and the language model's last-layer state at the position that predicts the answer (with its
log-sum-exp over the vocabulary, so the cross-entropy over the vocabulary *plus* ``[SEG]`` is
exact). Chat questions about UCM images (RSIVQA, when ``--chat-negatives`` > 0 and the UCM
folder is known) add states where ``[SEG]`` must *not* be predicted. Each step then trains
``seg_head``, ``text_hidden_fcs`` and the decoder with FSVLM's loss, 1.0 CE + 2.0 BCE +
0.5 Dice (:func:`rsvl.models.lisa.loss.seg_losses`), on flipped/rotated copies of the cached
maps and labels. Selection: the mean over sources of val gIoU, every ``eval_every`` steps;
the best weights go to ``OUT/fsvlm.safetensors`` with ``OUT/summary.json``.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from rsvl.console import state as console
from rsvl.data.farmseg import read_split
from rsvl.io import atomic_path, read_rgb, write_text
from rsvl.models.lisa.loss import seg_losses
from rsvl.models.mini.fsvlm import MiniFSVLM, MiniFSVLMConfig, build_mini_fsvlm, save_mini_fsvlm


@dataclass
class FsvlmTrainConfig:
    steps: int = 1500
    max_minutes: float | None = None
    batch_size: int = 8
    lr: float = 3e-4
    weight_decay: float = 0.0
    warmup: int = 100
    eval_every: int = 150
    ce_weight: float = 1.0
    bce_weight: float = 2.0
    dice_weight: float = 0.5
    chat_negatives: int = 400
    seed: int = 0
    threads: int | None = None
    limit_train: int | None = None
    device: str = "cpu"


@dataclass
class Cache:
    """Frozen outputs of every sample (float16 maps, float32 states)."""

    f8: torch.Tensor
    f16: torch.Tensor
    f32: torch.Tensor
    small: torch.Tensor
    states: torch.Tensor
    lse: torch.Tensor
    labels: torch.Tensor  # (N, S, S) uint8
    sources: list[str]


def square_label(label: np.ndarray, side: int) -> np.ndarray:
    """A label placed as :meth:`MiniFSVLM.pixels` places its image (centred on a square,
    padding = background), resized (nearest) to ``side``."""
    h, w = label.shape
    s = max(h, w)
    canvas = np.zeros((s, s), np.uint8)
    top, left = (s - h) // 2, (s - w) // 2
    canvas[top: top + h, left: left + w] = (label > 0).astype(np.uint8)
    if s != side:
        canvas = np.asarray(Image.fromarray(canvas).resize((side, side), Image.NEAREST))
    return canvas


def cache_samples(model: MiniFSVLM, samples: Sequence[Any], rng: random.Random,
                  log: Callable[[str], None], batch: int = 8) -> Cache:
    parts: dict[str, list[torch.Tensor]] = defaultdict(list)
    labels, sources = [], []
    t0 = time.perf_counter()
    for i in range(0, len(samples), batch):
        chunk = samples[i: i + batch]
        images = [read_rgb(s.image) for s in chunk]
        x, _geom = model.pixels(images)
        (f8, f16, f32), small, tokens = model.image_features(x)
        prompts = [s.request(rng) for s in chunk]
        states, logits = model.prompt_states(tokens, prompts)
        for name, t in (("f8", f8), ("f16", f16), ("f32", f32), ("small", small)):
            parts[name].append(t.to(torch.float16).cpu())
        parts["states"].append(states.cpu())
        parts["lse"].append(torch.logsumexp(logits, -1).cpu())
        for s in chunk:
            labels.append(torch.from_numpy(np.array(square_label(s.read_label(), model.image_size))))
            sources.append(s.source)
        if (i // batch) % 20 == 0:
            log(f"cache: {min(i + batch, len(samples))}/{len(samples)} ({time.perf_counter() - t0:.0f} s)")
    return Cache(*(torch.cat(parts[k]) for k in ("f8", "f16", "f32", "small", "states", "lse")),
                 labels=torch.stack(labels), sources=sources)


def chat_negatives(model: MiniFSVLM, ucm: Path, count: int, rng: random.Random,
                   log: Callable[[str], None]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """States of RSIVQA train questions (where the answer's first token is a word, never
    ``[SEG]``): (states, log-sum-exp, logit of the true first token)."""
    path = ucm / "rsivqa.json"
    if count <= 0 or not path.is_file():
        return torch.zeros(0, 1), torch.zeros(0), torch.zeros(0)
    meta = json.loads(path.read_text())
    pool = [s for s in meta["samples"] if s.get("split") == "train" and str(s.get("question", "")).strip()]
    picked = rng.sample(pool, min(count, len(pool)))
    chat = model.chat_model
    states, lse, target = [], [], []
    t0 = time.perf_counter()
    for i in range(0, len(picked), 8):
        chunk = picked[i: i + 8]
        x, _ = model.pixels([read_rgb(ucm / s["image"]) for s in chunk])
        _, _, tokens = model.image_features(x)
        st, lg = model.prompt_states(tokens, [str(s["question"]) for s in chunk])
        for b, s in enumerate(chunk):
            first = chat.answer_ids(str(s["answer"]).capitalize())[0]
            states.append(st[b])
            lse.append(torch.logsumexp(lg[b], -1))
            target.append(lg[b, first])
    log(f"chat negatives: {len(states)} questions ({time.perf_counter() - t0:.0f} s)")
    return torch.stack(states), torch.stack(lse), torch.stack(target)


def _augment(tensors: Sequence[torch.Tensor], k: int) -> list[torch.Tensor]:
    """The same flip/rotation (one of 8) of every (..., H, W) tensor."""
    out = [torch.rot90(t, k % 4, dims=(-2, -1)) for t in tensors]
    return [t.flip(-1) for t in out] if k >= 4 else out


def batch_loss(model: MiniFSVLM, cache: Cache, idx: Sequence[int], cfg: FsvlmTrainConfig, *,
               augment: random.Random | None = None,
               negatives: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    dev = model.device
    ii = torch.as_tensor(list(idx))
    maps = [cache.f8[ii], cache.f16[ii], cache.f32[ii], cache.small[ii], cache.labels[ii]]
    if augment is not None:
        maps = _augment(maps, augment.randrange(8))
    f8, f16, f32, small, labels = (m.to(dev) for m in maps)
    states = cache.states[ii].to(dev)
    logits = model.decode((f8, f16, f32), small, states, model.image_size)
    mask_loss = seg_losses(logits, labels.float())
    # cross-entropy over vocabulary + [SEG]: the true next token is [SEG] here...
    s = model.seg_logit(states)
    ce = (torch.logaddexp(cache.lse[ii].to(dev), s) - s).mean()
    if negatives is not None and len(negatives[0]):
        ns, nl, nt = negatives
        pick = torch.randint(0, len(ns), (len(idx),)) if augment is not None else torch.arange(len(ns))
        sn = model.seg_logit(ns[pick].to(dev))
        # ... and a word in the chat questions' answers
        ce = 0.5 * (ce + (torch.logaddexp(nl[pick].to(dev), sn) - nt[pick].to(dev)).mean())
    loss = cfg.ce_weight * ce + cfg.bce_weight * mask_loss["bce"] + cfg.dice_weight * mask_loss["dice"]
    return loss, {"ce": float(ce.detach()), "bce": float(mask_loss["bce"].detach()), "dice": float(mask_loss["dice"].detach())}


@torch.no_grad()
def evaluate(model: MiniFSVLM, cache: Cache, negatives: tuple[torch.Tensor, ...] | None = None,
             batch: int = 16) -> dict[str, Any]:
    """Per source: gIoU (mean per-sample foreground IoU, empty union = 1) and cIoU at the
    model's input size; the share of requests where [SEG] beats every word; and, on chat
    negatives, the share where it (wrongly) does."""
    model.eval()
    inter: dict[str, float] = defaultdict(float)
    union: dict[str, float] = defaultdict(float)
    ious: dict[str, list[float]] = defaultdict(list)
    fired = 0
    for i in range(0, len(cache.sources), batch):
        ii = torch.arange(i, min(i + batch, len(cache.sources)))
        dev = model.device
        logits = model.decode((cache.f8[ii].to(dev), cache.f16[ii].to(dev), cache.f32[ii].to(dev)),
                              cache.small[ii].to(dev), cache.states[ii].to(dev), model.image_size)
        pred = logits > 0
        gt = cache.labels[ii].to(dev) > 0
        s = model.seg_logit(cache.states[ii].to(dev))
        fired += int((s > cache.lse[ii].to(dev)).sum())  # [SEG] more likely than all words together
        for b, k in enumerate(ii.tolist()):
            src = cache.sources[k]
            it = float((pred[b] & gt[b]).sum())
            un = float((pred[b] | gt[b]).sum())
            inter[src] += it
            union[src] += un
            ious[src].append(it / un if un else 1.0)
    out: dict[str, Any] = {"per_source": {src: {"giou": float(np.mean(ious[src])), "ciou": inter[src] / max(1.0, union[src]),
                                                 "n": len(ious[src])} for src in sorted(ious)}}
    out["score"] = float(np.mean([v["giou"] for v in out["per_source"].values()]))
    out["seg_rate"] = fired / max(1, len(cache.sources))
    if negatives is not None and len(negatives[0]):
        s = model.seg_logit(negatives[0].to(model.device))
        out["false_seg_rate"] = float((s > negatives[1].to(model.device)).float().mean())
    model.train()
    return out


def _cached(model: MiniFSVLM, samples: Sequence[Any], rng: random.Random, log: Callable[[str], None],
            cache_dir: Path | None, split: str) -> Cache:
    """:func:`cache_samples`, kept in ``cache_dir`` when given (keyed by the samples, the
    request choice and the model's frozen parts), so a second run starts training at once."""
    if cache_dir is None:
        return cache_samples(model, samples, rng, log)
    key = hashlib.sha256(json.dumps([[str(s.image), s.request(random.Random(0))] for s in samples]).encode()
                         + json.dumps(model.config.to_dict(), sort_keys=True).encode()
                         + repr(rng.getstate()).encode()).hexdigest()[:16]
    path = Path(cache_dir) / f"fsvlm-{split}-{key}.pt"
    if path.is_file():
        log(f"cache: {path}")
        d = torch.load(path, weights_only=True)
        return Cache(**d)
    cache = cache_samples(model, samples, rng, log)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save(asdict(cache), tmp)
    return cache


def train_fsvlm(data: str | Path, out: str | Path, config: FsvlmTrainConfig | None = None, *,
                ucm: str | Path | None = None, log: Callable[[str], None] | None = None,
                model: MiniFSVLM | None = None, cache_dir: str | Path | None = None) -> dict[str, Any]:
    """Train mini-fsvlm on ``data/train``, select on ``data/val``; write
    ``out/fsvlm.safetensors`` (best val score) and ``out/summary.json``."""
    cfg = config or FsvlmTrainConfig()
    log = log or console.notice
    data, out = Path(data), Path(out)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    train_samples = read_split(data, "train")
    val_samples = read_split(data, "val")
    if cfg.limit_train:
        train_samples = rng.sample(train_samples, min(cfg.limit_train, len(train_samples)))
    out.mkdir(parents=True, exist_ok=True)
    model = model if model is not None else build_mini_fsvlm(MiniFSVLMConfig(), device=cfg.device)
    model.train()
    log(f"{len(train_samples)} train / {len(val_samples)} val requests")
    train = _cached(model, train_samples, rng, log, cache_dir, "train")
    val = _cached(model, val_samples, random.Random(cfg.seed + 1), log, cache_dir, "val")
    negatives = val_negatives = None
    if ucm is not None:
        negatives = chat_negatives(model, Path(ucm), cfg.chat_negatives, rng, log)
        n_val = max(1, len(negatives[0]) // 8) if len(negatives[0]) else 0
        val_negatives = tuple(t[:n_val] for t in negatives)
        negatives = tuple(t[n_val:] for t in negatives)

    params = model.trainable_parameters()
    head = list(model.seg_head.parameters())
    rest = [p for p in params if all(p is not h for h in head)]
    # the [SEG] row starts at zero and must outgrow a log-sum-exp over 49k words: a 10x rate
    opt = torch.optim.AdamW([{"params": rest, "lr": cfg.lr}, {"params": head, "lr": 10 * cfg.lr}],
                            betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    total = max(1, cfg.steps)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(1, cfg.warmup)) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / total))))
    before = evaluate(model, val, val_negatives)
    log(f"val before training: score {before['score']:.3f} {json.dumps(before['per_source'])}")
    history: list[dict[str, Any]] = [{"step": 0, **before}]
    best = (-1.0, -1)
    t0 = time.perf_counter()
    order: list[int] = []
    running: dict[str, float] = {}
    stopped = "steps"
    step = 0
    while step < total:
        if len(order) < cfg.batch_size:
            order = list(range(len(train.sources)))
            rng.shuffle(order)
        idx, order = order[: cfg.batch_size], order[cfg.batch_size:]
        loss, parts = batch_loss(model, train, idx, cfg, augment=rng, negatives=negatives)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        step += 1
        for k, v in {"loss": float(loss.detach()), **parts}.items():
            running[k] = 0.95 * running.get(k, v) + 0.05 * v
        minutes = (time.perf_counter() - t0) / 60
        over = cfg.max_minutes is not None and minutes >= cfg.max_minutes
        if step % 25 == 0:
            log(f"step {step}/{total} " + " ".join(f"{k} {v:.3f}" for k, v in running.items()) + f"  {minutes:.1f} min")
        if step % cfg.eval_every == 0 or step == total or over:
            res = evaluate(model, val, val_negatives)
            history.append({"step": step, "minutes": minutes, "train": dict(running), **res})
            mark = ""
            if res["score"] > best[0]:
                best = (res["score"], step)
                save_mini_fsvlm(model, out / "fsvlm.safetensors", extra={"step": str(step), "val_score": f"{res['score']:.4f}"})
                mark = " (best, saved)"
            log(f"step {step}: val score {res['score']:.3f} seg_rate {res['seg_rate']:.2f} "
                f"false_seg {res.get('false_seg_rate', float('nan')):.2f} {json.dumps(res['per_source'])}{mark}")
        if over:
            stopped = "max_minutes"
            break
    summary = {"config": asdict(cfg), "data": str(data), "train_requests": len(train.sources),
               "val_requests": len(val.sources), "steps": step, "stopped_by": stopped, "best_step": best[1],
               "best_val_score": best[0], "val_before": before, "history": history,
               "minutes": (time.perf_counter() - t0) / 60, "weights": str(out / "fsvlm.safetensors")}
    write_text(out / "summary.json", json.dumps(summary, indent=2))
    return summary


__all__ = ["FsvlmTrainConfig", "square_label", "train_fsvlm"]
