"""The task table of rsvl run: names, options checked on the driver, one entry per task."""

from __future__ import annotations

import pytest

from rsvl.errors import JobError, PromptError
from rsvl.scale.tasks import TASKS, block_pad, get_task, parse_bands


def test_task_names_and_aliases():
    assert set(TASKS) == {"segment", "classify", "instances", "refer", "index"}
    for name in ("index", "index build", "index-build", "Index"):
        assert get_task(name).name == "index"
    with pytest.raises(JobError, match="no task 'chatter'") as err:
        get_task("chatter")
    assert "segment" in err.value.hint


def test_options_are_checked_before_any_worker_starts():
    seg = get_task("segment")
    assert seg.check_options({"classes": "water, forest", "tile": 64, "bands": "3,2,1"})["bands"] == [3, 2, 1]
    with pytest.raises(JobError, match="segment has no option 'tiles'") as err:
        seg.check_options({"classes": "water", "tiles": 64})
    assert "min_pixels" in err.value.hint and "overwrite" not in err.value.hint
    with pytest.raises(JobError, match="needs the option 'classes'"):
        seg.check_options({})
    with pytest.raises(JobError, match="has no option 'out'"):
        seg.check_options({"classes": "water", "out": "x"})  # the runner names the outputs
    with pytest.raises(PromptError):
        seg.check_options({"classes": " , "})
    with pytest.raises(JobError, match="needs the option 'expression'"):
        get_task("refer").check_options({"tile": 512})
    assert get_task("index").check_options({"tile": 64, "min_valid": 0.2}) == {"tile": 64, "min_valid": 0.2}


def test_which_outputs_each_task_merges():
    assert TASKS["segment"].rasters[:2] == ("classes", "confidence") and TASKS["segment"].block
    assert TASKS["instances"].vector_rule == "centre" and TASKS["instances"].block
    assert TASKS["classify"].table == "predictions" and not TASKS["classify"].block
    assert TASKS["index"].index and not TASKS["refer"].block


def test_bands_and_block_context():
    assert parse_bands("4, 3,2") == [4, 3, 2] and parse_bands([1, 2, 3]) == [1, 2, 3] and parse_bands(None) is None
    with pytest.raises(JobError, match="not a list of band numbers"):
        parse_bands("red")
    assert block_pad(TASKS["segment"], {"tile": 256}) == 256 and block_pad(TASKS["segment"], {}) == 512
