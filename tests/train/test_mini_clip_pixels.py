"""mini-clip's dense training on pixel labels: AID reader, label vocabularies, the learned
"other" query (heads layout, training on a toy problem whose answer is known)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rsvl.errors import DatasetError
from rsvl.models.mini.clip import HeadsConfig, MiniClipHeads, load_heads, save_heads
from rsvl.train.mini_clip_data import AID_HELDOUT, aid_readable, load_aid
from rsvl.train.mini_clip_pixels import (
    CROP,
    IGNORE,
    OTHER,
    PixelBank,
    PixelTrainConfig,
    evaluate_pixels,
    make_bank,
    semseg_crops,
    train_pixels,
    with_other,
)


def _aid(root: Path, n: int = 10) -> None:
    rng = np.random.default_rng(0)
    for folder in ("Forest", "Beach", "Pond", "Desert"):
        (root / folder).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(root / folder / f"{folder}_{i}.jpg")


def test_load_aid_splits_merges_and_holds_out(tmp_path: Path) -> None:
    _aid(tmp_path / "aid")
    d = load_aid(tmp_path / "aid", per_class=8, val_fraction=0.25, heldout_per_class=3)
    by = {}
    for s in d.samples:
        by.setdefault((s["folder"], s["split"]), []).append(s)
    assert len(by[("Forest", "train")]) == 6 and len(by[("Forest", "val")]) == 2
    assert "Pond" in AID_HELDOUT and len(by[("Pond", "heldout")]) == 3
    assert not any(s["split"] != "heldout" for s in d.samples if s["folder"] == "Pond")
    labels = {s["folder"]: s["label"] for s in d.samples}
    assert labels["Beach"] == "beach"  # a UCM class: trained as it
    assert labels["Forest"] == "aid:Forest" and aid_readable("aid:Forest") == "a forest"
    assert all(len(s["captions"]) == 5 and s["captions"][0][0].isupper() for s in d.samples)
    again = load_aid(tmp_path / "aid", per_class=8, val_fraction=0.25, heldout_per_class=3)
    assert again.digest == d.digest and [s["image"] for s in again.samples] == [s["image"] for s in d.samples]
    assert load_aid(tmp_path / "aid", per_class=8, seed=1).digest != d.digest
    with pytest.raises(DatasetError, match="not found"):
        load_aid(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no AID class folders"):
        load_aid(tmp_path / "empty")


def test_bank_vocabularies_and_semseg_labels(tmp_path: Path) -> None:
    bank = make_bank(["beach", "aid:Forest"], aid_readable)
    assert bank.prompts[bank.index("scene:aid:Forest")] == ("a forest",)
    assert len(bank.vocab["nwpu"]) == 10 and bank.vocab["scenes"] == [bank.index("scene:beach"), bank.index("scene:aid:Forest")]
    assert bank.index("building") in bank.vocab["whu_building"] and len(bank.vocab["whu_building"]) == 1
    # LoveDA: 0 no-data -> ignored, 1 background -> "other", 2 building -> its class
    folder = tmp_path / "loveda"
    (folder / "images").mkdir(parents=True)
    (folder / "labels").mkdir()
    lab = np.zeros((300, 300), np.uint8)
    lab[:, 100:200], lab[:, 200:] = 1, 2
    Image.fromarray(np.zeros((300, 300, 3), np.uint8)).save(folder / "images" / "a.png")
    Image.fromarray(lab).save(folder / "labels" / "a.png")
    crops = semseg_crops(folder, "loveda", bank, scales=(1.0, 0.5))
    assert len(crops) == 4 + 1  # 2 x 2 tiles (the last shifted inside) and one padded half-scale tile
    assert all(c[0].shape == (CROP, CROP, 3) and c[1].shape == (CROP, CROP) for c in crops)
    first = crops[0][1]
    assert first[0, 50] == IGNORE and first[0, 150] == OTHER and first[0, 250] == bank.index("building")
    assert crops[-1][1][0, 200] == IGNORE  # padding of the half-scale tile


def _toy(n: int, seed: int) -> dict:
    """Maps whose f8 channels 0/1 mark classes a/b and channel 2 'neither': labels a, b, other."""
    g = torch.Generator().manual_seed(seed)
    lab = torch.full((n, 16, 16), OTHER, dtype=torch.long)
    for i in range(n):
        y, x = (int(v) for v in torch.randint(0, 9, (2,), generator=g))
        lab[i, y : y + 7, :8] = 0
        lab[i, :8, x : x + 7] = 1
    lab[:, 0, 0] = IGNORE
    cell = lab[:, 1::2, 1::2]
    f8 = torch.randn(n, 40, 8, 8, generator=g) * 0.5
    f8[:, 0] += 2.0 * (cell == 0)
    f8[:, 1] += 2.0 * (cell == 1)
    f8[:, 2] += 2.0 * (cell == OTHER)
    return {"f8": f8.half(), "f16": (torch.randn(n, 112, 4, 4, generator=g) * 0.1).half(),
            "f32": (torch.randn(n, 1280, 2, 2, generator=g) * 0.1).half(), "label": lab, "vocab": "toy"}


def test_dense_training_learns_classes_and_other_on_a_toy_problem() -> None:
    torch.manual_seed(0)
    heads = MiniClipHeads(HeadsConfig(other=True))
    bank = PixelBank(["a", "b"], [("a",), ("b",)], {"toy": [0, 1]})
    emb = torch.nn.functional.normalize(torch.randn(2, 256, generator=torch.Generator().manual_seed(1)), dim=-1)
    prompt_emb = [emb[0:1], emb[1:2]]
    train, val = _toy(48, 0), _toy(16, 1)
    before = evaluate_pixels(heads, val, bank, prompt_emb)
    losses = train_pixels(heads, [train], bank, prompt_emb,
                          PixelTrainConfig(epochs=20, batch=16, lr=1e-2, repeat={}, drop_class=0.2))
    after = evaluate_pixels(heads, val, bank, prompt_emb)
    assert losses[-1] < 0.5 * losses[0]
    assert after["miou"] > 80.0 > before["miou"] + 20
    assert after["iou"]["other"] > 80.0 and set(after["iou"]) == {"a", "b", "other"}


def test_heads_with_other_roundtrip_and_old_heads_load(tmp_path: Path) -> None:
    torch.manual_seed(0)
    old = MiniClipHeads(HeadsConfig())
    assert old.other_threshold() is None and not hasattr(old, "other_cos")
    new = with_other(old)
    assert new.config.other and with_other(new) is new
    with torch.no_grad():
        new.other_cos.fill_(0.3125)  # exact in float16
    q = new.other_threshold()
    for k, v in old.state_dict().items():
        torch.testing.assert_close(new.state_dict()[k], v)
    save_heads(old, tmp_path / "old.safetensors")
    save_heads(new, tmp_path / "new.safetensors")
    assert load_heads(tmp_path / "old.safetensors").other_threshold() is None
    back = load_heads(tmp_path / "new.safetensors")
    assert back.other_threshold().item() == q.item() == 0.3125


def test_nwpu_crops_label_each_class_against_the_rest(tmp_path: Path) -> None:
    from rsvl.data.refgen import split_images
    from rsvl.train.mini_clip_pixels import nwpu_crops

    (tmp_path / "images").mkdir()
    images, anns = [], []
    for i in range(1, 8):
        Image.fromarray(np.full((300, 400, 3), 30 * i, np.uint8)).save(tmp_path / "images" / f"{i}.jpg")
        images.append({"id": i, "file_name": f"{i}.jpg", "height": 300, "width": 400})
        anns.append({"id": i, "image_id": i, "category_id": 1, "bbox": [100, 100, 60, 40], "area": 2400,
                     "segmentation": [[100, 100, 160, 100, 160, 140, 100, 140]], "iscrowd": 0})
    coco = tmp_path / "instances.json"
    coco.write_text(__import__("json").dumps({"images": images, "annotations": anns,
                                              "categories": [{"id": 1, "name": "airplane"}]}))
    bank = make_bank([], aid_readable)
    which = split_images(list(range(1, 8)), 0.15, 0)
    train = nwpu_crops(coco, bank, "train")
    val = nwpu_crops(coco, bank, "val")
    n_train = sum(v == "train" for v in which.values())
    assert len(train) == 4 * n_train and len(val) == 2 * (7 - n_train)
    plane = bank.index("airplane")
    for img, lab in train + val:
        assert img.shape == (CROP, CROP, 3) and lab.shape == (CROP, CROP)
        assert set(np.unique(lab)) <= {OTHER, plane, IGNORE}
    # an object-centred crop holds the whole 60 x 40 plane (at native scale: 2400 pixels)
    assert (train[0][1] == plane).sum() == 2400


def test_dense_cli_trains_and_scores_tiny_data_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from tiny_ucm import tiny_ucm

    from rsvl.cli import main
    from rsvl.data.semseg_split import build_semseg_split
    from rsvl.models.mini.clip import load_mini_clip

    torch.set_num_threads(1)
    ucm = tiny_ucm(tmp_path / "ucm")
    _aid(tmp_path / "aid", n=4)
    rng = np.random.default_rng(0)
    for stem in ("0", "1"):
        folder = tmp_path / "semseg" / "loveda"
        (folder / "images").mkdir(parents=True, exist_ok=True)
        (folder / "labels").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (160, 160, 3), dtype=np.uint8)).save(folder / "images" / f"{stem}.png")
        Image.fromarray(rng.integers(1, 8, (160, 160), dtype=np.uint8)).save(folder / "labels" / f"{stem}.png")
    build_semseg_split(tmp_path / "semseg", tmp_path / "px")
    init = tmp_path / "init" / "heads.safetensors"
    save_heads(load_mini_clip().heads, init)
    out = tmp_path / "run" / "heads.safetensors"
    code = main(["train", "mini-clip-dense", "--heads", str(init), "--ucm", str(ucm), "--aid", str(tmp_path / "aid"),
                 "--pixels", str(tmp_path / "px"), "--out", str(out), "--cache", str(tmp_path / "cache"),
                 "--epochs", "1", "--mosaics", "4", "--val-mosaics", "2", "--threads", "1", "--json"])
    assert code == 0
    doc = json.loads(capsys.readouterr().out)
    assert set(doc["val_crops"]) == {"scenes"} and 0 <= doc["val_crops"]["scenes"]["miou"] <= 100
    lv = doc["semseg_val"]["loveda"]
    assert lv["images"] == 1 and lv["by_protocol"]["rsvl"]["command"].startswith("rsvl eval ovss ")
    heads = load_heads(out)
    assert heads.config.other and heads.other_threshold() is not None
    # the scene-level heads are the ones it started from
    start = load_heads(init)
    for k, v in start.state_dict().items():
        if not k.startswith(("dense_head", "dense_log_scale")):
            torch.testing.assert_close(heads.state_dict()[k], v)
    card = json.loads((out.parent / "card.json").read_text())
    assert card["dense_training"]["command"].startswith("rsvl train mini-clip-dense --heads ")
    assert card["dense_training"]["train_crops"]["loveda"] > 0 and "semseg_val" in card


def test_dense_cli_refuses_bad_inputs_before_any_work(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from rsvl.cli import main
    from rsvl.models.mini.clip import DEFAULT_WEIGHTS

    base = ["train", "mini-clip-dense", "--heads", str(DEFAULT_WEIGHTS), "--ucm", str(tmp_path / "ucm"),
            "--out", str(tmp_path / "h.safetensors"), "--cache", str(tmp_path / "cache")]
    assert main(base + ["--nwpu", str(tmp_path / "nope.json")]) == 2
    assert "NWPU VHR-10 COCO file not found" in capsys.readouterr().err
    assert main(base + ["--pixels", str(tmp_path)]) == 2
    assert "semseg-split" in capsys.readouterr().err
    assert main(["train", "mini-clip-dense", "--heads", str(tmp_path / "none.safetensors"), "--ucm", str(tmp_path),
                 "--out", str(tmp_path / "h.safetensors")]) == 2
    assert "weights not found" in capsys.readouterr().err
    assert not (tmp_path / "h.safetensors").exists() and not (tmp_path / "cache").exists()
