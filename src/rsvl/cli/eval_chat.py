"""``rsvl eval chat``: a chat model on VHM_Eval task files, scored as RSEvalKit does."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from rsvl.cli import preflight
from rsvl.console import emit_json, task_progress
from rsvl.errors import OutputError, UnknownModelError


def load_chat_model(name: str, weights: Path | None, device: str) -> Any:
    """The chat model ``name`` from the registry, refusing a model that cannot chat."""
    from rsvl.models.chat import ChatModel  # lazy: see rsvl.cli
    from rsvl.models.registry import load  # lazy: see rsvl.cli

    preflight.model_for("chat", name, weights)  # before the load, which takes seconds
    model = load(name, weights=weights, device=device)
    if not isinstance(model, ChatModel):
        raise UnknownModelError(f"{name} is not a chat model.", hint="Pick a model whose task is chat (see `rsvl models`).")
    return model


def _fmt(key: str, v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool) or isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if key == "per_range_percent":
            return f"{v:.2f} %"
        if key in ("mae", "mape") or key.startswith("mae") or "ratio" in key:
            return f"{v:.4g}"
        return f"{100 * v:.2f} %"
    return str(v)


def _rows(prefix: str, d: dict[str, Any]) -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    for k, v in d.items():
        if k in ("upstream", "baseline", "classes"):
            continue
        if isinstance(v, dict):
            rows += [(f"{prefix}{k} {kk}", _fmt(k, vv) if not k.endswith("count") else str(vv)) for kk, vv in v.items()]
        else:
            rows.append((f"{prefix}{k}", _fmt(k, v)))
    return rows


def _table(doc: dict[str, Any]) -> Table:
    s, m = doc["settings"], doc["metrics"]
    t = Table(title=f"{s['benchmark']} ({s['scorer']}, {s['n_samples']} questions)", show_edge=False)
    t.add_column("metric")
    t.add_column("value", justify="right")
    for k, v in _rows("", m):
        t.add_row(k, v)
    up = dict(m.get("upstream") or {})
    err = up.pop("error", None)
    if err:
        t.add_row("upstream", f"crashes: {err}")
    else:
        for k, v in _rows("upstream ", up):
            t.add_row(k, v)
    if m.get("baseline"):
        b = m["baseline"]
        t.add_row(f"baseline (always {b['answer']!r})", _fmt("accuracy", b["accuracy"]))
    return t


def chat(
    data: Path = typer.Argument(..., help="VHM_Eval folder: NAME.json files and their images."),
    tasks: list[str] = typer.Option(..., "--task", "-t", help="Task file name (e.g. cls_AID, presence_mo_dota) or upstream key; repeat, or 'all'."),
    scorer: str = typer.Option(None, "--scorer", help="Score with this kind instead of the task's: presence, mc, cls, vqa, color, counting, mae, bbox, ciou, ml."),
    model: str = typer.Option("mini-chat", "--model", "-m", help="Chat model name (see `rsvl models`)."),
    weights: Path = typer.Option(None, "--weights", help="Local checkpoint instead of the model card's file."),
    device: str = typer.Option("cpu", "--device"),
    limit: int = typer.Option(None, "--limit", min=1, help="Score N evenly spaced questions per task only."),
    max_new_tokens: int = typer.Option(512, "--max-new-tokens", min=1, help="Decoding budget per answer (upstream: 512)."),
    out: Path = typer.Option(None, "--out", "-o", help="Folder for the per-question predictions (<task>_<model>_eval.jsonl) and the metrics JSON."),
    allow_absolute: bool = typer.Option(False, "--allow-absolute-paths", help="Accept absolute image paths in the JSON files (trusted files only)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document (metrics and settings) on stdout."),
) -> None:
    """Chat benchmark (RSEvalKit / VHM_Eval): accuracy, MAE, Acc@0.5, C-IoU as upstream scores them,
    corrected where upstream's scorer is wrong, next to a majority-answer baseline."""
    from rsvl.eval.chat import evaluate_chat, read_chat_file, resolve_tasks  # lazy: see rsvl.cli
    from rsvl.io import write_text  # lazy: see rsvl.cli

    chosen = resolve_tasks(data, tasks, scorer)
    for t in chosen:  # fail on the data before the model loads
        read_chat_file(data, t, allow_absolute=allow_absolute)
    if out is not None and out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} is a file.", hint="--out names a folder for the predictions.")
    m = load_chat_model(model, weights, device)
    docs = []
    for t in chosen:
        progress = task_progress(f"chat {t.name}", unit="questions")
        res = evaluate_chat(m, data, t, limit=limit, max_new_tokens=max_new_tokens, progress=progress, out=out,
                            allow_absolute=allow_absolute, model_name=model, weights=weights)
        docs.append(res.to_dict())
    if len(docs) == 1:
        doc = docs[0]
    else:
        doc = {"task": "chat", "metrics": {d["settings"]["benchmark"]: d["metrics"] for d in docs},
               "settings": {"model": model, "dataset": docs[0]["settings"]["dataset"],
                            "tasks": [d["settings"]["benchmark"] for d in docs]},
               "results": docs}
    if out is not None:
        write_text(Path(out) / f"chat_{model.split('/')[-1]}_metrics.json", json.dumps(doc, indent=2, allow_nan=False) + "\n")
    if as_json:
        emit_json(doc)
        return
    console = Console(highlight=False)
    for d in docs:
        console.print(_table(d))
    console.print(f"model {model}, {sum(d['settings']['seconds'] for d in docs):.1f} s", markup=False)
    if out is not None:
        console.print(f"wrote {out}", markup=False)
