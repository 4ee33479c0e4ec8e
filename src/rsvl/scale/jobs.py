"""Job files for ``rsvl run jobs.yaml``: one YAML (or JSON) document naming the task, the
model, its options and the sources, so that a large run is written down once and rerun or
resumed with the same settings.

    task: segment
    model: mini-clip
    sources: [tiles/*.tif, more/]       # paths, folders or globs, relative to this file
    out: out/county
    options: {classes: "water, forest, buildings", tile: 256}
    workers: 4                          # any keyword of rsvl.scale.run
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import yaml

from rsvl.errors import InputNotFoundError, JobError

#: keys of a job file besides ``task``, ``sources``, ``out`` and ``options``
RUN_KEYS = ("model", "weights", "device", "workers", "gpus_per_worker", "cpus_per_worker", "address", "on_error",
            "retries", "resume", "overwrite", "block", "cog", "item_timeout", "start_timeout")
#: options whose values are paths (resolved relative to the job file)
PATH_OPTIONS = ("labels_file",)


def is_job_file(text: str) -> bool:
    return str(text).lower().endswith((".yaml", ".yml", ".json"))


def _resolve(base: Path, value: str) -> str:
    p = Path(os.path.expanduser(str(value)))
    return str(p if p.is_absolute() else base / p)


def load_job(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The keyword arguments of :func:`rsvl.scale.run` a job file describes (``task``,
    ``sources``, ``out``, run settings, and the task's options), relative paths resolved
    from the job file's folder."""
    p = Path(path)
    if not p.is_file():
        raise InputNotFoundError(f"{p}: no such job file.", hint="Check the path.")
    try:
        text = p.read_text(encoding="utf-8")
        doc = json.loads(text) if p.suffix.lower() == ".json" else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError) as exc:
        raise JobError(f"{p} is not a readable job file ({str(exc).splitlines()[0]}).",
                       hint="Write it as YAML: task, sources, out, options (see `rsvl run --help`).") from None
    if not isinstance(doc, dict):
        raise JobError(f"{p} is not a mapping of settings.", hint="Start it with `task: segment`.")
    unknown = sorted(set(doc) - {"task", "sources", "out", "options", *RUN_KEYS})
    if unknown:
        raise JobError(f"{p}: unknown key {unknown[0]!r}.",
                       hint=f"Keys: task, sources, out, options, {', '.join(RUN_KEYS)}.")
    for key in ("task", "sources", "out"):
        if not doc.get(key):
            raise JobError(f"{p} has no {key!r}.", hint="A job names task, sources and out.")
    base = p.resolve().parent
    sources = doc["sources"] if isinstance(doc["sources"], list) else [doc["sources"]]
    options = doc.get("options") or {}
    if not isinstance(options, dict):
        raise JobError(f"{p}: options must be a mapping (name: value).")
    options = {k: (_resolve(base, v) if k in PATH_OPTIONS and v else v) for k, v in options.items()}
    job: dict[str, Any] = {"task": str(doc["task"]), "sources": [_resolve(base, s) for s in sources],
                           "out": _resolve(base, doc["out"]), **{k: doc[k] for k in RUN_KEYS if k in doc}}
    if job.get("weights"):
        job["weights"] = _resolve(base, job["weights"])
    job["options"] = options
    return job
