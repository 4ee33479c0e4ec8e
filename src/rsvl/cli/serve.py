"""``rsvl serve``: the HTTP service and its web page (:mod:`rsvl.serve`)."""

from __future__ import annotations

import os
from pathlib import Path

import typer

from rsvl.console import state
from rsvl.errors import RsvlError


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)


def serve(
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind; 0.0.0.0 opens the service to the network."),
    port: int = typer.Option(8000, "--port", help="Port."),
    root: list[Path] = typer.Option(None, "--root", help="A folder whose rasters clients may open (repeat for more); "
                                    "nothing else on this machine is read."),
    token: str = typer.Option(None, "--token", help="Bearer token every request must carry (default: $RSVL_TOKEN; none: open)."),
    state_dir: Path = typer.Option(None, "--state", help="Folder for jobs, uploads and layers (default: ~/.cache/rsvl/serve); "
                                   "a restarted service resumes its unfinished jobs."),
    jobs: int = typer.Option(1, "--jobs", help="Jobs that run at once."),
    max_upload_mb: int = typer.Option(512, "--max-upload-mb", help="Largest upload, in MiB."),
    max_image_pixels: int = typer.Option(40_000_000, "--max-image-pixels", help="Largest inline image, in pixels."),
    max_raster_pixels: int = typer.Option(4_000_000_000, "--max-raster-pixels", help="Largest raster, in pixels."),
    cors: list[str] = typer.Option(None, "--cors", help="An origin allowed by CORS (repeat for more; default: CORS off)."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:1, mps."),
    keep_days: float = typer.Option(7.0, "--keep-days", help="Delete finished jobs and uploads older than this many days (0: keep everything)."),
    allow_downloads: bool = typer.Option(False, "--allow-downloads", help="Download missing weights on first use "
                                         "(default: refuse models whose weights are not here)."),
) -> None:
    """Serve every task over HTTP with a map web page at http://HOST:PORT/ (OpenAI-compatible chat at /v1)."""
    import uvicorn  # lazy: the service's stack (FastAPI, rio-tiler, torch) loads only for this command

    from rsvl.serve.app import create_app  # lazy: as above
    from rsvl.serve.safety import Limits  # lazy: as above

    if jobs < 1:
        raise typer.BadParameter("at least 1.", param_hint="--jobs")
    if max_upload_mb < 1 or max_image_pixels < 1 or max_raster_pixels < 1:
        raise typer.BadParameter("limits must be positive.", param_hint="--max-upload-mb")
    token = token or os.environ.get("RSVL_TOKEN") or None
    folder = state_dir if state_dir is not None else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "rsvl" / "serve"
    limits = Limits(upload_bytes=max_upload_mb * 1024 * 1024, image_pixels=max_image_pixels,
                    raster_pixels=max_raster_pixels)
    app = create_app(root or (), token, state_dir=folder, workers=jobs, limits=limits, cors_origins=cors or (),
                     device=device, offline=not allow_downloads,
                     keep_days=keep_days if keep_days > 0 else None)
    if host not in ("127.0.0.1", "localhost", "::1") and token is None:
        state.warn(f"serving on {host} without a token: anyone who reaches this port can use it (pass --token).")
    state.notice(f"rsvl serve: http://{'[' + host + ']' if ':' in host else host}:{port}/ "
                 f"({len(root or ())} root folder(s), state in {folder})")
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning" if state.quiet else "info")
    except OSError as exc:
        raise RsvlError(f"cannot listen on {host}:{port}: {exc.strerror or exc}.",
                        hint="Choose another --port, or stop the process that holds it.") from None
