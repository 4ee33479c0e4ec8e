from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = (REPO / ".." / "shared" / "data").resolve()

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RSVL_OFFLINE", "1")


def shared_data(*parts: str) -> Path:
    """A path under ../shared/data; skips the test with a reason when it is absent."""
    p = SHARED_DATA.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"real data not found at {p} (../shared/data next to the repository)")
    return p


def write_raster(
    path: Path,
    data: np.ndarray,
    *,
    crs: str | None = "EPSG:32618",
    transform=None,
    nodata=None,
    colorinterp=None,
    **profile,
) -> Path:
    import rasterio
    from rasterio.transform import from_origin

    if data.ndim == 2:
        data = data[None]
    count, h, w = data.shape
    if transform is None:
        transform = from_origin(500000.0, 4100000.0, 0.5, 0.5)
    prof = dict(driver="GTiff", width=w, height=h, count=count, dtype=data.dtype.name, transform=transform, nodata=nodata)
    if crs is not None:
        prof["crs"] = crs
    prof.update(profile)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with rasterio.open(path, "w", **prof) as ds:
            ds.write(data)
            if colorinterp is not None:
                ds.colorinterp = colorinterp
    return path


@pytest.fixture
def rgb_raster(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    return write_raster(tmp_path / "rgb.tif", rng.integers(0, 255, (3, 301, 437), dtype=np.uint8))


@pytest.fixture(autouse=True)
def _console_state_per_test():
    """rsvl's console state (--quiet, --debug) is process-wide; a test that sets it (a CLI
    call, a Ray worker built in-process) must not silence the next test's messages."""
    from rsvl.console import state

    saved = (state.quiet, state.debug)
    yield
    state.quiet, state.debug = saved
