"""Chat instruction data (``rsvl data chat``) built from the real annotations."""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from pathlib import Path

import pytest
from conftest import SHARED_DATA, shared_data
from PIL import Image

from rsvl.cli import main
from rsvl.data import chat, chat_items, refgen
from rsvl.errors import InputNotFoundError, OutputError

UCM = SHARED_DATA / "ucm"
NWPU = SHARED_DATA / "nwpu_vhr10" / "instances_train.json"
AID = SHARED_DATA / "aid"
FILES = ("train.json", "val.json", "stats.json", "eval/tasks.json")
CAP = 400

needs_data = pytest.mark.skipif(
    not (UCM.is_dir() and NWPU.is_file() and AID.is_dir()),
    reason=f"real data (ucm, nwpu_vhr10, aid) not found under {SHARED_DATA}",
)


# ------------------------------------------------------------------ errors

def test_no_source_and_missing_images(tmp_path: Path) -> None:
    with pytest.raises(InputNotFoundError, match="no source"):
        chat.build_chat_data(tmp_path / "out")
    coco = {"images": [{"id": 1, "file_name": "a.jpg", "width": 10, "height": 10}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1,
                             "bbox": [1, 1, 2, 2], "area": 4, "iscrowd": 0}],
            "categories": [{"id": 1, "name": "ship"}]}
    (tmp_path / "inst.json").write_text(json.dumps(coco))
    with pytest.raises(InputNotFoundError, match="missing"):
        chat.build_chat_data(tmp_path / "out", nwpu=tmp_path / "inst.json")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ the real data

@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    shared_data("ucm", "ucm.json")
    shared_data("nwpu_vhr10", "instances_train.json")
    shared_data("aid")
    out = tmp_path_factory.mktemp("chat") / "out"
    chat.build_chat_data(out, ucm=UCM, nwpu=NWPU, aid=AID, val_fraction=0.15, seed=0,
                         max_per_task=CAP)
    return out


def _load(out: Path, name: str) -> list[dict]:
    return json.loads((out / name).read_text())


def _coco() -> tuple[dict, dict[str, dict], dict[str, dict[str, list[list[float]]]]]:
    coco = json.loads(NWPU.read_text())
    names = {c["id"]: c["name"] for c in coco["categories"]}
    by_file = {im["file_name"]: im for im in coco["images"]}
    files = {im["id"]: im["file_name"] for im in coco["images"]}
    boxes: dict[str, dict[str, list[list[float]]]] = defaultdict(lambda: defaultdict(list))
    for a in coco["annotations"]:
        boxes[files[a["image_id"]]][names[a["category_id"]]].append(a["bbox"])
    return coco, by_file, boxes


def _class_in(question: str) -> str:
    """The one NWPU class a generated question names."""
    found = [n for n in ("airplane ship storage_tank baseball_diamond tennis_court "
                         "basketball_court ground_track_field harbor bridge vehicle").split()
             if re.search(rf"\b{refgen.class_phrase(n)}s?\b", question)]
    assert len(found) == 1, question
    return found[0]


def _qa(rec: dict) -> tuple[str, str]:
    human, gpt = rec["conversations"]
    assert human["from"] == "human" and gpt["from"] == "gpt"
    assert human["value"].startswith("<image>\n")
    return human["value"][len("<image>\n"):], gpt["value"]


@needs_data
def test_splits_disjoint_and_nwpu_split_is_refgens(built: Path) -> None:
    train, val = _load(built, "train.json"), _load(built, "val.json")
    images = {s: {r["image"] for r in recs} for s, recs in (("train", train), ("val", val))}
    assert not images["train"] & images["val"]
    coco, _, _ = _coco()
    split = refgen.split_images([im["id"] for im in coco["images"]], 0.15, 0)
    want = {str((NWPU.parent / "images" / im["file_name"]).resolve())
            for im in coco["images"] if split[im["id"]] == "val"}
    assert {r["image"] for r in val if r["source_dataset"] == "nwpu"} == want
    ucm_split = {str((UCM / s["image"]).resolve()): s["split"]
                 for s in json.loads((UCM / "ucm.json").read_text())["samples"]}
    for name, recs in (("train", train), ("val", val)):
        for r in recs:
            if r["source_dataset"] in ("ucm", "rsivqa"):
                assert ucm_split[r["image"]] == name


@needs_data
def test_presence_counting_answers_follow_the_labels(built: Path) -> None:
    _, _, boxes = _coco()
    seen = Counter()
    for r in _load(built, "train.json") + _load(built, "val.json"):
        if r["task"] not in ("nwpu_presence", "nwpu_counting"):
            continue
        q, a = _qa(r)
        n = len(boxes[Path(r["image"]).name][_class_in(q)])
        if r["task"] == "nwpu_presence":
            assert a in ("Yes.", "No.")
            assert (a == "Yes.") == (n > 0), (q, a, n)
        else:
            assert a == str(n)
        seen[(r["task"], a if r["task"] == "nwpu_presence" else a == "0")] += 1
    # honest no answers about as often as yes answers; zero counts present
    assert seen[("nwpu_presence", "No.")] > 0.8 * seen[("nwpu_presence", "Yes.")]
    assert seen[("nwpu_counting", True)] > 50


