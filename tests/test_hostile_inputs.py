"""Hostile inputs: files crafted to run code, lie about their sizes or read other files.

Every case must end in one clean :class:`~rsvl.errors.RsvlError` (one ``error:`` line and
exit 2 through the CLI, no traceback) and leave no side effect: the payload's marker file
never appears and no output file is created.
"""

from __future__ import annotations

import io
import json
import pickle
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, shared_data, write_raster
from rasterio.windows import Window

from rsvl.errors import (
    CheckpointMismatchError,
    DatasetError,
    InputNotFoundError,
    RasterReadError,
    RsvlError,
)


class Payload:
    """Unpickling this creates ``marker`` (through ``open``): proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    import os

    return subprocess.run([sys.executable, "-m", "rsvl.cli", *args], capture_output=True, text=True,
                          cwd=REPO, env={**os.environ, **(env or {})})


def run_main(capsys, *args: str) -> subprocess.CompletedProcess:
    """``rsvl ARGS`` in this process (no interpreter start-up), as a CompletedProcess."""
    from rsvl.cli import main

    capsys.readouterr()
    code = main(list(args))
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(["rsvl", *args], code, out, err)


def assert_one_error_line(r: subprocess.CompletedProcess, *needles: str) -> None:
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1, r.stderr
    for n in needles:
        assert n in errors[0], errors[0]


# -- pickles as checkpoints ---------------------------------------------------------------


def _weights() -> dict[str, torch.Tensor]:
    return {"layer.weight": torch.zeros(2, 2)}


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    return tmp_path / "PWNED"


def hostile_checkpoints(tmp_path: Path, marker: Path) -> dict[str, Path]:
    """The same payload as a zip .pt, a legacy pickle .bin, and nested in a state_dict."""
    out = {}
    out["zip.pt"] = tmp_path / "zip.pt"
    torch.save(Payload(marker), out["zip.pt"])
    out["legacy.bin"] = tmp_path / "legacy.bin"
    out["legacy.bin"].write_bytes(pickle.dumps(Payload(marker), protocol=2))
    out["nested.pt"] = tmp_path / "nested.pt"
    torch.save({"state_dict": {**_weights(), "extra": Payload(marker)}}, out["nested.pt"])
    out["beside.pth"] = tmp_path / "beside.pth"
    torch.save({"state_dict": _weights(), "meta": Payload(marker)}, out["beside.pth"])
    out["protocol4.bin"] = tmp_path / "protocol4.bin"
    out["protocol4.bin"].write_bytes(pickle.dumps({"state_dict": Payload(marker)}, protocol=4))
    return out


def test_pickled_payloads_as_checkpoints_are_refused_in_one_line(tmp_path, marker):
    from rsvl.models.checkpoint import read_state_dict

    for name, path in hostile_checkpoints(tmp_path, marker).items():
        with pytest.raises(CheckpointMismatchError, match="refuses to unpickle") as err:
            read_state_dict(path)
        text = str(err.value)
        assert "\n" not in text, name
        assert "weights_only=False" not in text and "Weights only load failed" not in text, name
        assert "never executes code" in text and ".safetensors" in text, name
        assert not marker.exists(), name


def test_payload_names_the_refused_object(tmp_path, marker):
    from rsvl.models.checkpoint import read_state_dict

    path = hostile_checkpoints(tmp_path, marker)["beside.pth"]
    with pytest.raises(CheckpointMismatchError) as err:
        read_state_dict(path)
    assert "(io.open)" in err.value.message or "(builtins.open)" in err.value.message


def test_garbage_checkpoint_is_not_called_a_pickle(tmp_path):
    from rsvl.models.checkpoint import read_state_dict

    path = tmp_path / "noise.bin"
    path.write_bytes(np.random.default_rng(0).integers(1, 255, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(CheckpointMismatchError, match="is not a PyTorch or safetensors checkpoint") as err:
        read_state_dict(path)
    assert "\n" not in str(err.value) and "weights_only" not in str(err.value)


def test_cli_refuses_a_hostile_checkpoint_in_one_line_without_running_it(tmp_path, marker, capsys):
    path = hostile_checkpoints(tmp_path, marker)["beside.pth"]
    image = tmp_path / "img.png"
    from PIL import Image

    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(image)
    out_csv = tmp_path / "table.csv"
    r = run_main(capsys, "classify", str(image), "-l", "a, b", "-m", "openai-vit-b32", "--weights",
                 str(path), "--csv", str(out_csv))
    assert_one_error_line(r, "refuses to unpickle", "never executes code")
    assert "weights_only" not in r.stderr
    assert not marker.exists() and not out_csv.exists()


# -- safetensors that lie ------------------------------------------------------------------


def _safetensors(header: bytes, data: bytes = b"", length: int | None = None) -> bytes:
    n = len(header) if length is None else length
    return struct.pack("<Q", n) + header + data


def lying_safetensors(tmp_path: Path) -> dict[str, Path]:
    good = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}).encode()
    cases = {
        "length past the end": _safetensors(good, bytes(16), length=10**9),
        "length of zero": _safetensors(b"", bytes(16), length=0),
        "header not JSON": _safetensors(b"{this is not json}   ", bytes(16)),
        "header a JSON list": _safetensors(b"[1, 2, 3]", bytes(16)),
        "offsets past the end": _safetensors(good, bytes(8)),
        "shape larger than data": _safetensors(json.dumps(
            {"w": {"dtype": "F32", "shape": [1 << 20, 1 << 20], "data_offsets": [0, 16]}}).encode(), bytes(16)),
        "unknown dtype": _safetensors(json.dumps(
            {"w": {"dtype": "EVIL", "shape": [4], "data_offsets": [0, 16]}}).encode(), bytes(16)),
        "truncated header": _safetensors(good)[:20],
        "zero bytes": b"",
    }
    out = {}
    for i, (name, blob) in enumerate(cases.items()):
        p = tmp_path / f"case{i}.safetensors"
        p.write_bytes(blob)
        out[name] = p
    return out


def test_lying_safetensors_are_one_clean_error(tmp_path):
    from rsvl.models.checkpoint import read_safetensors, read_state_dict

    for name, path in lying_safetensors(tmp_path).items():
        for reader in (read_state_dict, read_safetensors):
            with pytest.raises(CheckpointMismatchError) as err:
                reader(path)
            assert "\n" not in str(err.value), name


def test_mini_weights_that_are_not_safetensors_say_what_they_are(tmp_path, marker):
    from rsvl.models.mini.files import read_weights

    kw = dict(what="mini-clip heads", fmt="rsvl-mini-clip-heads", missing_hint="m",
              hint="Pass a heads.safetensors written by `rsvl train mini-clip`.")
    pt = hostile_checkpoints(tmp_path, marker)["zip.pt"]
    with pytest.raises(CheckpointMismatchError, match="is not a readable safetensors file") as err:
        read_weights(pt, **kw)
    assert "PyTorch (.pt/.bin) zip checkpoint" in err.value.message
    assert err.value.hint == kw["hint"]
    legacy = hostile_checkpoints(tmp_path, marker)["legacy.bin"]
    with pytest.raises(CheckpointMismatchError, match="a pickle"):
        read_weights(legacy, **kw)
    for path in lying_safetensors(tmp_path).values():
        with pytest.raises(CheckpointMismatchError, match="is not a readable safetensors file"):
            read_weights(path, **kw)
    assert not marker.exists()


# -- pickles as dataset files --------------------------------------------------------------


def make_refer_root(root: Path, refs_bytes: bytes) -> Path:
    (root / "rrsisd").mkdir(parents=True)
    (root / "images" / "rrsisd" / "JPEGImages").mkdir(parents=True)
    (root / "rrsisd" / "instances.json").write_text(json.dumps({"images": [], "annotations": []}))
    (root / "rrsisd" / "refs(unc).p").write_bytes(refs_bytes)
    return root


def test_refer_refs_payload_is_refused_without_running(tmp_path, marker):
    from rsvl.data.refer import RRSISD

    refs = [{"ref_id": 0, "split": "val", "sentences": [], "evil": Payload(marker)}]
    for protocol in (0, 2, 4, 5):
        root = make_refer_root(tmp_path / f"p{protocol}", pickle.dumps(refs, protocol=protocol))
        with pytest.raises(DatasetError, match="refuses to unpickle") as err:
            RRSISD(root, split="val")
        assert "io.open" in err.value.message or "builtins.open" in err.value.message
        assert "\n" not in str(err.value)
        assert not marker.exists()


@pytest.mark.parametrize("blob", [b"", b"\x80\x04\x95", b"not a pickle at all", b"\x80\x02]q\x00(K\x01"])
def test_refer_refs_file_that_is_not_a_pickle(tmp_path, blob):
    from rsvl.data.refer import RRSISD

    root = make_refer_root(tmp_path / "r", blob)
    with pytest.raises(DatasetError, match="is not a readable pickle"):
        RRSISD(root, split="val")


def test_cli_eval_refer_on_a_hostile_refs_file(tmp_path, marker, capsys):
    refs = [{"ref_id": 0, "split": "val", "sentences": [], "evil": Payload(marker)}]
    root = make_refer_root(tmp_path / "root", pickle.dumps(refs))
    out = tmp_path / "metrics.json"
    r = run_main(capsys, "eval", "refer", str(root), "-m", "mini-refer", "-o", str(out))
    assert_one_error_line(r, "REFER refs file", "refuses to unpickle")
    assert not marker.exists() and not out.exists()


def test_plain_unpickler_loads_plain_data_and_nothing_else(tmp_path, marker):
    from rsvl.io import read_plain_pickle

    # what REFER files hold, in every protocol (bytes need protocol 3 and sets protocol 4:
    # older protocols spell them as calls to globals, which are refused like any other)
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        plain: list = [{"a": 1, "b": [1.5, "x", None, True], "c": (1, 2), "big": 10**30, "neg": -7,
                        "sentences": [{"raw": "the ship", "tokens": ["the", "ship"], "sent_id": 3}]}]
        if protocol >= 3:
            plain.append(b"raw")
        if protocol >= 4:
            plain.append({"e": {1, 2}, "f": frozenset({3})})
        p = tmp_path / f"plain{protocol}.p"
        p.write_bytes(pickle.dumps(plain, protocol=protocol))
        assert read_plain_pickle(p) == plain, protocol
    # a global that is harmless is still a global: nothing outside plain data is built
    harmless = tmp_path / "harmless.p"
    harmless.write_bytes(pickle.dumps([complex(1, 2), io.BytesIO]))
    with pytest.raises(DatasetError, match="refuses to unpickle"):
        read_plain_pickle(harmless)
    with pytest.raises(InputNotFoundError):
        read_plain_pickle(tmp_path / "absent.p")


# -- rasters -------------------------------------------------------------------------------


def _tiff(entries: list[tuple[int, int, int, int]]) -> bytes:
    """A little-endian classic TIFF whose only IFD holds ``entries`` (tag, type, count, value)."""
    ifd = struct.pack("<H", len(entries)) + b"".join(
        struct.pack("<HHII", *e) for e in sorted(entries)) + struct.pack("<I", 0)
    return b"II*\x00" + struct.pack("<I", 8) + ifd


def hostile_rasters(tmp_path: Path) -> dict[str, Path]:
    full = write_raster(tmp_path / "full.tif", np.random.default_rng(0).integers(0, 255, (3, 256, 256),
                                                                                   dtype=np.uint8))
    data = full.read_bytes()
    huge = 2**31 - 1
    blobs = {
        "zero.tif": b"",
        "head.tif": data[:100],
        "half.tif": data[: len(data) // 2],
        # a header that claims 2^31 x 2^31 pixels in one strip
        "huge.tif": _tiff([(256, 4, 1, huge), (257, 4, 1, huge), (258, 3, 1, 8), (259, 3, 1, 1),
                           (262, 3, 1, 1), (273, 4, 1, 8), (278, 4, 1, huge), (279, 4, 1, huge)]),
        # strip tables that claim 2^30 entries past the end of the file
        "tags.tif": _tiff([(256, 4, 1, 64), (257, 4, 1, 64), (258, 3, 1, 8), (259, 3, 1, 1),
                           (262, 3, 1, 1), (273, 4, 2**30, 10**9), (278, 4, 1, 1), (279, 4, 2**30, 10**9)]),
        "garbage.vrt": b"<VRTDataset rasterXSize='4' rasterYSize='4'><VRTRasterBand",
    }
    out = {}
    for name, blob in blobs.items():
        (tmp_path / name).write_bytes(blob)
        out[name] = tmp_path / name
    return out


def test_hostile_rasters_are_one_clean_error(tmp_path):
    from rsvl.geo.raster import RasterSource

    for name, path in hostile_rasters(tmp_path).items():
        with pytest.raises(RasterReadError) as err:
            with RasterSource(path) as src, src.reader() as r:
                r.read(Window(0, 0, src.width, src.height))
        assert "\n" not in str(err.value), name


def raw_vrt(path: Path, target: str = "/etc/passwd") -> Path:
    path.write_text(
        '<VRTDataset rasterXSize="16" rasterYSize="4">\n'
        '  <VRTRasterBand dataType="Byte" band="1" subClass="VRTRawRasterBand">\n'
        f'    <SourceFilename relativetoVRT="0">{target}</SourceFilename>\n'
        "    <ImageOffset>0</ImageOffset><PixelOffset>1</PixelOffset><LineOffset>16</LineOffset>\n"
        "  </VRTRasterBand>\n</VRTDataset>\n")
    return path


def test_vrt_raw_raster_band_is_refused(tmp_path, monkeypatch):
    from rsvl.geo.raster import open_dataset

    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"root:x:0:0:root:/root:/bin/sh\n" * 4)
    vrt = raw_vrt(tmp_path / "leak.vrt", str(secret))
    monkeypatch.delenv("RSVL_ALLOW_VRT_RAW", raising=False)
    with pytest.raises(RasterReadError, match="raw raster band") as err:
        open_dataset(vrt)
    assert str(secret) in err.value.message and "RSVL_ALLOW_VRT_RAW=1" in err.value.hint
    # a VRT that sources the raw one (relative to itself) is refused too
    outer = tmp_path / "outer.vrt"
    outer.write_text(
        '<VRTDataset rasterXSize="16" rasterYSize="4"><VRTRasterBand dataType="Byte" band="1">'
        '<SimpleSource><SourceFilename relativeToVRT="1">leak.vrt</SourceFilename>'
        "<SourceBand>1</SourceBand></SimpleSource></VRTRasterBand></VRTDataset>")
    with pytest.raises(RasterReadError, match="raw raster band"):
        open_dataset(outer)
    # the opt-in: the environment variable, or the keyword
    with open_dataset(vrt, allow_vrt_raw=True) as ds:
        assert bytes(ds.read(1)[0][:5]) == b"root:"
    monkeypatch.setenv("RSVL_ALLOW_VRT_RAW", "1")
    with open_dataset(vrt) as ds:
        assert ds.width == 16


def test_ordinary_vrt_still_opens(tmp_path, monkeypatch):
    from rsvl.geo.raster import open_dataset

    monkeypatch.delenv("RSVL_ALLOW_VRT_RAW", raising=False)
    write_raster(tmp_path / "a.tif", np.full((1, 8, 8), 7, np.uint8))
    vrt = tmp_path / "mosaic.vrt"
    vrt.write_text(
        '<VRTDataset rasterXSize="8" rasterYSize="8"><VRTRasterBand dataType="Byte" band="1">'
        '<SimpleSource><SourceFilename relativeToVRT="1">a.tif</SourceFilename>'
        "<SourceBand>1</SourceBand></SimpleSource></VRTRasterBand></VRTDataset>")
    with open_dataset(vrt) as ds:
        assert int(ds.read(1).max()) == 7


def test_cli_refuses_hostile_rasters_in_one_line(tmp_path):
    vrt = raw_vrt(tmp_path / "leak.vrt")
    r = run_cli("info", str(vrt), env={"RSVL_ALLOW_VRT_RAW": ""})
    assert_one_error_line(r, "raw raster band", "RSVL_ALLOW_VRT_RAW=1")
    assert "root:" not in r.stdout + r.stderr.replace("/etc/passwd", "")
    rasters = hostile_rasters(tmp_path)
    for name in ("zero.tif", "head.tif"):
        r = run_cli("info", str(rasters[name]))
        assert_one_error_line(r, "GDAL cannot read this file as a raster")


def test_every_refusal_is_an_rsvl_error():
    # the classes the hostile cases raise are user errors: the CLI prints one line, exit 2
    for cls in (CheckpointMismatchError, DatasetError, RasterReadError, InputNotFoundError):
        assert issubclass(cls, RsvlError) and cls.exit_code == 2


def test_huge_index_manifest_is_not_read_into_memory(tmp_path):
    from rsvl.errors import IndexCorruptError
    from rsvl.index.store import EmbeddingIndex

    folder = tmp_path / "idx"
    folder.mkdir()
    with open(folder / "manifest.json", "wb") as fh:  # sparse: costs no disk
        fh.truncate(4 << 30)
    with pytest.raises(IndexCorruptError, match="more than any manifest rsvl writes"):
        EmbeddingIndex.open(folder)


def test_vrt_raw_raster_band_inside_an_archive_is_refused(tmp_path, monkeypatch):
    import zipfile

    from rsvl.geo.raster import open_dataset

    monkeypatch.delenv("RSVL_ALLOW_VRT_RAW", raising=False)
    vrt = raw_vrt(tmp_path / "leak.vrt")
    with zipfile.ZipFile(tmp_path / "a.zip", "w") as zf:
        zf.write(vrt, "leak.vrt")
    with pytest.raises(RasterReadError, match="raw raster band"):
        open_dataset(f"/vsizip/{tmp_path / 'a.zip'}/leak.vrt")


def test_crafted_faiss_header_is_refused_before_faiss_reads_it(tmp_path):
    """A vectors file whose header claims another size (or another index type) is refused
    with one line; FAISS never parses it (it would trust the sizes in it)."""
    import struct

    import faiss
    import numpy as np

    from rsvl.errors import IndexCorruptError
    from rsvl.index.store import check_faiss_header

    index = faiss.IndexFlatIP(8)
    index.add(np.random.default_rng(0).random((10, 8), dtype=np.float32))
    good = tmp_path / "good.faiss"
    faiss.write_index(index, str(good))
    check_faiss_header(good, 10, 8, "rebuild")  # what rsvl writes passes
    raw = good.read_bytes()
    huge = tmp_path / "huge.faiss"
    huge.write_bytes(raw[:8] + struct.pack("<q", 1 << 40) + raw[16:])
    with pytest.raises(IndexCorruptError, match="1099511627776 vectors"):
        check_faiss_header(huge, 10, 8, "rebuild")
    other = tmp_path / "other.faiss"
    other.write_bytes(b"IwPQ" + raw[4:])  # IVF-PQ: not a type rsvl writes
    with pytest.raises(IndexCorruptError, match="not a FAISS index rsvl writes"):
        check_faiss_header(other, 10, 8, "rebuild")
    padded = tmp_path / "padded.faiss"
    padded.write_bytes(raw + b"\0" * (2 << 20))
    with pytest.raises(IndexCorruptError, match="more than an index"):
        check_faiss_header(padded, 10, 8, "rebuild")


def test_truncated_raster_is_named_as_such_by_info_and_before_a_model_loads(tmp_path):
    """A GeoTIFF cut short opens and reports its full size; rsvl reads its last block first
    and says the file is truncated, in one line, exit 2 (segment: before loading a model)."""
    src = shared_data("geotiff", "OSBS_029.tif")
    cut = tmp_path / "cut.tif"
    cut.write_bytes(src.read_bytes()[:30000])
    for args in (["info", str(cut)], ["segment", str(cut), "water, trees", "-o", str(tmp_path / "o")]):
        res = run_cli(*args)
        assert res.returncode == 2, res.stderr
        assert "the end of this raster cannot be read" in res.stderr and "truncated" in res.stderr
        assert "loading" not in res.stderr.lower()
    assert not list(tmp_path.glob("o*"))
