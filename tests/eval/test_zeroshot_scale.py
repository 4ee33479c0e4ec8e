"""The logit scale of zero-shot scores: FarSLIP's protocol fixes 100 x cosine; rsvl's tasks use
the model's own scale and say so.

ScaleModel embeds an image by its (normalised) mean colour and a text naming "red", "green"
or "blue" as the matching unit vector, so the cosine of an image with each class is a
component of its mean colour and the probabilities can be computed by hand. Its logit scale
(7) is far from 100, so the two scales give visibly different probabilities.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rsvl.cli import main
from rsvl.data.classes import ClassSpec
from rsvl.eval import run_zeroshot
from rsvl.models.zeroshot import FARSLIP_LOGIT_SCALE, ZeroShotClassifier

WORDS = ("red", "green", "blue")


class ScaleModel:
    name = "scale-test"
    image_size = 16
    logit_scale = 7.0

    def encode_text(self, texts):
        out = torch.zeros(len(texts), 3)
        for i, t in enumerate(texts):
            out[i, next(k for k, w in enumerate(WORDS) if w in t)] = 1.0
        return out

    def encode_image(self, images):
        x = torch.as_tensor(np.asarray(images)).float().mean(dim=(2, 3))
        return torch.nn.functional.normalize(x, dim=-1)


#: near-grey colours: cosines differ by about 0.01, so 100 x cosine and 7 x cosine differ a lot
COLOURS = {"red": (130, 118, 112), "green": (116, 131, 114), "blue": (112, 119, 129)}


def _folder(root: Path) -> Path:
    for name, rgb in COLOURS.items():
        (root / name).mkdir(parents=True)
        Image.fromarray(np.full((20, 24, 3), rgb, np.uint8)).save(root / name / "a.png")
    return root


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _by_hand(images: np.ndarray, classes: list[str], scale: float) -> np.ndarray:
    """softmax over the classes of scale x cosine, the cosine being a mean-colour component."""
    rgb = np.asarray(images, np.float64).mean(axis=(2, 3))
    cos = rgb / np.linalg.norm(rgb, axis=1, keepdims=True)
    return _softmax(scale * cos[:, [WORDS.index(c) for c in classes]])


@pytest.fixture
def recorded(monkeypatch):
    """Every (images, probabilities) pair the harness's classifier returns."""
    calls: list[tuple[np.ndarray, np.ndarray]] = []
    original = ZeroShotClassifier.scores

    def spy(self, images):
        out = original(self, images)
        calls.append((np.asarray(images), out))
        return out

    monkeypatch.setattr(ZeroShotClassifier, "scores", spy)
    return calls


def test_farslip_protocol_scores_with_100_times_cosine(tmp_path, recorded):
    res = run_zeroshot(ScaleModel(), _folder(tmp_path / "scenes"), templates="farslip")
    classes = res.settings["classes"]
    assert res.settings["logit_scale"] == FARSLIP_LOGIT_SCALE == 100.0
    assert res.settings["logit_scale_source"].startswith("farslip protocol")
    assert res.settings["templates"] == ["a satellite photo of {}.", "a satellite image of {}"]
    images, probs = (np.concatenate(x) for x in zip(*recorded, strict=True))
    assert len(probs) == 3
    np.testing.assert_allclose(probs, _by_hand(images, classes, 100.0), rtol=1e-4, atol=1e-6)
    # the checkpoint's own scale would give other probabilities, the same ranking
    own = _by_hand(images, classes, ScaleModel.logit_scale)
    assert np.abs(probs - own).max() > 0.3
    assert (np.argsort(-probs, axis=1) == np.argsort(-own, axis=1)).all()
    assert res.metrics["top1"] == 1.0


def test_other_templates_use_the_models_scale_and_metrics_do_not_change(tmp_path, recorded):
    root = _folder(tmp_path / "scenes")
    farslip = run_zeroshot(ScaleModel(), root, templates="farslip")
    n = len(recorded)
    own = run_zeroshot(ScaleModel(), root, templates="an image of {}")
    assert own.settings["logit_scale"] == 7.0 and own.settings["logit_scale_source"] == "model"
    images, probs = (np.concatenate(x) for x in zip(*recorded[n:], strict=True))
    np.testing.assert_allclose(probs, _by_hand(images, own.settings["classes"], 7.0), rtol=1e-4, atol=1e-6)
    given = run_zeroshot(ScaleModel(), root, templates="farslip", logit_scale=7.0)
    assert given.settings["logit_scale"] == 7.0 and given.settings["logit_scale_source"] == "given"
    assert farslip.metrics == own.metrics == given.metrics  # the ranking is unchanged


def test_classifier_default_scale_is_the_models():
    specs = [ClassSpec(w, (w,)) for w in WORDS]
    assert ZeroShotClassifier(ScaleModel(), specs, "farslip").logit_scale == 7.0
    assert ZeroShotClassifier(ScaleModel(), specs, "farslip", logit_scale=100.0).logit_scale == 100.0


def test_classify_help_says_which_scale_it_uses(capsys):
    assert main(["classify", "--help"]) == 0
    text = re.sub(r"\s+", " ", capsys.readouterr().out)
    assert "the model's own logit scale x cosine similarity" in text
    assert "also with --templates farslip" in text
    assert "rsvl eval zeroshot --templates farslip) fixes the scale at 100" in text


def test_cli_eval_zeroshot_farslip_records_the_protocol_scale(tmp_path, monkeypatch, capsys):
    from rsvl.cli import eval as eval_cmd

    monkeypatch.setattr(eval_cmd, "_load_model", lambda name, weights, device, *task, **kw: ScaleModel())
    root = _folder(tmp_path / "scenes")
    assert main(["eval", "zeroshot", str(root), "--templates", "farslip", "--json"]) == 0
    settings = json.loads(capsys.readouterr().out)["settings"]
    assert settings["logit_scale"] == 100.0 and settings["logit_scale_source"].startswith("farslip protocol")
    assert main(["eval", "zeroshot", str(root), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["settings"]["logit_scale"] == 7.0
