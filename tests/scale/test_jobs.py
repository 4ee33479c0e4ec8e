"""Job files: YAML or JSON, relative paths resolved from the file, unknown keys refused."""

from __future__ import annotations

import json

import pytest

from rsvl.errors import InputNotFoundError, JobError
from rsvl.scale.jobs import is_job_file, load_job


def test_a_yaml_job_resolves_paths_from_its_folder(tmp_path):
    job = tmp_path / "jobs" / "county.yaml"
    job.parent.mkdir()
    job.write_text("task: segment\nmodel: mini-clip\nsources: [tiles/*.tif, /data/more]\nout: out/county\n"
                   "workers: 2\noptions:\n  classes: water, forest\n  labels_file: classes.txt\n  tile: 256\n")
    got = load_job(job)
    base = job.parent
    assert got == {"task": "segment", "model": "mini-clip", "workers": 2,
                   "sources": [str(base / "tiles/*.tif"), "/data/more"], "out": str(base / "out/county"),
                   "options": {"classes": "water, forest", "labels_file": str(base / "classes.txt"), "tile": 256}}


def test_a_json_job_and_single_source(tmp_path):
    job = tmp_path / "j.json"
    job.write_text(json.dumps({"task": "index", "sources": "a.tif", "out": "/abs/out"}))
    got = load_job(job)
    assert got["sources"] == [str(tmp_path / "a.tif")] and got["out"] == "/abs/out" and got["options"] == {}
    assert is_job_file("x.YAML") and is_job_file("y.json") and not is_job_file("scene.tif")


@pytest.mark.parametrize(("text", "match"), [
    ("task: segment\nsources: [a]\nout: o\nworker: 2\n", "unknown key 'worker'"),
    ("task: segment\nout: o\n", "no 'sources'"),
    ("- a\n- b\n", "not a mapping"),
    ("task: [unclosed\n", "not a readable job file"),
    ("task: segment\nsources: [a]\nout: o\noptions: [1]\n", "options must be a mapping"),
])
def test_bad_job_files_say_what_is_wrong(tmp_path, text, match):
    job = tmp_path / "j.yaml"
    job.write_text(text)
    with pytest.raises(JobError, match=match):
        load_job(job)


def test_a_missing_job_file(tmp_path):
    with pytest.raises(InputNotFoundError):
        load_job(tmp_path / "nope.yaml")
