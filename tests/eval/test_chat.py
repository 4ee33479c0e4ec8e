"""``rsvl.eval.chat`` and its scorers: every RSEvalKit quirk of notes A7 against hand-computed
numbers (upstream's and the corrected one differ exactly where the notes say), the VHM_Eval
reader on folders written here (hostile paths included), and a whole run with a model whose
answers come from a dict."""

from __future__ import annotations

import json
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rsvl.errors import DatasetError, InputNotFoundError, PromptError
from rsvl.eval.chat import (
    TASKS,
    evaluate_chat,
    majority_baseline,
    read_chat_file,
    resolve_task,
    resolve_tasks,
    score,
)
from rsvl.eval.chat_scorers import (
    ChatItem,
    mc_corrected,
    mc_upstream,
    ml_classes,
    ml_classes_upstream,
    parse_count,
    presence_corrected,
    presence_upstream,
)
from rsvl.models.chat import Box, ChatAnswer, ChatModel

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"


def item(answer: str, pred: str, **kw) -> ChatItem:
    return ChatItem(kw.pop("query", "q"), answer, pred, **kw)


# --------------------------------------------------------------------------- scorers


def test_presence_bare_no_and_words_containing_no():
    cases = [  # (gt, pred, upstream reading, corrected reading)
        ("No", "No", "unknown", "no"),                   # a bare "No" is missed upstream
        ("Yes", "Yes, I know.", "unknown", "yes"),       # "know" reads as no upstream
        ("Yes", "yes, north of the road", "unknown", "yes"),  # "north" too
        ("No", "There is not a ship", "no", "unknown"),  # "not" reads as no upstream
        ("Yes", "yes", "yes", "yes"),
        ("No", "false", "no", "no"),
    ]
    for _, pred, up, fixed in cases:
        assert presence_upstream(pred) == up and presence_corrected(pred) == fixed, pred
    res = score("presence", [item(g, p) for g, p, _, _ in cases])
    assert res.upstream["accuracy"] == pytest.approx(3 / 6)
    assert res.metrics["accuracy"] == pytest.approx(5 / 6)
    assert res.metrics["unknown"] == 1


def test_mc_first_letter_rule_and_missing_letter():
    assert mc_upstream("Answer: B") == "A" and mc_corrected("Answer: B") == "B"
    assert mc_upstream("The answer is D.") == "D" and mc_corrected("(C) top left") == "C"
    items = [item("B", "Answer: B"), item("C", "(C) top left"), item("A", "A"), item("D", "The answer is D.")]
    res = score("mc", items)
    assert res.upstream == {"accuracy": 0.75}
    assert res.metrics["accuracy"] == 1.0 and res.metrics["unparsable"] == 0
    crash = score("mc", [item("B", "B"), item("B", "none of them")])
    assert crash.upstream["accuracy"] is None and "item 1: no letter A-E" in crash.upstream["error"]
    assert crash.metrics["accuracy"] == 0.5 and crash.metrics["unparsable"] == 1


def test_cls_vqa_empty_prediction_passes_upstream_only():
    items = [item("parking lot", "Parking Lot"), item("farmland", ""), item("beach", "a beach"),
             item("dense residential", "residential")]
    for kind in ("cls", "vqa"):
        res = score(kind, items)
        assert res.upstream["accuracy"] == 0.75  # "" is a substring of every answer
        assert res.metrics["accuracy"] == 0.5 and res.metrics["empty"] == 1


def test_color_fraction_of_ground_truth_colours():
    res = score("color", [item("red, white", "A red car"), item("blue", "Blue")])
    assert res.metrics["accuracy"] == res.upstream["accuracy"] == pytest.approx(0.75)


