"""Resumable tile runs for the vector tasks (classify per tile, instances on rasters).

Their per-tile results are small (a score vector, a few polygons), so an interrupted run
keeps them rather than a blended raster: finished tiles are journaled in the partial folder
next to the run's first output (``.NAME.rsvl-partial``, the folder segment uses), together
with the run's settings:

* ``journal.json``: the settings (input, model, classes, grid, thresholds, outputs...),
  written once, atomically, before the first tile.
* ``tiles-000000.json``, ``tiles-000001.json``...: numbered chunks of finished tiles in
  row-major order (``{"start": first tile index, "tiles": [[row, col, payload], ...]}``),
  each written under a temporary name and renamed. A chunk holds whole predictor batches,
  so a resumed run sends the model the very batches an uninterrupted run would.

A kill at any moment leaves chunks 0..k-1 complete; the reader takes chunks in order and
stops at the first one that is missing, unreadable or out of sequence (and deletes it and
what follows), so what it reads back is always a consistent prefix of the tiles. A resumed
run replays that prefix, predicts the rest, and writes outputs identical to an
uninterrupted run's. The run holds :class:`rsvl.io.OutputLock` on the first output while it
works; the partial folder is removed once the outputs are in place.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rsvl.errors import OutputError, ResumeError
from rsvl.geo.runner import partial_dir_for
from rsvl.io import OutputLock, write_text

#: format of journal.json and the chunks
JOURNAL_VERSION = 1
JOURNAL = "journal.json"
CHUNK_PREFIX = "tiles-"
#: tiles per chunk: the smallest multiple of the batch size that is at least this
MIN_CHUNK_TILES = 8


def source_identity(path: str | os.PathLike[str]) -> dict[str, Any]:
    """What identifies an input file for a resume: real path, size and modification time."""
    st = os.stat(path)
    return {"source": os.path.realpath(path), "size": st.st_size, "mtime": int(st.st_mtime)}


def journal_exists(output: str | os.PathLike[str]) -> bool:
    """Whether an interrupted run of ``output`` left a journal."""
    return (partial_dir_for(output) / JOURNAL).exists()


def refuse_stale_journal(output: str | os.PathLike[str], resume: bool, overwrite: bool) -> None:
    """Without ``--resume`` or ``--overwrite``, an interrupted run's journal is an error
    (starting over silently would throw its work away)."""
    if not resume and not overwrite and journal_exists(output):
        raise OutputError(
            f"an interrupted run of {output} left its finished tiles in {partial_dir_for(output)}.",
            hint="Rerun with --resume to continue it, or with --overwrite to start over.",
        )


class TileJournal:
    """The journal of one resumable tile run (see the module doc). Use as a context
    manager: it holds the output lock, and :meth:`open` returns the tiles already done.

    ``outputs``: the run's outputs (the first names the partial folder and the lock);
    ``settings``: everything an identical result depends on (JSON-able); ``batch_size``:
    chunks hold whole batches of it.
    """

    def __init__(self, outputs: Sequence[str | os.PathLike[str]], settings: dict[str, Any], *,
                 batch_size: int, resume: bool = False, overwrite: bool = False) -> None:
        self.outputs = [Path(p) for p in outputs]
        self.settings = json.loads(json.dumps(settings, default=str))  # as it reads back
        self.resume = resume
        self.overwrite = overwrite
        self.partial = partial_dir_for(self.outputs[0])
        self.chunk_tiles = batch_size * max(1, -(-MIN_CHUNK_TILES // batch_size))
        self._lock = OutputLock(self.outputs[0])
        self._buffer: list[list[Any]] = []
        self._next_chunk = 0
        self._done = 0
        self.resumed = 0

    def __enter__(self) -> TileJournal:
        self._lock.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self._lock.release()

    # -- opening ---------------------------------------------------------------------------

    def open(self) -> list[tuple[tuple[int, int], Any]]:
        """Check the outputs and the journal, start or continue it; return the finished
        tiles ``[((row, col), payload), ...]`` in row-major order (empty for a new run)."""
        journal = self.partial / JOURNAL
        if journal.exists() and not self.resume:
            refuse_stale_journal(self.outputs[0], self.resume, self.overwrite)
        if self.resume and journal.exists():
            self._check_settings(journal)
            done = self._read_chunks()
            self._done = self.resumed = len(done)
            return done
        if self.resume:
            existing = [p for p in self.outputs if p.exists()]
            if existing:
                # the run finished (an interruption after its last write leaves complete
                # outputs and no journal); its settings are not re-checked, so refuse
                raise ResumeError(
                    f"{existing[0]} exists and no interrupted run of it is left to resume: that run finished.",
                    hint="Its outputs are complete. Pass --overwrite (without --resume) to run again, "
                         "or choose another output name.",
                )
        if not self.overwrite:
            for p in self.outputs:
                if p.exists():
                    raise OutputError(f"{p} exists.", hint="Pass --overwrite to replace it, or choose another output name.")
        if self.partial.exists():
            shutil.rmtree(self.partial)
        self.partial.mkdir(parents=True)
        write_text(journal, json.dumps({"version": JOURNAL_VERSION, "settings": self.settings},
                                       sort_keys=True, indent=1))
        return []

    def _check_settings(self, journal: Path) -> None:
        try:
            saved = json.loads(journal.read_text())
            ok = isinstance(saved, dict) and saved.get("version") == JOURNAL_VERSION
        except (OSError, ValueError) as exc:
            raise ResumeError(f"cannot read {journal} ({exc}).",
                              hint="Rerun with --overwrite (without --resume) to start over.") from exc
        if not ok or not isinstance(saved.get("settings"), dict):
            raise ResumeError(f"{journal} was written by another rsvl version and cannot be resumed safely.",
                              hint="Rerun with --overwrite (without --resume) to start over.")
        old = saved["settings"]
        differ = sorted(k for k in set(old) | set(self.settings)
                        if json.dumps(old.get(k), sort_keys=True) != json.dumps(self.settings.get(k), sort_keys=True))
        if differ:
            details = "; ".join(f"{k}: {_short(old.get(k))} then, {_short(self.settings.get(k))} now" for k in differ)
            raise ResumeError(
                f"the interrupted run in {self.partial} used other settings or another input ({details}).",
                hint="Resume with the same input and options, or rerun with --overwrite (without --resume) to start over.",
            )

    def _read_chunks(self) -> list[tuple[tuple[int, int], Any]]:
        """The longest run of complete, consecutive chunks; later ones are deleted."""
        done: list[tuple[tuple[int, int], Any]] = []
        k = 0
        while True:
            path = self.partial / f"{CHUNK_PREFIX}{k:06d}.json"
            try:
                doc = json.loads(path.read_text())
                tiles = doc["tiles"]
                ok = doc["start"] == len(done) and isinstance(tiles, list) and all(
                    isinstance(t, list) and len(t) == 3 for t in tiles)
            except (OSError, ValueError, KeyError, TypeError):
                ok = False
            if not ok:
                break
            done += [((int(r), int(c)), payload) for r, c, payload in tiles]
            k += 1
        for p in self.partial.glob(f"{CHUNK_PREFIX}*.json"):
            stem = p.stem[len(CHUNK_PREFIX):]
            if not stem.isdigit() or int(stem) >= k:
                p.unlink(missing_ok=True)
        self._next_chunk = k
        return done

    # -- the run -----------------------------------------------------------------------------

    def add(self, position: tuple[int, int], payload: Any) -> None:
        """Record one finished tile (``payload`` JSON-able); whole chunks are written as
        they fill, so only complete batches ever reach the journal."""
        self._buffer.append([int(position[0]), int(position[1]), payload])
        if len(self._buffer) >= self.chunk_tiles:
            self.flush()

    def flush(self) -> None:
        """Write the buffered tiles as the next chunk (atomically)."""
        if not self._buffer:
            return
        doc = {"start": self._done, "tiles": self._buffer}
        write_text(self.partial / f"{CHUNK_PREFIX}{self._next_chunk:06d}.json", json.dumps(doc))
        self._done += len(self._buffer)
        self._next_chunk += 1
        self._buffer = []

    def finish(self) -> None:
        """The outputs are in place: the journal is no longer needed."""
        self._buffer = []
        shutil.rmtree(self.partial, ignore_errors=True)


def _short(value: Any, limit: int = 60) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."
