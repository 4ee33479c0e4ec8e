"""``rsvl.scale.run``: a task over many rasters (or the blocks of a large one) on Ray.

One actor per worker loads the model once and runs the task's own function on an item at a
time, writing that item's outputs itself under ``OUTDIR/items/``. The driver hands items to
idle actors, tracks every item in the manifest (:mod:`rsvl.scale.manifest`), shows one
progress bar of items, and merges the outputs at the end (:mod:`rsvl.scale.merge`).

Faults: an item that fails (an error, or its worker dying) is retried ``retries`` times on
a fresh attempt (a dead worker is replaced), then recorded with its error (``on_error=
"skip"``) or stops the run (``"stop"``). Every wait on Ray has a timeout: workers that do not
start (no free CPU or GPU in the cluster) are an error, never a silent hang; the actors are
killed when the run ends however it ends, so they never hold the cluster's CPUs.
"""

from __future__ import annotations

import math
import os
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rsvl.api import load
from rsvl.console import progress_bar, state
from rsvl.errors import JobError, OutputError, RsvlError
from rsvl.io import OutputLock
from rsvl.models import registry
from rsvl.scale.items import DEFAULT_BLOCK, Item, plan_items, write_block_vrt
from rsvl.scale.manifest import DONE, FAILED, MANIFEST, PENDING, RUNNING, ItemRecord, Manifest
from rsvl.scale.merge import (
    Part,
    core_bounds,
    merge_index,
    merge_tables,
    merge_vectors,
    mosaic_vrt,
    to_cog,
)
from rsvl.scale.tasks import TaskSpec, block_pad, get_task, write_rows
from rsvl.tasks.sources import check_outputs, check_vector_format

INSTALL_HINT = 'Install it with: pip install "rsvl[ray]"'
#: seconds between the driver's looks at running items (also how often it checks timeouts)
POLL_S = 0.5

Event = Callable[[str, str, dict[str, Any]], None]


def import_ray() -> Any:
    """The ``ray`` module, or a JobError saying how to install it."""
    try:
        import ray  # lazy: an optional extra; rsvl works without it
    except ImportError:
        raise JobError("rsvl run needs Ray, which is not installed.", hint=INSTALL_HINT) from None
    return ray


class Worker:
    """What each Ray actor holds: the task and its model, loaded once.

    Errors never escape an actor: ``ready`` reports a model that failed to load, and ``run``
    returns an item's error as data, so that the only Ray exception the driver sees is a
    worker that died.
    """

    def __init__(self, task: str, model: str, weights: str | None, device: str, options: dict[str, Any],
                 out: str) -> None:
        state.quiet = True
        self.spec = get_task(task)
        self.options = options
        self.out = Path(out)
        self.error: str | None = None
        self.model: Any = None
        try:
            self.model = load(model, weights=weights, device=device)
        except Exception as exc:  # reported by ready()
            self.error = f"{type(exc).__name__}: {exc}"

    def ready(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "error": self.error}

    def run(self, item: dict[str, Any]) -> dict[str, Any]:
        it = Item.from_dict(item)
        t0 = time.perf_counter()
        source = str(self.out / "blocks" / f"{it.name}.vrt") if it.read is not None else it.source
        prefix = self.out / "items" / it.name
        try:
            res = self.spec.run(self.model, source, prefix, dict(self.options))
            outputs = dict(res["outputs"])
            if self.spec.table is not None:
                outputs["rows"] = str(write_rows(res.get("rows") or [], Path(f"{prefix}.rows.json")))
        except Exception as exc:
            msg = exc.message if isinstance(exc, RsvlError) else str(exc)
            return {"ok": False, "error": f"{type(exc).__name__}: {msg}", "pid": os.getpid(),
                    "seconds": time.perf_counter() - t0}
        return {"ok": True, "outputs": outputs, "pid": os.getpid(), "seconds": time.perf_counter() - t0}


@dataclass
class RunResult:
    """What a run did: item counts, errors, merged outputs and timings."""

    out: str
    task: str
    items: int
    done: int
    failed: list[dict[str, Any]] = field(default_factory=list)
    skipped: int = 0  # already finished by an earlier run (--resume)
    merged: dict[str, list[str]] = field(default_factory=dict)
    workers: int = 1
    seconds: float = 0.0
    run_seconds: float = 0.0
    merge_seconds: float = 0.0
    manifest: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _settings(spec: TaskSpec, model: str, weights: str | None, options: dict[str, Any], block: int | None,
              sources: Sequence[str]) -> dict[str, Any]:
    return {"task": spec.name, "model": model, "weights": weights, "options": options, "block": block,
            "sources": list(sources)}