def test_counting_numbers_words_ranges_and_the_upstream_crashes():
    assert parse_count("There are 3 planes") == 3 and parse_count("twenty-one ships") == 21
    assert parse_count("Two") == 2 and parse_count("three.") is None and parse_count("many") is None
    ok = [item("3", "There are 3 planes"), item("2", "two"), item("7", "about 10")]
    res = score("counting", ok)
    assert res.upstream["mae"] == 1.0 and res.upstream["mape"] == pytest.approx(1 / 7)
    assert res.upstream["per_range_percent"] == {"(0, 2]": 100.0, "(2, 6]": 100.0, "(6, 12]": 0.0, "(12, inf)": -1.0}
    assert res.metrics["mae"] == 1.0 and res.metrics["accuracy"] == pytest.approx(2 / 3)

    res = score("counting", [*ok, item("15", "many")])  # upstream: int('') raises
    assert res.upstream["mae"] is None and "no number" in res.upstream["error"]
    m = res.metrics
    assert m["accuracy"] == 0.5 and m["unparsable"] == 1
    assert m["mae"] == 1.0 and m["mape"] == pytest.approx(1 / 7)  # the unparsable one left out
    assert m["per_range"] == {"(0, 2]": 1.0, "(2, 6]": 1.0, "(6, 12]": 0.0, "(12, inf)": 0.0}
    assert m["per_range_count"] == {"(0, 2]": 1, "(2, 6]": 1, "(6, 12]": 1, "(12, inf)": 1}

    zero = score("counting", [item("0", "0"), item("4", "2")])  # upstream divides by the GT 0
    assert zero.upstream["mape"] is None and "division by zero" in zero.upstream["error"]
    assert zero.metrics["mape"] == 0.5 and zero.metrics["mae"] == 1.0 and zero.metrics["per_range"]["(0, 2]"] == 1.0


def test_mae_parse_failures_are_reported_and_zero_ground_truth():
    items = [item("0.5 m", "about 0.6 m"), item("10 20", "12 and 18"), item("3", "3 or 4")]
    res = score("mae", items)
    assert res.metrics["mae"] == pytest.approx(4.1 / 3) == res.upstream["mae"]
    assert res.metrics["mape"] == pytest.approx(0.5 / 3) == res.upstream["mape"]
    assert res.metrics["unparsable"] == 1 and res.metrics["unparsable_ratio"] == pytest.approx(1 / 3)
    zero = score("mae", [item("0", "1")])
    assert zero.upstream["mae"] is None and "0" in zero.upstream["error"]
    assert zero.metrics["mae"] == 1.0 and zero.metrics["mape"] is None
    none = score("mae", [item("5", "no idea")])
    assert none.upstream["mae"] is None and none.metrics["mae"] is None and none.metrics["unparsable"] == 1


def test_bbox_size_quirk_boxes_and_area_classes():
    # image 400 wide, 200 high; GT box 80x80 px (M); the model says [100,100,300,500] in 0-1000
    gt = "[40, 20, 120, 100]"
    right = Box(0.1, 0.1, 0.3, 0.5)
    items = [
        # no size in the JSON: upstream records PIL's (w, h) and reads it as (h, w)
        item(gt, "[[100, 100, 300, 500]]", boxes=[right], size=(400, 200), hw=(200, 400)),
        # the JSON's size (h, w): upstream right
        item(gt, "<box>[[100, 100, 300, 500]]</box>", boxes=[right], size=(200, 400), hw=(200, 400)),
        # a small GT (S) and no box at all
        item("[0, 0, 20, 20]", "I cannot find it", boxes=[], size=(200, 400), hw=(200, 400)),
    ]
    res = score("bbox", items)
    assert res.upstream["acc@0.5"] == pytest.approx(1 / 3)
    assert res.upstream["by_area"] == {"S": 0.0, "M": 0.5, "L": None}
    m = res.metrics
    assert m["acc@0.5"] == pytest.approx(2 / 3) and m["by_area"] == {"S": 0.0, "M": 1.0, "L": None}
    assert m["by_area_count"] == {"S": 1, "M": 2, "L": 0} and m["unparsable"] == 1
    assert m["mean_iou"] == pytest.approx(2 / 3)
    short = score("bbox", [item(gt, "[500]", boxes=[right], size=(200, 400), hw=(200, 400))])
    assert short.upstream["acc@0.5"] is None and "IndexError" in short.upstream["error"]
    assert short.metrics["acc@0.5"] == 1.0
    first = score("bbox", [item(gt, "no box", size=(200, 400), hw=(200, 400)), items[1]])
    assert first.upstream["acc@0.5"] is None and "UnboundLocalError" in first.upstream["error"]
    assert first.metrics["acc@0.5"] == 0.5
    five = score("bbox", [item("[40, 20, 120, 100, 0]", "[[100, 100, 300, 500]]", boxes=[right], size=(200, 400), hw=(200, 400))])
    assert five.upstream["acc@0.5"] is None and "5 numbers in the ground-truth box" in five.upstream["error"]
    assert five.metrics["acc@0.5"] == 1.0


