"""REFER refs files are pickles: genuine ones (Python 2 or 3, any protocol) load as plain
data; anything that names a Python object is refused without being built."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rsvl.data.refer import RRSISD
from rsvl.errors import DatasetError


def py2_pickle(obj) -> bytes:
    """``obj`` as Python 2's ``cPickle.dump(obj, f, 2)`` writes it: str values are byte
    strings (SHORT_BINSTRING), small ints BININT1; what the RRSIS-D / RefCOCO releases hold."""

    def emit(o) -> bytes:
        if isinstance(o, dict):
            return b"}(" + b"".join(emit(k) + emit(v) for k, v in o.items()) + b"u"
        if isinstance(o, list):
            return b"](" + b"".join(emit(v) for v in o) + b"e"
        if isinstance(o, str):
            raw = o.encode("ascii")
            return b"U" + bytes([len(raw)]) + raw
        if isinstance(o, int) and 0 <= o < 256:
            return b"K" + bytes([o])
        raise TypeError(type(o))

    return b"\x80\x02" + emit(obj) + b"."


REFS = [{"ref_id": 0, "ann_id": 100, "image_id": 0, "split": "val", "file_name": "0.png",
         "category_id": 1, "sent_ids": [7],
         "sentences": [{"raw": "the square", "sent": "the square", "tokens": ["the", "square"],
                        "sent_id": 7}]}]
PY2_REFS = py2_pickle(REFS)


def make_root(root: Path, refs_bytes: bytes) -> Path:
    (root / "rrsisd").mkdir(parents=True)
    imdir = root / "images" / "rrsisd" / "JPEGImages"
    imdir.mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(imdir / "0.png")
    (root / "rrsisd" / "instances.json").write_text(json.dumps({
        "images": [{"id": 0, "file_name": "0.png", "height": 8, "width": 8}],
        "annotations": [{"id": 100, "image_id": 0, "category_id": 1,
                         "segmentation": [[1, 1, 5, 1, 5, 5, 1, 5]]}]}))
    (root / "rrsisd" / "refs(unc).p").write_bytes(refs_bytes)
    return root


def test_python2_refs_file_loads_as_plain_data(tmp_path):
    assert pickle.loads(PY2_REFS) == REFS
    ds = RRSISD(make_root(tmp_path / "r", PY2_REFS), split="val")
    assert len(ds) == 1
    s = ds[0]
    assert s.sentence == "the square" and s.ref_id == 0 and s.sent_id == 7 and s.mask.sum() > 0


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_python3_refs_file_loads_in_every_protocol(tmp_path, protocol):
    ds = RRSISD(make_root(tmp_path / "r", pickle.dumps(REFS, protocol=protocol)), split="val")
    assert ds.refs == REFS


def test_refs_naming_a_python_object_are_refused(tmp_path):
    # a numpy integer is harmless but is not plain data: the file names numpy's reconstructor
    refs = [{**REFS[0], "ref_id": np.int64(0)}]
    with pytest.raises(DatasetError, match=r"refuses to unpickle") as err:
        RRSISD(make_root(tmp_path / "r", pickle.dumps(refs)), split="val")
    assert "numpy" in err.value.message and "rsvl data refgen" in err.value.hint


def test_refs_that_are_not_a_list_of_dicts(tmp_path):
    with pytest.raises(DatasetError, match="does not hold REFER refs"):
        RRSISD(make_root(tmp_path / "r", pickle.dumps(["a", "b"])), split="val")