def _prepare_out(out: Path, sources: Sequence[str], resume: bool, overwrite: bool) -> None:
    check_outputs([out], [s for s in sources if Path(s).exists()])
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out} exists and is a file.", hint="Pass a folder for the run's outputs (-o).")
    if resume or not out.exists():
        return
    if (out / MANIFEST).exists() and not overwrite:
        raise OutputError(f"{out} already holds a run.",
                          hint="Pass --resume to continue it, --overwrite to start again, or choose another folder.")
    if not (out / MANIFEST).exists() and any(out.iterdir()):
        raise OutputError(f"{out} exists and is not an rsvl run folder.", hint="Choose a new or empty folder.")


class _Pool:
    """The actors of one run: start, replace, and kill them, every wait with a timeout."""

    def __init__(self, ray: Any, n: int, make: Callable[[], Any], start_timeout: float) -> None:
        self.ray, self.make, self.start_timeout = ray, make, start_timeout
        self.actors: list[Any] = []
        self.pids: list[int | None] = []
        started = [make() for _ in range(n)]
        self.actors = started
        self.pids = [None] * n
        for i, info in enumerate(self._ready(started)):
            self.pids[i] = info["pid"]

    def _ready(self, actors: list[Any]) -> list[dict[str, Any]]:
        ray = self.ray
        try:
            infos = ray.get([a.ready.remote() for a in actors], timeout=self.start_timeout)
        except ray.exceptions.GetTimeoutError:
            raise JobError(f"the workers did not start within {self.start_timeout:.0f} s: the Ray cluster has no "
                           "free CPUs or GPUs for them.",
                           hint="Use fewer --workers or --gpus-per-worker, or free the cluster's resources.") from None
        except ray.exceptions.RayError as exc:
            raise JobError(f"a worker failed to start ({str(exc).splitlines()[0]}).",
                           hint="Check that rsvl and the model's weights are installed on every node.") from None
        for info in infos:
            if info["error"]:
                raise JobError(f"a worker could not load the model: {info['error']}",
                               hint="Check the model name and weights (`rsvl models`).")
        return infos

    def replace(self, i: int) -> None:
        self.kill(i)
        self.actors[i] = self.make()
        self.pids[i] = self._ready([self.actors[i]])[0]["pid"]

    def kill(self, i: int) -> None:
        try:
            self.ray.kill(self.actors[i], no_restart=True)
        except Exception:  # already dead
            pass

    def close(self) -> None:
        for i in range(len(self.actors)):
            self.kill(i)


