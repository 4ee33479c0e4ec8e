"""``rsvl train chat``: train mini-chat's projector and LoRA adapters on instruction data.

The data is VHM's training format (a JSON list of ``{"image", "task", "conversations":
[human "<image>\\n…", gpt "…"]}``), as ``rsvl data chat`` writes it from the real annotations
in ``../shared/data`` (``train.json`` / ``val.json`` in one folder).

The image tower is frozen, so its features are computed once per image and kept in memory;
each step then runs only the projector and SmolLM2 with its adapters. Selection is on the
val loss of the answer tokens (a fixed val subset, evaluated every ``eval_every`` steps); the
best adapters are written to ``OUT/adapter.safetensors`` with the run's summary in
``OUT/summary.json``. Training stops after ``epochs`` or ``max_minutes``, whichever first.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from rsvl.console import state as console
from rsvl.errors import DatasetError, InputNotFoundError
from rsvl.io import read_rgb, write_text
from rsvl.models.mini.chat import (
    IMAGE_PLACEHOLDER,
    MiniChat,
    MiniChatConfig,
    build_mini_chat,
    save_mini_chat,
)


@dataclass
class ChatTrainConfig:
    epochs: float = 2.0
    max_minutes: float | None = None
    batch_size: int = 8
    lr: float = 3e-4
    projector_lr: float = 1e-3
    weight_decay: float = 0.0
    warmup: float = 0.03
    eval_every: int = 150
    val_samples: int = 240
    max_answer_tokens: int = 48
    seed: int = 0
    threads: int | None = None
    limit_train: int | None = None
    device: str = "cpu"
    lora_r: int = 16


@dataclass
class Sample:
    image: int  # index into the feature cache
    before: list[int]
    after: list[int]
    answer: list[int]
    task: str


def read_items(path: Path) -> list[dict[str, Any]]:
    """Entries of a VHM training JSON with one human and one gpt turn each."""
    if not path.is_file():
        raise InputNotFoundError(f"training data not found: {path}.",
                                 hint="Build it with: rsvl data chat --ucm ../shared/data/ucm --nwpu "
                                      "../shared/data/nwpu_vhr10/instances_train.json --out DATA")
    try:
        items = json.loads(path.read_text())
    except ValueError as e:
        raise DatasetError(f"{path} is not JSON ({e}).") from e
    if not isinstance(items, list):
        raise DatasetError(f"{path}: expected a list of conversations.")
    for i, it in enumerate(items):
        conv = it.get("conversations") if isinstance(it, dict) else None
        if not (isinstance(conv, list) and len(conv) >= 2 and "image" in it):
            raise DatasetError(f"{path}: entry {i} has no image or no human/gpt turns.")
    return items


def turns(item: dict[str, Any]) -> tuple[str, str]:
    """(question without the image placeholder, answer) of a one-turn conversation."""
    conv = item["conversations"]
    question = str(conv[0]["value"]).replace(IMAGE_PLACEHOLDER, "").strip()
    return question, str(conv[1]["value"]).strip()


def encode(model: MiniChat, items: Sequence[dict[str, Any]], index: dict[str, int], max_answer: int) -> list[Sample]:
    out = []
    for it in items:
        q, a = turns(it)
        before, after = model.prompt_ids(q)
        answer = model.answer_ids(a)[: max_answer] if max_answer else model.answer_ids(a)
        if answer[-1] != model.end_id:
            answer[-1] = model.end_id
        out.append(Sample(index[str(it["image"])], before, after, answer, str(it.get("task", "?"))))
    return out


def cache_features(model: MiniChat, paths: Sequence[str], log: Callable[[str], None], batch: int = 16) -> torch.Tensor:
    """(N, 64, feature_dim) float16 tower features of every image, computed once."""
    feats = []
    t0 = time.perf_counter()
    for i in range(0, len(paths), batch):
        images = [read_rgb(p) for p in paths[i: i + batch]]
        feats.append(model.image_features(images).to(torch.float16).cpu())
        if (i // batch) % 25 == 0:
            log(f"features: {min(i + batch, len(paths))}/{len(paths)} images ({time.perf_counter() - t0:.0f} s)")
    return torch.cat(feats)


@torch.no_grad()
def val_loss(model: MiniChat, feats: torch.Tensor, samples: Sequence[Sample], batch: int) -> tuple[float, dict[str, float]]:
    """Mean answer-token loss over ``samples`` (batched within each task, so the per-task
    means are exact), and the per-task means."""
    model.eval()
    by_task: dict[str, list[Sample]] = {}
    for s in samples:
        by_task.setdefault(s.task, []).append(s)
    per_task: dict[str, float] = {}
    total = 0.0
    for task in sorted(by_task):
        group, acc = by_task[task], 0.0
        for i in range(0, len(group), batch):
            chunk = group[i: i + batch]
            loss = model.loss(feats[[s.image for s in chunk]], [(s.before, s.after, s.answer) for s in chunk])
            acc += float(loss) * len(chunk)
        per_task[task] = acc / len(group)
        total += acc
    model.train()
    model.features.eval()
    return total / max(1, len(samples)), per_task


def task_batches(samples: Sequence[Sample], size: int, rng: random.Random) -> list[list[Sample]]:
    """One epoch of batches, each from a single task (similar lengths: little padding, which
    matters on a CPU where the class lists of classification prompts are 5x longer than a
    presence question), in a shuffled order."""
    by_task: dict[str, list[Sample]] = {}
    for s in samples:
        by_task.setdefault(s.task, []).append(s)
    batches = []
    for task in sorted(by_task):
        group = list(by_task[task])
        rng.shuffle(group)
        batches.extend(group[i: i + size] for i in range(0, len(group), size))
    rng.shuffle(batches)
    return batches


def train_chat(data: str | Path, out: str | Path, config: ChatTrainConfig | None = None, *,
               log: Callable[[str], None] | None = None, language_model: tuple[Any, Any] | None = None,
               pretrained: bool = True) -> dict[str, Any]:
    """Train mini-chat on ``data/train.json``, select on ``data/val.json``; write
    ``out/adapter.safetensors`` (best val loss) and ``out/summary.json``."""
    cfg = config or ChatTrainConfig()
    log = log or console.notice
    data, out = Path(data), Path(out)
    train_items = read_items(data / "train.json")
    val_items = read_items(data / "val.json")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    out.mkdir(parents=True, exist_ok=True)

    model = build_mini_chat(MiniChatConfig(lora_r=cfg.lora_r, lora_alpha=2 * cfg.lora_r), pretrained=pretrained,
                            device=cfg.device, language_model=language_model)
    rng = random.Random(cfg.seed)
    if cfg.limit_train:
        train_items = rng.sample(train_items, min(cfg.limit_train, len(train_items)))
    val_pick = rng.sample(val_items, min(cfg.val_samples, len(val_items)))
    paths = sorted({str(it["image"]) for it in [*train_items, *val_pick]})
    index = {p: i for i, p in enumerate(paths)}
    log(f"{len(train_items)} train / {len(val_pick)} val conversations on {len(paths)} images")
    feats = cache_features(model, paths, log)
    train = encode(model, train_items, index, cfg.max_answer_tokens)
    val = encode(model, val_pick, index, cfg.max_answer_tokens)

    params = [
        {"params": list(model.projector.parameters()), "lr": cfg.projector_lr},
        {"params": [p for n, p in model.llm.named_parameters() if p.requires_grad], "lr": cfg.lr},
    ]
    opt = torch.optim.AdamW(params, weight_decay=cfg.weight_decay)
    steps_per_epoch = len(task_batches(train, cfg.batch_size, random.Random(0)))
    total = max(1, int(cfg.epochs * steps_per_epoch))
    warm = max(1, int(cfg.warmup * total))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / total))))

    t0 = time.perf_counter()
    best = (math.inf, -1)
    history: list[dict[str, Any]] = []
    base_loss, base_tasks = val_loss(model, feats, val, cfg.batch_size)
    log(f"val loss before training: {base_loss:.3f}")
    history.append({"step": 0, "val_loss": base_loss})
    step, running = 0, 0.0
    model.train()
    model.features.eval()
    stopped = "epochs"
    batches: list[list[Sample]] = []
    while step < total:
        if not batches:
            batches = task_batches(train, cfg.batch_size, rng)
        chunk = batches.pop()
        loss = model.loss(feats[[s.image for s in chunk]], [(s.before, s.after, s.answer) for s in chunk])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in params for p in g["params"]], 1.0)
        opt.step()
        sched.step()
        step += 1
        value = float(loss.detach())
        running = 0.98 * running + 0.02 * value if step > 1 else value
        elapsed = (time.perf_counter() - t0) / 60
        over = cfg.max_minutes is not None and elapsed >= cfg.max_minutes
        if step % 25 == 0:
            log(f"step {step}/{total}  loss {running:.3f}  {elapsed:.1f} min")
        if step % cfg.eval_every == 0 or step == total or over:
            vl, per_task = val_loss(model, feats, val, cfg.batch_size)
            history.append({"step": step, "val_loss": vl, "train_loss": running, "minutes": elapsed, "per_task": per_task})
            mark = ""
            if vl < best[0]:
                best = (vl, step)
                save_mini_chat(model, out / "adapter.safetensors", extra={"step": str(step), "val_loss": f"{vl:.4f}"})
                mark = " (best, saved)"
            log(f"step {step}: val loss {vl:.3f}{mark}")
        if over:
            stopped = "max_minutes"
            break

    summary = {
        "config": asdict(cfg),
        "data": str(data),
        "train_conversations": len(train),
        "val_conversations": len(val),
        "train_tasks": dict(Counter(s.task for s in train)),
        "steps": step,
        "stopped_by": stopped,
        "best_step": best[1],
        "best_val_loss": best[0],
        "val_loss_before": base_loss,
        "val_loss_before_per_task": base_tasks,
        "history": history,
        "minutes": (time.perf_counter() - t0) / 60,
        "weights": str(out / "adapter.safetensors"),
    }
    write_text(out / "summary.json", json.dumps(summary, indent=2))
    return summary


__all__ = ["ChatTrainConfig", "read_items", "train_chat", "turns"]
