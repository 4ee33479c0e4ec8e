"""The evaluation harness end to end, with a model whose answers are known.

ColourModel embeds an image by its mean colour and the words "red", "green" and "blue" as
the matching unit vectors, so every metric below can be computed by hand: the tests check
the harness's plumbing (layouts, protocols, settings, JSON), not a model's quality.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from PIL import Image
from typer.testing import CliRunner

from rsvl import eval as harness
from rsvl.data.classes import parse_class_list
from rsvl.errors import DatasetError
from rsvl.eval import (
    ovss_protocol,
    prompt_name,
    rescale_size,
    run_coco,
    run_ovss,
    run_refer,
    run_retrieval,
    run_zeroshot,
    sliding_windows,
    subset_indices,
)

SHARED = Path(__file__).parents[2] / "../shared/data"
WORDS = ("red", "green", "blue")


class ColourModel:
    name = "colour-test"
    image_size = 16
    logit_scale = 100.0
    default_templates = ("{}",)

    def encode_text(self, texts):
        out = torch.zeros(len(texts), 3)
        for i, t in enumerate(texts):
            hits = [k for k, w in enumerate(WORDS) if w in t.lower()]
            out[i, hits[0] if hits else sum(map(ord, t)) % 3] = 1.0
        return out

    def encode_image(self, images):
        x = torch.as_tensor(np.asarray(images)).float().mean(dim=(2, 3)) + 1e-3
        return torch.nn.functional.normalize(x, dim=-1)

    def dense_features(self, images):
        x = torch.as_tensor(np.asarray(images)).float()
        return torch.nn.functional.normalize(torch.nn.functional.avg_pool2d(x, 4) + 1e-3, dim=1)


RED, GREEN, BLUE = (200, 0, 0), (0, 200, 50), (0, 50, 200)


def solid(path: Path, rgb, size=(20, 24)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((*size, 3), rgb, np.uint8)).save(path)
    return path


# -- zero-shot ---------------------------------------------------------------------------
# three images: a red one labelled red, a green one labelled green, a blue one labelled red
# -> 2 of 3 right; per class red 1/2, green 1/1, blue no sample; mean per class 0.75.


def _check_zeroshot(res):
    m = res.metrics
    assert m["top1"] == pytest.approx(2 / 3)
    assert m["top5"] == 1.0
    assert m["correct"] == 2
    assert m["per_class"]["red"] == 0.5 and m["per_class"]["green"] == 1.0
    assert np.isnan(m["per_class"]["blue"])
    assert m["mean_per_class"] == pytest.approx(0.75)
    d = res.to_dict()
    assert d["metrics"]["per_class"]["blue"] is None  # JSON has no NaN
    json.dumps(d, allow_nan=False)
    s = d["settings"]
    for key in ("model", "weights", "weights_sha256", "templates", "classes", "prompt_names", "split",
                "rsvl_version", "dataset", "n_samples", "seconds", "image_size"):
        assert key in s
    assert s["n_samples"] == 3 and s["model"] == "colour-test" and s["templates"] == ["{}"]


def make_folder(root: Path) -> Path:
    solid(root / "red" / "a.png", RED)
    solid(root / "red" / "b.png", BLUE)
    solid(root / "green" / "c.png", GREEN)
    (root / "blue").mkdir()
    return root


def test_zeroshot_folder_layout(tmp_path):
    res = run_zeroshot(ColourModel(), make_folder(tmp_path / "scenes"), split="val")
    _check_zeroshot(res)
    assert res.settings["layout"] == "folder" and res.settings["split"] is None
    assert res.settings["classes"] == ["blue", "green", "red"]


def test_zeroshot_csv_layout(tmp_path):
    make_folder(tmp_path / "imgs")
    (tmp_path / "classnames.txt").write_text("red\ngreen\nblue\n")
    with open(tmp_path / "test.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["filepath", "label"])
        w.writerows([["imgs/red/a.png", 0], ["imgs/red/b.png", "red"], ["imgs/green/c.png", 1]])
    res = run_zeroshot(ColourModel(), tmp_path / "test.csv")
    _check_zeroshot(res)
    assert res.settings["layout"] == "csv" and res.settings["classes"] == ["red", "green", "blue"]


def make_ucm(root: Path) -> Path:
    make_folder(root / "images")
    solid(root / "images" / "green" / "train.png", RED)
    samples = [
        {"image": "images/red/a.png", "label": "red", "split": "val", "captions": ["red"]},
        {"image": "images/green/c.png", "label": "green", "split": "val", "captions": ["blue"]},
        {"image": "images/red/b.png", "label": "red", "split": "val", "captions": ["green"]},
        {"image": "images/green/train.png", "label": "green", "split": "train", "captions": ["x"]},
    ]
    (root / "ucm.json").write_text(json.dumps({"classes": ["red", "green", "blue"], "samples": samples}))
    return root / "ucm.json"


def test_zeroshot_ucm_json_layout_and_split(tmp_path):
    res = run_zeroshot(ColourModel(), make_ucm(tmp_path / "ucm"), split="val")
    _check_zeroshot(res)
    assert res.settings["split"] == "val" and res.settings["n_dataset"] == 3
    with pytest.raises(DatasetError, match="split"):
        run_zeroshot(ColourModel(), tmp_path / "ucm", split="test")


def test_prompt_names_are_readable():
    assert prompt_name("baseballdiamond") == "baseball diamond"
    assert prompt_name("storagetanks") == "storage tanks"
    assert prompt_name("BaseballField") == "baseball field"
    assert prompt_name("basketball_court") == "basketball court"
    assert prompt_name("river") == "river"


def test_limit_is_evenly_spaced_and_deterministic():
    assert subset_indices(10, None).tolist() == list(range(10))
    assert subset_indices(10, 3).tolist() == [0, 4, 9]  # linspace(0, 9, 3) = 0, 4.5, 9 -> round half even
    assert subset_indices(3, 10).tolist() == [0, 1, 2]


# -- retrieval ---------------------------------------------------------------------------
# images R, G, B with captions "red", "blue", "green": R finds its text first; G ranks
# "green" then "blue" (rank 2); B ranks "blue" then "green". Same the other way round.
# R@1 = 1/3, R@5 = R@10 = 1 in both directions; mean recall = 7/9.


def test_retrieval_ucm_json(tmp_path):
    res = run_retrieval(ColourModel(), make_ucm(tmp_path / "ucm"))
    m = res.metrics
    for d in ("img2text", "text2img"):
        assert m[f"{d}_R@1"] == pytest.approx(1 / 3)
        assert m[f"{d}_R@5"] == 1.0 and m[f"{d}_R@10"] == 1.0
    assert m["mean_recall"] == pytest.approx(7 / 9)
    assert m["n_images"] == 3 and m["n_texts"] == 3
    assert res.settings["split"] == "val" and res.settings["dedup_texts"] is True


def test_retrieval_karpathy_and_csv(tmp_path):
    make_ucm(tmp_path)
    caps = [("red/a.png", "red"), ("green/c.png", "blue"), ("red/b.png", "green")]
    kp = {"images": [{"filename": f, "split": "test", "sentences": [{"raw": c}]} for f, c in caps]}
    (tmp_path / "dataset_toy.json").write_text(json.dumps(kp))
    res = run_retrieval(ColourModel(), tmp_path / "dataset_toy.json")
    assert res.settings["layout"] == "karpathy" and res.settings["split"] == "test"
    assert res.metrics["mean_recall"] == pytest.approx(7 / 9)
    with open(tmp_path / "toy_img_txt_pairs_test.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["filepath", "title"])
        w.writerows([[f"images/{p}", c] for p, c in caps])
    res = run_retrieval(ColourModel(), tmp_path / "toy_img_txt_pairs_test.csv", caption_prefix="a satellite image. ")
    assert res.settings["layout"] == "csv" and res.settings["caption_prefix"] == "a satellite image. "
    assert res.metrics["mean_recall"] == pytest.approx(7 / 9)


# -- OVSS --------------------------------------------------------------------------------


def test_windows_and_resize_match_mmseg():
    # mmseg slide_inference: h_grids = max(h - crop + stride - 1, 0) // stride + 1, clamped
    assert sliding_windows(300, 224, 224, 112) == [(0, 224, 0, 224), (76, 300, 0, 224)]
    assert sliding_windows(100, 100, 224, 112) == [(0, 100, 0, 100)]
    assert len(sliding_windows(448, 448, 224, 112)) == 9
    assert rescale_size(1024, 1024, (448, 448)) == (448, 448)
    assert rescale_size(512, 1024, (448, 448)) == (224, 448)  # long side fits
    assert rescale_size(512, 1024, (2048, 448)) == (448, 896)  # short side 448
    assert rescale_size(512, 1024, None) == (512, 1024)


def seg_scene() -> tuple[np.ndarray, np.ndarray]:
    """Image: left half red, right half green. Label: left red (0); right top green (1),
    right bottom blue (2), one ignored row (255)."""
    img = np.zeros((32, 48, 3), np.uint8)
    img[:, :24] = RED
    img[:, 24:] = GREEN
    lab = np.zeros((32, 48), np.uint8)
    lab[:16, 24:] = 1
    lab[16:, 24:] = 2
    lab[0] = 255
    return img, lab


def write_seg(root: Path, shift: bool = False) -> None:
    img, lab = seg_scene()
    if shift:  # mmseg reduce_zero_label encoding: 0 ignored, classes 1..C
        lab = np.where(lab == 255, 0, lab + 1).astype(np.uint8)
    for i in range(2):
        (root / "images").mkdir(parents=True, exist_ok=True)
        (root / "labels").mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(root / "images" / f"{i}.png")
        Image.fromarray(lab).save(root / "labels" / f"{i}.png")


# Prediction: red left, green right. Valid pixels per image: rows 1..31.
# red: I = 31*24, U = 31*24 -> 1. green: I = 15*24 (rows 1..15), U = 31*24 -> 15/31.
# blue: I = 0 -> 0. mIoU = (1 + 15/31 + 0) / 3 (background classes counted).
EXPECTED_GREEN = 15 / 31
EXPECTED_MIOU = (1 + 15 / 31) / 3


@pytest.mark.parametrize("shift", [False, True])
def test_ovss_simple_layout(tmp_path, shift):
    write_seg(tmp_path / "seg", shift=shift)
    proto = ovss_protocol("farslip", resize=(0, 0), crop=16, stride=8, templates="none")
    res = run_ovss(ColourModel(), tmp_path / "seg", parse_class_list("red, green|lime, blue"),
                   protocol=proto, reduce_zero_label=shift)
    m = res.metrics
    assert m["IoU"]["red"] == pytest.approx(1.0)
    assert m["IoU"]["green"] == pytest.approx(EXPECTED_GREEN)
    assert m["IoU"]["blue"] == 0.0
    assert m["mIoU"] == pytest.approx(EXPECTED_MIOU)
    assert m["pixels"] == 2 * 31 * 48
    s = res.to_dict()["settings"]
    assert s["protocol"] == "farslip" and s["crop"] == 16 and s["stride"] == 8 and s["resize"] is None
    assert s["reduce_zero_label"] is shift and s["ignore_index"] == 255 and s["background_counted"]
    assert s["prompts"] == [["red"], ["green", "lime"], ["blue"]] and s["logit_scale"] == 50.0


def test_ovss_learned_other_joins_the_background_class(tmp_path):
    class OtherModel(ColourModel):
        def other_threshold(self):
            return 0.99  # above the cosine of the green-blue mix (0, 200, 50) with "green": all "other"

    write_seg(tmp_path / "seg")
    proto = ovss_protocol("farslip", resize=(0, 0), crop=16, stride=8, templates="none")
    # "blue|background": the other channel is a synonym of blue; red (200, 0, 0) stays red
    res = run_ovss(OtherModel(), tmp_path / "seg", parse_class_list("red, green, blue|background"), protocol=proto)
    assert res.settings["learned_other"] == "blue"
    # (the 4 px patches at the red/green boundary are mixes: below 0.99 too)
    assert res.metrics["IoU"]["red"] > 0.9 and res.metrics["IoU"]["green"] == 0.0
    assert 0.45 < res.metrics["IoU"]["blue"] < 16 / 31  # all of the right half predicted blue
    # --no-other, or no background class to join: scored as before
    for classes, other in (("red, green, blue|background", False), ("red, green, blue", None)):
        res = run_ovss(OtherModel(), tmp_path / "seg", parse_class_list(classes), protocol=proto, other=other)
        assert res.settings["learned_other"] is None and res.metrics["mIoU"] == pytest.approx(EXPECTED_MIOU)


def test_ovss_resize_and_threshold(tmp_path):
    write_seg(tmp_path / "seg")
    classes = parse_class_list("red, green, blue")
    # resized to 64x96 (long side 96), windows 32/16: labels stay at 32x48, same answer
    proto = ovss_protocol("farslip", resize=(96, 96), crop=32, stride=16, templates="none")
    res = run_ovss(ColourModel(), tmp_path / "seg", classes, protocol=proto)
    assert res.metrics["mIoU"] == pytest.approx(EXPECTED_MIOU)
    # a threshold nothing reaches at scale 1 sends every pixel to bg_idx 2 (blue)
    proto = ovss_protocol("segearth", resize=(0, 0), crop=16, stride=8, templates="none",
                          logit_scale=1.0, prob_thd=0.99, bg_idx=2)
    res = run_ovss(ColourModel(), tmp_path / "seg", classes, protocol=proto)
    assert res.metrics["IoU"]["blue"] == pytest.approx(16 * 24 / (31 * 48))
    assert res.settings["prob_thd"] == 0.99 and res.settings["bg_idx"] == 2
    # ColourModel has no CLS embedding: the protocol's -0.3 is not applied, and says so
    assert res.settings["cls_lambda"] == 0.0


def test_segearth_protocol_applies_the_cls_correction(tmp_path):
    from rsvl.tasks.segment import DensePredictor

    class ClsModel(ColourModel):
        cls_calls = 0

        def dense_features(self, images, return_cls=False):
            ClsModel.cls_calls += bool(return_cls)
            f = super().dense_features(images)
            cls = torch.nn.functional.normalize(torch.as_tensor(images).float().mean(dim=(2, 3)) + 1e-3, dim=-1)
            return (f, cls) if return_cls else f

    write_seg(tmp_path / "seg")
    classes = parse_class_list("red, green, blue")
    proto = ovss_protocol("segearth", resize=(0, 0), crop=48, stride=48, templates="none")
    assert proto.cls_lambda == -0.3
    res = run_ovss(ClsModel(), tmp_path / "seg", classes, protocol=proto)
    assert res.settings["cls_lambda"] == -0.3 and ClsModel.cls_calls == 2  # one window per image
    # the harness uses the predictor's corrected logits: same argmax as computing them here
    ds_img = np.asarray(Image.open(next((tmp_path / "seg" / "images").iterdir())).convert("RGB"))
    pred = DensePredictor(ClsModel(), classes, "none", logit_scale=50.0, cls_lambda=-0.3)
    from rsvl.eval import ovss_predict

    want = pred(ds_img.transpose(2, 0, 1)[None]).argmax(axis=1)[0]
    got = ovss_predict(pred, ds_img, ds_img.shape[:2], proto)
    assert (got == want).all()


def test_segearth_protocol_takes_the_dataset_threshold():
    p = ovss_protocol("segearth", "potsdam")
    assert (p.prob_thd, p.bg_idx, p.crop, p.stride, p.resize) == (0.1, 5, 224, 112, (448, 448))
    assert ovss_protocol("farslip", "potsdam").prob_thd == 0.0


# -- refer and coco from files -----------------------------------------------------------


def test_refer_from_mask_folders(tmp_path):
    for d in ("pred", "gt"):
        (tmp_path / d).mkdir()
    a = np.zeros((10, 10), np.uint8)
    a[:5] = 255
    b_gt = np.zeros((10, 10), np.uint8)
    b_gt[:, :2] = 1
    b_pred = np.zeros((10, 10), np.uint8)
    b_pred[:, :4] = 1
    for name, arr in (("a", a), ("b", b_gt), ("c", a)):
        Image.fromarray(arr).save(tmp_path / "gt" / f"{name}.png")
    Image.fromarray(a).save(tmp_path / "pred" / "a.png")
    np.save(tmp_path / "pred" / "b.npy", b_pred)
    res = run_refer(tmp_path / "pred", tmp_path / "gt", size=None)
    m = res.metrics
    # a: IoU 1; b: I 20 U 40 -> 0.5; c: no prediction -> 0
    assert m["mIoU"] == pytest.approx(0.5)
    assert m["oIoU"] == pytest.approx((50 + 20) / (50 + 40 + 50))
    assert m["Pr@0.5"] == pytest.approx(2 / 3) and m["Pr@0.6"] == pytest.approx(1 / 3)
    assert m["missing_predictions"] == 1


def test_coco_from_detections(tmp_path):
    gt = {"images": [{"id": 1, "width": 50, "height": 50, "file_name": "x.png"}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20]}],
          "categories": [{"id": 1, "name": "ship"}]}
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "dets.json").write_text(json.dumps(
        [{"image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20], "score": 0.9}]))
    res = run_coco(tmp_path / "gt.json", tmp_path / "dets.json")
    assert res.metrics["AP"] == pytest.approx(1.0) and res.metrics["per_class"]["ship"] == pytest.approx(1.0)
    json.dumps(res.to_dict(), allow_nan=False)


# -- errors ------------------------------------------------------------------------------


def test_bad_dataset_paths_name_the_expected_layout(tmp_path):
    with pytest.raises(DatasetError, match="ucm.json"):
        run_zeroshot(ColourModel(), tmp_path / "nope")
    with pytest.raises(DatasetError, match="Karpathy"):
        run_retrieval(ColourModel(), tmp_path / "nope.json")
    with pytest.raises(DatasetError, match="images/"):
        run_ovss(ColourModel(), tmp_path, parse_class_list("red, green"))
    (tmp_path / "t.csv").write_text("filepath,label\n")
    with pytest.raises(DatasetError, match="class-name file"):
        run_zeroshot(ColourModel(), tmp_path / "t.csv")
    with pytest.raises(DatasetError, match="ucm.json"):
        run_zeroshot(ColourModel(), tmp_path / "empty")


# -- CLI ---------------------------------------------------------------------------------


@pytest.fixture
def cli(monkeypatch):
    from rsvl.cli import eval as eval_cmd

    monkeypatch.setattr(eval_cmd, "_load_model", lambda name, weights, device, *task, **kw: ColourModel())
    app = typer.Typer()

    @app.callback()
    def _root() -> None:
        pass

    eval_cmd.register(app)
    return app


def test_cli_zeroshot_json_is_one_document_with_settings(cli, tmp_path):
    make_folder(tmp_path / "scenes")
    r = CliRunner().invoke(cli, ["eval", "zeroshot", str(tmp_path / "scenes"), "--json",
                                 "--out", str(tmp_path / "res.json")])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["metrics"]["top1"] == pytest.approx(2 / 3)
    assert doc["settings"]["model"] == "mini-clip" and doc["settings"]["n_samples"] == 3
    assert json.loads((tmp_path / "res.json").read_text())["metrics"] == doc["metrics"]


def test_cli_tables_and_errors(cli, tmp_path):
    ucm = make_ucm(tmp_path / "ucm")
    r = CliRunner().invoke(cli, ["eval", "retrieval", str(ucm)])
    assert r.exit_code == 0, r.output
    assert "mean recall" in r.stdout and "77.78" in r.stdout
    write_seg(tmp_path / "seg")
    r = CliRunner().invoke(cli, ["eval", "ovss", str(tmp_path / "seg"), "--classes-file", str(_classes(tmp_path)),
                                 "--resize", "0", "--crop", "16", "--stride", "8", "--templates", "none", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["metrics"]["mIoU"] == pytest.approx(EXPECTED_MIOU)
    r = CliRunner().invoke(cli, ["eval", "zeroshot", str(tmp_path / "missing")])
    assert isinstance(r.exception, DatasetError) and "Expected" in str(r.exception)


def _classes(tmp_path: Path) -> Path:
    p = tmp_path / "cls.txt"
    p.write_text("red\ngreen\nblue\n")
    return p


# -- real data ---------------------------------------------------------------------------


def test_ucm_json_on_shared_data_with_fake_model():
    ucm = SHARED / "ucm" / "ucm.json"
    if not ucm.is_file():
        pytest.skip(f"real data not found at {ucm.resolve()} (../shared/data next to the repository)")
    res = run_zeroshot(ColourModel(), ucm, split="val", limit=6)
    assert res.settings["n_samples"] == 6 and len(res.settings["classes"]) == 16
    assert "baseball diamond" in res.settings["prompt_names"]
    assert "storage tanks" in res.settings["prompt_names"]
    assert 0.0 <= res.metrics["top1"] <= 1.0 and res.metrics["n"] == 6
    assert res.to_dict() == harness.EvalResult(res.task, res.metrics, res.settings).to_dict()
