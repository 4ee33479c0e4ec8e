"""``rsvl eval chat``: a chat model on RSEvalKit's VHM_Eval benchmark files, scored as upstream.

Layout (VHM_Eval, ``../shared/reference/vhm-rsprompter.md`` A5): a folder holding one JSON
per benchmark task, ``DIR/NAME.json``, each a list of entries
``{"image", "image_path", "conversations": [{"from": "human", "value": "<image>\\nQ"},
{"from": "gpt", "value": "A"}], "size"?}``; the image is ``DIR/image_path/image``
(``image_path`` may be absolute upstream: rsvl refuses that unless asked, and refuses any
path that climbs out of DIR, since a JSON file is untrusted input).

The task name picks the scorer as RSEvalKit's ``BENCH_DATASETS`` table does (:data:`TASKS`,
keyed by file name; upstream's own keys are accepted as aliases) and the VHM task tag
(``{CLS}``, ``{VQA}``, ``{VG}``, ``{IDK}``, ``{IT}``) passed as ``task=`` to
:meth:`rsvl.models.chat.ChatModel.chat`, chosen from upstream's key as ``convt_qa`` does.
Answers are greedy. The scorers and their upstream-vs-corrected numbers are in
:mod:`rsvl.eval.chat_scorers`. Next to the model's number, a majority baseline (the file's
most frequent ground truth given as every answer) shows what a model that ignores the image
would score.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from rsvl.console import TaskProgress, progress_scope
from rsvl.errors import DatasetError, InputNotFoundError, PromptError
from rsvl.eval.chat_scorers import (
    ChatItem,
    Scored,
    bracket_numbers,
    gt_box,
    score_bbox,
    score_ciou,
    score_cls_vqa,
    score_color,
    score_counting,
    score_mae,
    score_mc,
    score_ml,
    score_presence,
)
from rsvl.eval.results import EvalResult, base_settings, finish, model_settings, subset_indices
from rsvl.io import read_rgb, write_text
from rsvl.models.chat import TASK_KINDS, ChatModel

#: a benchmark JSON larger than this is refused (VHM_Eval's largest are a few MB)
MAX_JSON_BYTES = 256 * 1024 * 1024
#: upstream's decoding budget (greedy, 512 new tokens)
DEFAULT_MAX_NEW_TOKENS = 512


#: scorer kind -> function; the kinds RSEvalKit names ``position`` and ``imgType`` are mc
SCORERS: dict[str, Callable[[Sequence[ChatItem]], Scored]] = {
    "presence": score_presence,
    "mc": score_mc,
    "cls": score_cls_vqa,
    "vqa": score_cls_vqa,
    "color": score_color,
    "counting": score_counting,
    "mae": score_mae,
    "bbox": score_bbox,
    "ciou": score_ciou,
    "ml": score_ml,
}

#: kinds where "always answer the most frequent ground truth" is a meaningful baseline
BASELINE_KINDS: tuple[str, ...] = ("presence", "cls", "vqa", "counting", "mc")


def check_answer(kind: str, answer: str) -> str | None:
    """Why the ground truth ``answer`` cannot be scored by ``kind`` (None when it can), so a
    malformed file fails before the model runs."""
    if kind == "counting":
        if not re.fullmatch(r"[0-9]+", answer.strip()):
            return f"a counting answer must be a whole number, got {answer!r}"
    elif kind == "bbox":
        try:
            gt_box(answer)
        except ValueError as exc:
            return str(exc)
    elif kind == "ciou":
        nums = bracket_numbers(answer)
        if nums is None or len(nums) < 6:
            return f"no [x1, y1, x2, y2, x3, y3, ...] polygon in the ground truth {answer!r}"
    return None


def score(kind: str, items: Sequence[ChatItem]) -> Scored:
    """Score ``items`` with the scorer ``kind`` (a key of :data:`SCORERS`)."""
    return SCORERS[kind](items)


def majority_baseline(kind: str, items: Sequence[ChatItem]) -> dict[str, Any] | None:
    """The most frequent ground-truth answer of ``items`` given as every prediction, scored
    with the same scorer (None for kinds where it means nothing)."""
    if kind not in BASELINE_KINDS or not items:
        return None
    answer = Counter(it.answer.strip() for it in items).most_common(1)[0][0]
    fake = [ChatItem(it.query, it.answer, answer, size=it.size, hw=it.hw) for it in items]
    res = score(kind, fake)
    out: dict[str, Any] = {"answer": answer, "accuracy": res.metrics["accuracy"]}
    if kind == "counting":
        out["mae"] = res.metrics["mae"]
    return out


@dataclass(frozen=True)
class ChatTask:
    """One benchmark file: its name (the JSON's stem), scorer, VHM tag and upstream key."""

    name: str
    scorer: str
    tag: str
    #: RSEvalKit's ``BENCH_DATASETS`` key for this file ("" for a file upstream does not list)
    upstream_key: str = ""


def _tag(upstream_key: str) -> str:
    # upstream's convt_qa: substrings of the BENCH_DATASETS key, in this order
    if "cls" in upstream_key:
        return "cls"
    if "vqa" in upstream_key:
        return "vqa"
    if "vg" in upstream_key:
        return "vg"
    if any(w in upstream_key for w in ("color", "presence", "position")):
        return "idk"
    return "it"


#: file stem -> (upstream key, scorer kind); RSEvalKit's ``position`` / ``imgType`` are mc;
#: ``none``: inference only upstream (false-premise colour questions), never scored
_TABLE: dict[str, tuple[str, str]] = {
    "presence_mo_dota": ("rs_presence_mo_judge", "presence"),
    "abspos_dota-test_mc": ("rs_position_mo_mc", "mc"),
    "relpos_dota-test_mc": ("rs_relative_position_mo_mc", "mc"),
    "counting_dota-test_open": ("rs_counting_mo_open", "counting"),
    "imgType_mcq": ("rs_imagetype_mc", "mc"),
    "color_dota-test_fair1m-val_open": ("rs_color_open", "color"),
    "gsd_dota_fbp": ("rs_gsd_open", "mae"),
    "color_false_dota-test_popular_open": ("rs_color_false_popular_open", "none"),
    "color_false_dota-test_adversarial_open": ("rs_color_false_adversarial_open", "none"),
    "color_false_dota-test_random_open": ("rs_color_false_random_open", "none"),
    "color_false_pan_dota-test": ("rs_color_false_pan_open", "none"),
    "abspos_false_dota-test_adversarial_mc": ("rs_position_false_adversarial_mc", "mc"),
    "abspos_false_dota-test_popular_mc": ("rs_position_false_popular_mc", "mc"),
    "abspos_false_dota-test_random_mc": ("rs_position_false_random_mc", "mc"),
    "relpos_false_dota-test_adversarial_mc": ("rs_relative_position_false_adversarial_mc", "mc"),
    # "popula": the file name upstream ships
    "relpos_false_dota-test_popula_mc": ("rs_relative_position_false_popular_mc", "mc"),
    "relpos_false_dota-test_random_mc": ("rs_relative_position_false_random_mc", "mc"),
    "cls_AID": ("cls_aid", "cls"),
    "cls_METER_ML": ("cls_METER_ML", "cls"),
    "cls_NWPU_RESISC45": ("cls_NWPU_RESISC45", "cls"),
    "cls_SIRI_WHU": ("cls_SIRI", "cls"),
    "cls_WHU_RS19": ("cls_WHU_RS19", "cls"),
    "RSVQA_HR-comp_RSVQA": ("vqa_HR-comp", "vqa"),
    "RSVQA_HR-presence_RSVQA": ("vqa_HR-pre", "vqa"),
    "RSVQA_LR-comp_RSVQA": ("vqa_LR-comp", "vqa"),
    "RSVQA_LR-presence_RSVQA": ("vqa_LR-pre", "vqa"),
    "RSVQA_LR-rural_urban_RSVQA": ("vqa_LR-rural", "vqa"),
    "VG_DOIR_RSVG_test": ("rs_vg", "bbox"),
    "bfv_crowdai_val": ("rs_building_polygon", "ciou"),
    "obj_meas_dota_test": ("rs_meas", "mae"),
    # upstream's keys for the two multi-label files are swapped (rs_ml_gid -> mlc_fbp_test)
    "mlc_fbp_test": ("rs_ml_gid", "ml"),
    "mlc_gid_test": ("rs_ml_fbp", "ml"),
}

#: every benchmark file RSEvalKit knows, by file stem
TASKS: dict[str, ChatTask] = {stem: ChatTask(stem, kind, _tag(key), key) for stem, (key, kind) in _TABLE.items()}

#: upstream's ``--task`` keys -> file stem; the multi-label keys go to the file they name
ALIASES: dict[str, str] = {t.upstream_key: t.name for t in TASKS.values()} | {
    "rs_ml_gid": "mlc_gid_test",
    "rs_ml_fbp": "mlc_fbp_test",
}

#: the tag a file upstream does not list gets, from the scorer chosen for it
_SCORER_TAGS = {"cls": "cls", "vqa": "vqa", "bbox": "vg", "presence": "idk", "color": "idk"}


@dataclass(frozen=True)
class ChatEntry:
    """One question of a benchmark file."""

    index: int
    image: Path
    query: str
    answer: str
    #: the entry's ``size`` as the JSON gives it (None when absent)
    size: tuple[int, int] | None


def _known() -> str:
    return ", ".join(sorted(t.name for t in TASKS.values() if t.scorer != "none"))


def folder_tasks(folder: str | Path) -> dict[str, ChatTask]:
    """Tasks a folder declares in its ``tasks.json`` (``{name: {"scorer", "tag"}}``, as
    ``rsvl data chat`` writes for rsvl's own val data): their scorer and VHM tag, so such a
    folder is scored with ``--task all`` and no ``--scorer``. Absent file: no tasks."""
    path = Path(folder) / "tasks.json"
    if not path.is_file():
        return {}
    try:
        if path.stat().st_size > 1 << 20:
            raise ValueError("larger than 1 MiB")
        table = json.loads(path.read_text())
        out = {}
        for name, spec in table.items():
            scorer, tag = str(spec["scorer"]), str(spec.get("tag", "it"))
            if scorer != "none" and scorer not in SCORERS:
                raise ValueError(f"task {name!r}: unknown scorer {scorer!r}")
            if tag not in TASK_KINDS:
                raise ValueError(f"task {name!r}: unknown tag {tag!r}")
            if re.fullmatch(r"[A-Za-z0-9_\-][A-Za-z0-9_.\-]*", str(name)):
                out[str(name)] = ChatTask(str(name), scorer, tag, "")
        return out
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
        raise DatasetError(f"{path}: not a task table ({e}).",
                           hint="It maps each NAME to {\"scorer\": KIND, \"tag\": TAG}; fix or remove it.") from e


def resolve_task(name: str, scorer: str | None = None, extra: dict[str, ChatTask] | None = None) -> ChatTask:
    """The :class:`ChatTask` of a file stem (``cls_AID``), a file name (``cls_AID.json``) or
    an upstream key (``cls_aid``); ``extra``: a folder's own tasks (:func:`folder_tasks`);
    ``scorer`` overrides the table and lets any file name in."""
    if scorer is not None and scorer not in SCORERS:
        raise PromptError(f"Unknown scorer {scorer!r}.", hint=f"Use one of: {', '.join(SCORERS)}.")
    stem = name[:-5] if name.endswith(".json") else name
    if not re.fullmatch(r"[A-Za-z0-9_\-][A-Za-z0-9_.\-]*", stem):
        raise PromptError(f"Task name {name!r} is not a file name in the folder.",
                          hint="Give the JSON's name without a path, e.g. --task cls_AID.")
    stem = ALIASES.get(stem, stem)
    task = TASKS.get(stem) or (extra or {}).get(stem)
    if task is None:
        if scorer is None:
            raise PromptError(
                f"Unknown chat task {name!r}.",
                hint=f"Known tasks: {_known()}; or pass --scorer ({', '.join(SCORERS)}) to score another file.",
            )
        return ChatTask(stem, scorer, _SCORER_TAGS.get(scorer, "it"), "")
    if scorer is not None:
        return ChatTask(task.name, scorer, task.tag, task.upstream_key)
    if task.scorer == "none":
        raise PromptError(
            f"{task.name} is inference only in RSEvalKit (false-premise questions, no scorer).",
            hint="Pass --scorer to score it anyway.",
        )
    return task


def resolve_tasks(folder: str | Path, names: Sequence[str], scorer: str | None = None) -> list[ChatTask]:
    """The tasks ``names`` asks for in ``folder``; ``all`` means every ``*.json`` there whose
    name maps to a scorer. Each file must exist."""
    root = Path(folder)
    if not root.is_dir():
        raise InputNotFoundError(f"{root} is not a folder.", hint="Give the VHM_Eval folder holding NAME.json files.")
    if scorer is not None and scorer not in SCORERS:
        raise PromptError(f"Unknown scorer {scorer!r}.", hint=f"Use one of: {', '.join(SCORERS)}.")
    if not names:
        raise PromptError("No task given.", hint=f"Pass --task NAME (or all). Known tasks: {_known()}.")
    tasks: list[ChatTask] = []
    own = folder_tasks(root)
    known = {**own, **TASKS}
    for name in names:
        if name == "all":
            found = [known[p.stem] for p in sorted(root.glob("*.json")) if p.stem in known]
            found = [t if scorer is None else ChatTask(t.name, scorer, t.tag, t.upstream_key) for t in found
                     if scorer is not None or t.scorer != "none"]
            if not found:
                raise DatasetError(f"No benchmark file in {root}.", hint=f"Expected NAME.json with NAME one of: {_known()}.")
            tasks.extend(found)
            continue
        task = resolve_task(name, scorer, own)
        if not (root / f"{task.name}.json").is_file():
            present = ", ".join(sorted(p.stem for p in root.glob("*.json"))) or "none"
            raise InputNotFoundError(f"{root / (task.name + '.json')} does not exist.",
                                     hint=f"JSON files in {root}: {present}.")
        tasks.append(task)
    unique: dict[str, ChatTask] = {}
    for t in tasks:
        unique.setdefault(t.name, t)
    return list(unique.values())


def _entry_error(path: Path, i: int, what: str) -> DatasetError:
    return DatasetError(f"{path.name}, entry {i}: {what}.", hint="Fix or remove that entry.")


def _inside(root: Path, path: Path) -> bool:
    return os.path.commonpath([root, path]) == str(root)


def _image_path(root: Path, json_path: Path, i: int, entry: dict[str, Any], allow_absolute: bool) -> Path:
    image = entry.get("image")
    if not isinstance(image, str) or not image.strip():
        raise _entry_error(json_path, i, "'image' is missing or not a file name")
    sub = entry.get("image_path", "")
    if sub is None:
        sub = ""
    if not isinstance(sub, str):
        raise _entry_error(json_path, i, f"'image_path' must be a string, got {type(sub).__name__}")
    if os.path.isabs(image) or (sub and os.path.isabs(sub)):
        if not allow_absolute:
            raise _entry_error(json_path, i, f"absolute image path {os.path.join(sub, image)!r} refused "
                                             "(pass --allow-absolute-paths if you trust this file)")
        return Path(os.path.normpath(os.path.join(sub, image) if sub else image))
    path = Path(os.path.normpath(root / sub / image))
    if not _inside(root, path):
        raise _entry_error(json_path, i, f"image path {os.path.join(sub, image)!r} leaves {root}")
    return path


def _turns(json_path: Path, i: int, entry: dict[str, Any]) -> tuple[str, str]:
    conv = entry.get("conversations")
    if not isinstance(conv, list) or len(conv) < 2:
        raise _entry_error(json_path, i, "'conversations' must be a list of a human and a gpt turn")
    values = []
    for k, want in ((0, "human"), (1, "gpt")):
        turn = conv[k]
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise _entry_error(json_path, i, f"conversation turn {k} has no text 'value'")
        if "from" in turn and turn["from"] != want:
            raise _entry_error(json_path, i, f"conversation turn {k} is from {turn['from']!r}, expected {want!r}")
        values.append(turn["value"])
    query = values[0].replace("<image>\n", "").replace("<image>", "").strip()
    if not query:
        raise _entry_error(json_path, i, "the question is empty")
    return query, values[1]


def _size(json_path: Path, i: int, entry: dict[str, Any]) -> tuple[int, int] | None:
    size = entry.get("size")
    if size is None:
        return None
    ok = isinstance(size, list | tuple) and len(size) == 2
    ok = ok and all(isinstance(v, int | float) and not isinstance(v, bool) and v > 0 for v in size)
    if not ok:
        raise _entry_error(json_path, i, f"'size' must be two positive numbers, got {size!r}")
    return int(size[0]), int(size[1])


def read_chat_file(
    folder: str | Path,
    task: ChatTask | str,
    *,
    allow_absolute: bool = False,
    check_images: bool = True,
    max_bytes: int = MAX_JSON_BYTES,
) -> list[ChatEntry]:
    """The entries of ``folder/NAME.json``, checked: every entry well formed, its image
    inside ``folder`` (or absolute, when ``allow_absolute``) and present, its ground truth
    readable by the task's scorer. A problem raises a :class:`~rsvl.errors.DatasetError`
    naming the entry and what is wrong."""
    t = task if isinstance(task, ChatTask) else resolve_task(task)
    root = Path(os.path.abspath(folder))
    path = root / f"{t.name}.json"
    if not path.is_file():
        raise InputNotFoundError(f"{path} does not exist.", hint="Check the folder and the task name.")
    nbytes = path.stat().st_size
    if nbytes > max_bytes:
        raise DatasetError(f"{path} is {nbytes / 2**20:.0f} MiB, over the {max_bytes / 2**20:.0f} MiB limit "
                           "for a benchmark file.", hint="Check that this is a VHM_Eval task file.")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path} is not valid JSON ({exc}).", hint="Re-extract the file.") from exc
    if not isinstance(data, list) or not data:
        raise DatasetError(f"{path} must hold a non-empty list of entries.", hint="Check the file's layout (VHM_Eval).")
    entries = []
    for i, entry in enumerate(data):
        if not isinstance(entry, dict):
            raise _entry_error(path, i, f"an entry must be an object, got {type(entry).__name__}")
        image = _image_path(root, path, i, entry, allow_absolute)
        query, answer = _turns(path, i, entry)
        why = check_answer(t.scorer, answer)
        if why:
            raise _entry_error(path, i, why)
        entries.append(ChatEntry(i, image, query, answer, _size(path, i, entry)))
    if check_images:
        missing = [e for e in entries if not e.image.is_file()]
        if missing:
            raise DatasetError(f"{path.name}: {len(missing)} image(s) missing, first {missing[0].image} "
                               f"(entry {missing[0].index}).", hint="Extract the task's images next to its JSON.")
    return entries


