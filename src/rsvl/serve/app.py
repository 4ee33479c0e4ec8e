"""The FastAPI application of ``rsvl serve``: thin over the tasks.

``create_app(roots, token)`` wires the pieces: :mod:`.safety` (roots, limits, token),
:mod:`.models` (one cached model per name, a lock each), :mod:`.jobs` (rasters as jobs on
disk, one queue), :mod:`.tiles` (map tiles by layer id), :mod:`.openai` (OpenAI-compatible
chat and embeddings) and the web page in ``static/``.

Endpoints (every answer is JSON; every error ``{"error": {"message", "type", "code",
"hint"}}`` with a 4xx/5xx status, never a traceback):

* ``GET /health``; ``GET /v1/models``; ``GET /v1/files?dir=`` (rasters under the roots)
* ``POST /v1/info|classify|segment|refer|instances|chat|farmland``: one small image, as
  multipart (``file`` plus form fields) or JSON (``image``: base64 or a data URL), or a
  small file under the roots (``path``) or an opened layer (``layer``); answered at once.
* ``POST /v1/search``: the hits of an index (a finished ``index`` job or a folder under the
  roots) for a text or an image.
* ``POST /jobs`` -> id; ``GET /jobs``, ``GET /jobs/{id}``, ``DELETE /jobs/{id}``;
  ``GET /jobs/{id}/files/{name}``; ``GET /jobs/{id}/features/{kind}`` (a vector output as
  GeoJSON in EPSG:4326, for maps).
* ``POST /layers`` (a raster under the roots), ``POST /uploads`` (a raster or image),
  ``GET /layers/{id}``, ``GET /tiles/{layer}/{z}/{x}/{y}.png``.
* ``POST /v1/chat/completions``, ``POST /v1/embeddings`` (OpenAI's shapes).
* ``POST /session``: the page trades the token for a same-site cookie (map tiles are
  plain image requests and cannot carry a header).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import pydantic
import rasterio
import xstatic.pkg.leaflet as xleaflet
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field, create_model
from starlette.exceptions import HTTPException as StarletteHTTPException

from rsvl import __version__
from rsvl.errors import (
    AccessDeniedError,
    InputNotFoundError,
    JobNotFoundError,
    JobStateError,
    PromptError,
    RequestTooLargeError,
    RsvlError,
    UnauthorizedError,
    UnknownModelError,
    WeightsNotFoundError,
)
from rsvl.geo.raster import RasterSource
from rsvl.index import EmbeddingIndex
from rsvl.models.weights import is_available_offline
from rsvl.serve import openai, runs
from rsvl.serve.jobs import Job, JobStore, new_id
from rsvl.serve.models import ModelCache, model_list
from rsvl.serve.safety import (
    Limits,
    Roots,
    bearer,
    check_raster,
    check_token,
    decode_base64,
    decode_image,
    safe_filename,
)
from rsvl.serve.tiles import LayerStore
from rsvl.tasks.search import search as search_index

STATIC = Path(__file__).parent / "static"
COOKIE = "rsvl_token"
#: files a client may upload (rasters GDAL reads, plain images)
UPLOAD_SUFFIXES = (".tif", ".tiff", ".jp2", ".png", ".jpg", ".jpeg", ".webp", ".img")
#: what GET /v1/files lists: uploads' formats and VRTs (a VRT's sources must lie under the roots)
LISTED_SUFFIXES = (*UPLOAD_SUFFIXES, ".vrt")
#: what sync endpoints run on a file under the roots; larger rasters go through POST /jobs
SYNC_PIXELS = 4_000_000
SYNC_TASKS = ("classify", "segment", "refer", "instances", "chat", "farmland")

_STATUS: tuple[tuple[type[RsvlError], int], ...] = (
    (UnauthorizedError, 401), (AccessDeniedError, 403), (JobNotFoundError, 404), (InputNotFoundError, 404),
    (UnknownModelError, 404), (RequestTooLargeError, 413), (JobStateError, 409), (WeightsNotFoundError, 503),
)


def status_of(exc: RsvlError) -> int:
    return next((code for cls, code in _STATUS if isinstance(exc, cls)), 400)


def code_of(exc: BaseException) -> str:
    name = type(exc).__name__.removesuffix("Error") or "error"
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def error_response(status: int, message: str, type_: str, code: str, hint: str | None = None,
                   **extra: Any) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse({"error": {"message": message, "type": type_, "code": code, "hint": hint, **extra}},
                        status_code=status, headers=headers)


class BodyLimit:
    """ASGI middleware: refuse request bodies over ``limit`` bytes (413), from the
    Content-Length header when there is one, else while the body streams in."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit + 64 * 1024:
            resp = error_response(413, f"the request body is larger than this service's limit of {self.limit} bytes.",
                                  "RequestTooLargeError", "request_too_large",
                                  "Send a smaller file, or start the service with a larger --max-upload-mb.")
            return await resp(scope, receive, send)
        seen = 0

        async def limited() -> Any:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit + 64 * 1024:
                    raise RequestTooLargeError(f"the request body is larger than {self.limit} bytes.")
            return message

        return await self.app(scope, limited, send)


class JobRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    task: runs.Task
    model: str | None = Field(None, max_length=200, description="Model name (GET /v1/models); default: the task's.")
    source: str | None = Field(None, max_length=4096, description="A raster under the service's roots.")
    layer: str | None = Field(None, max_length=64, description="A layer id (an upload or an opened raster).")
    params: dict[str, Any] = Field(default_factory=dict)


class LayerRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str = Field(..., max_length=4096)


class SessionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    token: str = Field("", max_length=1000)


class InfoRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str | None = Field(None, max_length=4096)
    layer: str | None = Field(None, max_length=64)


class SearchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    index: str = Field(..., max_length=4096, description="The id of a finished index job, or an index folder under the roots.")
    text: str | None = Field(None, max_length=10_000)
    image: str | None = Field(None, description="A query image as base64 or a data URL.")
    k: int = Field(10, ge=1, le=1000)


_INPUT_FIELDS = {
    "model": (str | None, Field(None, max_length=200)),
    "image": (str | None, Field(None, description="The image as base64 or a data:image/...;base64, URL.")),
    "path": (str | None, Field(None, max_length=4096, description="A small image or raster under the roots.")),
    "layer": (str | None, Field(None, max_length=64, description="A layer id (upload or opened raster).")),
}


def _sync_schema(task: str) -> dict[str, Any]:
    """The OpenAPI request body of ``POST /v1/{task}``: JSON or multipart."""
    params = runs.PARAMS[task]
    model = create_model(f"{task.capitalize()}Request", __base__=params, **_INPUT_FIELDS)  # type: ignore[call-overload]
    schema = model.model_json_schema()
    form = json.loads(json.dumps(schema))
    form["properties"].pop("image")
    form["properties"]["file"] = {"type": "string", "format": "binary"}
    if "history" in form["properties"]:
        form["properties"]["history"] = {"type": "string", "description": "Earlier turns as JSON: [[q, a], ...]."}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema},
                                                          "multipart/form-data": {"schema": form}}}}


