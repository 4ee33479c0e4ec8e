"""Fixtures of the service tests: a root folder with the bundled sample raster and a small
image, symlinks out of it, and a folder outside it the service must never read."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from serve_util import png_bytes

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "examples" / "OSBS_029.tif"


@pytest.fixture(scope="session")
def roots(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``root/`` (the sample raster, a small PNG, a sub folder, a link out of the root) and
    ``outside/`` (a file the service must never read)."""
    base = tmp_path_factory.mktemp("serve-roots")
    root, outside = base / "root", base / "outside"
    (root / "sub").mkdir(parents=True)
    outside.mkdir()
    shutil.copy(SAMPLE, root / "OSBS_029.tif")
    (root / "small.png").write_bytes(png_bytes(40))
    shutil.copy(SAMPLE, outside / "secret.tif")
    os.symlink(outside / "secret.tif", root / "escape.tif")
    os.symlink(outside, root / "sub" / "out")
    return {"root": root, "outside": outside}
