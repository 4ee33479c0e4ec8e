"""``rsvl data chat``: instruction data for rsvl's chat models, from the real annotations.

:func:`build_chat_data` takes the items of :mod:`rsvl.data.chat_items` (UC Merced
captions and scene classes, RSIVQA, NWPU VHR-10 boxes, AID scene classes; the tasks, their
phrasings and answers are described there), caps the train items of each task at
``max_per_task`` (a seeded choice) so no task dominates, shuffles them, and writes them in
VHM's training layout, split into train and val by image, plus the val items once more per
task in the VHM_Eval layout so that ``rsvl eval chat`` (and RSEvalKit) score a model on them.
No torch here.

The eval files are written so that RSEvalKit's scorers, as upstream implements them, can
score them: the presence ground truth is a bare "yes" / "no" (upstream compares its parsed
"yes" / "no" / "unknown" with the lower-cased ground truth, so "Yes." would never match),
and the ``nwpu_counting`` eval file holds only non-zero counts (upstream's MAPE divides by
the ground truth); the "0" questions stay in train.json and val.json, and absent classes are
scored by ``nwpu_presence``. ``image_path`` is the folder of the image, joined with
``image`` as upstream does.

Written under ``OUT``::

    OUT/train.json          [{id, image (absolute path), source_dataset, task,
                              conversations: [{from: human, value: "<image>\\n..."},
                                              {from: gpt, value: ...}]}, ...]
    OUT/val.json            the same for the val split
    OUT/eval/<task>.json    the val items of one task, VHM_Eval layout:
                            [{id, image (file name), image_path (its folder, relative to
                              OUT/eval as RSEvalKit joins them), conversations,
                              size: [h, w]}, ...]
    OUT/eval/images/        the val images, linked (default) or copied by source and folder
    OUT/eval/tasks.json     {task: {scorer, tag, items}}
    OUT/stats.json          items per task and split, images per source and split, settings,
                            the majority answer of every eval task and its accuracy

Run: ``rsvl data chat --ucm ../shared/data/ucm --nwpu
../shared/data/nwpu_vhr10/instances_train.json --aid ../shared/data/aid --out DIR``.
"""

from __future__ import annotations

import json
import random
import shutil
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from PIL import Image

from rsvl.data.chat_items import (
    CAPTIONS_PER_IMAGE,
    MAX_BOXES,
    RELPOS_MARGIN,
    TASKS,
    ChatItem,
    generate_items,
)
from rsvl.errors import DatasetError, OutputError
from rsvl.io import atomic_dir, write_text

__all__ = [
    "DEFAULT_MAX_PER_TASK",
    "build_chat_data",
    "format_stats",
]

#: train items kept per task (a seeded choice among those generated)
DEFAULT_MAX_PER_TASK = 900
#: scorers for which a majority answer is a meaningful baseline
_MAJORITY_SCORERS = ("presence", "cls", "vqa", "counting", "mc")


def _cap(items: list[ChatItem], limit: int | None, seed: int, split: str) -> list[ChatItem]:
    by_task: dict[str, list[ChatItem]] = defaultdict(list)
    for it in items:
        by_task[it.task].append(it)
    kept: list[ChatItem] = []
    for task in sorted(by_task):
        group = by_task[task]
        if limit is not None and len(group) > limit:
            group = list(group)
            random.Random(f"chat-cap:{seed}:{split}:{task}").shuffle(group)
            group = sorted(group[:limit], key=lambda it: it.key)
        kept += group
    return kept


def _norm_answer(text: str) -> str:
    return " ".join(text.lower().split()).rstrip(".")


def _squash(text: str) -> str:
    return text.replace(" ", "").lower()