def test_ciou_y_scaled_with_width_and_missing_polygons():
    h, w = 100, 200
    gt = "[100, 200, 500, 200, 500, 500, 100, 500]"   # x 20-100 px; y 20-50 (upstream: 40-100)
    tall = "[100, 200, 500, 200, 500, 900, 100, 900]"  # y 20-90 (upstream: 40-180, clipped to 100)
    res = score("ciou", [item(gt, tall, size=(h, w), hw=(h, w))])
    assert res.upstream["mean_iou"] == pytest.approx(1.0, abs=1e-6)  # the clipping hides the error
    assert res.metrics["mean_iou"] == pytest.approx(30 / 70, abs=0.02)
    assert res.metrics["c_iou"] == res.metrics["mean_iou"]
    six = "[100, 200, 300, 200, 500, 200, 500, 500, 300, 500, 100, 500]"  # same square, 6 points
    res = score("ciou", [item(gt, six, size=(h, w), hw=(h, w))])
    assert res.metrics["mean_iou"] == pytest.approx(1.0, abs=1e-6)
    assert res.metrics["c_iou"] == pytest.approx(1 - 2 / 10, abs=1e-6)
    res = score("ciou", [item(gt, gt, size=(h, w), hw=(h, w)), item(gt, "no building", size=(h, w), hw=(h, w))])
    assert res.upstream["mean_iou"] is None and "None" in res.upstream["error"]
    assert res.metrics["mean_iou"] == pytest.approx(0.5, abs=1e-6) and res.metrics["unparsable"] == 1


def test_multilabel_substrings_unpredicted_classes_and_class_list():
    q = "Which of these classes are in the image: tree, street, water, road."
    assert ml_classes_upstream(q) == ml_classes(q) == ["tree", "street", "water", "road"]
    assert ml_classes_upstream("Classes: a, b") == ["a", ""] and ml_classes("Classes: a, b") == ["a", "b"]
    items = [item("street, water", "street", query=q), item("tree", "tree, water", query=q),
             item("water", "street", query=q)]
    res = score("ml", items)
    # upstream: "tree" is in "street"; road never predicted counts 0
    assert res.upstream["average_cp"] == pytest.approx(7 / 24)
    assert res.metrics["average_cp"] == pytest.approx(0.5)
    assert res.metrics["average_cr"] == pytest.approx(2 / 3) and res.metrics["cf1"] == pytest.approx(4 / 7)


def test_majority_baseline_uses_the_same_scorer():
    items = [item("No", "x"), item("Yes", "x"), item("No", "x")]
    assert majority_baseline("presence", items) == {"answer": "No", "accuracy": pytest.approx(2 / 3)}
    counts = [item("3", "x"), item("3", "x"), item("5", "x")]
    assert majority_baseline("counting", counts) == {"answer": "3", "accuracy": pytest.approx(2 / 3), "mae": pytest.approx(2 / 3)}
    assert majority_baseline("bbox", items) is None


# --------------------------------------------------------------------------- task table


def test_task_table_tags_aliases_and_unknown_names():
    assert len(TASKS) == 32
    assert resolve_task("presence_mo_dota").tag == "idk" and resolve_task("presence_mo_dota").scorer == "presence"
    assert resolve_task("cls_AID.json").tag == "cls" and resolve_task("RSVQA_LR-comp_RSVQA").tag == "vqa"
    assert resolve_task("counting_dota-test_open").tag == "it" and resolve_task("imgType_mcq").scorer == "mc"
    vg = resolve_task("rs_vg")
    assert (vg.name, vg.scorer, vg.tag) == ("VG_DOIR_RSVG_test", "bbox", "vg")
    assert resolve_task("rs_ml_gid").name == "mlc_gid_test"  # upstream's keys for ml are swapped
    assert resolve_task("relpos_false_dota-test_popula_mc").tag == "idk"
    with pytest.raises(PromptError, match="Unknown chat task 'cls_ucm'.*Known tasks: .*cls_AID"):
        resolve_task("cls_ucm")
    assert resolve_task("cls_ucm", scorer="cls").tag == "cls"
    with pytest.raises(PromptError, match="inference only"):
        resolve_task("color_false_pan_dota-test")
    with pytest.raises(PromptError, match="Unknown scorer"):
        resolve_task("cls_AID", scorer="bleu")
    for hostile in ("../cls_AID", "/etc/passwd", "sub/x.json", ".hidden"):
        with pytest.raises(PromptError, match="not a file name"):
            resolve_task(hostile, scorer="cls")


