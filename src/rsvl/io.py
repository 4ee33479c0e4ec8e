"""File helpers every layer shares: atomic writes, the image-suffix list and one image reader.

Every file rsvl writes for a user appears under its final name only once it is complete:
writers write to a temporary name next to the target (same folder, so the rename is atomic
on one filesystem) and :func:`atomic_path` renames it when the block finishes without an
exception. A crash, Ctrl-C or a full disk leaves at most a hidden ``.NAME.rsvl-tmp*`` file,
never a half-written output under the final name.
"""

from __future__ import annotations

import errno
import fcntl
import io
import os
import pickle
import shutil
import socket
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from rsvl.errors import DatasetError, InputNotFoundError, OutputError, RasterReadError, RsvlError

#: suffixes of the files rsvl treats as images when it is given a folder (plain images and
#: every raster format GDAL reads by extension that users keep scenes in, VRT mosaics included)
IMAGE_SUFFIXES: tuple[str, ...] = (
    ".png",
    ".jpg",
    ".jpeg",
    ".tif",
    ".tiff",
    ".jp2",
    ".bmp",
    ".webp",
    ".vrt",
)

#: marker in every temporary name, so leftovers of a killed run are recognisable
TMP_MARK = ".rsvl-tmp"


def is_image_file(path: str | Path, suffixes: Sequence[str] = IMAGE_SUFFIXES) -> bool:
    """True for a visible file whose suffix is in ``suffixes`` (:data:`IMAGE_SUFFIXES`)."""
    p = Path(path)
    return p.is_file() and p.suffix.lower() in suffixes and not p.name.startswith(".")


def list_images(folder: str | Path) -> list[Path]:
    """The image files directly inside ``folder``, sorted by name (hidden files skipped)."""
    return sorted(p for p in Path(folder).iterdir() if is_image_file(p))


def temporary_name(path: str | Path) -> Path:
    """A hidden name next to ``path`` that keeps its suffix (GDAL and pyogrio choose the
    format from it) and is unique to this process."""
    p = Path(path)
    return p.parent / f".{p.stem}{TMP_MARK}-{os.getpid()}{p.suffix}"


