"""What the service lets a request touch: paths under the allowed roots, bounded uploads and
images, and an optional bearer token.

* A path from a client is resolved on the server (symbolic links followed) and must lie
  under one of the ``--root`` folders; a ``..`` component is refused before anything is
  resolved, so neither traversal nor a link pointing out of a root reaches a file.
* Uploads are limited in bytes while they are read, and images in pixels before they are
  decoded (PIL's ``MAX_IMAGE_PIXELS`` for plain images, the raster's header through GDAL for
  rasters): a small compressed file cannot make the server allocate gigabytes.
* The token is compared with :func:`hmac.compare_digest` (constant time).
"""

from __future__ import annotations

import base64
import binascii
import hmac
import io
import os
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePath
from xml.etree import ElementTree

import numpy as np
import rasterio
from PIL import Image

from rsvl.errors import (
    AccessDeniedError,
    InputNotFoundError,
    RasterReadError,
    RequestTooLargeError,
    UnauthorizedError,
)

#: default limits: uploads up to 512 MiB, inline images up to 40 megapixels, rasters (files
#: under the roots or uploaded) up to 4 gigapixels (the tiled runner keeps memory bounded)
MAX_UPLOAD_BYTES = 512 * 1024 * 1024
MAX_IMAGE_PIXELS = 40_000_000
MAX_RASTER_PIXELS = 4_000_000_000


@dataclass(frozen=True)
class Limits:
    """Size limits of one service."""

    upload_bytes: int = MAX_UPLOAD_BYTES
    image_pixels: int = MAX_IMAGE_PIXELS
    raster_pixels: int = MAX_RASTER_PIXELS


class Roots:
    """The folders a client may name paths in."""

    def __init__(self, roots: Iterable[str | os.PathLike[str]]) -> None:
        resolved = []
        for r in roots:
            p = Path(r).expanduser()
            if not p.is_dir():
                raise InputNotFoundError(f"root folder {p} does not exist.", hint="Pass existing folders with --root.")
            resolved.append(p.resolve())
        self.paths: tuple[Path, ...] = tuple(resolved)

    def __bool__(self) -> bool:
        return bool(self.paths)

    def contains(self, path: Path) -> bool:
        """Whether the resolved ``path`` lies in a root."""
        return any(path == r or path.is_relative_to(r) for r in self.paths)

    def resolve(self, path: str) -> Path:
        """The server-side file a client names: absolute, or relative to the first root.

        Raises :class:`AccessDeniedError` for a ``..`` component, a path outside every root
        (after following symbolic links) or a service without roots, and
        :class:`InputNotFoundError` when the file does not exist.
        """
        if not isinstance(path, str) or not path.strip() or "\x00" in path:
            raise AccessDeniedError("empty or malformed path.", hint="Give a file under the service's --root folders.")
        if not self.paths:
            raise AccessDeniedError("this service reads no server-side files (it was started without --root).",
                                    hint="Upload the file instead, or restart with rsvl serve --root DIR.")
        if ".." in PurePath(path).parts:
            raise AccessDeniedError(f"{path!r}: '..' is not allowed in paths.",
                                    hint="Name the file by its path under a root folder.")
        candidate = Path(path) if os.path.isabs(path) else self.paths[0] / path
        real = Path(os.path.realpath(candidate))
        if not self.contains(real):
            raise AccessDeniedError(f"{path!r} is outside the folders this service may read.",
                                    hint=f"Allowed roots: {', '.join(map(str, self.paths))}.")
        try:
            exists = real.exists()
        except OSError:  # a name too long, a loop of links...
            exists = False
        if not exists:
            raise InputNotFoundError(f"{path!r}: no such file under the roots.", hint="Check the path (GET /v1/files lists them).")
        return real

    def display(self, path: Path) -> str:
        """``path`` as a client sees it: relative to its root, prefixed by the root's index
        when there are several roots."""
        for i, r in enumerate(self.paths):
            if path == r or path.is_relative_to(r):
                rel = path.relative_to(r).as_posix() or "."
                return rel if i == 0 else str(r / rel)
        return str(path)


