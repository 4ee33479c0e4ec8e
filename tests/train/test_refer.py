"""Training of referring models (loss, Lightning module, resume) and eval from a model."""

from __future__ import annotations

import importlib
import json
import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

torch.set_num_threads(1)


def make_rrsisd(root: Path, n_images: int = 6, size: int = 32, seed: int = 0) -> list[tuple[int, int, int]]:
    """A tiny REFER-format set: one bright square per image, one sentence per ref; every
    third image is val. Returns (x0, y0, side) per image."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    (root / "rrsisd").mkdir(parents=True)
    imdir = root / "images" / "rrsisd" / "JPEGImages"
    imdir.mkdir(parents=True)
    images, anns, refs, boxes = [], [], [], []
    for i in range(n_images):
        side = int(rng.integers(6, 12))
        x0, y0 = int(rng.integers(0, size - side)), int(rng.integers(0, size - side))
        arr = np.full((size, size, 3), 40, np.uint8)
        arr[y0 : y0 + side, x0 : x0 + side] = 230
        Image.fromarray(arr).save(imdir / f"{i}.png")
        boxes.append((x0, y0, side))
        images.append({"id": i, "file_name": f"{i}.png", "height": size, "width": size})
        poly = [x0, y0, x0 + side, y0, x0 + side, y0 + side, x0, y0 + side]
        anns.append({"id": 100 + i, "image_id": i, "category_id": 1, "segmentation": [poly],
                     "area": side * side, "bbox": [x0, y0, side, side], "iscrowd": 0})
        refs.append({"ref_id": i, "ann_id": 100 + i, "image_id": i, "split": "val" if i % 3 == 2 else "train",
                     "file_name": f"{i}.png", "category_id": 1, "sent_ids": [i],
                     "sentences": [{"raw": "the bright square on the left", "sent": "the bright square on the left",
                                    "tokens": [], "sent_id": i}]})
    (root / "rrsisd" / "instances.json").write_text(json.dumps(
        {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "square"}]}))
    with open(root / "rrsisd" / "refs(unc).p", "wb") as f:
        pickle.dump(refs, f)
    return boxes


# -- loss ----------------------------------------------------------------------------------


def test_weighted_ce_and_dice_match_hand_computation():
    from rsvl.train.refer import dice_loss, refer_loss

    # one sample, 1x2 pixels: logits (bg, fg) per pixel, target [0, 1]
    logits = torch.tensor([[[[2.0, 0.0]], [[0.0, 1.0]]]])  # (1, 2, 1, 2)
    target = torch.tensor([[[0, 1]]])
    p0 = math.exp(2) / (math.exp(2) + 1)  # P(bg) at pixel 0
    p1 = math.exp(1) / (math.exp(1) + 1)  # P(fg) at pixel 1
    # weighted CE (weights 0.9 bg, 1.1 fg): sum w * -log p / sum w
    ce = (0.9 * -math.log(p0) + 1.1 * -math.log(p1)) / (0.9 + 1.1)
    # Dice over batch x class x pixels: one-hot t = [[1,0],[0,1]] (class-major)
    inter = p0 + p1
    dice = 1 - (2 * inter + 1e-6) / (2.0 + 2.0 + 1e-6)  # sum p = 2 pixels, sum t = 2
    assert dice_loss(logits, target).item() == pytest.approx(dice, rel=1e-6)
    assert refer_loss(logits, target).item() == pytest.approx(0.9 * ce + 0.1 * dice, rel=1e-6)


def test_dice_is_zero_for_a_perfect_confident_prediction():
    from rsvl.train.refer import dice_loss

    target = torch.tensor([[[0, 1], [1, 0]]])
    logits = torch.stack([(1 - target) * 50.0, target * 50.0], 1).float()
    assert dice_loss(logits, target).item() == pytest.approx(0.0, abs=1e-6)


def test_flip_expression_swaps_direction_words():
    from rsvl.train.refer_data import flip_expression

    assert flip_expression("the leftmost of the three ships", "h") == "the rightmost of the three ships"
    assert flip_expression("the ship in the upper left", "h") == "the ship in the upper right"
    assert flip_expression("the ship in the upper left", "v") == "the ship in the lower left"
    assert flip_expression("the topmost of the two tanks at the top", "v") == \
        "the bottommost of the two tanks at the bottom"
    assert flip_expression("the bridge next to the harbor", "h") == "the bridge next to the harbor"


def test_poly_schedule():
    from rsvl.train.refer import poly_lambda

    f = poly_lambda(10)
    assert f(0) == 1.0 and f(10) == 0.0 and f(5) == pytest.approx(0.5 ** 0.9)


# -- Lightning -------------------------------------------------------------------------------


def test_tiny_model_loss_decreases_through_the_lightning_module():
    import lightning as L

    from rsvl.models.mini.refer import tiny_mini_refer
    from rsvl.train.refer import ReferLitModule

    model = tiny_mini_refer(32)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 255, (4, 3, 32, 32), dtype=torch.uint8, generator=g)
    masks = torch.zeros(4, 32, 32, dtype=torch.bool)
    masks[:, 8:20, 4:16] = True
    images[:, :, 8:20, 4:16] = 250
    batch = {"image": images, "text": model.tokenize(["the bright square"] * 4), "mask": masks}
    losses: list[float] = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, module, outputs, b, i):
            losses.append(float(outputs["loss"]))

    module = ReferLitModule(model, lr=5e-3, total_steps=1000)
    dl = torch.utils.data.DataLoader([batch] * 12, batch_size=None)
    trainer = L.Trainer(max_steps=12, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[Record()])
    trainer.fit(module, dl)
    assert len(losses) == 12
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3])
    # only the decoder was trained
    assert all(not p.requires_grad for p in model.image_encoder.parameters())


@pytest.mark.parametrize("cached", [True, False])
def test_train_refer_writes_weights_and_resumes(tmp_path, cached):
    from rsvl.models.mini.refer import load_decoder, tiny_mini_refer
    from rsvl.train.refer import ReferTrainConfig, train_refer

    data = tmp_path / "data"
    make_rrsisd(data)
    cfg = ReferTrainConfig(epochs=1, batch_size=2, lr=3e-3, cache_features=cached)
    s1 = train_refer("mini-refer", data, tmp_path / "run", cfg, model=tiny_mini_refer(32),
                     cache_dir=tmp_path / "cache", quiet=True)
    assert s1["cached_features"] is cached and s1["train_samples"] == 4 and s1["val_samples"] == 2
    assert len(s1["history"]) == 1 and "val_mIoU" in s1["best_val"]
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert not any(k.startswith(("model.image_encoder.", "model.text_encoder.")) for k in ckpt["state_dict"])
    load_decoder(s1["weights"])  # the exported best decoder loads
    cfg2 = ReferTrainConfig(epochs=2, batch_size=2, lr=3e-3, cache_features=cached)
    s2 = train_refer("mini-refer", data, tmp_path / "run", cfg2, model=tiny_mini_refer(32, seed=1),
                     cache_dir=tmp_path / "cache", resume=True, quiet=True)
    assert s2["epochs_run"] == 2 and s2["global_steps"] == 2 * s1["global_steps"]
    assert [h["epoch"] for h in s2["history"]] == [0, 1]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["selected_on"].startswith("val_oIoU")


def test_resume_without_checkpoint_and_unknown_model_are_user_errors(tmp_path):
    from rsvl.errors import ResumeError, UnknownModelError
    from rsvl.train.refer import model_to_train, train_refer

    make_rrsisd(tmp_path / "data")
    with pytest.raises(ResumeError):
        train_refer("mini-refer", tmp_path / "data", tmp_path / "run", resume=True, quiet=True)
    with pytest.raises(UnknownModelError):
        model_to_train("resnet-refer")


def test_cli_train_refer_reports_bad_input(tmp_path, capsys):
    from rsvl.cli import main

    assert main(["train", "refer", "--model", "nope", "--data", str(tmp_path), "--out", str(tmp_path / "o")]) != 0
    assert main(["train", "refer", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) != 0
    err = capsys.readouterr().err
    assert "nope" in err and "missing" in err


# -- eval from a model -----------------------------------------------------------------------


class LeftHalfModel(torch.nn.Module):
    """Predicts the left half of every image as the referred object."""

    name = "left-half"
    image_size = 16
    mean = (0.5, 0.5, 0.5)
    std = (0.5, 0.5, 0.5)

    def tokenize(self, expressions):
        return {"input_ids": torch.zeros(len(expressions), 4, dtype=torch.long)}

    def forward(self, images, text):
        b, _, h, w = images.shape
        logits = torch.zeros(b, 2, h, w)
        logits[:, 1] = -1.0
        logits[:, 1, :, : w // 2] = 1.0  # symmetric, so bilinear upsampling splits at the middle
        return logits


def test_eval_refer_model_matches_hand_computed_metrics(tmp_path):
    from rsvl.eval import run_refer_model

    boxes = make_rrsisd(tmp_path / "data", n_images=6, size=32)
    res = run_refer_model(LeftHalfModel(), tmp_path / "data", split="val", size=None)
    # at original size (32): prediction = columns 0..15
    ious, cum_i, cum_u = [], 0, 0
    for i, (x0, y0, side) in enumerate(boxes):
        if i % 3 != 2:
            continue
        gt = np.zeros((32, 32), bool)
        gt[y0 : y0 + side, x0 : x0 + side] = True
        pred = np.zeros((32, 32), bool)
        pred[:, :16] = True
        inter, union = (gt & pred).sum(), (gt | pred).sum()
        ious.append(inter / union)
        cum_i += inter
        cum_u += union
    m = res.metrics
    assert m["n"] == 2
    assert m["mIoU"] == pytest.approx(np.mean(ious))
    assert m["oIoU"] == pytest.approx(cum_i / cum_u)
    assert m["Pr@0.5"] == pytest.approx(np.mean(np.array(ious) >= 0.5))
    assert res.settings["split"] == "val" and res.settings["size"] is None
    assert res.settings["image_size"] == 16 and res.settings["n_samples"] == 2
    # 480 protocol: GT NEAREST-resized to 480, prediction = left 240 columns
    res480 = run_refer_model(LeftHalfModel(), tmp_path / "data", split="val", size=480)
    assert res480.settings["size"] == 480
    assert res480.metrics["mIoU"] == pytest.approx(np.mean(ious), abs=0.02)


def test_eval_refer_cli_modes(tmp_path, capsys, monkeypatch):
    from rsvl.cli import eval as eval_cmd
    from rsvl.cli import main

    make_rrsisd(tmp_path / "data")
    monkeypatch.setattr(eval_cmd, "_load_model", lambda name, weights, device, *task: LeftHalfModel())
    out = tmp_path / "res.json"
    assert main(["eval", "refer", str(tmp_path / "data"), "--model", "left-half", "--size", "0",
                 "--json", "-o", str(out)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["metrics"]["n"] == 2 and doc["settings"]["size"] is None
    assert json.loads(out.read_text())["metrics"]["mIoU"] == doc["metrics"]["mIoU"]
    assert main(["eval", "refer", str(tmp_path / "data")]) != 0  # neither --model nor GT folder


def test_fianet_starts_from_swin_and_bert_not_random(monkeypatch, tmp_path):
    from rsvl.errors import WeightsNotFoundError
    from rsvl.models.fianet.config import FianetConfig

    fianet_build = importlib.import_module("rsvl.models.fianet.build")  # the module, not build()
    from rsvl.train.refer import model_to_train

    with pytest.raises(WeightsNotFoundError, match="Swin-B") as e:
        model_to_train("fianet")
    assert "--swin" in e.value.hint and "--bert" in e.value.hint
    seen = {}

    def fake_init(config, swin, bert, vocab=None):
        seen.update(swin=swin, bert=bert, vocab=vocab, tmem=config.num_tmem)
        return torch.nn.Linear(1, 1)

    monkeypatch.setattr(fianet_build, "init_fianet_pretrained", fake_init)
    model_to_train("fianet", swin=tmp_path / "swin.pth", bert=tmp_path / "bert", vocab=tmp_path / "vocab.txt")
    assert seen == {"swin": tmp_path / "swin.pth", "bert": tmp_path / "bert", "vocab": tmp_path / "vocab.txt",
                    "tmem": FianetConfig().num_tmem}


def test_resume_from_a_pickled_payload_is_refused_without_running_it(tmp_path):
    import os

    from rsvl.errors import CheckpointMismatchError
    from rsvl.models.mini.refer import tiny_mini_refer
    from rsvl.train.refer import ReferTrainConfig, train_refer

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    make_rrsisd(tmp_path / "data")
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    torch.save({"state_dict": {}, "loops": Payload()}, tmp_path / "run" / "checkpoints" / "last.ckpt")
    cfg = ReferTrainConfig(epochs=1, batch_size=2, cache_features=False)
    with pytest.raises(CheckpointMismatchError, match="rsvl refuses to unpickle") as err:
        train_refer("mini-refer", tmp_path / "data", tmp_path / "run", cfg, model=tiny_mini_refer(32),
                    cache_dir=tmp_path / "cache", resume=True, quiet=True)
    assert not marker.exists() and "weights_only=False" not in str(err.value)


def test_eval_refer_model_reports_by_expression_type(tmp_path):
    """Generated data records each sentence's template: mIoU per type, from the same samples."""
    import pickle

    from rsvl.eval import run_refer_model

    make_rrsisd(tmp_path / "data", n_images=6, size=32)
    refs_path = tmp_path / "data" / "rrsisd" / "refs(unc).p"
    refs = pickle.loads(refs_path.read_bytes())
    kinds = {}
    for k, r in enumerate(refs):
        for s in r["sentences"]:
            s["template"] = ("class", "position")[k % 2]
            kinds[f"{r['ref_id']}:{s['sent_id']}"] = s["template"]
    refs_path.write_bytes(pickle.dumps(refs, protocol=4))
    res = run_refer_model(LeftHalfModel(), tmp_path / "data", split="val", size=None)
    by_type = res.metrics["by_type"]
    assert set(by_type) <= {"class", "position"} and sum(t["n"] for t in by_type.values()) == res.metrics["n"]
    for kind, t in by_type.items():
        ious = [v for key, v in res.metrics["per_sample"].items() if kinds[key] == kind]
        assert t["n"] == len(ious) and t["mIoU"] == pytest.approx(np.mean(ious))
    # data without types (human-written, RefSegRS...) reports none
    refs_plain = [{**r, "sentences": [{k: v for k, v in s.items() if k != "template"} for s in r["sentences"]]}
                  for r in refs]
    refs_path.write_bytes(pickle.dumps(refs_plain, protocol=4))
    assert run_refer_model(LeftHalfModel(), tmp_path / "data", split="val", size=None).metrics["by_type"] == {}
