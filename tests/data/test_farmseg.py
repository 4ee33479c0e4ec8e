"""FIT layout reader, FSVLM's templates, FSVLM's mask losses, and `rsvl data farmland` on the
real shared data."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from conftest import shared_data
from PIL import Image

from rsvl.data.farmseg import ANSWER_TEMPLATES, QUESTION_TEMPLATES, farmland_question, read_split
from rsvl.errors import DatasetError, InputNotFoundError, OutputError
from rsvl.models.lisa.loss import bce_loss, dice_loss, seg_losses


def _fit(root, split="test", n=2, questions=None):
    for sub in ("img", "lbl", "json"):
        (root / split / sub).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(np.full((8, 8, 3), i * 40, np.uint8)).save(root / split / "img" / f"t{i}.png")
        lbl = np.zeros((8, 8), np.uint8)
        lbl[:4] = 255 if i else 3  # any non-zero value is the class
        Image.fromarray(lbl).save(root / split / "lbl" / f"t{i}.png")
        meta = {"img_description_eg": f"scene {i}."}
        if questions and questions[i]:
            meta["question"] = questions[i]
        (root / split / "json" / f"t{i}.json").write_text(json.dumps(meta))
    return root


def test_reader_labels_descriptions_and_question_override(tmp_path):
    root = _fit(tmp_path, questions=[None, "Please segment the ships."])
    samples = read_split(root, "test")
    assert [s.name for s in samples] == ["t0", "t1"]
    assert samples[0].read_label().sum() == 32 and set(np.unique(samples[1].read_label())) == {0, 1}
    assert samples[0].request() == "scene 0. Can you segment the farmland in this image?"
    assert samples[1].request() == "Please segment the ships."
    (root / "test" / "json" / "t0.json").unlink()  # no json: no description
    assert read_split(root, "test")[0].request() == "Can you segment the farmland in this image?"


def test_reader_errors(tmp_path):
    with pytest.raises(InputNotFoundError, match="rsvl data farmland"):
        read_split(tmp_path, "test")
    with pytest.raises(DatasetError, match="unknown split"):
        read_split(tmp_path, "dev")
    root = _fit(tmp_path)
    (root / "test" / "lbl" / "t1.png").unlink()
    with pytest.raises(DatasetError, match="no label for"):
        read_split(root, "test")
    (root / "test" / "json" / "t0.json").write_text("[1, 2")
    (root / "test" / "lbl" / "t1.png").write_bytes((root / "test" / "lbl" / "t0.png").read_bytes())
    with pytest.raises(DatasetError, match="not JSON"):
        read_split(root, "test")


def test_templates_are_fsvlms():
    assert len(QUESTION_TEMPLATES) == 4 and all("{desc}" in t and "farmland" in t for t in QUESTION_TEMPLATES)
    assert len(ANSWER_TEMPLATES) == 5 and all("[SEG]" in a for a in ANSWER_TEMPLATES)
    picked = {farmland_question("A.", random.Random(s)) for s in range(40)}
    assert len(picked) == 4 and all(q.startswith("A. ") for q in picked)


def test_losses_match_a_direct_computation():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 7, generator=g) * 3
    targets = (torch.rand(3, 5, 7, generator=g) > 0.6).float()
    p = logits.sigmoid()
    bce = -(targets * torch.log(p) + (1 - targets) * torch.log(1 - p)).mean(dim=(1, 2)).sum() / 3
    num = 2 * (p / 1000 * targets).sum(dim=(1, 2))
    den = (p / 1000).sum(dim=(1, 2)) + (targets / 1000).sum(dim=(1, 2))
    dice = (1 - (num + 1e-6) / (den + 1e-6)).sum() / 3
    torch.testing.assert_close(bce_loss(logits, targets), bce, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dice_loss(logits, targets), dice, atol=1e-5, rtol=1e-5)
    out = seg_losses(logits, targets)
    torch.testing.assert_close(out["mask"], 2 * bce + 0.5 * dice, atol=1e-5, rtol=1e-5)
    perfect = seg_losses((targets * 2 - 1) * 50, targets)
    assert float(perfect["dice"]) < 1e-3 and float(perfect["bce"]) < 1e-6
    with pytest.raises(ValueError, match="shape"):
        seg_losses(logits, targets[:, :4])


@pytest.mark.realdata
def test_build_farmland_data_from_the_shared_data(tmp_path):
    from rsvl.data.farmland import build_farmland_data

    ucm = shared_data("ucm")
    loveda = shared_data("semseg", "loveda")
    whu = shared_data("semseg", "whu_building")
    out = tmp_path / "farm"
    stats = build_farmland_data(out, ucm=ucm, loveda=loveda, whu=whu, aid=shared_data("aid"),
                                train_mosaics=6, val_mosaics=3, size=96)
    assert stats["samples"] == {"train": 6 + 2, "val": 3 + 2, "test": 8}
    train = read_split(out, "train")
    mosaics = [s for s in train if s.source == "ucm-mosaic"]
    assert len(mosaics) == 6 and all(s.question is None for s in mosaics)
    assert all(s.request().endswith("?") or s.request().endswith(".") for s in mosaics)
    whu_s = [s for s in train if s.source == "whu"]
    assert whu_s and whu_s[0].request() == "Please segment the buildings."
    test = read_split(out, "test")
    # LoveDA: farmland = agriculture (7), read back from the written labels
    lab = np.asarray(Image.open(loveda / "labels" / "0.png"))[:512, :512]
    assert np.array_equal(test[0].read_label(), (lab == 7).astype(np.uint8))
    # same seed, same data
    again = build_farmland_data(tmp_path / "again", ucm=ucm, aid=shared_data("aid"), train_mosaics=6, val_mosaics=3,
                                size=96)
    for s in mosaics:
        a = np.asarray(Image.open(s.image))
        b = np.asarray(Image.open(tmp_path / "again" / "train" / "img" / s.image.name))
        assert np.array_equal(a, b)
    assert again["samples"] == {"train": 6, "val": 3}
    with pytest.raises(OutputError, match="exists"):
        build_farmland_data(out, ucm=ucm, train_mosaics=2, val_mosaics=2, size=96)