@needs_data
def test_grounding_boxes_round_trip(built: Path) -> None:
    _, by_file, boxes = _coco()
    n = 0
    for r in _load(built, "train.json") + _load(built, "val.json"):
        if r["task"] != "nwpu_vg":
            continue
        q, a = _qa(r)
        im = by_file[Path(r["image"]).name]
        got = json.loads(a)
        gt = sorted(boxes[im["file_name"]][_class_in(q)])
        assert len(got) == len(gt) <= chat_items.MAX_BOXES
        for b, (x, y, w, h) in zip(got, gt, strict=True):
            want = (x / im["width"], y / im["height"], (x + w) / im["width"],
                    (y + h) / im["height"])
            assert all(0 <= v <= 1000 and isinstance(v, int) for v in b)
            assert max(abs(v - 1000 * t) for v, t in zip(b, want, strict=True)) <= 0.5 + 1e-9
        n += 1
    assert n > 100
    for e in _load(built, "eval/nwpu_vg.json"):
        q, a = _qa(e)
        (x, y, w, h), = boxes[e["image"]][_class_in(q)]
        (b,) = json.loads(a)
        assert b == [round(x), round(y), round(x + w), round(y + h)]


@needs_data
def test_relpos_answers_follow_box_centres(built: Path) -> None:
    _, by_file, boxes = _coco()
    recs = [r for r in _load(built, "train.json") if r["task"] == "nwpu_relpos"]
    assert recs
    plural = 0
    for r in recs:
        q, a = _qa(r)
        m = re.match(r"Is the (.+?) (?:to the|on the|above|below).* the (.+)\?$", q)
        assert m, q
        here = boxes[Path(r["image"]).name]
        names = {refgen.class_phrase(n, plural=len(b) > 1): n for n, b in here.items()}
        (ax, ay, aw, ah), = here[names[m.group(1)]]
        refs = here[names[m.group(2)]]
        dxs = [(ax + aw / 2) - (bx + bw / 2) for bx, _, bw, _ in refs]
        dys = [(ay + ah / 2) - (by + bh / 2) for _, by, _, bh in refs]
        im = by_file[Path(r["image"]).name]
        if "left" in q:
            assert min(abs(d) for d in dxs) >= chat_items.RELPOS_MARGIN * im["width"]
            assert {a} == {"Left." if d < 0 else "Right." for d in dxs}
        else:
            assert min(abs(d) for d in dys) >= chat_items.RELPOS_MARGIN * im["height"]
            assert {a} == {"Above." if d < 0 else "Below." for d in dys}
        plural += len(refs) > 1
    assert plural > 0


@needs_data
def test_eval_files_in_vhm_eval_layout(built: Path) -> None:
    tasks = json.loads((built / "eval" / "tasks.json").read_text())
    files = {p.stem for p in (built / "eval").glob("*.json")} - {"tasks"}
    assert set(tasks) == files
    assert {"nwpu_presence", "nwpu_counting", "nwpu_vg", "ucm_cls", "aid_cls",
            "ucm_describe", "rsivqa_presence"} <= files
    val = _load(built, "val.json")
    for name, info in tasks.items():
        assert info["scorer"] == chat_items.TASKS[name].scorer
        assert info["tag"] in ("cls", "vqa", "vg", "idk", "it")
        recs = _load(built, f"eval/{name}.json")
        assert info["items"] == len(recs) > 0
        for e in recs[:40]:
            # RSEvalKit's path: image_path (relative to the eval folder) joined with image
            assert not Path(e["image_path"]).is_absolute()
            path = built / "eval" / e["image_path"] / e["image"]
            assert path.is_symlink() and path.resolve().is_file()
            assert (built / "eval").resolve() not in path.resolve().parents
            with Image.open(path) as im:
                assert e["size"] == [im.height, im.width]
            _qa(e)
        # several-box grounding and zero counts stay out of the eval files
        if name not in ("nwpu_vg", "nwpu_counting"):
            assert len(recs) == sum(1 for r in val if r["task"] == name)
    cls = _load(built, "eval/aid_cls.json")
    q, a = _qa(cls[0])
    assert q.startswith("Classify the image within one of the given classes: bare land, beach")
    assert q.endswith("Answer with only the class name.") and a in q


