"""VRT safety: a VRT whose raw raster band (``VRTRawRasterBand``) would read a local file as
pixels is refused unless the user opts in (``RSVL_ALLOW_VRT_RAW=1``). The GDAL switch
``GDAL_VRT_ENABLE_RAWRASTERBAND=NO`` is set too, but not every GDAL honours it, so the VRT
(and the local VRTs it sources) is checked here before it is opened."""

from __future__ import annotations

import os
from pathlib import Path
from xml.etree import ElementTree

from rsvl.errors import (
    RasterReadError,
)

#: set to 1 to let VRTs read raw local files (VRTRawRasterBand); refused by default
ALLOW_VRT_RAW_ENV = "RSVL_ALLOW_VRT_RAW"


def vrt_raw_allowed() -> bool:
    """True when the user opted in to VRT raw raster bands (``RSVL_ALLOW_VRT_RAW=1``)."""
    return os.environ.get(ALLOW_VRT_RAW_ENV, "").strip().lower() in {"1", "yes", "true", "on"}


#: largest VRT rsvl parses to look for raw raster bands (a mosaic of 10k sources is ~5 MB)
VRT_CHECK_MAX_BYTES = 64 * 1024 * 1024


_VRT_MAX_DEPTH = 8


def vrt_raw_source(path: Path, depth: int = 0) -> str | None:
    """The file a VRTRawRasterBand of the VRT at ``path`` (or of a local VRT it uses as a
    source, recursively) would read, or ``None`` when there is none. Non-VRT files are
    ``None``; a VRT too large or nested too deep to check counts as raw."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(1024)
            if b"<vrtdataset" not in head.lower():
                return None
            size = path.stat().st_size
            if size > VRT_CHECK_MAX_BYTES or depth > _VRT_MAX_DEPTH:
                return f"(a VRT too large or nested too deep to check: {path})"
            fh.seek(0)
            data = fh.read()
    except OSError:
        return None
    try:
        root = ElementTree.fromstring(data)
    except ElementTree.ParseError:
        # GDAL will refuse it too; a textual hit still counts as raw
        return str(path) if b"vrtrawrasterband" in data.lower() else None
    for band in root.iter():
        if str(band.get("subClass", band.get("subclass", ""))).lower() == "vrtrawrasterband":
            src = band.findtext("SourceFilename") or "?"
            return src.strip()
    for node in root.iter("SourceFilename"):
        name = (node.text or "").strip()
        if not name or name.startswith("/vsi") or "://" in name:
            continue
        rel = str(node.get("relativeToVRT", node.get("relativetoVRT", "0"))).strip() == "1"
        src = path.parent / name if rel else Path(name)
        if src.is_file() and src.resolve() != path.resolve():
            found = vrt_raw_source(src, depth + 1)
            if found:
                return found
    return None


def raw_vrt_refused(text: str, raw: str) -> RasterReadError:
    return RasterReadError(
        f"{text} is a VRT with a raw raster band that reads {raw} as pixels; rsvl refuses "
        "raw bands, which can expose any local file.",
        hint=f"If you trust this VRT, set {ALLOW_VRT_RAW_ENV}=1; otherwise convert the data "
        "to a GeoTIFF (gdal_translate) and pass that.",
    )