def create_app(
    roots: Sequence[str | os.PathLike[str]] = (),
    token: str | None = None,
    *,
    state_dir: str | os.PathLike[str] | None = None,
    workers: int = 1,
    limits: Limits | None = None,
    cors_origins: Sequence[str] = (),
    device: str = "cpu",
    offline: bool = True,
    model_loader: Any = None,
    keep_days: float | None = 7.0,
) -> FastAPI:
    """The service.

    Args:
        roots: folders whose files clients may name (nothing else on the server is read).
        token: bearer token every request must carry (None: no token; ``/``, ``/static``,
            ``/health`` stay open).
        state_dir: where jobs, uploads and layers live (default: a new temporary folder);
            a restarted service with the same folder resumes unfinished jobs.
        workers: jobs that run at once.
        limits: upload bytes and pixel limits (:class:`rsvl.serve.safety.Limits`).
        cors_origins: origins allowed by CORS (none by default: CORS stays off).
        device: where models run.
        offline: refuse models whose weights are not on this machine instead of downloading.
        model_loader: ``loader(name, device)`` instead of :func:`rsvl.load` (tests).
        keep_days: finished jobs and uploads older than this are deleted (at start and on
            every new job or upload); None keeps everything.
    """
    limits = limits or Limits()
    allowed = Roots(roots)
    token = token or None
    state = Path(state_dir) if state_dir is not None else Path(tempfile.mkdtemp(prefix="rsvl-serve-"))
    state.mkdir(parents=True, exist_ok=True)
    (state / "uploads").mkdir(exist_ok=True)
    cache = ModelCache(device=device, loader=model_loader)
    layers = LayerStore(state)

    def card_for(name: str | None, task: str) -> Any:
        card = cache.card(name, runs.CARD_TASK.get(task, task))
        if offline and not is_available_offline(card):
            raise WeightsNotFoundError(
                f"the weights of {card.name} are not on this machine.",
                hint=f"Fetch them first (rsvl fetch {card.name}), or place the trained file where "
                     "`rsvl models` says, then restart the service.")
        return card

    def execute(job: Job, progress: Any, resume: bool, source: Any = None) -> None:
        src = source if source is not None else Path(job.source_path)
        params = runs.parse_params(job.task, job.params)
        out = store.out_dir(job.id)
        stem = re.sub(r"[^A-Za-z0-9_-]", "_", Path(job.source_path).stem)[:60] if job.source_path else "input"
        with cache.use(job.model, runs.CARD_TASK.get(job.task, job.task)) as model:
            result = runs.run(job.task, model, src, params, out, progress=progress, resume=resume,
                              stem=stem or "input")
        outputs = runs.relative_outputs(result.get("outputs") or {}, out)
        result["outputs"] = dict(outputs)
        if "index" in result and job.task == "index":
            result["index"] = job.id
        # built aside and assigned whole: GET /jobs/{id} reads the record from other threads
        found: dict[str, str] = {}
        legend: list[dict[str, Any]] = []
        for kind, name in outputs.items():
            if not name.endswith(".tif"):
                continue
            if kind in ("classes", "labels", "mask"):
                layer = layers.add(out / name, "labels", f"{job.task}: {kind}")
                found[kind] = layer.id
                legend = legend or layer.legend
            elif kind == "confidence":
                found[kind] = layers.add(out / name, "grey", f"{job.task}: confidence").id
        job.files, job.layers, job.legend, job.result = runs.files_of(out), found, legend, result
        job.outputs = outputs

    store = JobStore(state, execute, workers=workers)

    def sweep() -> None:
        """Delete finished jobs and uploads older than ``keep_days``."""
        if keep_days is None:
            return
        store.purge(keep_days * 86400)
        cutoff = time.time() - keep_days * 86400
        for folder in (state / "uploads").iterdir():
            try:
                if folder.is_dir() and folder.stat().st_mtime < cutoff:
                    shutil.rmtree(folder, ignore_errors=True)
            except OSError:
                continue

    sweep()

    app = FastAPI(title="rsvl", version=__version__,
                  description="Remote-sensing vision-language models over HTTP: every rsvl task, raster jobs, "
                              "map tiles, and OpenAI-compatible chat.")
    app.state.store, app.state.cache, app.state.layers, app.state.roots = store, cache, layers, allowed
    app.state.state_dir = state
    if cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["*"],
                           allow_headers=["*"])
    app.add_middleware(BodyLimit, limit=limits.upload_bytes)

    # -- errors: always {"error": {...}} ---------------------------------------------------
    @app.exception_handler(RsvlError)
    async def _rsvl_error(request: Request, exc: RsvlError) -> JSONResponse:
        return error_response(status_of(exc), exc.message, type(exc).__name__, code_of(exc), exc.hint)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _invalid(exc.errors())

    @app.exception_handler(pydantic.ValidationError)
    async def _validation2(request: Request, exc: pydantic.ValidationError) -> JSONResponse:
        return _invalid(exc.errors())

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else "request refused"
        if exc.status_code == 404 and message == "Not Found":
            message = f"no endpoint {request.url.path} (GET /docs lists them)."
        return error_response(exc.status_code, message, "HTTPError", f"http_{exc.status_code}")

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        return error_response(500, f"unexpected {type(exc).__name__}: {exc}", "InternalError", "internal_error",
                              "This is a bug in rsvl; the service log has the details.")

    # -- the page and open endpoints --------------------------------------------------------
    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    app.mount("/static/leaflet", StaticFiles(directory=xleaflet.BASE_DIR), name="leaflet")
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/health", summary="Liveness and what the service holds")
    def health() -> dict[str, Any]:
        jobs = store.list()
        return {"status": "ok", "version": __version__, "auth": token is not None,
                "roots": len(allowed.paths), "models_loaded": cache.loaded(),
                "jobs": {s: sum(j.state == s for j in jobs) for s in ("queued", "running", "done", "failed", "cancelled")}}

    @app.post("/session", summary="Trade the token for a same-site cookie (the web page's map tiles)")
    def session(req: SessionRequest) -> JSONResponse:
        check_token(token, req.token or None)
        resp = JSONResponse({"ok": True})
        if token is not None:
            resp.set_cookie(COOKIE, req.token, httponly=True, samesite="strict")
        return resp

    def auth(request: Request) -> None:
        given = bearer(request.headers.get("authorization")) or request.cookies.get(COOKIE)
        check_token(token, given)

    api = APIRouter(dependencies=[Depends(auth)])

    # -- models, files, layers ----------------------------------------------------------------
    @api.get("/v1/models", summary="Every model: cards, tasks, whether its weights are here")
    def models() -> dict[str, Any]:
        return {"object": "list", "data": model_list(cache.loaded())}

    @api.get("/v1/files", summary="Folders and rasters under the roots")
    def files(dir: str = ".") -> dict[str, Any]:
        folder = allowed.resolve(dir)
        if not folder.is_dir():
            raise InputNotFoundError(f"{dir!r} is not a folder.")
        entries = []
        for p in sorted(folder.iterdir(), key=lambda p: (not p.is_dir(), p.name.lower()))[:2000]:
            if p.name.startswith("."):
                continue
            real = Path(os.path.realpath(p))
            if not allowed.contains(real):
                continue  # a link out of the roots is not shown
            if p.is_dir() or p.suffix.lower() in LISTED_SUFFIXES:
                entries.append({"name": p.name, "path": allowed.display(real) if p.is_dir() else allowed.display(p),
                                "dir": p.is_dir(), "size": p.stat().st_size if p.is_file() else None})
        return {"dir": allowed.display(folder), "roots": [str(r) for r in allowed.paths], "entries": entries}

    @api.post("/layers", summary="Open a raster under the roots as a map layer")
    def open_layer(req: LayerRequest) -> dict[str, Any]:
        path = allowed.resolve(req.path)
        if path.is_dir():
            raise InputNotFoundError(f"{req.path!r} is a folder.", hint="Open one raster.")
        check_raster(path, limits, allowed)
        return layers.add(path, "image", Path(req.path).name).public()

    @api.get("/layers/{layer_id}", summary="A layer: bounds, zooms, legend, tile URL")
    def get_layer(layer_id: str) -> dict[str, Any]:
        return layers.get(layer_id).public()

    @api.post("/uploads", summary="Upload a raster or image (multipart field 'file'); returns its layer")
    async def upload(request: Request) -> dict[str, Any]:
        form = await _form(request)
        item = form.get("file")
        if item is None or isinstance(item, str):
            raise PromptError("no file in the upload.", hint="Send multipart/form-data with a field named 'file'.")
        name = safe_filename(item.filename, UPLOAD_SUFFIXES)
        sweep()
        folder = state / "uploads" / new_id()
        folder.mkdir(parents=True)
        dest = folder / name
        await run_in_threadpool(_save_upload, item.file, dest, limits.upload_bytes)
        try:
            check_raster(dest, limits)
            layer = await run_in_threadpool(layers.add, dest, "image", name)
        except RsvlError:
            dest.unlink(missing_ok=True)
            raise
        return layer.public()

    @api.get("/tiles/{layer_id}/{z}/{x}/{y}.png", summary="A 256 px Web Mercator tile of a layer",
             response_class=Response)
    def tile(layer_id: str, z: int, x: int, y: int) -> Response:
        if not (0 <= z <= 30 and 0 <= x < 2**z and 0 <= y < 2**z):
            raise PromptError(f"tile {z}/{x}/{y} does not exist.")
        return Response(layers.render(layer_id, z, x, y), media_type="image/png",
                        headers={"Cache-Control": "private, max-age=60"})

    # -- synchronous tasks ----------------------------------------------------------------------
    def scope(path: Path) -> Roots | None:
        """The roots a server-side file may read within; None for an upload (its own folder)."""
        return allowed if allowed.contains(path) else None

    def source_of(path: str | None, layer: str | None) -> Path:
        if (path is None) == (layer is None):
            raise PromptError("give exactly one of path and layer.")
        if layer is not None:
            return Path(layers.get(layer).path)
        p = allowed.resolve(str(path))
        if p.is_dir():
            raise InputNotFoundError(f"{path!r} is a folder.", hint="Name one raster or image.")
        return p

    @api.post("/v1/info", summary="What a raster is and how rsvl reads it")
    def info(req: InfoRequest) -> dict[str, Any]:
        path = source_of(req.path, req.layer)
        check_raster(path, limits, scope(path))
        with RasterSource(path) as src:
            meta = src.info().to_dict()
        meta["path"] = allowed.display(path) if allowed.contains(path) else path.name
        return runs.jsonable(meta)

    def sync_task(task: str, fields: dict[str, Any], upload: bytes | None) -> dict[str, Any]:
        model = fields.pop("model", None) or None
        if model is not None and not isinstance(model, str):
            raise PromptError("'model' must be a model name.", hint="See GET /v1/models, e.g. \"model\": \"mini-clip\".")
        image, path, layer = fields.pop("image", None), fields.pop("path", None), fields.pop("layer", None)
        given = sum(v is not None for v in (image, path, layer, upload))
        if given != 1:
            raise PromptError("give exactly one input: an uploaded file, an image (base64), a path or a layer.",
                              hint="Rasters larger than a few megapixels run as jobs: POST /jobs.")
        params = runs.parse_params(task, fields)
        card = card_for(model, task)
        source: Any
        if path is not None or layer is not None:
            file = source_of(path, layer)
            w, h = check_raster(file, limits, scope(file))
            if task == "chat":  # the page's chat panel: the whole scene, downsampled
                source = _preview(file)
            elif w * h > SYNC_PIXELS:
                raise RequestTooLargeError(f"{file.name} has {w} x {h} pixels: too large to answer at once.",
                                           hint="Run it as a job: POST /jobs with the same task and parameters.")
            else:
                source = file
        else:
            data = upload if upload is not None else decode_base64(image, limits)
            source = decode_image(data, limits)
        job = store.create(task, card.name, params.model_dump(), "inline", "", inline=True)
        store.run_inline(job, lambda j, progress, resume: execute(j, progress, False, source))
        return _public(job)

    def _make_sync(task: str) -> Any:
        async def endpoint(request: Request) -> Any:
            fields, upload = await _fields(request, limits)
            return await run_in_threadpool(sync_task, task, fields, upload)

        endpoint.__name__ = f"sync_{task}"
        return endpoint

    for task in SYNC_TASKS:
        api.add_api_route(f"/v1/{task}", _make_sync(task), methods=["POST"], openapi_extra=_sync_schema(task),
                          summary=f"{task} one small image (multipart or JSON with base64)")

    @api.post("/v1/search", summary="Search an index by text or image")
    def search(req: SearchRequest) -> dict[str, Any]:
        if re.fullmatch(r"[0-9a-f]{16}", req.index):
            job = store.get(req.index)
            if job.task != "index" or job.state != "done":
                raise JobStateError(f"job {req.index} is not a finished index job.")
            folder = store.out_dir(job.id) / "index"
        else:
            folder = allowed.resolve(req.index)
        query_image = None
        if req.image is not None:
            rgb = decode_image(decode_base64(req.image, limits), limits)
            query_image = runs.write_png(rgb, Path(tempfile.mkdtemp(dir=state)) / "query.png")
        name = EmbeddingIndex.open(folder).model
        card_for(name, "search")
        with cache.use(name, "search") as model:
            result = search_index(folder, req.text, image=query_image, k=req.k, model=model.module)
        doc = result.to_dict()
        doc["index"] = req.index
        gdf = result.to_geodataframe()
        doc["features"] = json.loads(gdf.to_json()) if len(gdf) else {"type": "FeatureCollection", "features": []}
        return runs.jsonable(doc)

    # -- jobs --------------------------------------------------------------------------------------
    @api.post("/jobs", status_code=202, summary="Run a task on a raster as a job")
    def submit(req: JobRequest) -> dict[str, Any]:
        path = source_of(req.source, req.layer)
        check_raster(path, limits, scope(path))
        params = runs.parse_params(req.task, req.params)
        card = card_for(req.model, req.task)
        shown = req.source if req.source is not None else layers.get(str(req.layer)).title
        sweep()
        job = store.submit(req.task, card.name, params.model_dump(), shown, str(path))
        return _public(job)

    @api.get("/jobs", summary="Every job, newest first")
    def list_jobs() -> dict[str, Any]:
        return {"jobs": [_public(j) for j in store.list()]}

    @api.get("/jobs/{job_id}", summary="A job: state, tiles done/total, rate, ETA, outputs")
    def get_job(job_id: str) -> dict[str, Any]:
        return _public(store.get(job_id))

    @api.delete("/jobs/{job_id}", summary="Cancel a queued or running job")
    def cancel_job(job_id: str) -> dict[str, Any]:
        return _public(store.cancel(job_id))

    @api.get("/jobs/{job_id}/files/{name:path}", summary="Download an output of a finished job",
             response_class=FileResponse)
    def job_file(job_id: str, name: str) -> FileResponse:
        job = store.get(job_id)
        if name not in job.files:
            if job.state != "done":
                raise JobStateError(f"job {job_id} is {job.state}; its files appear when it is done.")
            raise JobNotFoundError(f"job {job_id} has no file {name!r}.", hint=f"Its files: {', '.join(job.files)}.")
        return FileResponse(store.out_dir(job_id) / name, filename=Path(name).name)

    @api.get("/jobs/{job_id}/features/{kind}", summary="A vector output as GeoJSON in EPSG:4326")
    def job_features(job_id: str, kind: str) -> Response:
        job = store.get(job_id)
        name = job.outputs.get(kind)
        if name is None or not re.search(r"\.(gpkg|geojson|parquet)$", name):
            raise JobNotFoundError(f"job {job_id} has no vector output {kind!r}.",
                                   hint=f"Its outputs: {', '.join(job.outputs) or 'none yet'}.")
        path = store.out_dir(job_id) / name
        gdf = gpd.read_parquet(path) if name.endswith(".parquet") else gpd.read_file(path)
        if gdf.crs is not None:
            gdf = gdf.to_crs("EPSG:4326")
        return Response(gdf.to_json(drop_id=True, default=str), media_type="application/geo+json")

    app.include_router(api)
    app.include_router(openai.router(cache, limits, card_for), dependencies=[Depends(auth)])

    def _public(job: Job) -> dict[str, Any]:
        doc = job.public()
        doc["files"] = [{"name": n, "url": f"/jobs/{job.id}/files/{n}"} for n in job.files]
        doc["layers"] = {k: layers.get(v).public() for k, v in job.layers.items()}
        doc["features"] = {k: f"/jobs/{job.id}/features/{k}" for k, n in job.outputs.items()
                           if re.search(r"\.(gpkg|geojson|parquet)$", n)}
        return doc

    return app