def check_token(expected: str | None, given: str | None) -> None:
    """Raise :class:`UnauthorizedError` unless ``given`` equals ``expected`` (constant time);
    nothing is checked when the service has no token."""
    if expected is None:
        return
    if not given or not hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8")):
        raise UnauthorizedError("missing or wrong token.",
                                hint="Send 'Authorization: Bearer TOKEN' (the token given to rsvl serve --token or RSVL_TOKEN).")


def bearer(header: str | None) -> str | None:
    """The token of an ``Authorization: Bearer TOKEN`` header, else None."""
    if not header:
        return None
    scheme, _, value = header.partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None


def decode_base64(data: str, limits: Limits) -> bytes:
    """The bytes of a base64 string or a ``data:image/...;base64,`` URL, within the upload limit."""
    if not isinstance(data, str) or not data:
        raise RasterReadError("empty image.", hint="Send the image as base64 or a data:image/...;base64, URL.")
    if data.startswith("data:"):
        head, sep, data = data.partition(",")
        if not sep or not head.endswith(";base64"):
            raise RasterReadError("a data URL must be base64: data:image/png;base64,....")
    elif data.startswith(("http://", "https://", "file:")):
        raise RasterReadError("image URLs are not fetched by this service.",
                              hint="Send the image itself as a data:image/...;base64, URL.")
    if len(data) * 3 // 4 > limits.upload_bytes:
        raise RequestTooLargeError(f"the image is larger than {limits.upload_bytes} bytes.",
                                   hint="Send a smaller image, or run a raster as a job (POST /jobs).")
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise RasterReadError(f"the image is not valid base64 ({exc}).") from None


def decode_image(data: bytes, limits: Limits) -> np.ndarray:
    """Decode a plain image (PNG, JPEG, WebP, TIFF...) to (H, W, 3) uint8 RGB, refusing more
    than ``limits.image_pixels`` pixels before the pixels are decoded."""
    if len(data) > limits.upload_bytes:
        raise RequestTooLargeError(f"the image is larger than {limits.upload_bytes} bytes.")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            old = Image.MAX_IMAGE_PIXELS
            Image.MAX_IMAGE_PIXELS = limits.image_pixels
            try:
                im = Image.open(io.BytesIO(data))
                w, h = im.size
                if w * h > limits.image_pixels:
                    raise RequestTooLargeError(f"the image has {w} x {h} pixels, more than {limits.image_pixels}.",
                                               hint="Send a smaller image, or run a raster as a job (POST /jobs).")
                rgb = np.asarray(im.convert("RGB"))
            finally:
                Image.MAX_IMAGE_PIXELS = old
    except RequestTooLargeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise RequestTooLargeError(f"the image is too large to decode ({exc}).") from None
    except Exception as exc:  # PIL raises many types for a corrupt file
        raise RasterReadError(f"cannot read the image: {exc}.", hint="Send a PNG, JPEG, WebP or TIFF.") from None
    return np.ascontiguousarray(rgb)


def _references(path: Path) -> list[str] | None:
    """The files a VRT names, or None when ``path`` is not text that GDAL reads as a dataset.
    GDAL picks drivers by content, so a VRT renamed ``.tif`` is caught too; other XML
    descriptions (``<GDAL_WMS>``, ``<WCS_GDAL>``...: network sources) are refused."""
    with open(path, "rb") as f:
        head = f.read(1024).lstrip(b"\xef\xbb\xbf \t\r\n")
    if not head.startswith(b"<"):
        return None
    if path.stat().st_size > 16 * 1024 * 1024:
        raise RequestTooLargeError(f"{path.name}: an XML dataset description larger than 16 MiB.")
    try:
        root = ElementTree.parse(path).getroot()
    except ElementTree.ParseError as exc:
        raise RasterReadError(f"{path.name}: neither a raster nor a valid VRT ({exc}).") from None
    if not isinstance(root.tag, str) or root.tag.lower() != "vrtdataset":
        raise AccessDeniedError(f"{path.name}: a <{root.tag}> dataset description; this service opens only "
                                "raster files and VRTs of files under its roots.")
    refs = []
    for el in root.iter():
        tag = el.tag.lower() if isinstance(el.tag, str) else ""
        if tag == "pixelfunctioncode":
            raise AccessDeniedError(f"{path.name}: VRT pixel functions with code are not run by this service.")
        if tag.endswith("filename"):
            name = (el.text or "").strip()
            relative = el.get("relativeToVRT", "0").strip() == "1"
            refs.append(str(path.parent / name) if relative and not os.path.isabs(name) else name)
    return refs