@contextmanager
def atomic_path(path: str | Path, *, fsync: bool = False) -> Iterator[Path]:
    """Yield a temporary path to write instead of ``path``; rename it onto ``path`` when the
    block succeeds, delete it when the block raises.

    Args:
        path: the final file name.
        fsync: flush the finished file to disk before the rename (for manifests whose
            loss after a power cut would lose other files).

    Example:
        >>> with atomic_path(out / "table.csv") as tmp:  # doctest: +SKIP
        ...     df.to_csv(tmp)
    """
    final = Path(path)
    tmp = temporary_name(final)
    tmp.unlink(missing_ok=True)
    try:
        yield tmp
        if fsync:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, final)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Like :func:`atomic_path` for a folder that must not exist yet: the block fills a hidden
    temporary folder, which is renamed to ``path`` when the block succeeds."""
    final = Path(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}{TMP_MARK}-", dir=final.parent))
    try:
        yield tmp
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_text(path: str | Path, text: str, *, fsync: bool = False) -> Path:
    """Write ``text`` to ``path`` atomically (UTF-8)."""
    with atomic_path(path, fsync=fsync) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_bytes(path: str | Path, data: bytes, *, fsync: bool = False) -> Path:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path, fsync=fsync) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def read_rgb(path: str | Path, *, error: type[RsvlError] = RasterReadError) -> np.ndarray:
    """Read a plain image file (PNG, JPEG, ...) as an (H, W, 3) uint8 RGB array.

    Args:
        path: the image.
        error: the :class:`~rsvl.errors.RsvlError` subclass to raise for an unreadable file
            (dataset readers pass ``DatasetError``).

    Georeferenced rasters go through :mod:`rsvl.geo.raster` instead, which handles bands,
    bit depth and nodata.
    """
    p = Path(path)
    try:
        with Image.open(p) as im:
            return np.asarray(im.convert("RGB"))
    except FileNotFoundError as exc:
        if error is RasterReadError:
            raise InputNotFoundError(f"{p} does not exist.", hint="Check the path.") from exc
        raise error(f"Image not found: {p}.", hint="Check the dataset root.") from exc
    except (UnidentifiedImageError, OSError) as exc:
        raise error(
            f"Cannot read image {p} ({exc}).", hint="Re-download or remove the file."
        ) from exc


def same_file(a: str | Path, b: str | Path) -> bool:
    """Whether two paths name one file: equal after resolving symlinks, ``.`` and ``..``,
    or (both existing) the same inode, which also catches hard links."""
    pa, pb = Path(a), Path(b)
    if os.path.realpath(pa) == os.path.realpath(pb):
        return True
    try:
        return pa.exists() and pb.exists() and os.path.samefile(pa, pb)
    except OSError:
        return False


def refuse_inputs_as_outputs(outputs: Iterable[str | Path], inputs: Iterable[str | Path]) -> None:
    """Raise :class:`OutputError` when an output path is (or is a folder holding) a file the
    run reads. Checked before anything is written, with or without ``--overwrite``:
    replacing the input is never what a user asked for."""
    ins = [Path(p) for p in inputs]
    for out in outputs:
        o = Path(out)
        real_out = os.path.realpath(o)
        for i in ins:
            inside = o.is_dir() and os.path.realpath(i).startswith(real_out.rstrip(os.sep) + os.sep)
            if same_file(o, i) or inside:
                raise OutputError(
                    f"the output {o} would replace {i}, which this run reads.",
                    hint="Choose another output name or folder (-o); inputs are never overwritten.",
                )


class PlainUnpickler(pickle.Unpickler):
    """An unpickler that builds only plain data: lists, tuples, dicts, sets, strings, bytes,
    numbers, booleans and ``None``.

    Everything that could run code in a pickle (a class, a function, ``__reduce__``) reaches
    the unpickler as a global to look up; :meth:`find_class` refuses every one, so no
    object of the file's choosing is ever created or called. Persistent ids are refused too.
    """

    def find_class(self, module: str, name: str) -> Any:
        raise RefusedGlobal(module, name)

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("the file uses persistent ids, which plain data never does")


class RefusedGlobal(pickle.UnpicklingError):
    """A pickle named a Python object (``module.name``) that :class:`PlainUnpickler` refuses."""

    def __init__(self, module: str, name: str) -> None:
        self.module, self.name = module, name
        super().__init__(f"{module}.{name}")


def read_plain_pickle(
    path: str | Path,
    *,
    what: str = "Pickle file",
    error: type[RsvlError] = DatasetError,
    hint: str | None = None,
) -> Any:
    """Unpickle ``path`` with :class:`PlainUnpickler`: a file that holds only plain data
    (the REFER annotation format) loads; anything else raises one ``error`` line.

    Args:
        path: the file.
        what: the file's name in messages ("REFER refs file").
        error: the :class:`~rsvl.errors.RsvlError` subclass to raise.
        hint: what to do, for a refused or unreadable file.
    """
    p = Path(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError as exc:
        raise InputNotFoundError(f"{what} {p} does not exist.", hint="Check the path.") from exc
    except OSError as exc:
        raise error(f"{what} {p} cannot be read ({exc}).", hint=hint) from exc
    try:
        return PlainUnpickler(io.BytesIO(data)).load()
    except RefusedGlobal as exc:
        raise error(
            f"{what} {p} holds Python objects ({exc.module}.{exc.name}) that rsvl refuses to "
            "unpickle: loading them could run code from the file, and a genuine file holds only "
            "lists, dicts, strings and numbers.",
            hint=hint,
        ) from exc
    except Exception as exc:  # truncated or malformed: the unpickler raises many types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise error(
            f"{what} {p} is not a readable pickle ({type(exc).__name__}{': ' if first else ''}"
            f"{first}).",
            hint=hint,
        ) from exc


def lock_path_for(path: str | os.PathLike[str]) -> Path:
    p = Path(path)
    return p.parent / f".{p.name}.rsvl-lock"


class OutputLock:
    """An exclusive lock on one output (its partial folder), held for the whole run.

    ``flock`` on a lock file beside the partial folder: the kernel drops it when the holder
    exits, however it exits (kill -9 included), so a stale lock of a dead run is simply taken
    over. The file names the holder (pid, host, start time) for the error another run gets.
    """

    def __init__(self, output: str | os.PathLike[str]) -> None:
        self.output = Path(output)
        self.path = lock_path_for(output)
        self._fd: int | None = None

    def acquire(self) -> OutputLock:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise
                raise OutputError(
                    f"{self.output} is being written by another rsvl run ({self.holder()}).",
                    hint="Wait for that run to finish or stop it, or choose another output name.",
                ) from None
            # The holder before us may have removed the file after we opened it: lock the
            # file that is under the name now.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        info = f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}"
        os.ftruncate(fd, 0)
        os.write(fd, info.encode())
        self._fd = fd
        return self

    def holder(self) -> str:
        try:
            text = self.path.read_text(encoding="utf-8", errors="replace").strip()
        except OSError:
            text = ""
        return text or "holder unknown"

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
