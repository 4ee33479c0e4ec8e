"""Jobs: long runs on rasters, kept on disk so that a restarted service finishes them.

Every job is a folder ``STATE/jobs/ID/`` holding ``job.json`` (what was asked, its state and
progress, written atomically) and ``out/`` (the task's outputs, each written atomically by
the task). One queue feeds a fixed number of worker threads (``workers``): at most that many
jobs run at once, the others wait in order.

States: ``queued`` -> ``running`` -> ``done`` | ``failed`` | ``cancelled``; ``DELETE`` on a
queued job cancels it at once, on a running one sets ``cancelling`` and the task stops at
its next progress step (its outputs are written to temporary names, so nothing
half-written is left under a final name). When the service starts it requeues every job
the last process left ``queued`` or ``running``; a running one continues from its journal
where its task keeps one (``resume``), else it starts again.
"""

from __future__ import annotations

import json
import queue
import re
import secrets
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rsvl.console import Advance
from rsvl.errors import CancelledError, JobNotFoundError, JobStateError, RsvlError
from rsvl.io import write_text

FINISHED = ("done", "failed", "cancelled")
_ID = re.compile(r"^[0-9a-f]{16}$")
#: seconds between two writes of a job's progress to disk
SAVE_EVERY = 0.5


def new_id() -> str:
    return secrets.token_hex(8)


def check_id(job_id: str, what: str = "job") -> str:
    if not isinstance(job_id, str) or not _ID.match(job_id):
        raise JobNotFoundError(f"no {what} {job_id!r} on this service.", hint=f"Use the id POST returned for the {what}.")
    return job_id


@dataclass
class Job:
    id: str
    task: str
    model: str | None
    params: dict[str, Any]
    #: the input as the client named it, and the server-side file
    source: str
    source_path: str
    state: str = "queued"
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    done: int = 0
    total: int = 0
    #: units done when this attempt started (a resumed run starts past 0)
    done_at_start: int = 0
    attempts: int = 0
    resumed: bool = False
    error: dict[str, Any] | None = None
    result: dict[str, Any] | None = None
    #: output kind -> file name under out/
    outputs: dict[str, str] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)
    #: output kind -> layer id (rasters the tiles endpoint serves)
    layers: dict[str, str] = field(default_factory=dict)
    legend: list[dict[str, Any]] = field(default_factory=list)
    inline: bool = False

    def public(self) -> dict[str, Any]:
        """What ``GET /jobs/{id}`` answers: the record plus rate (units/s) and ETA (s)."""
        doc = asdict(self)
        doc.pop("source_path")
        doc.pop("done_at_start")
        rate = eta = None
        if self.started is not None and self.state in ("running", "cancelling"):
            elapsed = time.time() - self.started
            work = self.done - self.done_at_start
            if elapsed > 0 and work > 0:
                rate = work / elapsed
                eta = max(0.0, (self.total - self.done) / rate) if self.total else None
        elif self.started is not None and self.finished is not None and self.finished > self.started:
            rate = (self.done - self.done_at_start) / (self.finished - self.started)
        doc["rate"] = None if rate is None else round(rate, 3)
        doc["eta_s"] = None if eta is None else round(eta, 1)
        doc["progress"] = round(self.done / self.total, 4) if self.total else (1.0 if self.state == "done" else 0.0)
        return doc


#: ``execute(job, progress, resume) -> None``: runs the job, filling result/outputs/files
Execute = Callable[[Job, Callable[[int], Any], bool], None]


