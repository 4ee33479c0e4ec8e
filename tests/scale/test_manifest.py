"""The run manifest: an atomic round trip, finished items need their outputs on disk, and a
resume with other settings is refused."""

from __future__ import annotations

import json

import pytest

from rsvl.errors import ResumeError
from rsvl.scale.items import Item
from rsvl.scale.manifest import DONE, FAILED, ItemRecord, Manifest


def test_round_trip_and_counts(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    f = out / "a_classes.tif"
    f.write_bytes(b"x")
    items = [ItemRecord(Item("a", "/s/a.tif"), DONE, {"classes": str(f)}, attempts=1, seconds=1.5, worker=7),
             ItemRecord(Item("b_block000-001", "/s/b.tif", (8, 0, 8, 8), (4, 0, 12, 8)), FAILED, error="boom",
                        attempts=2)]
    m = Manifest(out, {"task": "segment", "options": {"tile": 64}}, items)
    m.save()
    doc = json.loads((out / "run.json").read_text())
    assert doc["format"] == "rsvl-run" and doc["counts"] == {"pending": 0, "running": 0, "done": 1, "failed": 1}
    back = Manifest.load(out)
    assert [r.to_dict() for r in back.items] == [r.to_dict() for r in items]
    assert back.items[1].item.core == (8, 0, 8, 8)
    assert back.items[0].finished() and not back.items[1].finished()
    f.unlink()
    assert not back.items[0].finished()  # done, but an output is gone: redone on resume
    assert not list(out.glob(".*rsvl-tmp*"))


def test_resume_refuses_other_settings(tmp_path):
    m = Manifest(tmp_path, {"task": "segment", "options": {"gsd": 0, "tile": 64}}, [])
    m.check_resumable({"task": "segment", "options": {"tile": 64, "gsd": 0.0}})  # same values
    with pytest.raises(ResumeError, match="started with options="):
        m.check_resumable({"task": "segment", "options": {"tile": 128, "gsd": 0}})


def test_unreadable_or_missing_manifests(tmp_path):
    with pytest.raises(ResumeError, match="no run to resume"):
        Manifest.load(tmp_path)
    (tmp_path / "run.json").write_text("{not json")
    with pytest.raises(ResumeError, match="cannot be read"):
        Manifest.load(tmp_path)
