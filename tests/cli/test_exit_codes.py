"""Exit codes and messages the README promises: usage mistakes exit 2 with Click's usage line
and message, Ctrl-C exits 130 and says how to continue, and nothing is checked only after a
model has loaded."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from conftest import REPO, write_raster

from rsvl.cli import main

SAMPLE = str(REPO / "examples" / "OSBS_029.tif")


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rsvl.cli", *args], capture_output=True, text=True, cwd=REPO)


# -- usage mistakes ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, usage, message",
    [
        (["segment"], "Usage: rsvl segment", "Missing argument"),
        (["segmnt", SAMPLE], "Usage: rsvl [OPTIONS] COMMAND", "Did you mean 'segment'?"),
        (["segment", SAMPLE, "water", "--overwrit"], "Usage: rsvl segment", "--overwrite"),
        (["index", "biuld"], "Usage: rsvl index", "Did you mean 'build'?"),
        (["segment", SAMPLE, "water", "--tile", "big"], "Usage: rsvl segment", "Invalid value for '--tile'"),
    ],
)
def test_usage_mistakes_print_usage_and_exit_2(args, usage, message, capsys):
    assert main(args) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert usage in err and message in err
    assert "unexpected" not in err and "Traceback" not in err


def test_usage_mistake_in_a_subprocess_exits_2():
    r = run_cli("segment")
    assert r.returncode == 2
    assert "Usage: rsvl segment" in r.stderr and "Missing argument" in r.stderr
    assert "unexpected" not in r.stderr


def test_segment_refuses_a_second_raster_as_the_class_list(tmp_path, monkeypatch, capsys):
    from rsvl.models import registry

    monkeypatch.setattr(registry, "load", _no_model)
    second = write_raster(tmp_path / "b.tif", np.zeros((3, 8, 8), np.uint8))
    assert main(["segment", SAMPLE, str(second), "-o", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "b.tif" in err and "one raster" in err
    assert main(["segment", SAMPLE, "other.jpg", "-o", str(tmp_path / "x")]) == 2
    assert "other.jpg" in capsys.readouterr().err
    assert not list(tmp_path.glob("x*"))


# -- Ctrl-C --------------------------------------------------------------------------------------

# Sends a real SIGINT to the process while the predictor works on its 5th batch of 2 tiles
# (rows of 4 tiles: the runner has finished and checkpointed a tile row by then), like Ctrl-C.
_INTERRUPTING = textwrap.dedent(
    """
    import os, signal, sys
    signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, even if started with SIGINT ignored
    from rsvl.tasks import segment as task
    original = task.DensePredictor.__call__
    calls = [0]
    def interrupting(self, batch):
        calls[0] += 1
        if calls[0] == 5:
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, batch)
    task.DensePredictor.__call__ = interrupting
    from rsvl.cli import main
    sys.exit(main(sys.argv[1:]))
    """
)


@pytest.mark.slow
def test_ctrl_c_during_segment_exits_130_keeps_the_finished_rows_and_resumes(tmp_path):
    assert signal.SIGINT  # the test relies on POSIX signals
    rng = np.random.default_rng(3)
    raster = write_raster(tmp_path / "scene.tif", rng.integers(0, 255, (3, 160, 208), dtype=np.uint8))
    args = ["segment", str(raster), "forest, water, buildings", "-o", str(tmp_path / "out" / "scene"),
            "--gsd", "0", "--tile", "64", "--overlap", "16", "--batch-size", "2"]
    r = subprocess.run([sys.executable, "-c", _INTERRUPTING, *args], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 130, r.stderr
    assert "interrupted; rerun with --resume to continue" in r.stderr
    assert "Traceback" not in r.stderr
    partial = tmp_path / "out" / ".scene_classes.tif.rsvl-partial"
    with np.load(partial / "checkpoint.npz", allow_pickle=False) as z:  # the runner's one-file checkpoint
        state = json.loads(str(z["state"]))
    assert state["next_row"] >= 1  # what was finished before Ctrl-C was flushed
    assert not (tmp_path / "out" / "scene_classes.tif").exists()

    assert main([*args, "--resume", "--json"]) == 0
    assert (tmp_path / "out" / "scene_classes.tif").exists() and not partial.exists()


def test_ctrl_c_in_process_returns_130_and_says_so(tmp_path, monkeypatch, capsys):
    from rsvl.tasks import classify as task

    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(task, "classify", interrupt)
    assert main(["classify", SAMPLE, "-l", "forest, water"]) == 130
    err = capsys.readouterr().err
    assert "interrupted; rerun with --resume to continue" in err  # classify per tile resumes


def test_ctrl_c_answered_with_sys_exit_still_exits_130(monkeypatch, capsys):
    """Lightning (rsvl train ...) catches KeyboardInterrupt, shuts down and calls sys.exit(1)."""
    from rsvl.tasks import classify as task

    def lightning_like(*a, **k):
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            sys.exit(1)

    monkeypatch.setattr(task, "classify", lightning_like)
    assert main(["classify", SAMPLE, "-l", "forest, water"]) == 130
    assert "interrupted" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # any other sys.exit is left alone
        monkeypatch.setattr(task, "classify", lambda *a, **k: sys.exit(3))
        main(["classify", SAMPLE, "-l", "forest, water"])


def test_interrupted_message_names_resume_only_where_it_exists():
    from rsvl.cli import interrupted_message

    assert "--resume" in interrupted_message(["segment", "a.tif", "water"])
    assert "--resume" in interrupted_message(["--quiet", "train", "clip", "--out", "x"])
    assert "--resume" in interrupted_message(["classify", "a.tif", "-l", "water"])
    assert "--resume" in interrupted_message(["instances", "a.tif"])
    for args in (["index", "build", "a"], []):
        assert interrupted_message(args) == "interrupted"


def _no_model(*args, **kwargs):
    raise AssertionError("a model was loaded before the inputs were checked")


def test_class_list_checks_leave_plain_class_names_alone(tmp_path, monkeypatch):
    from rsvl.cli import preflight
    from rsvl.errors import PromptError

    monkeypatch.chdir(tmp_path)
    (tmp_path / "water").write_text("")  # a file that happens to be called like a class
    (tmp_path / "classes.txt").write_text("forest\nwater\n")
    for ok in ("water", "forest|trees, water", "st. mary's church, water", None):
        preflight.not_a_path(ok)
    with pytest.raises(PromptError, match="--labels-file classes.txt"):
        preflight.not_a_path("classes.txt")
    with pytest.raises(PromptError, match="one raster per run"):
        preflight.not_a_path(str(tmp_path))


def test_a_full_disk_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    import errno
    import importlib

    task = importlib.import_module("rsvl.tasks.segment")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "out_classes.tif"))

    monkeypatch.setattr(task, "segment", full)
    raster = write_raster(tmp_path / "scene.tif", np.zeros((3, 32, 32), np.uint8))
    code = main(["segment", str(raster), "water, forest", "-o", str(tmp_path / "out"), "--gsd", "0"])
    err = capsys.readouterr().err
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "disk is full" in lines[0] and "out_classes.tif" in lines[0]
    assert "unexpected" not in err