# --------------------------------------------------------------------------- reader


def png(path: Path, h: int = 32, w: int = 48, value: int = 90) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((h, w, 3), value, np.uint8)).save(path)
    return path.name


def entry(image: str, q: str, a: str, image_path: str = "images", **extra) -> dict:
    return {"image": image, "image_path": image_path,
            "conversations": [{"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": a}], **extra}


def write_task(folder: Path, name: str, entries: list) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    p = folder / f"{name}.json"
    p.write_text(json.dumps(entries))
    return p


def presence_folder(root: Path) -> Path:
    for i in range(4):
        png(root / "images" / f"{i}.png", value=40 * i)
    qa = [("Is there a ship?", "Yes"), ("Is there a plane?", "No"), ("Is there a car?", "No"), ("Is there a road?", "Yes")]
    write_task(root, "presence_mo_dota", [entry(f"{i}.png", q, a) for i, (q, a) in enumerate(qa)])
    return root


def test_reader_strips_the_image_marker_and_reads_sizes(tmp_path):
    root = presence_folder(tmp_path / "eval")
    entries = read_chat_file(root, "presence_mo_dota")
    assert [e.query for e in entries][:2] == ["Is there a ship?", "Is there a plane?"]
    assert entries[1].answer == "No" and entries[1].image == root / "images" / "1.png" and entries[1].size is None
    write_task(root, "cls_AID", [entry("0.png", "Classify.", "beach", size=[32, 48])])
    assert read_chat_file(root, "cls_AID")[0].size == (32, 48)


@pytest.mark.parametrize("bad, message", [
    ({"image": "x.png", "image_path": "../outside"}, "leaves"),
    ({"image": "../../etc/passwd", "image_path": "images"}, "leaves"),
    ({"image": "/etc/passwd", "image_path": ""}, "absolute image path"),
    ({"image": "x.png", "image_path": "/tmp"}, "absolute image path"),
])
def test_reader_refuses_paths_out_of_the_folder(tmp_path, bad, message):
    root = tmp_path / "eval"
    e = entry("0.png", "Is there a ship?", "Yes")
    e.update(bad)
    write_task(root, "presence_mo_dota", [entry("0.png", "Q?", "No"), e])
    png(root / "images" / "0.png")
    with pytest.raises(DatasetError, match=f"presence_mo_dota.json, entry 1: .*{message}"):
        read_chat_file(root, "presence_mo_dota")


