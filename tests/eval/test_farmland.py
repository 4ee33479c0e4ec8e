"""rsvl eval farmland: FSVLM's Evaluator(2) and LISA's gIoU / cIoU, the request protocol,
per-source numbers, the CLIP class-probability baseline and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from rsvl.cli import app, main
from rsvl.data.farmseg import TEST_QUESTION
from rsvl.errors import DatasetError, PromptError
from rsvl.eval.farmland import ClassProbabilityBaseline, run_farmland
from rsvl.metrics import BinarySegAccumulator
from rsvl.models.segchat import SegAnswer


def _evaluator_reference(pairs):
    """FSVLM's Evaluator(2), written from its definition: a confusion matrix by bincount
    (rows = GT, columns = prediction) and its formulas; LISA's gIoU / cIoU."""
    cm = np.zeros((2, 2))
    ious, si, su = [], 0, 0
    for p, g in pairs:
        cm += np.bincount(2 * g.astype(int).ravel() + p.astype(int).ravel(), minlength=4).reshape(2, 2)
        i, u = (p & g).sum(), (p | g).sum()
        si, su = si + i, su + u
        ious.append(i / u if u else 1.0)
    d = np.diag(cm)
    iou = d / (cm.sum(0) + cm.sum(1) - d)
    freq = cm.sum(1) / cm.sum()
    return {"acc": d.sum() / cm.sum(), "acc_class": np.nanmean(d / cm.sum(1)), "miou": np.nanmean(iou),
            "fwiou": (freq[freq > 0] * iou[freq > 0]).sum(), "dice": np.nanmean(2 * d / (cm.sum(0) + cm.sum(1))),
            "precision": np.nanmean(d / cm.sum(0)), "giou": np.mean(ious), "ciou": si / su}


def test_binary_metrics_match_the_evaluator_definitions():
    rng = np.random.default_rng(0)
    pairs = [(rng.random((17, 23)) > t, rng.random((17, 23)) > 0.6) for t in (0.3, 0.5, 0.9)]
    pairs.append((np.zeros((17, 23), bool), np.zeros((17, 23), bool)))  # empty union: gIoU counts it as 1
    acc = BinarySegAccumulator()
    for p, g in pairs:
        acc.update(p, g)
    got, ref = acc.compute(), _evaluator_reference(pairs)
    for k, v in ref.items():
        assert got[k] == pytest.approx(v, abs=1e-12), k
    assert got["n"] == 4
    # merging two halves gives the same numbers as one pass
    a, b = BinarySegAccumulator(), BinarySegAccumulator()
    for p, g in pairs[:2]:
        a.update(p, g)
    for p, g in pairs[2:]:
        b.update(p, g)
    assert a.merge(b).compute() == pytest.approx(got, nan_ok=True)


def test_precision_is_colsum_based_and_a_blank_prediction_has_zero_target_iou():
    g = np.zeros((4, 4), bool)
    g[:2] = True
    p = np.zeros((4, 4), bool)
    p[:1] = True  # half the target, nothing outside it
    acc = BinarySegAccumulator()
    acc.update(p, g)
    r = acc.compute()
    assert r["precision"] == pytest.approx((8 / 12 + 4 / 4) / 2)  # background 8 of 12 predicted right; target 4/4
    assert r["acc_class"] == pytest.approx((8 / 8 + 4 / 8) / 2)  # recall
    assert r["iou_target"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="differ in shape"):
        acc.update(p, g[:3])


def _fit(root, split="test", n=3, questions=None, sources=None, size=32):
    """A FIT-layout split: image i has a bright square; its label marks the square."""
    for d in ("img", "lbl", "json"):
        (root / split / d).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img = np.full((size, size, 3), 40, np.uint8)
        lbl = np.zeros((size, size), np.uint8)
        img[4 + i : 20 + i, 6:22] = 230
        lbl[4 + i : 20 + i, 6:22] = 255
        Image.fromarray(img).save(root / split / "img" / f"t{i}.png")
        Image.fromarray(lbl).save(root / split / "lbl" / f"t{i}.png")
        meta = {"img_description_eg": f"Scene {i} with fields."}
        if questions and questions[i]:
            meta["question"] = questions[i]
        if sources:
            meta["source"] = sources[i]
        (root / split / "json" / f"t{i}.json").write_text(json.dumps(meta))
    return root


