"""The tile journal reads back a consistent prefix whatever a kill left behind."""

from __future__ import annotations

import json

import pytest

from rsvl.errors import OutputError, ResumeError
from rsvl.geo.journal import CHUNK_PREFIX, TileJournal, refuse_stale_journal


def _fill(out, n_tiles: int, batch_size: int = 2) -> None:
    with TileJournal([out], {"tile": 8, "nodata": float("nan")}, batch_size=batch_size) as j:
        assert j.open() == []
        for i in range(n_tiles):
            j.add((i // 5, i % 5), None if i % 3 else {"v": i})


def test_chunks_hold_whole_batches_and_read_back_in_order(tmp_path):
    out = tmp_path / "x.gpkg"
    _fill(out, 19, batch_size=3)  # chunks of 9 tiles: two written, one partial batch lost
    with TileJournal([out], {"tile": 8, "nodata": float("nan")}, batch_size=3, resume=True) as j:
        done = j.open()
    assert [p for p, _ in done] == [(i // 5, i % 5) for i in range(18)]
    assert done[3][1] == {"v": 3} and done[4][1] is None


def test_an_out_of_sequence_or_broken_chunk_ends_the_prefix(tmp_path):
    out = tmp_path / "x.gpkg"
    _fill(out, 40)  # five chunks of 8
    partial = tmp_path / ".x.gpkg.rsvl-partial"
    (partial / f"{CHUNK_PREFIX}000002.json").write_text(json.dumps({"start": 99, "tiles": []}))
    with TileJournal([out], {"tile": 8, "nodata": float("nan")}, batch_size=2, resume=True) as j:
        assert len(j.open()) == 16
        assert sorted(p.name for p in partial.glob(f"{CHUNK_PREFIX}*")) == [
            f"{CHUNK_PREFIX}000000.json", f"{CHUNK_PREFIX}000001.json"]
        j.add((9, 9), None)
        j.flush()
    assert json.loads((partial / f"{CHUNK_PREFIX}000002.json").read_text())["start"] == 16


def test_settings_must_match_and_a_journal_is_never_dropped_silently(tmp_path):
    out = tmp_path / "x.gpkg"
    _fill(out, 4)
    with pytest.raises(ResumeError, match=r"tile: 8 then, 16 now"), \
            TileJournal([out], {"tile": 16, "nodata": float("nan")}, batch_size=2, resume=True) as j:
        j.open()
    with pytest.raises(OutputError, match="interrupted run") as err:
        refuse_stale_journal(out, resume=False, overwrite=False)
    assert "--resume" in err.value.hint
    refuse_stale_journal(out, resume=False, overwrite=True)  # --overwrite starts over