def test_reader_takes_absolute_paths_only_when_allowed(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    png(elsewhere / "a.png")
    root = tmp_path / "eval"
    write_task(root, "presence_mo_dota", [entry("a.png", "Is there a ship?", "Yes", image_path=str(elsewhere))])
    with pytest.raises(DatasetError, match="--allow-absolute-paths"):
        read_chat_file(root, "presence_mo_dota")
    assert read_chat_file(root, "presence_mo_dota", allow_absolute=True)[0].image == elsewhere / "a.png"


@pytest.mark.parametrize("bad, message", [
    ({"conversations": [{"from": "human", "value": "<image>\nQ"}]}, "'conversations' must be a list"),
    ({"conversations": [{"from": "gpt", "value": "Q"}, {"from": "gpt", "value": "A"}]}, "turn 0 is from 'gpt'"),
    ({"conversations": [{"from": "human", "value": "<image>\n"}, {"from": "gpt", "value": "A"}]}, "question is empty"),
    ({"image": 3}, "'image' is missing"),
    ({"size": [0, 5]}, "'size' must be two positive numbers"),
    ({"conversations": [{"from": "human", "value": "How many?"}, {"from": "gpt", "value": "many"}]}, "whole number"),
    ({"conversations": [{"from": "human", "value": "How many?"}, {"from": "gpt", "value": "\u00b3"}]}, "whole number"),
])
def test_reader_names_the_malformed_entry(tmp_path, bad, message):
    root = tmp_path / "eval"
    png(root / "images" / "0.png")
    e = entry("0.png", "How many planes?", "2")
    e.update(bad)
    write_task(root, "counting_dota-test_open", [entry("0.png", "How many?", "1"), entry("0.png", "How many?", "3"), e])
    with pytest.raises(DatasetError, match=f"entry 2: .*{message}"):
        read_chat_file(root, "counting_dota-test_open")


def test_reader_missing_files_bad_json_and_size_guard(tmp_path):
    root = tmp_path / "eval"
    write_task(root, "presence_mo_dota", [entry("0.png", "Q?", "Yes"), entry("9.png", "Q?", "No")])
    png(root / "images" / "0.png")
    with pytest.raises(DatasetError, match=r"1 image\(s\) missing, first .*9.png \(entry 1\)"):
        read_chat_file(root, "presence_mo_dota")
    with pytest.raises(InputNotFoundError, match="cls_AID.json does not exist"):
        read_chat_file(root, "cls_AID")
    with pytest.raises(DatasetError, match="over the"):
        read_chat_file(root, "presence_mo_dota", max_bytes=10)
    (root / "imgType_mcq.json").write_text("[{")
    with pytest.raises(DatasetError, match="not valid JSON"):
        read_chat_file(root, "imgType_mcq")
    (root / "imgType_mcq.json").write_text("{}")
    with pytest.raises(DatasetError, match="non-empty list"):
        read_chat_file(root, "imgType_mcq")


def test_resolve_tasks_all_takes_scored_files_only(tmp_path):
    root = presence_folder(tmp_path / "eval")
    write_task(root, "cls_AID", [entry("0.png", "Classify.", "beach")])
    write_task(root, "color_false_pan_dota-test", [entry("0.png", "Colour?", "red")])
    write_task(root, "notes", [])
    assert [t.name for t in resolve_tasks(root, ["all"])] == ["cls_AID", "presence_mo_dota"]
    with pytest.raises(PromptError, match="Unknown scorer 'bleu'"):
        resolve_tasks(root, ["all"], scorer="bleu")
    with pytest.raises(InputNotFoundError, match="JSON files in .*cls_AID, color_false_pan_dota-test"):
        resolve_tasks(root, ["VG_DOIR_RSVG_test"])
    with pytest.raises(InputNotFoundError, match="is not a folder"):
        resolve_tasks(root / "nope", ["all"])


def test_a_folders_task_table_names_its_own_tasks(tmp_path):
    """rsvl data chat writes tasks.json: its names resolve with their scorer and tag, `all`
    takes them (not the inference-only ones), and a bad table is one clear error."""
    root = presence_folder(tmp_path / "eval")
    write_task(root, "nwpu_presence", [entry("0.png", "Is there a ship?", "yes")])
    write_task(root, "ucm_describe", [entry("0.png", "Describe.", "a river")])
    (root / "tasks.json").write_text(json.dumps({
        "nwpu_presence": {"scorer": "presence", "tag": "idk"},
        "ucm_describe": {"scorer": "none", "tag": "it"}}))
    (task,) = resolve_tasks(root, ["nwpu_presence"])
    assert (task.scorer, task.tag) == ("presence", "idk")
    assert [t.name for t in resolve_tasks(root, ["all"])] == ["nwpu_presence", "presence_mo_dota"]
    (root / "tasks.json").write_text(json.dumps({"nwpu_presence": {"scorer": "bleu"}}))
    with pytest.raises(DatasetError, match="unknown scorer 'bleu'"):
        resolve_tasks(root, ["nwpu_presence"])


# --------------------------------------------------------------------------- a whole run


class DictModel:
    """Answers from a dict keyed by question; records the task tags it was given."""

    name = "dict-model"
    image_size = 32

    def __init__(self, answers: dict[str, str | ChatAnswer]):
        self.answers = answers
        self.tags: list[str | None] = []
        self.shapes: list[tuple[int, ...]] = []

    def chat(self, image, question, *, history=(), task=None, max_new_tokens=256, temperature=0.0, on_text=None):
        self.tags.append(task)
        self.shapes.append(image.shape)
        a = self.answers[question]
        return a if isinstance(a, ChatAnswer) else ChatAnswer(a, new_tokens=len(a.split()))


def test_evaluate_chat_presence_end_to_end(tmp_path):
    root = presence_folder(tmp_path / "eval")
    model = DictModel({"Is there a ship?": "Yes", "Is there a plane?": "No",
                       "Is there a car?": "I do not know", "Is there a road?": "yes"})
    assert isinstance(model, ChatModel)
    totals: list[int] = []
    done: list[int] = []

    @contextmanager
    def progress(total):
        totals.append(total)
        yield done.append

    res = evaluate_chat(model, root, "presence_mo_dota", progress=progress, out=tmp_path / "preds")
    m = res.metrics
    # "No" missed upstream, "I do not know" read as no upstream (right by chance)
    assert m["accuracy"] == 0.75 and m["upstream"]["accuracy"] == 0.75 and m["n"] == 4 and m["unknown"] == 1
    assert m["baseline"] == {"answer": "Yes", "accuracy": 0.5}
    assert model.tags == ["idk"] * 4 and model.shapes[0] == (32, 48, 3)
    assert totals == [4] and sum(done) == 4
    s = res.settings
    assert (s["scorer"], s["tag"], s["upstream_key"], s["n_samples"], s["subset"]) == ("presence", "idk", "rs_presence_mo_judge", 4, "all")
    lines = (tmp_path / "preds" / "presence_mo_dota_dict-model_eval.jsonl").read_text().splitlines()
    rows = [json.loads(x) for x in lines]
    assert [r["pred"] for r in rows] == ["Yes", "No", "I do not know", "yes"]
    assert rows[1]["query"] == "Is there a plane?" and rows[1]["answer"] == "No" and rows[1]["size"] == [48, 32]
    assert rows[2]["parsed"] == "unknown" and rows[2]["score"] == 0.0
    assert s["predictions"].endswith("presence_mo_dota_dict-model_eval.jsonl")
    json.dumps(res.to_dict(), allow_nan=False)

    sub = evaluate_chat(DictModel(model.answers), root, "presence_mo_dota", limit=2)
    assert sub.settings["n_samples"] == 2 and sub.settings["subset"] == "evenly spaced"
    assert sub.metrics["accuracy"] == 1.0  # entries 0 and 3: the ends of the file


def test_evaluate_chat_bbox_uses_the_models_boxes_and_true_size(tmp_path):
    root = tmp_path / "eval"
    png(root / "images" / "wide.png", h=200, w=400)
    write_task(root, "VG_DOIR_RSVG_test", [entry("wide.png", "Where is the ship?", "[40, 20, 120, 100]")])
    answer = ChatAnswer("[[100, 100, 300, 500]]", boxes=[Box(0.1, 0.1, 0.3, 0.5)])
    model = DictModel({"Where is the ship?": answer})
    res = evaluate_chat(model, root, "rs_vg")
    assert model.tags == ["vg"]
    assert res.metrics["acc@0.5"] == 1.0 and res.metrics["upstream"]["acc@0.5"] == 0.0  # no size: (w, h) as (h, w)
    assert "baseline" not in res.metrics


def test_evaluate_chat_on_real_ucm_questions(tmp_path):
    """RSIVQA's yes/no questions on real UCM JPEGs, in the VHM_Eval layout with the absolute
    image_path upstream allows: a model that always says "No" scores the share of "no"
    answers corrected, and 0 upstream (a bare "No" is missed)."""
    ucm = SHARED / "ucm"
    if not (ucm / "rsivqa.json").is_file():
        pytest.skip(f"real data not found at {ucm} (../shared/data next to the repository)")
    samples = [s for s in json.loads((ucm / "rsivqa.json").read_text())["samples"]
               if s["split"] == "val" and s["answer"] in ("yes", "no")][:12]
    root = tmp_path / "eval"
    write_task(root, "presence_mo_dota", [entry(s["image"], s["question"], s["answer"], image_path=str(ucm.resolve()))
                                          for s in samples])
    with pytest.raises(DatasetError, match="absolute image path"):
        read_chat_file(root, "presence_mo_dota")
    model = DictModel({s["question"]: "No" for s in samples})
    res = evaluate_chat(model, root, "presence_mo_dota", allow_absolute=True)
    n_no = sum(s["answer"] == "no" for s in samples)
    assert res.metrics["accuracy"] == pytest.approx(n_no / len(samples))
    assert res.metrics["upstream"]["accuracy"] == 0.0
    majority = Counter(s["answer"] for s in samples).most_common(1)[0]
    assert res.metrics["baseline"] == {"answer": majority[0], "accuracy": pytest.approx(majority[1] / len(samples))}
    assert set(model.shapes) == {(256, 256, 3)}