def _record(entry: ChatEntry, size: tuple[int, int], text: str, boxes: list[Any]) -> dict[str, Any]:
    return {
        "filename": str(entry.image),
        "size": list(size),
        "query": entry.query,
        "answer": entry.answer,
        "pred": text,
        "boxes": [[b.x1, b.y1, b.x2, b.y2] for b in boxes],
    }


def predictions_name(task: str, model_name: str) -> str:
    """Upstream's per-item file name: ``<stem>_<model>_eval.jsonl``."""
    return f"{task}_{model_name.rstrip('/').split('/')[-1]}_eval.jsonl"


def evaluate_chat(
    model: ChatModel,
    folder: str | Path,
    task: str | ChatTask,
    scorer: str | None = None,
    limit: int | None = None,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    progress: TaskProgress | None = None,
    *,
    out: str | Path | None = None,
    allow_absolute: bool = False,
    model_name: str | None = None,
    weights: str | Path | None = None,
) -> EvalResult:
    """Run ``model`` on one VHM_Eval task file and score it as RSEvalKit does.

    Args:
        model: any :class:`~rsvl.models.chat.ChatModel`; answers are greedy.
        folder: the folder holding ``NAME.json`` (and the images it names).
        task: the file stem or upstream key (see :func:`resolve_task`).
        scorer: a key of :data:`~rsvl.eval.chat_scorers.SCORERS` instead of the table's.
        limit: score N evenly spaced entries only.
        max_new_tokens: the decoding budget per answer (upstream: 512).
        progress: a :class:`~rsvl.console.TaskProgress` (one unit per question).
        out: a folder to write the per-item predictions to, as upstream's
            ``<stem>_<model>_eval.jsonl`` (filename, size, query, answer, pred; plus boxes).
        allow_absolute: accept absolute image paths in the JSON.

    Returns:
        An :class:`EvalResult` whose ``metrics`` hold the corrected numbers, ``upstream``
        (upstream's numbers, None plus ``error`` where upstream raises) and ``baseline``
        (the majority answer's score, for presence, cls, vqa, counting and mc).
    """
    t0 = time.perf_counter()
    t = task if isinstance(task, ChatTask) else resolve_task(task, scorer)
    if scorer is not None and t.scorer != scorer:
        t = ChatTask(t.name, scorer, t.tag, t.upstream_key)
    entries = read_chat_file(folder, t, allow_absolute=allow_absolute)
    chosen = [entries[i] for i in subset_indices(len(entries), limit)]
    name = model_name or getattr(model, "name", None) or type(model).__name__
    items: list[ChatItem] = []
    records: list[dict[str, Any]] = []
    new_tokens = 0
    with progress_scope(progress, len(chosen)) as advance:
        for e in chosen:
            try:
                image = read_rgb(e.image, error=DatasetError)
            except Image.DecompressionBombError as exc:
                raise DatasetError(f"{e.image} (entry {e.index}) is too large to decode ({exc}).",
                                   hint="Check the benchmark's images.") from exc
            h, w = image.shape[:2]
            size = e.size if e.size is not None else (w, h)  # upstream: PIL's (w, h) when absent
            ans = model.chat(image, e.query, task=t.tag, max_new_tokens=max_new_tokens, temperature=0.0)
            new_tokens += ans.new_tokens
            items.append(ChatItem(e.query, e.answer, ans.text, list(ans.boxes), size=size, hw=(h, w)))
            records.append(_record(e, size, ans.text, ans.boxes))
            advance(1)
    scored = score(t.scorer, items)
    for rec, row in zip(records, scored.items, strict=True):
        rec["parsed"], rec["score"] = row.get("parsed"), row.get("score")
    if out is not None:
        out_dir = Path(out)
        out_dir.mkdir(parents=True, exist_ok=True)
        write_text(out_dir / predictions_name(t.name, name),
                   "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    metrics: dict[str, Any] = {**scored.metrics, "n": len(items), "upstream": scored.upstream}
    baseline = majority_baseline(t.scorer, items)
    if baseline is not None:
        metrics["baseline"] = baseline
    settings = base_settings("chat", folder)
    settings.update(model_settings(model, model_name, weights))
    settings.update({
        "benchmark": t.name,
        "file": str(Path(os.path.abspath(folder)) / f"{t.name}.json"),
        "scorer": t.scorer,
        "tag": t.tag,
        "upstream_key": t.upstream_key or None,
        "max_new_tokens": max_new_tokens,
        "temperature": 0.0,
        "n_samples": len(items),
        "n_dataset": len(entries),
        "limit": limit,
        "subset": "evenly spaced" if len(items) < len(entries) else "all",
        "new_tokens": new_tokens,
        "predictions": None if out is None else str(Path(out) / predictions_name(t.name, name)),
    })
    return finish(f"chat/{t.name}", metrics, settings, t0)