def run(
    task: str,
    sources: Sequence[str | os.PathLike[str]] | str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    model: str | None = None,
    weights: str | os.PathLike[str] | None = None,
    device: str | None = None,
    workers: int = 1,
    gpus_per_worker: float = 0,
    cpus_per_worker: float = 1,
    address: str | None = None,
    on_error: str = "skip",
    retries: int = 1,
    resume: bool = False,
    overwrite: bool = False,
    block: int | None = DEFAULT_BLOCK,
    cog: bool = False,
    item_timeout: float | None = None,
    start_timeout: float = 600.0,
    on_event: Event | None = None,
    save_every: float = 2.0,
    **options: Any,
) -> RunResult:
    """Run ``task`` over every raster of ``sources`` on Ray and merge the outputs in ``out``.

    Args:
        task: segment, classify, instances, refer or index (``index build``).
        sources: rasters, folders (recursively) or glob patterns.
        out: the run's folder: ``run.json`` (manifest), ``items/`` (each item's outputs),
            and the merged outputs (``KIND.vrt``, ``KIND.gpkg``, ``TABLE.csv``, ``index/``).
        model, weights, device: the model every worker loads (default: the task's; device
            ``cuda`` when ``gpus_per_worker`` > 0, else ``cpu``).
        workers: number of actors; a local Ray is started with that many CPUs unless Ray is
            already initialised in this process or ``address`` names a cluster to join.
        gpus_per_worker, cpus_per_worker: Ray resources of each actor.
        on_error: ``skip`` (record a failed item and go on) or ``stop``.
        retries: further attempts of a failed item before it counts as failed.
        resume: continue the run in ``out``: finished items are kept, the others redone.
        overwrite: start again in a folder that holds a run.
        block: side in pixels above which a raster is split into blocks (tasks that allow
            it: segment, instances); ``None`` never splits.
        cog: also write each raster mosaic as a Cloud-Optimised GeoTIFF.
        item_timeout: seconds after which a running item's worker is killed (an attempt).
        start_timeout: seconds to wait for workers to start before giving up.
        on_event: called as ``on_event(event, item, info)`` for ``start`` (info: pid),
            ``done``, ``retry`` and ``failed`` (info: error), after the manifest is updated.
        save_every: least seconds between two rewrites of the manifest while items run (it
            is rewritten whole, so a run of many short items would otherwise spend its time
            there); 0 writes it at every change. A failure and the run's end always write it.
        **options: the task's options, as its own command takes them (``classes``, ``tile``,
            ``expression``, ``vector_format``...).
    """
    t_start = time.perf_counter()
    spec = get_task(task)
    if on_error not in ("skip", "stop"):
        raise JobError(f"on_error must be 'skip' or 'stop', not {on_error!r}.")
    if workers < 1:
        raise JobError(f"workers must be at least 1, not {workers}.")
    src_list = [str(s) for s in ([sources] if isinstance(sources, str | os.PathLike) else sources)]
    out = Path(out).expanduser().resolve()
    opts = spec.check_options(options)
    vector_format = check_vector_format(opts.get("vector_format", "gpkg"))
    model = model or spec.default_model
    registry.get_card(model)  # an unknown model fails here, before any worker starts
    device = device or ("cuda" if gpus_per_worker else "cpu")
    weights_text = str(weights) if weights is not None else None
    blk = int(block) if (block and spec.block) else None
    settings = _settings(spec, model, weights_text, opts, blk, src_list)
    _prepare_out(out, src_list, resume, overwrite)
    ray = import_ray()
    out.mkdir(parents=True, exist_ok=True)
    with OutputLock(out):
        if resume:
            manifest = Manifest.load(out)
            manifest.check_resumable(settings)
        else:
            items = plan_items(src_list, block=blk, pad=block_pad(spec, opts) if blk else 0)
            manifest = Manifest(out, settings, [ItemRecord(it) for it in items])
        (out / "items").mkdir(exist_ok=True)
        skipped = 0
        for rec in manifest.items:
            if rec.finished():
                skipped += 1
                continue
            rec.state, rec.error, rec.attempts, rec.worker = PENDING, None, 0, None
            if rec.item.read is not None:
                (out / "blocks").mkdir(exist_ok=True)
                write_block_vrt(rec.item, out / "blocks" / f"{rec.item.name}.vrt")
        manifest.save()
        todo = [r for r in manifest.items if r.state == PENDING]
        t_run = time.perf_counter()
        if todo:
            _run_items(ray, manifest, todo, spec, model=model, weights=weights_text, device=device, options=opts,
                       workers=min(workers, len(todo)), gpus=gpus_per_worker, cpus=cpus_per_worker,
                       address=address, on_error=on_error, retries=retries, item_timeout=item_timeout,
                       start_timeout=start_timeout, on_event=on_event, done_before=skipped,
                       save_every=save_every)
        run_s = time.perf_counter() - t_run
        t_merge = time.perf_counter()
        manifest.merged = merge_outputs(manifest, spec, opts, vector_format=vector_format, cog=cog)
        manifest.save()
        merge_s = time.perf_counter() - t_merge
    failed = [{"item": r.item.name, "source": r.item.source, "error": r.error}
              for r in manifest.items if r.state == FAILED]
    return RunResult(str(out), spec.name, len(manifest.items), manifest.counts()[DONE], failed, skipped,
                     manifest.merged, workers, round(time.perf_counter() - t_start, 3), round(run_s, 3),
                     round(merge_s, 3), str(manifest.path))


def _start_ray(ray: Any, workers: int, cpus: float, address: str | None) -> bool:
    """Initialise Ray unless it already is; True when this call started it."""
    if ray.is_initialized():
        return False
    try:
        if address:
            ray.init(address=address, log_to_driver=False, logging_level="ERROR")
        else:
            ray.init(num_cpus=max(1, math.ceil(workers * cpus)), include_dashboard=False,
                     log_to_driver=False, logging_level="ERROR")
    except Exception as exc:  # Ray raises plain Exceptions (ConnectionError, timeouts) here
        where = f"the Ray cluster at {address}" if address else "a local Ray"
        raise JobError(f"could not start {where} ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}).",
                       hint="Check the --address (`ray status` on the head node), or retry when the machine is "
                            "less busy; finished items are kept (--resume).") from None
    return True


