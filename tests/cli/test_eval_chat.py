"""``rsvl eval chat``: the --json document, task checks before the model loads, --out."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rsvl.cli import eval_chat, main
from rsvl.models.chat import Box, ChatAnswer


class DictModel:
    name = "dict-model"
    image_size = 32

    def __init__(self, answers):
        self.answers = answers

    def chat(self, image, question, *, history=(), task=None, max_new_tokens=256, temperature=0.0, on_text=None):
        a = self.answers[question]
        return a if isinstance(a, ChatAnswer) else ChatAnswer(a)


ANSWERS = {
    "Is there a ship?": "Yes",
    "Is there a plane?": "No",
    "How many cars?": "3",
    "How many trees?": "There are several trees.",
    "Where is the tank?": ChatAnswer("[[0, 0, 500, 500]]", boxes=[Box(0.0, 0.0, 0.5, 0.5)]),
}


def _entry(image, q, a):
    return {"image": image, "image_path": "img",
            "conversations": [{"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": a}]}


@pytest.fixture
def bench(tmp_path) -> Path:
    root = tmp_path / "vhm_eval"
    (root / "img").mkdir(parents=True)
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(root / "img" / "a.png")
    tasks = {
        "presence_mo_dota": [_entry("a.png", "Is there a ship?", "Yes"), _entry("a.png", "Is there a plane?", "Yes")],
        "counting_dota-test_open": [_entry("a.png", "How many cars?", "3"), _entry("a.png", "How many trees?", "5")],
        "VG_DOIR_RSVG_test": [_entry("a.png", "Where is the tank?", "[0, 0, 20, 20]")],
    }
    for name, entries in tasks.items():
        (root / f"{name}.json").write_text(json.dumps(entries))
    return root


@pytest.fixture
def loads(monkeypatch):
    calls = []

    def fake(name, weights, device):
        calls.append((name, weights, device))
        return DictModel(ANSWERS)

    monkeypatch.setattr(eval_chat, "load_chat_model", fake)
    return calls


def test_json_document_per_scorer(bench, loads, capsys):
    assert main(["eval", "chat", str(bench), "--task", "presence_mo_dota", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["task"] == "chat/presence_mo_dota" and doc["settings"]["model"] == "mini-chat"
    assert doc["metrics"]["accuracy"] == 0.5 and doc["metrics"]["upstream"]["accuracy"] == 0.5
    assert doc["metrics"]["baseline"] == {"answer": "Yes", "accuracy": 1.0}
    assert loads == [("mini-chat", None, "cpu")]

    assert main(["eval", "chat", str(bench), "--task", "counting_dota-test_open", "--json"]) == 0
    m = json.loads(capsys.readouterr().out)["metrics"]
    assert m["accuracy"] == 0.5 and m["mae"] == 0.0 and m["unparsable"] == 1  # "several trees": no number
    assert m["upstream"]["mae"] is None and "no number" in m["upstream"]["error"]

    assert main(["eval", "chat", str(bench), "--task", "rs_vg", "--json"]) == 0
    m = json.loads(capsys.readouterr().out)["metrics"]
    assert m["acc@0.5"] == 1.0 and m["upstream"]["acc@0.5"] == 1.0 and m["by_area"]["S"] == 1.0


def test_several_tasks_one_document_and_out_folder(bench, loads, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["eval", "chat", str(bench), "--task", "all", "--limit", "1", "--out", str(out), "--json"])
    assert code == 0
    doc = json.loads(capsys.readouterr().out)
    assert sorted(doc["metrics"]) == ["VG_DOIR_RSVG_test", "counting_dota-test_open", "presence_mo_dota"]
    assert doc["metrics"]["presence_mo_dota"]["accuracy"] == 1.0 and len(doc["results"]) == 3
    assert len(loads) == 1
    files = sorted(p.name for p in out.iterdir())
    assert files == ["VG_DOIR_RSVG_test_mini-chat_eval.jsonl", "chat_mini-chat_metrics.json",
                     "counting_dota-test_open_mini-chat_eval.jsonl", "presence_mo_dota_mini-chat_eval.jsonl"]
    row = json.loads((out / "counting_dota-test_open_mini-chat_eval.jsonl").read_text().splitlines()[0])
    assert set(row) >= {"filename", "size", "query", "answer", "pred"}


def test_text_output_shows_upstream_and_baseline(bench, loads, capsys):
    assert main(["eval", "chat", str(bench), "--task", "counting_dota-test_open"]) == 0
    out = capsys.readouterr().out
    assert "upstream" in out and "crashes" in out and "baseline (always '3')" in out


def test_bad_inputs_fail_before_the_model_loads(bench, loads, capsys):
    assert main(["eval", "chat", str(bench), "--task", "cls_ucm"]) == 2
    err = capsys.readouterr().err
    assert "Unknown chat task 'cls_ucm'" in err and "presence_mo_dota" in err and "VG_DOIR_RSVG_test" in err
    assert main(["eval", "chat", str(bench), "--task", "cls_AID"]) == 2
    assert "cls_AID.json does not exist" in capsys.readouterr().err
    (bench / "imgType_mcq.json").write_text(json.dumps([{**_entry("a.png", "Q?", "A"), "image_path": "../.."}]))
    assert main(["eval", "chat", str(bench), "--task", "imgType_mcq", "--out", str(bench / "out")]) == 2
    err = capsys.readouterr().err
    assert "entry 0: image path '../../a.png' leaves" in err and "Traceback" not in err
    assert not (bench / "out").exists()
    assert main(["eval", "chat", str(bench / "nope"), "--task", "all"]) == 2
    assert loads == []


def test_model_that_cannot_chat_is_refused(bench, monkeypatch, capsys):
    from rsvl.models import registry

    assert main(["eval", "chat", str(bench), "--task", "presence_mo_dota", "--model", "no-such-chat"]) == 2
    assert "no-such-chat" in capsys.readouterr().err
    monkeypatch.setattr(registry, "load", lambda name, weights=None, device="cpu": object())
    assert main(["eval", "chat", str(bench), "--task", "presence_mo_dota", "--model", "mini-clip"]) == 2
    assert "mini-clip is not a chat model" in capsys.readouterr().err
