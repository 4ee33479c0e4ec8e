"""Every command checks its inputs and outputs before it loads a model (seconds to tens of
seconds): a missing file, a folder given as a raster, an existing output without
--overwrite fail at once, with one line and exit 2."""

from __future__ import annotations

import shutil

import pytest
from conftest import REPO

from rsvl.cli import main
from rsvl.models import registry

SAMPLE = REPO / "examples" / "OSBS_029.tif"


@pytest.fixture(autouse=True)
def no_model(monkeypatch):
    def load(*args, **kwargs):
        raise AssertionError("a model was loaded before the inputs and outputs were checked")

    monkeypatch.setattr(registry, "load", load)


def _fails(args: list[str], capsys, *expected: str) -> None:
    assert main([str(a) for a in args]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for text in expected:
        assert text in err, err


@pytest.fixture
def folder(tmp_path):
    d = tmp_path / "scenes"
    d.mkdir()
    shutil.copy(SAMPLE, d / "a.tif")
    return d


def test_segment(tmp_path, folder, capsys):
    _fails(["segment", folder, "forest, water", "-o", tmp_path / "x"], capsys, "is a folder")
    _fails(["segment", tmp_path / "nope.tif", "forest, water", "-o", tmp_path / "x"], capsys, "no such file")
    (tmp_path / "x_confidence.tif").write_bytes(b"")
    _fails(["segment", SAMPLE, "forest, water", "-o", tmp_path / "x"], capsys, "x_confidence.tif exists", "--overwrite")
    _fails(["segment", SAMPLE, "forest, water", "-o", tmp_path / "y", "--vector-format", "shp"], capsys,
           "unknown vector format")


def test_classify(tmp_path, folder, capsys):
    _fails(["classify", tmp_path / "nope.tif", "-l", "forest, water"], capsys, "no such file")
    empty = tmp_path / "empty"
    empty.mkdir()
    _fails(["classify", empty, "-l", "forest, water"], capsys, "no images found")
    (tmp_path / "x_tiles.gpkg").write_bytes(b"")
    _fails(["classify", SAMPLE, "-l", "forest, water", "-o", tmp_path / "x"], capsys, "x_tiles.gpkg exists")
    (tmp_path / "table.csv").write_text("")
    _fails(["classify", folder, "-l", "forest, water", "--csv", tmp_path / "table.csv"], capsys, "table.csv exists")


def test_refer(tmp_path, folder, capsys):
    _fails(["refer", folder, "the tree", "-o", tmp_path / "x"], capsys, "is a folder")
    (tmp_path / "x_mask.tif").write_bytes(b"")
    _fails(["refer", SAMPLE, "the tree", "-o", tmp_path / "x"], capsys, "x_mask.tif exists")


def test_instances(tmp_path, folder, capsys):
    _fails(["instances", tmp_path / "nope.tif"], capsys, "no such file")
    (tmp_path / "x_instances.gpkg").write_bytes(b"")
    _fails(["instances", SAMPLE, "-o", tmp_path / "x"], capsys, "x_instances.gpkg exists")
    out = tmp_path / "out"
    out.mkdir()
    (out / "a_overlay.png").write_bytes(b"")
    _fails(["instances", folder, "-o", out], capsys, "a_overlay.png exists")


def test_index_and_search(tmp_path, folder, capsys):
    _fails(["index", "build", folder, tmp_path / "nope.tif", "-o", tmp_path / "idx"], capsys, "no such file")
    (tmp_path / "idx").mkdir()
    (tmp_path / "idx" / "x.txt").write_text("")
    _fails(["index", "build", folder, "-o", tmp_path / "idx"], capsys, "not an rsvl index")
    _fails(["search", tmp_path / "nothing", "a river"], capsys, "nothing")


@pytest.mark.parametrize("args", [
    ["segment", SAMPLE, "forest, water", "--model", "mini-klip"],
    ["classify", SAMPLE, "-l", "forest, water", "--model", "mini-klip"],
    ["refer", SAMPLE, "the tree", "--model", "mini-klip"],
    ["instances", SAMPLE, "--model", "mini-klip"],
    ["chat", SAMPLE, "What is this?", "--model", "mini-klip"],
    ["index", "build", SAMPLE, "-o", "IDX", "--model", "mini-klip"],
])
def test_unknown_model_fails_before_any_load(tmp_path, capsys, args):
    _fails([str(a).replace("IDX", str(tmp_path / "idx")) for a in args], capsys, "Unknown model 'mini-klip'",
           "mini-clip")


@pytest.mark.parametrize("args, expected", [
    (["segment", SAMPLE, "forest", "--model", "mini-chat"], "mini-chat"),
    (["classify", SAMPLE, "-l", "forest, water", "--model", "mini-refer"], "mini-refer"),
    (["refer", SAMPLE, "the tree", "--model", "mini-clip"], "not a referring-segmentation model"),
    (["instances", SAMPLE, "--model", "mini-clip"], "mini-clip"),
    (["chat", SAMPLE, "What is this?", "--model", "mini-clip"], "not a chat model"),
    (["index", "build", SAMPLE, "-o", "IDX", "--model", "mini-chat"], "mini-chat"),
])
def test_a_model_that_does_not_serve_the_task_fails_before_any_load(tmp_path, capsys, args, expected):
    _fails([str(a).replace("IDX", str(tmp_path / "idx")) for a in args], capsys, expected)


@pytest.mark.parametrize("args, expected", [
    (["segment", SAMPLE, " , "], "class"),
    (["classify", SAMPLE, "-l", " "], "class"),
    (["refer", SAMPLE, "  "], "expression"),
    (["chat", SAMPLE, "  "], "question"),
    (["search", "IDX", "  "], "empty query"),
    (["index", "build", SAMPLE, "-o", "IDX", "--index-type", "annoy"], "unknown index type 'annoy'"),
    (["index", "build", SAMPLE, "-o", "IDX", "--index-type", "hnsw", "--hnsw-m", "1"], "hnsw m must be"),
])
def test_bad_prompts_and_options_fail_before_any_load(tmp_path, capsys, args, expected):
    _fails([str(a).replace("IDX", str(tmp_path / "idx")) for a in args], capsys, expected)


@pytest.mark.parametrize("command, task", [("zeroshot", "classify"), ("retrieval", "search")])
def test_eval_refuses_a_model_of_another_task_before_loading(tmp_path, capsys, command, task):
    data = tmp_path / "scenes"
    for name in ("forest", "water"):
        (data / "val" / name).mkdir(parents=True)
        shutil.copy(SAMPLE, data / "val" / name / "a.tif")
    if command == "retrieval":
        data = tmp_path / "pairs.csv"
        data.write_text(f"filepath,title\n{SAMPLE},a forest\n{SAMPLE},water\n")
    _fails(["eval", command, data, "--model", "mini-refer"], capsys, f"mini-refer is not a {task} model")
