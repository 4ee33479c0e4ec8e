"""One line that says what a model can find or where its weights come from."""

from __future__ import annotations

import json

from conftest import REPO

from rsvl.cli import main
from rsvl.models import registry

SAMPLE = str(REPO / "examples" / "OSBS_029.tif")


def test_instances_that_find_nothing_say_which_classes_the_model_knows(tmp_path, monkeypatch, capsys):
    from rsvl.tasks import instances as task

    monkeypatch.setattr(registry, "load", lambda *a, **k: object())

    def nothing(model, source, out, **kwargs):
        return task.InstancesResult(str(source), ["airplane", "ship", "vehicle"], 0, {}, {}, 4, 0.1)

    monkeypatch.setattr(task, "instances", nothing)
    assert main(["instances", SAMPLE, "-o", str(tmp_path / "x"), "--score", "0.4"]) == 0
    out, err = capsys.readouterr()
    assert "0 instance(s)" in out
    assert "mini-instances detects only airplane, ship, vehicle (--score 0.4)" in err


def test_models_show_where_weights_come_from(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RSVL_CACHE", str(tmp_path))
    assert main(["models", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)["models"]}
    assert rows["mini-clip"]["weights"] == "bundled"
    assert rows["fianet-rrsisd"]["weights"] == "bring your own"
    assert rows["rsprompter-anchor-nwpu"]["weights"] == "bring your own"
    assert rows["rsprompter-anchor-nwpu"]["source"] == "unpublished"
    assert rows["rsprompter-anchor-nwpu"]["available_offline"] is False
    assert main(["models"]) == 0
    assert "bring your own" in capsys.readouterr().out


def test_fetch_of_a_bring_your_own_card_is_one_line_without_a_download(tmp_path, monkeypatch, capsys):
    from rsvl.models import weights

    def no_download(card, dest):
        raise AssertionError("fetch tried to download")

    monkeypatch.setenv("RSVL_CACHE", str(tmp_path))
    monkeypatch.delenv("RSVL_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(weights, "_download_to", no_download)
    assert main(["fetch", "sam-seg-whu"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "no trained checkpoint" in err[0] and "--weights PATH" in err[0]