def _majority(items: list[ChatItem]) -> dict[str, Any] | None:
    """The most frequent ground truth of an eval file given as every answer, scored with the
    task's scorer as RSEvalKit reads an answer (cls / vqa: the answer, lower-cased without
    spaces, is a substring of the ground truth; presence and counting: equal), and exactly."""
    if not items or TASKS[items[0].task].scorer not in _MAJORITY_SCORERS:
        return None
    scorer = TASKS[items[0].task].scorer
    truth = [(it.answer if it.eval_answer is None else it.eval_answer).strip() for it in items]
    answer = Counter(truth).most_common(1)[0][0]
    if scorer in ("cls", "vqa"):
        hits = sum(_squash(answer) in _squash(t) for t in truth)
    else:
        hits = sum(answer.lower() == t.lower() for t in truth)
    exact = sum(_norm_answer(answer) == _norm_answer(t) for t in truth)
    return {"answer": answer, "accuracy": round(hits / len(truth), 4),
            "exact": round(exact / len(truth), 4), "items": len(truth)}


def _image_size(path: Path, cache: dict[Path, tuple[int, int]]) -> tuple[int, int]:
    if path not in cache:
        try:
            with Image.open(path) as im:
                w, h = im.size
        except OSError as exc:
            raise DatasetError(f"cannot read image {path}: {exc}") from exc
        cache[path] = (h, w)
    return cache[path]


def _dump(obj: Any) -> str:
    return json.dumps(obj, indent=1, ensure_ascii=False) + "\n"


