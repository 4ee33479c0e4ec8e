"""Rasters: open what GDAL reads, describe it, and read windows as the 8-bit RGB models expect.

Nothing here knows about models. A :class:`RasterSource` decides once, from the file's
metadata and a decimated read, how to turn its bands into RGB uint8 (band selection and a
per-band percentile stretch for 16-bit / float / multispectral data) and which pixels are
valid (nodata, alpha and internal masks). Window reads then apply that recipe, so every
tile of a scene is converted identically and no read ever touches the whole raster.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import rasterio._err
from rasterio.enums import ColorInterp, Resampling
from rasterio.errors import NotGeoreferencedWarning, RasterioIOError
from rasterio.vrt import WarpedVRT
from rasterio.windows import Window

from rsvl.errors import (
    BandSelectionError,
    GridError,
    InputNotFoundError,
    NoCRSError,
    RasterReadError,
)
from rsvl.geo.gsd import (
    ResamplePlan,
    gsd_metres,
    gsd_of,
    linear_units,
    resampled_size,
)
from rsvl.geo.vrt import raw_vrt_refused, vrt_raw_allowed, vrt_raw_source

# GDAL's block cache defaults to 5 % of RAM and would grow with the scene; bound it unless
# the user chose a size. GDAL reads this once, on first use of its cache. 64 MB holds two
# rows of 512 px RGB blocks across a 20k px wide scene (what a row-major tile walk revisits);
# a larger cache only makes peak memory grow with the scene (bench/task_memory.py).
os.environ.setdefault("GDAL_CACHEMAX", "64")





# A VRTRawRasterBand reads any local file (/etc/passwd, a key) as pixels, and rsvl reads
# untrusted rasters. GDAL >= 3.12 honours this switch everywhere it opens a VRT (nested
# ones too); open_dataset also checks the VRT itself, for the GDALs that predate it.
os.environ.setdefault("GDAL_VRT_ENABLE_RAWRASTERBAND", "YES" if vrt_raw_allowed() else "NO")

#: longest side of the decimated read used for stretch statistics
STATS_MAX_SIDE = 1024








def open_dataset(
    path: str | os.PathLike[str], *, allow_vrt_raw: bool | None = None
) -> rasterio.io.DatasetReader:
    """Open a raster with GDAL, turning every failure into an error that says what to do.

    A VRT with a raw raster band (``VRTRawRasterBand``, which reads any local file as
    pixels) is refused unless ``allow_vrt_raw`` (default: ``RSVL_ALLOW_VRT_RAW=1``)."""
    p = Path(path)
    text = str(path)
    is_remote = text.startswith(("/vsi", "http://", "https://", "s3://", "gs://"))
    if not is_remote and not p.exists():
        raise InputNotFoundError(
            f"{text}: no such file.", hint="Check the path (relative paths are resolved from the current folder)."
        )
    if not is_remote and p.is_dir():
        raise RasterReadError(f"{text} is a folder, not a raster.", hint="Pass a raster file (GeoTIFF, COG, VRT, JPEG2000, PNG, JPEG).")
    allowed = vrt_raw_allowed() if allow_vrt_raw is None else allow_vrt_raw
    raw = None if is_remote or allowed else vrt_raw_source(p)
    if raw is not None:
        raise raw_vrt_refused(text, raw)
    try:
        # an opt-in after import (the keyword) lifts the process-wide switch for this open
        lift = allowed and os.environ.get("GDAL_VRT_ENABLE_RAWRASTERBAND", "").upper() == "NO"
        with warnings.catch_warnings(), (
            rasterio.Env(GDAL_VRT_ENABLE_RAWRASTERBAND="YES") if lift else contextlib.nullcontext()
        ):
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            ds = rasterio.open(text)
    except RasterioIOError as exc:
        raise RasterReadError(
            f"{text}: GDAL cannot read this file as a raster ({_first_line(exc)}).",
            hint="Check that it is a complete GeoTIFF/COG/VRT/JPEG2000/PNG/JPEG file (a truncated download or a non-raster file gives this error).",
        ) from exc
    if not allowed and ds.driver == "VRT":  # also covers /vsi paths the check above skips
        xml = str(ds.tags(ns="xml:VRT").get("xml:VRT", ""))
        if "vrtrawrasterband" in xml.lower():
            ds.close()
            raise raw_vrt_refused(text, "a local file")
    if ds.count == 0:
        ds.close()
        raise RasterReadError(f"{text} has no raster bands.", hint="Pass a file with at least one band.")
    return ds


def _read_failed(path: str, exc: BaseException) -> RasterReadError:
    return RasterReadError(
        f"{path}: GDAL cannot read the pixels of this raster ({_first_line(exc)}).",
        hint="The file is probably truncated or corrupt: download or export it again.",
    )


def check_last_block(ds: rasterio.io.DatasetReader) -> None:
    """Read the last block of the first band: a file cut short (an interrupted download or
    copy) opens and reports its full size, and fails only when the missing part is read.
    Raises :class:`RasterReadError` saying so, before hours of work stop at the last rows."""
    if not ds.block_shapes or ds.width < 1 or ds.height < 1:
        return
    bh, bw = ds.block_shapes[0]
    row, col = (ds.height - 1) // bh * bh, (ds.width - 1) // bw * bw
    window = Window(col, row, min(bw, ds.width - col), min(bh, ds.height - row))
    try:
        ds.read(1, window=window)
    except Exception as exc:  # rasterio raises RasterioIOError / CPLE_* with GDAL's message
        raise RasterReadError(
            f"{ds.name}: the end of this raster cannot be read ({_first_line(exc)}).",
            hint="The file is truncated or corrupt (an interrupted download or copy?): download or export it again.",
        ) from exc


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


@dataclass(frozen=True)
class BandPlan:
    """Which bands become R, G, B, and why."""
    bands: tuple[int, int, int]  # 1-based
    alpha_band: int | None
    note: str
    grayscale: bool = False


def plan_bands(
    count: int, colorinterp: Sequence[ColorInterp], requested: Sequence[int] | None = None
) -> BandPlan:
    """Choose the three bands used as RGB (1-based), honouring an explicit ``--bands``."""
    alpha = next((i + 1 for i, ci in enumerate(colorinterp) if ci == ColorInterp.alpha), None)
    if requested is not None:
        req = tuple(int(b) for b in requested)
        if len(req) not in (1, 3):
            raise BandSelectionError(
                f"--bands takes 3 band numbers (R,G,B) or 1 (grayscale), got {len(req)}: {','.join(map(str, req))}.",
                hint="Example: --bands 4,3,2",
            )
        bad = [b for b in req if b < 1 or b > count]
        if bad:
            raise BandSelectionError(
                f"band {bad[0]} does not exist: this raster has {count} band(s), numbered 1..{count}.",
                hint="Pass existing band numbers, e.g. --bands 1,2,3.",
            )
        if len(req) == 1:
            return BandPlan((req[0],) * 3, alpha, f"using band {req[0]} as grayscale (from --bands)", True)
        return BandPlan(req, alpha, f"using bands {','.join(map(str, req))} as RGB (from --bands)")  # type: ignore[arg-type]

    data_bands = [i + 1 for i in range(count) if colorinterp[i] != ColorInterp.alpha]
    rgb = [
        next((i + 1 for i, ci in enumerate(colorinterp) if ci == want), None)
        for want in (ColorInterp.red, ColorInterp.green, ColorInterp.blue)
    ]
    if all(b is not None for b in rgb) and count >= 3:
        bands = tuple(rgb)  # type: ignore[assignment]
        extra = count - 3 - (1 if alpha else 0)
        note = f"{count} bands: using {','.join(map(str, bands))} (tagged red, green, blue) as RGB"
        if alpha:
            note += f"; band {alpha} is alpha and marks valid pixels"
        if extra > 0:
            note += "; pass --bands to change"
        return BandPlan(bands, alpha, note)  # type: ignore[arg-type]
    if len(data_bands) == 1:
        b = data_bands[0]
        return BandPlan((b, b, b), alpha, f"1 band: using band {b} as grayscale (replicated to RGB)", True)
    if len(data_bands) == 2:
        raise BandSelectionError(
            f"this raster has {count} bands and rsvl cannot tell which are red, green and blue.",
            hint="Pass --bands R,G,B (three band numbers) or --bands N for one band as grayscale.",
        )
    bands = tuple(data_bands[:3])
    note = f"{count} bands: using {','.join(map(str, bands))} as RGB"
    if count > 3:
        note += "; pass --bands to change"
    return BandPlan(bands, alpha, note)  # type: ignore[arg-type]


















def source_files(path: str | os.PathLike[str]) -> list[str]:
    """Every local file GDAL reads for ``path``: the raster, its sidecars (.ovr, .aux.xml,
    .msk) and, for a VRT, the rasters it refers to."""
    with open_dataset(path) as ds:
        files = list(ds.files or [])
    return [str(path), *(f for f in files if not f.startswith("/vsi"))]


@dataclass(frozen=True)
class Stretch:
    """Per-band linear stretch to 0..255: ``(x - low) / (high - low) * 255``, clipped."""
    low: tuple[float, ...]
    high: tuple[float, ...]
    method: str  # "none" | "percentile" | "dtype"
    percentiles: tuple[float, float] | None = None

    def apply(self, data: np.ndarray) -> np.ndarray:
        if self.method == "none":
            return np.clip(data, 0, 255).astype(np.uint8, copy=False)
        low = np.asarray(self.low, dtype=np.float32)[:, None, None]
        high = np.asarray(self.high, dtype=np.float32)[:, None, None]
        scale = 255.0 / np.maximum(high - low, 1e-12)
        out = (data.astype(np.float32) - low) * scale
        np.clip(out, 0, 255, out=out)
        return np.rint(out).astype(np.uint8)


@dataclass(frozen=True)
class RasterInfo:
    path: str
    driver: str
    width: int
    height: int
    count: int
    dtypes: list[str]
    crs: str | None
    epsg: int | None
    transform: list[float]
    bounds: list[float]
    gsd: list[float]
    gsd_units: str | None
    gsd_m: float | None
    nodata: float | None
    colorinterp: list[str]
    overviews: list[int]
    block_shapes: list[list[int]]
    compression: str | None
    has_mask: bool
    plan: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class RasterSource:
    """A raster plus the recipe that turns any window of it into RGB uint8 and a validity mask.

    Parameters
    ----------
    path: anything GDAL opens.
    bands: 1-based band numbers used as RGB (or one band as grayscale); default from colour
        interpretation, else the first three bands.
    stretch: ``"auto"`` (percentile stretch unless the data is already 8-bit),
        ``"percentile"`` (always), or ``"none"`` (clip values to 0..255).
    percentiles: low/high percentiles of the stretch.
    target_gsd: resample reads to this ground sample distance in metres (also for a
        geographic CRS, whose degrees are converted at the scene's latitude);
        the working grid (``width``, ``height``, ``transform``) is then that of the resampled
        raster. None keeps the native resolution.
    """
    def __init__(
        self,
        path: str | os.PathLike[str],
        bands: Sequence[int] | None = None,
        stretch: str = "auto",
        percentiles: tuple[float, float] = (2.0, 98.0),
        target_gsd: float | None = None,
        resampling: Resampling = Resampling.bilinear,
    ) -> None:
        if stretch not in ("auto", "percentile", "none"):
            raise BandSelectionError(f"unknown stretch {stretch!r}.", hint="Use auto, percentile or none.")
        self.path = str(path)
        self._ds = open_dataset(path)
        ds = self._ds
        self.band_plan = plan_bands(ds.count, ds.colorinterp, bands)
        self.crs = ds.crs
        self.native_transform = ds.transform
        self.native_width, self.native_height = ds.width, ds.height
        self.nodata = ds.nodata
        self.dtype = ds.dtypes[self.band_plan.bands[0] - 1]
        self.resampling = resampling
        self.warnings: list[str] = []
        if ds.crs is None:
            self.warnings.append(
                f"{self.path} has no CRS: outputs will not be georeferenced (pixel coordinates only)."
            )
        self.target_gsd = target_gsd
        if target_gsd is not None:
            if target_gsd <= 0:
                raise GridError(f"target GSD must be positive, got {target_gsd}.")
            if ds.crs is None:
                raise NoCRSError(
                    f"{self.path} has no CRS, so a target GSD in ground units cannot be applied.",
                    hint="Drop --gsd, or assign a CRS first (e.g. gdal_edit.py -a_srs EPSG:XXXX).",
                )
            # The target is in metres whatever the CRS's units (degrees for EPSG:4326).
            self.width, self.height = resampled_size(ds, target_gsd)
            self.scale = (ds.width / self.width, ds.height / self.height)
            self.transform = ds.transform @ rasterio.Affine.scale(
                ds.width / self.width, ds.height / self.height
            )
        else:
            self.scale = (1.0, 1.0)
            self.width, self.height = ds.width, ds.height
            self.transform = ds.transform
        self.stretch = self._compute_stretch(stretch, percentiles)

    # -- description -------------------------------------------------------------------

    def info(self) -> RasterInfo:
        ds = self._ds
        epsg = None
        crs_text = None
        if ds.crs is not None:
            try:
                epsg = ds.crs.to_epsg()
            except Exception:  # pragma: no cover
                epsg = None
            crs_text = f"EPSG:{epsg}" if epsg else ds.crs.to_wkt()
        gx, gy = gsd_of(ds)
        plan: dict[str, Any] = {
            "rgb_bands": list(self.band_plan.bands),
            "alpha_band": self.band_plan.alpha_band,
            "bands_note": self.band_plan.note,
            "stretch": self.stretch.method,
            "stretch_low": list(self.stretch.low),
            "stretch_high": list(self.stretch.high),
            "working_size": [self.width, self.height],
            "working_gsd": self.target_gsd,
            "resample_factor": round(self.resample_plan().factor, 4),
            "resampling_note": self.resample_plan().describe(),
        }
        if self.stretch.method == "percentile":
            p = self.stretch.percentiles
            plan["stretch_note"] = (
                f"{self.dtype} data: per-band {p[0]:g}-{p[1]:g} percentile stretch to 8-bit"
                " (from a decimated read)"
            )
        elif self.dtype == "uint8":
            plan["stretch_note"] = "8-bit data: used as is"
        else:
            plan["stretch_note"] = f"{self.dtype} data: values clipped to 0..255 (stretch none)"
        masks = {m for flags in ds.mask_flag_enums for m in flags}
        has_mask = any(m.name in ("per_dataset", "alpha", "nodata") for m in masks)
        return RasterInfo(
            path=self.path,
            driver=ds.driver,
            width=ds.width,
            height=ds.height,
            count=ds.count,
            dtypes=list(ds.dtypes),
            crs=crs_text,
            epsg=epsg,
            transform=list(ds.transform)[:6],
            bounds=list(ds.bounds),
            gsd=[gx, gy],
            gsd_units=linear_units(ds),
            gsd_m=gsd_metres(ds),
            nodata=ds.nodata,
            colorinterp=[ci.name for ci in ds.colorinterp],
            overviews=ds.overviews(1),
            block_shapes=[list(s) for s in ds.block_shapes],
            compression=ds.compression.name if ds.compression else None,
            has_mask=has_mask,
            plan=plan,
            warnings=list(self.warnings),
        )

    # -- statistics ----------------------------------------------------------------------

    def _compute_stretch(self, stretch: str, percentiles: tuple[float, float]) -> Stretch:
        bands = self.band_plan.bands
        if stretch == "none" or (stretch == "auto" and self.dtype == "uint8"):
            return Stretch((0.0,) * 3, (255.0,) * 3, "none")
        lo_p, hi_p = percentiles
        if not (0 <= lo_p < hi_p <= 100):
            raise BandSelectionError(f"percentiles must satisfy 0 <= low < high <= 100, got {percentiles}.")
        ds = self._ds
        factor = max(ds.width, ds.height) / STATS_MAX_SIDE
        out_w = max(1, int(round(ds.width / max(factor, 1.0))))
        out_h = max(1, int(round(ds.height / max(factor, 1.0))))
        # A decimated read: GDAL serves it from overviews when the file has them.
        try:
            data = ds.read(list(bands), out_shape=(3, out_h, out_w), resampling=Resampling.nearest, masked=True)
        except (RasterioIOError, rasterio.errors.RasterioError, rasterio._err.CPLE_BaseError) as exc:
            raise _read_failed(self.path, exc) from exc
        valid = ~np.ma.getmaskarray(data).any(axis=0)
        valid &= np.isfinite(data.filled(0)).all(axis=0)
        if self.band_plan.alpha_band is not None:
            alpha = ds.read(self.band_plan.alpha_band, out_shape=(out_h, out_w), resampling=Resampling.nearest)
            valid &= alpha > 0
        low, high = [], []
        for i in range(3):
            values = np.asarray(data[i].filled(0))[valid]
            if values.size == 0:
                low.append(0.0)
                high.append(255.0)
                continue
            lo, hi = np.percentile(values.astype(np.float64), [lo_p, hi_p])
            if hi <= lo:
                hi = lo + 1.0
            low.append(float(lo))
            high.append(float(hi))
        return Stretch(tuple(low), tuple(high), "percentile", (lo_p, hi_p))

    # -- reading -----------------------------------------------------------------------------

    def reader(self) -> WindowReader:
        """A reader with its own GDAL handle (one per thread)."""
        return WindowReader(self)

    def read(self, window: Window) -> tuple[np.ndarray, np.ndarray]:
        with self.reader() as r:
            return r.read(window)

    def read_preview(self, width: int, height: int) -> np.ndarray:
        """The whole working extent as (3, height, width) uint8 RGB, from a decimated read
        (GDAL uses overviews when present); invalid pixels are black."""
        bands = list(self.band_plan.bands)
        unique = sorted(set(bands))
        try:
            raw = self._ds.read(unique, out_shape=(len(unique), height, width), resampling=Resampling.average)
            mask = self._ds.dataset_mask(out_shape=(height, width), resampling=Resampling.nearest) > 0
        except (RasterioIOError, rasterio.errors.RasterioError, rasterio._err.CPLE_BaseError) as exc:
            raise _read_failed(self.path, exc) from exc
        data = raw[[unique.index(b) for b in bands]]
        if np.issubdtype(data.dtype, np.floating):
            mask &= np.isfinite(data).all(axis=0)
            data = np.where(np.isfinite(data), data, 0)
        rgb = self.stretch.apply(data)
        rgb[:, ~mask] = 0
        return rgb

    def close(self) -> None:
        self._ds.close()

    def __enter__(self) -> RasterSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def resample_plan(self) -> ResamplePlan:
        """What resampling to ``target_gsd`` does to this raster (see :class:`ResamplePlan`)."""
        return ResamplePlan(gsd_metres(self._ds), self.target_gsd, (self.native_width, self.native_height),
                            (self.width, self.height))

    def settings(self) -> dict[str, Any]:
        """What decides the pixels a model sees: recorded in output tags."""
        return {
            **self.resample_plan().tags(),
            "source": os.path.basename(self.path),
            "bands": list(self.band_plan.bands),
            "stretch": self.stretch.method,
            "stretch_low": [round(v, 6) for v in self.stretch.low],
            "stretch_high": [round(v, 6) for v in self.stretch.high],
            "gsd": self.target_gsd if self.target_gsd is not None else (gsd_metres(self._ds) or None),
            "resampled": self.target_gsd is not None,
        }


class WindowReader:
    """Reads windows of the working grid as ``(rgb uint8 (3,h,w), valid bool (h,w))``.

    Windows may extend past the raster: the outside is zero-filled and marked invalid, so
    edge tiles are padded, never dropped.
    """
    def __init__(self, source: RasterSource) -> None:
        self.source = source
        self._ds = open_dataset(source.path)
        self._vrt = None
        if source.target_gsd is not None:

            self._vrt = WarpedVRT(
                self._ds,
                crs=self._ds.crs,
                transform=source.transform,
                width=source.width,
                height=source.height,
                resampling=source.resampling,
            )
        self._src = self._vrt if self._vrt is not None else self._ds

    def read(self, window: Window) -> tuple[np.ndarray, np.ndarray]:
        s = self.source
        col, row = int(window.col_off), int(window.row_off)
        w, h = int(window.width), int(window.height)
        try:
            rgb = np.zeros((3, h, w), dtype=np.uint8)
            valid = np.zeros((h, w), dtype=bool)
        except (ValueError, MemoryError) as exc:  # a header that claims billions of pixels
            raise RasterReadError(
                f"{s.path}: a {w} x {h} px window of this raster is too large to read into memory.",
                hint="Check the file's size in `rsvl info`: a corrupt header can claim it; a "
                "genuine raster that large needs a CRS so rsvl reads it tile by tile.",
            ) from exc
        c0, r0 = max(col, 0), max(row, 0)
        c1, r1 = min(col + w, s.width), min(row + h, s.height)
        if c1 <= c0 or r1 <= r0:
            return rgb, valid
        inner = Window(c0, r0, c1 - c0, r1 - r0)
        bands = list(s.band_plan.bands)
        unique = sorted(set(bands))
        try:
            raw = self._src.read(unique, window=inner)
            mask = self._src.dataset_mask(window=inner) > 0
        except (RasterioIOError, rasterio.errors.RasterioError, rasterio._err.CPLE_BaseError) as exc:
            raise _read_failed(s.path, exc) from exc
        data = raw[[unique.index(b) for b in bands]]
        if np.issubdtype(data.dtype, np.floating):
            finite = np.isfinite(data).all(axis=0)
            mask &= finite
            data = np.where(finite[None], data, 0)
        ys, xs = slice(r0 - row, r1 - row), slice(c0 - col, c1 - col)
        rgb[:, ys, xs] = s.stretch.apply(data)
        valid[ys, xs] = mask
        rgb[:, ys, xs][:, ~mask] = 0
        return rgb, valid

    def close(self) -> None:
        if self._vrt is not None:
            self._vrt.close()
        self._ds.close()

    def __enter__(self) -> WindowReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
