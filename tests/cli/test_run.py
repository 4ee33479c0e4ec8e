"""``rsvl run``: its option parsing and the mistakes it refuses before any worker starts
(the runs themselves are tested in tests/scale/test_runner.py)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import write_raster

from rsvl.cli import main
from rsvl.cli.run import parse_option
from rsvl.errors import JobError


def test_options_are_read_as_json_when_they_parse():
    assert parse_option("min_pixels=32") == ("min_pixels", 32)
    assert parse_option("probabilities=true") == ("probabilities", True)
    assert parse_option("bands=[4,3,2]") == ("bands", [4, 3, 2])
    assert parse_option("to-crs=EPSG:4326") == ("to_crs", "EPSG:4326")
    with pytest.raises(JobError, match="not NAME=VALUE"):
        parse_option("min_pixels")


@pytest.fixture
def scene(tmp_path):
    return write_raster(tmp_path / "s.tif", np.zeros((3, 16, 16), np.uint8))


@pytest.mark.parametrize(("args", "message"), [
    (["segment"], "no sources given"),
    (["segment", "{scene}"], "no output folder given"),
    (["segmnt", "{scene}", "-o", "{out}"], "rsvl run has no task 'segmnt'"),
    (["segment", "{scene}", "-o", "{out}"], "segment needs the option 'classes'"),
    (["segment", "{scene}", "-o", "{out}", "--classes", "water", "-O", "tiles=3"], "segment has no option 'tiles'"),
    (["segment", "{scene}", "-o", "{out}", "--classes", "water", "--on-error", "ignore"], "on_error must be"),
    (["segment", "{scene}", "-o", "{out}", "--classes", "water", "-m", "no-such-model"], "no-such-model"),
    (["segment", "{scene}", "-o", "{scene}", "--classes", "water"], "would replace"),
    (["index", "build", "{tmp}/nope.tif", "-o", "{out}"], "nope.tif: no such file"),
])
def test_mistakes_are_one_line_and_exit_2(args, message, scene, tmp_path, capsys):
    fill = {"scene": str(scene), "out": str(tmp_path / "out"), "tmp": str(tmp_path)}
    assert main(["run", *[a.format(**fill) for a in args]]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err


def test_a_folder_holding_a_run_needs_resume_or_overwrite(scene, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "run.json").write_text("{}")
    assert main(["run", "segment", str(scene), "-o", str(out), "--classes", "water"]) == 2
    assert "already holds a run" in capsys.readouterr().err
    (out / "run.json").unlink()
    (out / "other.txt").write_text("x")
    assert main(["run", "segment", str(scene), "-o", str(out), "--classes", "water"]) == 2
    assert "not an rsvl run folder" in capsys.readouterr().err


def test_a_job_file_names_its_own_sources(scene, tmp_path, capsys):
    job = tmp_path / "j.yaml"
    job.write_text(f"task: segment\nsources: [{scene}]\nout: out\n")
    assert main(["run", str(job), str(scene)]) == 2
    assert "names its own sources" in capsys.readouterr().err