def build_chat_data(out: str | Path, *, ucm: str | Path | None = None,
                    nwpu: str | Path | None = None, aid: str | Path | None = None,
                    nwpu_images: str | Path | None = None, val_fraction: float = 0.15,
                    seed: int = 0, max_per_task: int | None = DEFAULT_MAX_PER_TASK,
                    max_val_per_task: int | None = None, link: str = "symlink",
                    overwrite: bool = False) -> dict[str, Any]:
    """Build the instruction data under ``out`` (see the module doc); returns the statistics.

    ``out`` must not exist, or must be an earlier output of this function (or empty) and
    ``overwrite`` true. Same inputs and seed give byte-identical files. ``link`` places the
    val images under ``out/eval/images/<source>/<folder>/`` as symbolic links (``symlink``)
    or copies (``copy``), so the eval folder is self-contained as ``rsvl eval chat`` wants
    it (image paths inside the folder); ``none`` points ``image_path`` at the absolute
    source folders instead.
    """
    root = Path(out)
    if root.exists():
        if not overwrite:
            raise OutputError(f"{root} exists", hint="Pass --overwrite or choose another --out.")
        if not root.is_dir() or (any(root.iterdir()) and not (root / "stats.json").is_file()):
            raise OutputError(f"{root} exists and is not a chat data folder; not replacing it",
                              hint="Choose another --out.")
    if link not in ("symlink", "copy", "none"):
        raise OutputError(f"link must be symlink, copy or none, not {link!r}")
    if max_per_task is not None and max_per_task < 1:
        raise DatasetError(f"--max-per-task must be at least 1, got {max_per_task}")
    dropped: Counter[str] = Counter()
    items = generate_items(ucm=ucm, nwpu=nwpu, aid=aid, nwpu_images=nwpu_images,
                           val_fraction=val_fraction, seed=seed, dropped=dropped)
    generated = Counter((it.task, it.split) for it in items)
    train = _cap([it for it in items if it.split == "train"], max_per_task, seed, "train")
    val = _cap([it for it in items if it.split == "val"], max_val_per_task, seed, "val")
    random.Random(f"chat-order:{seed}").shuffle(train)
    tasks = sorted({it.task for it in items}, key=list(TASKS).index)

    sizes: dict[Path, tuple[int, int]] = {}
    links: dict[Path, str] = {}  # image -> its folder under eval/ (linked or copied there)
    eval_files: dict[str, list[dict[str, Any]]] = {}
    for task in tasks:
        records = []
        for it in val:
            if it.task != task or not it.evaluable:
                continue
            if link == "none":
                folder = str(it.image.parent)
            else:
                folder = links.setdefault(it.image, f"images/{it.source}/{it.image.parent.name}")
            records.append(it.eval_record(_image_size(it.image, sizes), folder))
        if records:
            eval_files[task] = records

    images: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
    for it in train + val:
        images[it.source][it.split].add(str(it.image))
    stats: dict[str, Any] = {
        "items": {"train": len(train), "val": len(val)},
        "per_task": {t: {"train": sum(1 for it in train if it.task == t),
                         "val": sum(1 for it in val if it.task == t),
                         "eval": len(eval_files.get(t, [])),
                         "generated_train": generated.get((t, "train"), 0),
                         "generated_val": generated.get((t, "val"), 0),
                         "scorer": TASKS[t].scorer, "tag": TASKS[t].tag} for t in tasks},
        "images": {s: {sp: len(images[s][sp]) for sp in ("train", "val")}
                   for s in sorted(images)},
        "answers": {t: dict(Counter(it.answer for it in train if it.task == t).most_common(5))
                    for t in tasks if TASKS[t].scorer in ("presence", "vqa")},
        "baseline": {t: _majority([it for it in val if it.task == t and it.evaluable])
                     for t in tasks},
        "dropped": dict(sorted(dropped.items())),
        "settings": {"ucm": None if ucm is None else str(Path(ucm).resolve()),
                     "nwpu": None if nwpu is None else str(Path(nwpu).resolve()),
                     "aid": None if aid is None else str(Path(aid).resolve()),
                     "val_fraction": val_fraction, "seed": seed,
                     "max_per_task": max_per_task, "max_val_per_task": max_val_per_task,
                     "link": link,
                     "captions_per_image": CAPTIONS_PER_IMAGE, "max_boxes": MAX_BOXES,
                     "relpos_margin": RELPOS_MARGIN},
    }
    task_table = {t: {"scorer": TASKS[t].scorer, "tag": TASKS[t].tag,
                      "items": len(eval_files[t])} for t in tasks if t in eval_files}

    root.parent.mkdir(parents=True, exist_ok=True)
    if root.exists():
        shutil.rmtree(root)
    with atomic_dir(root) as tmp:
        write_text(tmp / "train.json", _dump([it.record() for it in train]))
        write_text(tmp / "val.json", _dump([it.record() for it in val]))
        (tmp / "eval").mkdir()
        for task, records in eval_files.items():
            write_text(tmp / "eval" / f"{task}.json", _dump(records))
        write_text(tmp / "eval" / "tasks.json", _dump(task_table))
        for image, folder in links.items():
            dst = tmp / "eval" / folder / image.name
            dst.parent.mkdir(parents=True, exist_ok=True)
            if link == "symlink":
                dst.symlink_to(image)
            else:
                shutil.copyfile(image, dst)
        write_text(tmp / "stats.json", _dump(stats))
    return stats


def format_stats(stats: dict[str, Any]) -> str:
    """Plain-text report of a run (what ``rsvl data chat`` prints)."""
    lines = [f"items: train {stats['items']['train']}, val {stats['items']['val']} "
             f"(eval files: {sum(r['eval'] for r in stats['per_task'].values())})",
             "images: " + ", ".join(f"{s} {d['train']}/{d['val']}"
                                    for s, d in stats["images"].items()) + " (train/val)",
             f"{'task':<18}{'train':>7}{'val':>6}{'eval':>6}  {'scorer':<9}"
             "majority baseline (eval)"]
    for task, row in stats["per_task"].items():
        base = stats["baseline"].get(task)
        text = f"{base['answer']!r} {base['accuracy']:.3f}" if base else "-"
        lines.append(f"{task:<18}{row['train']:>7}{row['val']:>6}{row['eval']:>6}  "
                     f"{row['scorer']:<9}{text}")
    if stats.get("dropped"):
        lines.append("dropped: " + ", ".join(f"{k} {v}" for k, v in stats["dropped"].items()))
    return "\n".join(lines)