def _run_items(ray: Any, manifest: Manifest, todo: list[ItemRecord], spec: TaskSpec, *, model: str,
               weights: str | None, device: str, options: dict[str, Any], workers: int, gpus: float, cpus: float,
               address: str | None, on_error: str, retries: int, item_timeout: float | None,
               start_timeout: float, on_event: Event | None, done_before: int, save_every: float) -> None:
    notify = on_event or (lambda event, item, info: None)
    started = _start_ray(ray, workers, cpus, address)
    actor_cls = ray.remote(num_cpus=cpus, num_gpus=gpus or 0, max_restarts=0, max_task_retries=0)(Worker)

    def make() -> Any:
        return actor_cls.remote(spec.name, model, weights, device, options, str(manifest.out))

    last_save = [time.monotonic()]

    def checkpoint(force: bool = False) -> None:
        """Rewrite the manifest, at most every ``save_every`` seconds unless forced: an item
        finished since the last write is merely redone by a resume."""
        if force or time.monotonic() - last_save[0] >= save_every:
            manifest.save()
            last_save[0] = time.monotonic()

    pool: _Pool | None = None
    queue: deque[ItemRecord] = deque(todo)
    running: dict[Any, tuple[int, ItemRecord, float]] = {}
    try:
        pool = _Pool(ray, workers, make, start_timeout)
        free = list(range(workers))
        total = len(manifest.items)
        with progress_bar(total, f"{spec.name} x{workers}", enabled=True, unit="items") as advance:
            if done_before:
                advance(done_before)
            while queue or running:
                while free and queue:
                    i, rec = free.pop(0), queue.popleft()
                    rec.state, rec.attempts, rec.worker = RUNNING, rec.attempts + 1, pool.pids[i]
                    running[pool.actors[i].run.remote(rec.item.to_dict())] = (i, rec, time.monotonic())
                    checkpoint()
                    notify("start", rec.item.name, {"pid": pool.pids[i], "attempt": rec.attempts})
                ready, _ = ray.wait(list(running), num_returns=1, timeout=POLL_S)
                if item_timeout:
                    for ref, (i, _rec, t0) in running.items():
                        if ref not in ready and time.monotonic() - t0 > item_timeout:
                            pool.kill(i)  # its ref now fails as a dead worker
                for ref in ready:
                    i, rec, t0 = running.pop(ref)
                    try:
                        res = ray.get(ref, timeout=start_timeout)
                    except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError) as exc:
                        timed_out = item_timeout and time.monotonic() - t0 > item_timeout
                        why = f"timed out after {item_timeout:g} s" if timed_out else "its worker died"
                        res = {"ok": False, "error": f"{why} ({type(exc).__name__})", "seconds": None}
                        pool.replace(i)
                    free.append(i)
                    rec.seconds = round(res["seconds"], 3) if res.get("seconds") is not None else None
                    if res["ok"]:
                        rec.state, rec.outputs, rec.error = DONE, res["outputs"], None
                        checkpoint()
                        advance(1)
                        notify("done", rec.item.name, {"seconds": rec.seconds})
                        continue
                    rec.error = res["error"]
                    if rec.attempts <= retries:
                        rec.state = PENDING
                        queue.appendleft(rec)
                        checkpoint()
                        notify("retry", rec.item.name, {"error": rec.error})
                        continue
                    rec.state = FAILED
                    checkpoint(force=True)
                    advance(1)
                    notify("failed", rec.item.name, {"error": rec.error})
                    if on_error == "stop":
                        raise JobError(f"{rec.item.name} ({rec.item.source}) failed: {rec.error}",
                                       hint=f"Fix or remove it, then rerun with --resume (or pass --on-error skip); "
                                            f"finished items are kept in {manifest.path}.")
                    state.warn(f"{rec.item.name} failed: {rec.error}")
    finally:
        for _, rec, _ in running.values():
            rec.state = PENDING
        manifest.save()
        if pool is not None:
            pool.close()
        if started:
            ray.shutdown()


def merge_outputs(manifest: Manifest, spec: TaskSpec, options: dict[str, Any], *, vector_format: str = "gpkg",
                  cog: bool = False) -> dict[str, list[str]]:
    """Merge the finished items' outputs in item order (see :mod:`rsvl.scale.merge`)."""
    out = manifest.out
    done = [r for r in manifest.items if r.state == DONE]
    cores = {r.item.name: core_bounds(r.item.source, r.item.core) for r in done if r.item.core is not None}

    def parts(kind: str) -> list[Part]:
        return [Part(r.outputs[kind], r.item.source, r.item.name, cores.get(r.item.name))
                for r in done if kind in r.outputs]

    merged: dict[str, list[str]] = {}
    for kind in spec.rasters:
        ps = parts(kind)
        if not ps:
            continue
        vrts = mosaic_vrt(ps, out / f"{kind}.vrt")
        merged[kind] = [str(p) for p in vrts]
        if cog:
            merged[f"{kind}_cog"] = [str(to_cog(v, v.with_suffix(".tif"))) for v in vrts]
    for kind in spec.vectors:
        ps = parts(kind)
        if ps:
            path = merge_vectors(ps, out / f"{kind}.{vector_format}", rule=spec.vector_rule,
                                 to_crs=options.get("to_crs"))
            if path is not None:
                merged[kind] = [str(path)]
    if spec.table is not None:
        files = [r.outputs["rows"] for r in done if "rows" in r.outputs]
        path = merge_tables(files, out / f"{spec.table}.csv") if files else None
        if path is not None:
            merged[spec.table] = [str(path)]
    if spec.index and done:
        pairs = [(r.outputs["vectors"], r.outputs["rows"]) for r in done]
        merged["index"] = [str(merge_index(pairs, out / "index", options))]
    return merged
