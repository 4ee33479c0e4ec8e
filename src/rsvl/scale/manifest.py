"""The run's manifest on disk (``OUTDIR/run.json``): the task, its settings and, per item,
its state, outputs, error, attempts and timing.

The driver rewrites it atomically (and flushed to disk) whenever an item changes state, so a
killed driver or worker loses nothing finished: ``--resume`` reads it back, skips the items
whose state is ``done`` and whose outputs are all on disk, and redoes the others.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rsvl import __version__
from rsvl.errors import ResumeError
from rsvl.io import write_text
from rsvl.scale.items import Item

MANIFEST = "run.json"
FORMAT = "rsvl-run"
FORMAT_VERSION = 1

PENDING, RUNNING, DONE, FAILED = "pending", "running", "done", "failed"


@dataclass
class ItemRecord:
    """What the manifest knows of one item."""

    item: Item
    state: str = PENDING
    outputs: dict[str, str] = field(default_factory=dict)
    error: str | None = None
    attempts: int = 0
    seconds: float | None = None
    worker: int | None = None  # pid of the process that ran (or runs) it

    def finished(self) -> bool:
        """Done, with every output still on disk."""
        return self.state == DONE and all(Path(p).exists() for p in self.outputs.values())

    def to_dict(self) -> dict[str, Any]:
        return {**self.item.to_dict(), "state": self.state, "outputs": self.outputs, "error": self.error,
                "attempts": self.attempts, "seconds": self.seconds, "worker": self.worker}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ItemRecord:
        return cls(Item.from_dict(d), str(d.get("state", PENDING)), dict(d.get("outputs") or {}), d.get("error"),
                   int(d.get("attempts") or 0), d.get("seconds"), d.get("worker"))


@dataclass
class Manifest:
    """The manifest of a run in folder ``out``; ``settings`` decide whether it can resume."""

    out: Path
    settings: dict[str, Any]
    items: list[ItemRecord]
    merged: dict[str, list[str]] = field(default_factory=dict)
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))

    @property
    def path(self) -> Path:
        return self.out / MANIFEST

    def save(self) -> None:
        doc = {"format": FORMAT, "format_version": FORMAT_VERSION, "rsvl_version": __version__,
               "created": self.created, "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "settings": self.settings, "counts": self.counts(), "merged": self.merged,
               "items": [r.to_dict() for r in self.items]}
        write_text(self.path, json.dumps(doc, indent=1, default=str) + "\n", fsync=True)

    def counts(self) -> dict[str, int]:
        out = {PENDING: 0, RUNNING: 0, DONE: 0, FAILED: 0}
        for r in self.items:
            out[r.state] = out.get(r.state, 0) + 1
        return out

    @classmethod
    def load(cls, out: str | os.PathLike[str]) -> Manifest:
        path = Path(out) / MANIFEST
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
            if doc.get("format") != FORMAT:
                raise ValueError(f"format {doc.get('format')!r}")
            items = [ItemRecord.from_dict(d) for d in doc["items"]]
            return cls(Path(out), dict(doc["settings"]), items, dict(doc.get("merged") or {}),
                       str(doc.get("created", "")))
        except FileNotFoundError:
            raise ResumeError(f"{out} holds no run to resume (no {MANIFEST}).",
                              hint="Start the run without --resume.") from None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ResumeError(f"{path} cannot be read as a run manifest ({exc}).",
                              hint="Start the run again in a new folder, or with --overwrite.") from None

    def check_resumable(self, settings: dict[str, Any]) -> None:
        """Raise a ResumeError if ``settings`` differ from those the run was started with."""
        def plain(value: Any) -> Any:  # as stored: tuples become lists; 0 and 0.0 compare equal
            return json.loads(json.dumps(value, default=str))

        for key in sorted(set(settings) | set(self.settings)):
            if plain(settings.get(key)) != plain(self.settings.get(key)):
                raise ResumeError(
                    f"the run in {self.out} was started with {key}={self.settings.get(key)!r}, "
                    f"not {settings.get(key)!r}.",
                    hint="Resume with the same task, model, options and sources, or start a new run in another folder.")