def _check_reference(name: str, owner: Path, roots: Roots | None) -> None:
    what = f"{owner.name} refers to {name!r}"
    if not name or name.startswith("/vsi") or "://" in name or name.lower().startswith(("<", "mem:", "vrt:")):
        raise AccessDeniedError(f"{what}: remote, virtual or inline sources are not read by this service.",
                                hint="Point the VRT at files under the service's --root folders.")
    if not os.path.isabs(name):  # GDAL would resolve it against the server's working folder
        raise AccessDeniedError(f"{what}: a relative source without relativeToVRT=\"1\".",
                                hint="Mark relative sources relativeToVRT=\"1\" or use absolute paths under the roots.")
    real = Path(os.path.realpath(name))
    if roots is None or not roots.contains(real):
        raise AccessDeniedError(f"{what}, outside the folders this service may read.",
                                hint="Only VRTs under a --root whose sources are under the roots are opened; "
                                "uploads cannot be VRTs.")


def check_raster(path: Path, limits: Limits, roots: Roots | None = None) -> tuple[int, int]:
    """Width and height of a raster from its header (GDAL); refuse more than
    ``limits.raster_pixels`` pixels, files GDAL cannot open, and datasets that reach files
    outside ``roots`` (a VRT's sources are checked before GDAL opens it, and every file GDAL
    lists for the opened dataset after). ``roots`` None (an upload): the dataset may read
    nothing outside its own folder, and cannot be a VRT."""
    refs = _references(path)
    for name in refs or ():
        _check_reference(name, path, roots)
    try:
        with rasterio.open(path) as ds:
            w, h = ds.width, ds.height
            files = list(ds.files or [])
    except rasterio.errors.RasterioIOError as exc:
        raise RasterReadError(f"{path.name}: not a raster GDAL can read ({exc}).") from None
    for f in files:
        real = Path(os.path.realpath(f)) if not f.startswith("/vsi") else None
        inside = real is not None and (real.parent == path.parent if roots is None else roots.contains(real))
        if not inside:
            raise AccessDeniedError(f"{path.name} reads {f!r}, outside the folders this service may read.",
                                    hint="Open rasters whose files all lie under the --root folders.")
    if w * h > limits.raster_pixels:
        raise RequestTooLargeError(f"{path.name} has {w} x {h} pixels, more than this service's limit of "
                                   f"{limits.raster_pixels}.", hint="Start the service with a larger --max-raster-pixels.")
    return w, h


def safe_filename(name: str | None, allowed: Sequence[str]) -> str:
    """A plain file name for an upload (no folders, no hidden file), with a suffix GDAL or
    PIL reads."""
    base = PurePath((name or "").replace("\\", "/")).name.strip().lstrip(".")
    stem, dot, suffix = base.rpartition(".")
    if not dot or f".{suffix.lower()}" not in allowed:
        raise RasterReadError(f"{name!r} is not a raster or image file this service accepts.",
                              hint=f"Accepted suffixes: {', '.join(allowed)}.")
    clean = "".join(c if c.isalnum() or c in "-_" else "_" for c in stem)[:80] or "upload"
    return f"{clean}.{suffix.lower()}"