def _invalid(errors: Sequence[Any]) -> JSONResponse:
    parts = []
    for e in list(errors)[:5]:
        where = ".".join(str(x) for x in e.get("loc", ()) if x != "body") or "body"
        parts.append(f"{where}: {e.get('msg', 'invalid')}")
    return error_response(422, "invalid request: " + "; ".join(parts), "ValidationError", "invalid_request",
                          "GET /docs shows every field.")


async def _form(request: Request) -> Any:
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise PromptError("send multipart/form-data.", hint="curl -F file=@scene.tif ...")
    try:
        return await request.form(max_files=1, max_fields=50)
    except RsvlError:
        raise
    except Exception as exc:  # a malformed multipart body
        raise PromptError(f"cannot read the form: {exc}.") from None


async def _fields(request: Request, limits: Limits) -> tuple[dict[str, Any], bytes | None]:
    """The fields of a JSON or multipart body, and the bytes of an uploaded ``file``."""
    kind = request.headers.get("content-type", "")
    if kind.startswith("multipart/form-data"):
        form = await _form(request)
        fields: dict[str, Any] = {}
        upload = None
        for key, value in form.multi_items():
            if isinstance(value, str) and key == "history":
                try:
                    fields[key] = json.loads(value) if value.strip() else []
                except ValueError:
                    raise PromptError("history must be JSON: [[question, answer], ...].") from None
            elif isinstance(value, str):
                fields[key] = value
            elif key == "file":
                upload = await value.read(limits.upload_bytes + 1)
                if len(upload) > limits.upload_bytes:
                    raise RequestTooLargeError(f"the upload is larger than {limits.upload_bytes} bytes.")
            else:
                raise PromptError(f"unexpected file field {key!r}.", hint="Send the image as the field 'file'.")
        return fields, upload
    try:
        body = await request.json()
    except (ValueError, UnicodeDecodeError):
        raise PromptError("the body is not JSON.", hint="Send application/json, or multipart/form-data with a file.") from None
    if not isinstance(body, dict):
        raise PromptError("the JSON body must be an object.")
    return body, None


