"""What a scaled run works on: the items (a raster, or one block of a large raster) that the
SOURCES of ``rsvl run`` expand to, in a deterministic order.

SOURCES are raster files, folders (every image under them, recursively, sorted by path) or
glob patterns (``tiles/**/*.tif``). A raster larger than ``block`` pixels on a side is cut,
for tasks that allow it, into ``block`` x ``block`` cores, each read with ``pad`` pixels of
context around it through a small VRT written next to the outputs; the mosaic later keeps
only each block's core, so neighbouring blocks never overlap in the merged result.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

from rasterio.dtypes import dtype_rev, typename_fwd

from rsvl.errors import InputNotFoundError, RsvlError
from rsvl.geo.raster import open_dataset
from rsvl.io import is_image_file, write_text
from rsvl.tasks.sources import find_images, no_images_message

#: default block side in pixels: a raster larger than this on a side is split among workers
DEFAULT_BLOCK = 8192

Window4 = tuple[int, int, int, int]  # col_off, row_off, width, height


@dataclass(frozen=True)
class Item:
    """One unit of work: ``source`` (an absolute raster path) whole, or one of its blocks.

    ``core`` is the block's own window and ``read`` the larger window the task reads
    (``core`` plus the task's context, clipped to the raster), both in source pixels;
    ``None`` for a whole raster. ``name`` is unique within a run and names the outputs.
    """

    name: str
    source: str
    core: Window4 | None = None
    read: Window4 | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Item:
        core, read = d.get("core"), d.get("read")
        return cls(str(d["name"]), str(d["source"]), tuple(core) if core else None,  # type: ignore[arg-type]
                   tuple(read) if read else None)  # type: ignore[arg-type]


def _is_glob(text: str) -> bool:
    return any(ch in text for ch in "*?[")


def expand_sources(sources: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """Files, folders and globs -> distinct absolute raster paths, in the order given
    (a folder's or a glob's files sorted by path)."""
    if isinstance(sources, str | os.PathLike):
        sources = [sources]
    out: list[Path] = []
    seen: set[Path] = set()
    for s in sources:
        text = str(s)
        p = Path(text).expanduser()
        if p.is_dir():
            files = find_images(p)
            if not files:
                raise InputNotFoundError(no_images_message(p), hint="Point at a folder of rasters or images.")
        elif p.exists():
            files = [p]
        elif _is_glob(text):
            files = [Path(f) for f in sorted(glob.glob(os.path.expanduser(text), recursive=True)) if is_image_file(f)]
            if not files:
                raise InputNotFoundError(f"{text}: the pattern matches no raster or image.",
                                         hint="Check the pattern (quote it so that the shell does not expand it).")
        else:
            raise InputNotFoundError(f"{text}: no such file or folder.", hint="Check the path.")
        for f in files:
            a = f.resolve()
            if a not in seen:
                seen.add(a)
                out.append(a)
    if not out:
        raise InputNotFoundError("no sources given.", hint="Pass rasters, folders or glob patterns.")
    return out


def block_windows(width: int, height: int, block: int, pad: int) -> list[tuple[int, int, Window4, Window4]]:
    """(row, col, core, read) for the blocks of a ``width`` x ``height`` raster, row-major.

    Cores tile the raster exactly (the last row and column are smaller); each read window
    is its core grown by ``pad`` on every side and clipped to the raster."""
    out = []
    for r, y in enumerate(range(0, height, block)):
        for c, x in enumerate(range(0, width, block)):
            w, h = min(block, width - x), min(block, height - y)
            x0, y0 = max(0, x - pad), max(0, y - pad)
            x1, y1 = min(width, x + w + pad), min(height, y + h + pad)
            out.append((r, c, (x, y, w, h), (x0, y0, x1 - x0, y1 - y0)))
    return out


def plan_items(
    sources: Sequence[str | os.PathLike[str]], *, block: int | None = DEFAULT_BLOCK, pad: int = 0
) -> list[Item]:
    """The items of a run: one per raster, or one per block of a raster larger than
    ``block`` (``None``: never split). A file GDAL cannot open stays one item, so that its
    error is reported for it while the other items run."""
    names: dict[str, int] = {}
    items: list[Item] = []
    for path in expand_sources(sources):
        stem = path.stem
        n = names.get(stem, 0) + 1
        names[stem] = n
        name = stem if n == 1 else f"{stem}-{n}"
        size = None
        if block:
            try:
                with open_dataset(path) as ds:
                    size = (ds.width, ds.height)
            except RsvlError:
                size = None
        if size is None or (size[0] <= block and size[1] <= block):  # type: ignore[operator]
            items.append(Item(name, str(path)))
            continue
        for r, c, core, read in block_windows(size[0], size[1], int(block), int(pad)):  # type: ignore[arg-type]
            items.append(Item(f"{name}_block{r:03d}-{c:03d}", str(path), core, read))
    return items


def _gdal_type(dtype: str) -> str:
    return typename_fwd[dtype_rev[dtype]]


def write_block_vrt(item: Item, path: str | os.PathLike[str]) -> Path:
    """A VRT that shows ``item.read`` of ``item.source`` as a raster of its own (CRS,
    geotransform, nodata, colour interpretation kept), which every task can read."""
    if item.read is None:
        raise ValueError(f"{item.name} is a whole raster, not a block")
    x, y, w, h = item.read
    with open_dataset(item.source) as ds:
        t = ds.transform
        gt = (t.c + x * t.a + y * t.b, t.a, t.b, t.f + x * t.d + y * t.e, t.d, t.e)
        lines = [f'<VRTDataset rasterXSize="{w}" rasterYSize="{h}">']
        if ds.crs is not None:
            lines.append(f"  <SRS>{escape(ds.crs.to_wkt())}</SRS>")
        lines.append("  <GeoTransform>" + ", ".join(repr(float(v)) for v in gt) + "</GeoTransform>")
        for b in range(1, ds.count + 1):
            nodata = ds.nodatavals[b - 1]
            lines.append(f'  <VRTRasterBand dataType="{_gdal_type(ds.dtypes[b - 1])}" band="{b}">')
            if nodata is not None:
                lines.append(f"    <NoDataValue>{nodata!r}</NoDataValue>")
            lines.append(f"    <ColorInterp>{ds.colorinterp[b - 1].name.capitalize()}</ColorInterp>")
            kind = "ComplexSource" if nodata is not None else "SimpleSource"
            lines += [
                f"    <{kind}>",
                f'      <SourceFilename relativeToVRT="0">{escape(str(item.source))}</SourceFilename>',
                f"      <SourceBand>{b}</SourceBand>",
                f'      <SrcRect xOff="{x}" yOff="{y}" xSize="{w}" ySize="{h}"/>',
                f'      <DstRect xOff="0" yOff="0" xSize="{w}" ySize="{h}"/>',
            ]
            if nodata is not None:
                lines.append(f"      <NODATA>{nodata!r}</NODATA>")
            lines += [f"    </{kind}>", "  </VRTRasterBand>"]
        lines.append("</VRTDataset>")
    return write_text(path, "\n".join(lines) + "\n")