class Bright:
    """A fake language-guided model: the bright pixels, at half the input's size (so the
    evaluator has to resize); declines requests without 'segment'."""

    name = "bright"

    def __init__(self):
        self.prompts = []

    def seg_chat(self, image, prompt, *, max_new_tokens=32, force_seg=False):
        self.prompts.append(prompt)
        if not force_seg and "segment" not in prompt.lower():
            return SegAnswer(text="No.")
        small = image[::2, ::2].mean(axis=2).astype(np.float32)
        return SegAnswer(text="Sure, [SEG].", masks=[(small - 127.5) / 10])


def test_run_scores_the_test_split_with_fsvlms_request_and_per_source(tmp_path):
    data = _fit(tmp_path / "fit", questions=[None, "Please segment the storage tanks.", None],
                sources=["farmland", "nwpu", "farmland"])
    model = Bright()
    res = run_farmland(model, data)
    m = res.metrics
    assert model.prompts == [TEST_QUESTION, "Please segment the storage tanks.", TEST_QUESTION]
    assert m["n"] == 3 and m["seg_rate"] == 1.0
    assert m["giou"] > 0.85 and m["miou"] > 0.85  # half-size logits resized back: edges only
    assert set(m["per_source"]) == {"farmland", "nwpu"}
    assert m["per_source"]["farmland"]["n"] == 2
    assert res.settings["split"] == "test" and res.settings["n_samples"] == 3
    json.dumps(res.to_dict(), allow_nan=False)


def test_description_mode_and_an_answer_without_seg_predicts_nothing(tmp_path):
    data = _fit(tmp_path / "fit", n=2)
    model = Bright()
    model.seg_chat = lambda image, prompt, **kw: (model.prompts.append(prompt), SegAnswer(text="It is a field."))[1]
    res = run_farmland(model, data, question="description")
    assert model.prompts[0].startswith("Scene 0 with fields.") and "farmland" in model.prompts[0]
    assert res.metrics["seg_rate"] == 0.0
    assert res.metrics["giou"] == 0.0 and res.metrics["iou_target"] == 0.0
    assert res.metrics["per_sample"]["t0"]["answer"] == "It is a field."


def test_errors_name_the_fix(tmp_path):
    with pytest.raises(Exception, match="not a FarmSeg-VL/FIT folder"):
        run_farmland(Bright(), tmp_path)
    data = _fit(tmp_path / "fit", n=1)
    with pytest.raises(PromptError, match="not a language-guided"):
        run_farmland(object(), data)
    with pytest.raises(PromptError, match="question mode"):
        run_farmland(Bright(), data, question="free")
    (data / "test" / "img" / "t0.png").write_bytes(b"not a png")
    with pytest.raises(DatasetError, match="cannot read image"):
        run_farmland(Bright(), data)


class ColourClip:
    """A fake open-vocabulary CLIP: 2-d features (brightness, darkness) per 4x4 cell; text
    'farmland' points at brightness, every other class at darkness."""

    name = "colour-clip"
    logit_scale = 10.0

    def encode_text(self, texts):
        return torch.tensor([[1.0, 0.0] if "farmland" in t else [0.0, 1.0] for t in texts])

    def dense_features(self, images):
        x = torch.as_tensor(np.asarray(images)).float().mean(1, keepdim=True) / 255
        x = torch.nn.functional.avg_pool2d(x, 4)
        f = torch.cat([x, 1 - x], 1)
        return f / f.norm(dim=1, keepdim=True)


def test_clip_baseline_thresholds_the_target_probability(tmp_path):
    data = _fit(tmp_path / "fit", n=2)
    base = ClassProbabilityBaseline(ColourClip(), others=("forest", "water"), threshold=0.5)
    res = run_farmland(base, data, model_name=base.name)
    assert res.metrics["giou"] > 0.8
    with pytest.raises(PromptError, match="cannot tell"):
        base.seg_chat(np.zeros((8, 8, 3), np.uint8), "hello")
    with pytest.raises(PromptError, match="threshold"):
        ClassProbabilityBaseline(ColourClip(), threshold=1.0)


def test_cli_runs_the_mini_clip_baseline_and_writes_json(tmp_path, capsys):
    data = _fit(tmp_path / "fit", n=2, size=64)
    out = tmp_path / "res.json"
    r = CliRunner().invoke(app, ["eval", "farmland", str(data), "--model", "mini-clip", "--json", "--out", str(out)])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["task"] == "farmland"
    assert {"miou", "giou", "ciou", "acc", "precision"} <= set(doc["metrics"])
    assert doc["settings"]["model"].startswith("mini-clip (class probability")
    assert json.loads(out.read_text())["metrics"]["n"] == 2
    assert main(["eval", "farmland", str(tmp_path / "nowhere"), "--model", "mini-clip"]) != 0
    assert "FIT folder" in capsys.readouterr().err