def _save_upload(stream: Any, dest: Path, limit: int) -> None:
    written = 0
    with open(dest, "wb") as f:
        while chunk := stream.read(1024 * 1024):
            written += len(chunk)
            if written > limit:
                f.close()
                dest.unlink(missing_ok=True)
                raise RequestTooLargeError(f"the upload is larger than {limit} bytes.")
            f.write(chunk)


def _preview(path: Path, max_side: int = 768) -> np.ndarray:
    """The whole raster as one (H, W, 3) uint8 image no larger than ``max_side`` (a
    decimated read: overviews when the file has them), stretched 2-98 % unless uint8."""
    with rasterio.open(path) as ds:
        scale = max(1.0, max(ds.width, ds.height) / max_side)
        shape = (max(1, round(ds.height / scale)), max(1, round(ds.width / scale)))
        bands = [1, 2, 3] if ds.count >= 3 else [1, 1, 1]
        data = ds.read(bands, out_shape=(3, *shape), masked=True)
    if data.dtype != np.uint8:
        out = np.zeros(data.shape, np.uint8)
        for i, band in enumerate(data):
            values = band.compressed()
            lo, hi = np.percentile(values, (2, 98)) if values.size else (0.0, 1.0)
            out[i] = np.clip((band.filled(lo) - lo) / max(hi - lo, 1e-9) * 255, 0, 255).astype(np.uint8)
        data = out
    return np.ascontiguousarray(np.asarray(data).transpose(1, 2, 0))