@needs_data
def test_stats_caps_and_majority_baseline(built: Path) -> None:
    stats = json.loads((built / "stats.json").read_text())
    train = _load(built, "train.json")
    per_task = Counter(r["task"] for r in train)
    assert max(per_task.values()) <= CAP
    assert per_task["nwpu_presence"] == CAP  # more were generated
    for task, row in stats["per_task"].items():
        assert row["train"] == per_task[task] <= row["generated_train"]
        assert row["eval"] == len(_load(built, f"eval/{task}.json"))
    assert len({r["id"] for r in train + _load(built, "val.json")}) == \
        stats["items"]["train"] + stats["items"]["val"]
    recs = _load(built, "eval/nwpu_presence.json")
    answers = Counter(_qa(e)[1] for e in recs)
    assert set(answers) == {"yes", "no"}  # what upstream's presence scorer compares with
    counts = [int(_qa(e)[1]) for e in _load(built, "eval/nwpu_counting.json")]
    assert min(counts) > 0  # upstream's MAPE divides by the ground truth
    top, n = answers.most_common(1)[0]
    base = stats["baseline"]["nwpu_presence"]
    assert base["accuracy"] == round(n / len(recs), 4)
    # vqa as upstream scores it: "two" is a substring of "twenty-two"
    recs = _load(built, "eval/rsivqa_counting.json")
    truth = [_qa(e)[1] for e in recs]
    top = Counter(truth).most_common(1)[0][0]
    base = stats["baseline"]["rsivqa_counting"]
    assert base["answer"] == top
    assert base["accuracy"] == round(sum(top in t for t in truth) / len(truth), 4)
    assert base["exact"] == round(truth.count(top) / len(truth), 4) < base["accuracy"]
    assert stats["baseline"]["nwpu_vg"] is None and stats["baseline"]["ucm_describe"] is None


@needs_data
def test_same_seed_same_bytes(built: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    chat.build_chat_data(again, ucm=UCM, nwpu=NWPU, aid=AID, seed=0, max_per_task=CAP)
    for p in sorted(built.rglob("*.json")):
        assert (again / p.relative_to(built)).read_bytes() == p.read_bytes(), p
    other = tmp_path / "other"
    chat.build_chat_data(other, nwpu=NWPU, seed=1, max_per_task=CAP)
    first = {r["image"] for r in _load(built, "val.json") if r["source_dataset"] == "nwpu"}
    assert {r["image"] for r in _load(other, "val.json")} != first


def test_cli_writes_and_refuses_existing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shared_data("ucm", "ucm.json")
    out = tmp_path / "out"
    args = ["data", "chat", "--ucm", str(UCM), "--out", str(out), "--max-per-task", "50"]
    assert main(args) == 0
    for name in FILES:
        assert (out / name).is_file()
    assert "ucm_describe" in capsys.readouterr().out
    before = (out / "train.json").read_bytes()
    assert main(args) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main([*args, "--overwrite", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["stats"]["per_task"]["ucm_cls"]["train"] == 50
    assert (out / "train.json").read_bytes() == before
    # --link none: no images under eval/, image_path is the image's absolute folder
    # and --max-val-per-task caps val (and so the eval files) per task
    assert main([*args, "--overwrite", "--link", "none", "--max-val-per-task", "7"]) == 0
    capsys.readouterr()
    assert not (out / "eval" / "images").exists()
    assert set(Counter(r["task"] for r in _load(out, "val.json")).values()) == {7}
    e = _load(out, "eval/ucm_cls.json")[0]
    assert Path(e["image_path"], e["image"]).is_file() and Path(e["image_path"]).is_absolute()
    # a folder this command did not write is never replaced
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep")
    with pytest.raises(OutputError, match="not a chat data folder"):
        chat.build_chat_data(other, ucm=UCM, overwrite=True)
    assert (other / "notes.txt").read_text() == "keep"


@needs_data
def test_describe_and_aid_splits(built: Path) -> None:
    train, val = _load(built, "train.json"), _load(built, "val.json")
    per_image = Counter(r["image"] for r in train if r["task"] == "ucm_describe")
    assert max(per_image.values()) > 1  # several captions of one image, separate items
    per_val = Counter(r["image"] for r in val if r["task"] == "ucm_describe")
    assert set(per_val.values()) == {1}
    captions = {str((UCM / s["image"]).resolve()): s["captions"]
                for s in json.loads((UCM / "ucm.json").read_text())["samples"]}
    for r in train[:300]:
        if r["task"] == "ucm_describe":
            answer = _qa(r)[1]
            assert any(answer.rstrip(".").lower() == c.replace(" .", "").strip().lower()
                       for c in captions[r["image"]]), answer
    # AID: a seeded split per class, val_fraction of each class
    for cls_dir in sorted(AID.iterdir()):
        n = sum(1 for f in cls_dir.iterdir() if f.suffix.lower() == ".jpg")
        n_val = sum(1 for r in val if r["task"] == "aid_cls"
                    and Path(r["image"]).parent.name == cls_dir.name)
        assert n_val == round(n * 0.15)