class JobStore:
    """Jobs on disk under ``state_dir`` and the worker threads that run them."""

    def __init__(self, state_dir: Path, execute: Execute, *, workers: int = 1) -> None:
        self.root = Path(state_dir) / "jobs"
        self.root.mkdir(parents=True, exist_ok=True)
        self.execute = execute
        self._jobs: dict[str, Job] = {}
        self._cancel: dict[str, threading.Event] = {}
        self._saved: dict[str, float] = {}
        self._lock = threading.RLock()
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._threads: list[threading.Thread] = []
        self._load()
        for i in range(max(0, int(workers))):
            t = threading.Thread(target=self._worker, name=f"rsvl-job-{i}", daemon=True)
            t.start()
            self._threads.append(t)

    # -- disk ---------------------------------------------------------------------------
    def job_dir(self, job_id: str) -> Path:
        return self.root / check_id(job_id)

    def out_dir(self, job_id: str) -> Path:
        return self.job_dir(job_id) / "out"

    def _save(self, job: Job, *, force: bool = True) -> None:
        now = time.monotonic()
        if not force and now - self._saved.get(job.id, 0.0) < SAVE_EVERY:
            return
        self._saved[job.id] = now
        write_text(self.job_dir(job.id) / "job.json", json.dumps(asdict(job), indent=1))

    def _load(self) -> None:
        """Read every job on disk; requeue those the last process did not finish."""
        pending = []
        for f in sorted(self.root.glob("*/job.json")):
            try:
                job = Job(**json.loads(f.read_text(encoding="utf-8")))
            except (OSError, ValueError, TypeError):
                continue  # not a job this version wrote: left alone
            self._jobs[job.id] = job
            if job.state == "cancelling":
                job.state, job.finished = "cancelled", time.time()
                self._save(job)
            elif job.state in ("queued", "running") and not job.inline:
                if job.state == "running":
                    job.resumed = True
                job.state = "queued"
                self._save(job)
                pending.append(job)
            elif job.state == "running":  # an inline run cut by the restart: its client is gone
                job.state, job.finished = "failed", time.time()
                job.error = {"type": "Interrupted", "message": "the service stopped during this run."}
                self._save(job)
        for job in sorted(pending, key=lambda j: j.created):
            self._cancel[job.id] = threading.Event()
            self._queue.put(job.id)

    # -- API ----------------------------------------------------------------------------
    def create(self, task: str, model: str | None, params: dict[str, Any], source: str, source_path: str, *,
               inline: bool = False) -> Job:
        job = Job(new_id(), task, model, params, source, source_path, inline=inline)
        self.out_dir(job.id).mkdir(parents=True, exist_ok=True)
        with self._lock:
            self._jobs[job.id] = job
            self._cancel[job.id] = threading.Event()
            self._save(job)
        return job

    def submit(self, task: str, model: str | None, params: dict[str, Any], source: str, source_path: str) -> Job:
        job = self.create(task, model, params, source, source_path)
        self._queue.put(job.id)
        return job

    def get(self, job_id: str) -> Job:
        with self._lock:
            job = self._jobs.get(check_id(job_id))
        if job is None:
            raise JobNotFoundError(f"no job {job_id!r} on this service.", hint="GET /jobs lists the jobs.")
        return job

    def list(self) -> list[Job]:
        with self._lock:
            return sorted(self._jobs.values(), key=lambda j: j.created, reverse=True)

    def cancel(self, job_id: str) -> Job:
        job = self.get(job_id)
        with self._lock:
            if job.state in FINISHED:
                raise JobStateError(f"job {job_id} is already {job.state}.", hint="Only queued or running jobs can be cancelled.")
            self._cancel.setdefault(job.id, threading.Event()).set()
            if job.state == "queued":
                job.state, job.finished = "cancelled", time.time()
            else:
                job.state = "cancelling"
            self._save(job)
        return job

    def run_inline(self, job: Job, execute: Execute | None = None) -> Job:
        """Run ``job`` in the calling thread (the synchronous endpoints) with ``execute``
        (default: the store's); a failure is recorded and raised again."""
        self._run(job, execute)
        if job.state == "failed" and job.error is not None and "exception" in job.error:
            exc = job.error.pop("exception")
            self._save(job)
            raise exc
        return job

    def purge(self, older_than_s: float) -> list[str]:
        """Delete finished jobs (record and outputs) that finished more than ``older_than_s``
        seconds ago; queued and running jobs are never touched. Returns the ids removed."""
        cutoff = time.time() - older_than_s
        with self._lock:
            old = [j for j in self._jobs.values() if j.state in FINISHED and (j.finished or j.created) < cutoff]
            for job in old:
                self._jobs.pop(job.id, None)
                self._cancel.pop(job.id, None)
                self._saved.pop(job.id, None)
        for job in old:
            shutil.rmtree(self.job_dir(job.id), ignore_errors=True)
        return [j.id for j in old]

    def close(self) -> None:
        for _ in self._threads:
            self._queue.put(None)

    # -- running ------------------------------------------------------------------------
    def _worker(self) -> None:
        while True:
            job_id = self._queue.get()
            if job_id is None:
                return
            job = self._jobs.get(job_id)
            if job is None or job.state != "queued":
                continue
            self._run(job)

    def _progress(self, job: Job) -> Callable[[int], Any]:
        event = self._cancel.setdefault(job.id, threading.Event())
        store = self

        @contextmanager
        def scope(total: int) -> Iterator[Advance]:
            job.total = int(total)
            store._save(job)
            first = True

            def advance(n: int = 1) -> None:
                nonlocal first
                if event.is_set():
                    raise CancelledError(f"job {job.id} was cancelled.")
                if first and job.resumed and n > 1:
                    job.done_at_start = job.done + int(n)  # tiles a resumed run found done
                first = False
                job.done += int(n)
                store._save(job, force=job.done >= job.total)

            yield advance

        return scope

    def _run(self, job: Job, execute: Execute | None = None) -> None:
        event = self._cancel.setdefault(job.id, threading.Event())
        with self._lock:
            if event.is_set():
                return
            job.state, job.started, job.attempts = "running", time.time(), job.attempts + 1
            job.done = job.done_at_start = 0
            job.error = None
            self._save(job)
        try:
            (execute or self.execute)(job, self._progress(job), job.resumed)
        except CancelledError:
            job.state = "cancelled"
        except RsvlError as exc:
            job.state = "failed"
            job.error = {"type": type(exc).__name__, "message": exc.message, "hint": exc.hint}
            if job.inline:
                job.error["exception"] = exc
        except Exception as exc:  # a bug: recorded without a traceback, the job is failed
            job.state = "failed"
            job.error = {"type": type(exc).__name__, "message": f"unexpected error: {exc}"}
            if job.inline:
                job.error["exception"] = exc
        else:
            job.state = "cancelled" if event.is_set() else "done"
        job.finished = time.time()
        with self._lock:
            err = job.error.pop("exception", None) if job.error else None
            self._save(job)
            if err is not None:
                job.error["exception"] = err
