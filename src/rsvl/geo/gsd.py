"""Ground sample distance in metres, and what resampling a raster to a target GSD does
(:class:`ResamplePlan`: native and target GSD, factor, working grid)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import rasterio
import rasterio._err

from rsvl.errors import (
    GridError,
    NoCRSError,
)


def gsd_of(ds: rasterio.io.DatasetReader) -> tuple[float, float]:
    """Pixel size (x, y) in the CRS's units (rotation-safe)."""
    t = ds.transform
    return (math.hypot(t.a, t.d), math.hypot(t.b, t.e))


def linear_units(ds: rasterio.io.DatasetReader) -> str | None:
    if ds.crs is None:
        return None
    if ds.crs.is_geographic:
        return "degree"
    try:
        return ds.crs.linear_units or "unknown"
    except Exception:  # pragma: no cover - exotic CRSs
        return "unknown"


def pixel_size_metres(ds: rasterio.io.DatasetReader) -> tuple[float, float] | None:
    """Pixel size (x, y) in metres, or None without a CRS. A geographic CRS's degrees are
    converted at the scene's central latitude; other units through the CRS's factor."""
    if ds.crs is None:
        return None
    gx, gy = gsd_of(ds)
    if ds.crs.is_geographic:
        lat = (ds.bounds.top + ds.bounds.bottom) / 2.0
        m_per_deg = 111_320.0
        return (gx * m_per_deg * math.cos(math.radians(lat)), gy * m_per_deg)
    factor = 1.0
    try:
        factor = float(ds.crs.linear_units_factor[1])
    except Exception:  # pragma: no cover
        pass
    return (gx * factor, gy * factor)


def gsd_metres(ds: rasterio.io.DatasetReader) -> float | None:
    """Ground sample distance in metres (mean of x and y), or None without a CRS."""
    size = pixel_size_metres(ds)
    return None if size is None else float((size[0] + size[1]) / 2.0)


def resampled_size(ds: rasterio.io.DatasetReader, target_gsd: float) -> tuple[int, int]:
    """(width, height) of ``ds`` resampled to ``target_gsd`` metres per pixel (geographic
    rasters included: their pixel size is converted to metres first)."""
    size = pixel_size_metres(ds)
    if size is None:
        raise NoCRSError("a raster without a CRS has no ground sample distance to resample from.")
    mx, my = size
    return (max(1, int(round(ds.width * mx / target_gsd))), max(1, int(round(ds.height * my / target_gsd))))


#: the largest upsampling (native GSD / target GSD) a model's *default* GSD may apply
#: unasked: beyond it a run costs factor**2 times the tiles for no new detail
MAX_DEFAULT_UPSAMPLE = 4.0


def _metres(v: float | None) -> str:
    if v is None:
        return "?"
    return f"{v:.3g} m" if v < 100 else f"{v:,.0f} m"


@dataclass(frozen=True)
class ResamplePlan:
    """What resampling does to one raster: the native and working GSD (metres), the linear
    factor (native / working; > 1 upsamples) and the native and working grid sizes."""

    native_gsd: float | None
    target_gsd: float | None
    native_size: tuple[int, int]
    working_size: tuple[int, int]

    @property
    def resampled(self) -> bool:
        return self.target_gsd is not None

    @property
    def factor(self) -> float:
        if self.target_gsd is None or not self.native_gsd:
            return 1.0
        return self.native_gsd / self.target_gsd

    def describe(self, tiles: int | None = None) -> str:
        """One line: ``resampling 5 m -> 0.3 m (16.7x upsampling): 934x723 -> 15,567x12,050 px, 4,960 tiles``."""
        (nw, nh), (w, h) = self.native_size, self.working_size
        tail = "" if tiles is None else f", {tiles:,} tile{'s' if tiles != 1 else ''}"
        if not self.resampled:
            gsd = f" at the native {_metres(self.native_gsd)}" if self.native_gsd else ""
            return f"no resampling: {w:,}x{h:,} px{gsd}{tail}"
        f = self.factor
        way = f"{f:.3g}x upsampling" if f >= 1 else f"{1 / f:.3g}x downsampling"
        return (f"resampling {_metres(self.native_gsd)} -> {_metres(self.target_gsd)} ({way}): "
                f"{nw:,}x{nh:,} -> {w:,}x{h:,} px{tail}")

    def tags(self) -> dict[str, Any]:
        """The plan as recorded in output settings (GSDs in metres, rounded)."""
        return {
            "native_gsd": None if self.native_gsd is None else round(self.native_gsd, 6),
            "target_gsd": None if self.target_gsd is None else round(self.target_gsd, 6),
            "resample_factor": round(self.factor, 4),
        }

    def check_default(self, tiles: int, native_tiles: int | None = None, *,
                      limit: float = MAX_DEFAULT_UPSAMPLE) -> None:
        """Refuse a *default* target GSD that upsamples more than ``limit`` times: the user
        confirms it with an explicit ``--gsd`` or runs at the native resolution with ``--gsd 0``."""
        if self.resampled and self.factor > limit:
            native = _metres(self.native_gsd).replace(" m", "")
            target = f"{self.target_gsd:g}"
            raise GridError(
                f"this {_metres(self.native_gsd)} raster would be resampled {self.factor:.3g}x to the model's "
                f"{_metres(self.target_gsd)} training GSD ({tiles:,} tiles instead of "
                f"{native_tiles if native_tiles is not None else max(1, round(tiles / self.factor ** 2)):,} "
                f"at the native resolution); rsvl does not upsample more than "
                f"{limit:g}x unasked.",
                hint=f"Pass --gsd 0 to run at the native {native} m, or --gsd {target} to confirm.",
            )

