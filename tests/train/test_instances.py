"""rsvl train instances on a tiny synthetic COCO dataset with a tiny random model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from rsvl.data.coco import split_ids
from rsvl.errors import InputNotFoundError, ResumeError, UnknownModelError
from rsvl.train.instances import (
    InstanceTrainConfig,
    InstanceTrainSet,
    boxes_from_masks,
    flip_sample,
    large_scale_jitter,
    train_instances,
)

torch.set_num_threads(1)

TINY = {"backbone": "tiny", "fpn_channels": 16, "box_hidden": 32, "mask_convs": 1,
        "anchor_sizes": [[12], [24], [48], [96]], "train_min_size": [96], "test_min_size": 96,
        "max_size": 128, "rois_per_image": 32, "rpn_post_nms_train": 100, "rpn_post_nms_test": 50}


def make_coco(root, n=8, seed=0):
    """``n`` 96 x 96 images, each with a red square (class 1) and a blue rectangle (class 2)."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    images, anns = [], []
    for i in range(n):
        img = np.full((96, 96, 3), 90, np.uint8)
        boxes = []
        for cat, colour in ((1, (230, 20, 20)), (2, (20, 20, 230))):
            w, h = (int(v) for v in rng.integers(16, 36, 2))
            x, y = int(rng.integers(0, 96 - w)), int(rng.integers(0, 96 - h))
            img[y:y + h, x:x + w] = colour
            boxes.append((cat, x, y, w, h))
        Image.fromarray(img).save(root / "images" / f"{i:03d}.png")
        images.append({"id": i + 1, "file_name": f"{i:03d}.png", "width": 96, "height": 96})
        for cat, x, y, w, h in boxes:
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": cat, "iscrowd": 0,
                         "bbox": [x, y, w, h], "area": w * h,
                         "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]]})
    cats = [{"id": 1, "name": "airplane"}, {"id": 2, "name": "ship"}]
    path = root / "instances_train.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return path


def cfg(tmp_path, data, **kw):
    base = dict(data=str(data), out=str(tmp_path / "run"), model="mini-instances", epochs=4,
                batch_size=2, lr=0.02, warmup_iters=2, val_fraction=0.25, seed=0,
                model_config=dict(TINY), ckpt_every=0, threads=1)
    base.update(kw)
    return InstanceTrainConfig(**base)


def test_tiny_model_trains_with_decreasing_loss_and_resumes(tmp_path):
    data = make_coco(tmp_path / "data")
    # stops mid-epoch (3 steps per epoch), as an interrupted run does
    res = train_instances(cfg(tmp_path, data, epochs=4, val_every=3), quiet=True, max_steps=10)
    assert res.n_train == 6 and res.n_val == 2
    assert res.steps == 10
    losses = json.loads((tmp_path / "run" / "log.jsonl").read_text().splitlines()[0])["loss"]
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    steps = [r for r in log if "loss" in r]
    assert steps[-1]["loss"] < losses
    assert res.val is not None and {"bbox_AP", "segm_AP"} <= set(res.val)
    assert (tmp_path / "run" / "last.ckpt").is_file() and (tmp_path / "run" / "model.safetensors").is_file()
    minutes = res.train_minutes

    # the val images are never trained on: the split is the referring generator's
    train_doc = json.loads((tmp_path / "run" / "train.json").read_text())
    _, val = split_ids(list(range(1, 9)), 0.25, 0)
    assert train_doc["val_image_ids"] == val

    # resume mid-epoch: continues past step 10 (to the end of 5 epochs), time accumulates
    res2 = train_instances(cfg(tmp_path, data, epochs=5, resume=True), quiet=True)
    assert 10 < res2.steps <= 15 and res2.train_minutes >= minutes
    assert res2.last_loss is not None

    # the exported weights load and predict in the torchvision convention
    from rsvl.models.mini.instances import load_mini_instances

    model = load_mini_instances(tmp_path / "run" / "model.safetensors")
    assert model.classes == ["airplane", "ship"]
    with torch.no_grad():
        (out,) = model([torch.rand(3, 96, 96)])
    assert set(out) >= {"boxes", "labels", "scores", "masks"}

    # and evaluate through the harness on the val split
    from rsvl.eval import run_coco_model

    ev = run_coco_model(model, data, val_fraction=0.25, seed=0)
    assert ev.settings["n_samples"] == 2 and set(ev.metrics) == {"bbox", "segm"}


def test_run_folder_guards(tmp_path):
    data = make_coco(tmp_path / "data", n=4)
    with pytest.raises(ResumeError, match="Nothing to resume"):
        train_instances(cfg(tmp_path, data, resume=True), quiet=True)
    with pytest.raises(InputNotFoundError) as e:
        train_instances(cfg(tmp_path, tmp_path / "nope.json"), quiet=True)
    assert "--data" in e.value.hint
    with pytest.raises(UnknownModelError) as e:
        train_instances(cfg(tmp_path, data, model="mask-rcnn-xl"), quiet=True)
    assert "mini-instances" in e.value.hint
    train_instances(cfg(tmp_path, data, epochs=1), quiet=True, max_steps=1)
    with pytest.raises(ResumeError, match="already holds a run"):
        train_instances(cfg(tmp_path, data, epochs=1), quiet=True)


def test_augmentations_keep_boxes_and_masks_consistent(tmp_path):
    data = make_coco(tmp_path / "data", n=2)
    from rsvl.data.coco import CocoInstanceDataset

    ds = CocoInstanceDataset(data)
    item = InstanceTrainSet(ds, ds.image_ids, train=False)
    img, target = item[0]
    assert img.shape == (3, 96, 96) and img.max() <= 1.0
    assert target["labels"].tolist() == [1, 2]
    assert torch.allclose(boxes_from_masks(target["masks"]), target["boxes"])
    rng = np.random.default_rng(0)
    for _ in range(8):
        fimg, ft = flip_sample(img, target, rng)
        assert torch.allclose(boxes_from_masks(ft["masks"]), ft["boxes"])
        limg, lt = large_scale_jitter(img, target, 64, (0.5, 2.0), rng)
        assert max(limg.shape[-2:]) <= 64
        assert len(lt["boxes"]) == len(lt["labels"]) == len(lt["masks"])
        assert torch.allclose(boxes_from_masks(lt["masks"]), lt["boxes"])


def test_cli_train_instances_json(tmp_path, capsys):
    from rsvl.cli import main

    data = make_coco(tmp_path / "data", n=4)
    args = ["train", "instances", "--data", str(data), "--out", str(tmp_path / "cli"), "--epochs", "1",
            "--val-fraction", "0.25", "--threads", "1", "--json"]
    for k, v in TINY.items():
        args += ["--model-config", f"{k}={json.dumps(v)}"]
    assert main(args) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["steps"] == 2 and doc["weights"].endswith("model.safetensors")
    assert main(["train", "instances", "--model", "nope", "--data", str(data), "--out", str(tmp_path / "x")]) == 2
    assert "Unknown instance model" in capsys.readouterr().err


def test_whu_building_masks_become_connected_component_instances(tmp_path):
    from conftest import write_raster

    from rsvl.data.coco import CocoInstanceDataset
    from rsvl.data.instances import whu_to_coco, write_coco

    label = np.zeros((32, 32), np.uint8)
    label[2:6, 2:8] = 255          # a building
    label[6:9, 8:10] = 255         # touches it only at a corner: separate (4-connectivity)
    label[20:30, 20:30] = 255      # another building
    for sub in ("image", "label"):
        (tmp_path / "whu" / "train" / sub).mkdir(parents=True)
    write_raster(tmp_path / "whu" / "train" / "label" / "a.tif", label, crs=None)
    write_raster(tmp_path / "whu" / "train" / "image" / "a.tif", np.zeros((3, 32, 32), np.uint8), crs=None)
    coco = whu_to_coco(tmp_path / "whu", "train")
    assert [a["area"] for a in coco["annotations"]] == [24.0, 6.0, 100.0]
    assert coco["annotations"][2]["bbox"] == [20.0, 20.0, 10.0, 10.0]
    path = write_coco(coco, tmp_path / "whu_train.json")
    ds = CocoInstanceDataset(path, tmp_path / "whu" / "train" / "image")
    masks = ds.masks(ds[0])
    assert masks.shape == (3, 32, 32) and (masks.sum(0) == (label == 255)).all()


def test_cli_eval_coco_model_mode(tmp_path, capsys):
    from rsvl.cli import main

    data = make_coco(tmp_path / "data", n=4)
    res = train_instances(cfg(tmp_path, data, epochs=1, val_fraction=0.25), quiet=True)
    code = main(["eval", "coco", str(data), "--model", "mini-instances", "--weights", res.weights,
                 "--val-fraction", "0.25", "--save-detections", str(tmp_path / "dets.json"), "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    doc = json.loads(out)
    assert doc["settings"]["split"] == "val" and doc["settings"]["n_samples"] == 1
    assert set(doc["metrics"]) == {"bbox", "segm"} and "AP50" in doc["metrics"]["segm"]
    assert isinstance(json.loads((tmp_path / "dets.json").read_text()), list)
    # the file mode still works on the saved detections; giving both is an error
    assert main(["eval", "coco", str(data), str(tmp_path / "dets.json"), "--json"]) == 0
    capsys.readouterr()
    assert main(["eval", "coco", str(data), str(tmp_path / "dets.json"), "--model", "mini-instances"]) == 2
    assert "not both" in capsys.readouterr().err


def test_models_are_built_by_their_family(tmp_path):
    """The trainer builds through the registry: mini-instances, and an RSPrompter card picked
    by the dataset folder (nwpu_vhr10 -> N_p = 70) on a SAM read off a checkpoint."""
    from dataclasses import replace

    from rsvl.models.mini.instances import MiniInstances
    from rsvl.models.sam import build_sam
    from rsvl.models.sam.config import SamConfig
    from rsvl.train.instances import build_model

    tiny = SamConfig(image_size=64, encoder_embed_dim=32, encoder_depth=2, encoder_num_heads=2,
                     encoder_global_attn_indexes=(1,), window_size=2, prompt_embed_dim=32,
                     decoder_num_heads=2, decoder_mlp_dim=64, iou_head_hidden_dim=32)
    torch.save(build_sam(tiny).state_dict(), tmp_path / "sam.pth")
    cfg = InstanceTrainConfig(
        data=str(tmp_path / "nwpu_vhr10" / "instances_train.json"), out=str(tmp_path / "out"),
        model="rsprompter-query", sam_checkpoint=str(tmp_path / "sam.pth"),
        model_config=dict(feat_channels=32, ffn_channels=64, num_decoder_layers=1, encoder_layers=1))
    m = build_model(cfg, ["a", "b"])
    assert (m.rsvl_name, m.num_classes, m.num_queries) == ("rsprompter-query", 2, 70)
    assert m.sam.config.encoder_embed_dim == 32 and m.training
    mini = build_model(replace(cfg, model="mini-instances", model_config=TINY), ["a", "b"])
    assert isinstance(mini, MiniInstances)
    with pytest.raises(UnknownModelError):
        build_model(replace(cfg, model="mask-rcnn"), ["a"])


def test_resume_from_a_pickled_payload_is_refused_without_running_it(tmp_path):
    import os

    from rsvl.errors import CheckpointMismatchError

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    data = make_coco(tmp_path / "data", n=4)
    (tmp_path / "run").mkdir()
    torch.save({"state_dict": {}, "loops": Payload()}, tmp_path / "run" / "last.ckpt")
    with pytest.raises(CheckpointMismatchError, match="rsvl refuses to unpickle") as err:
        train_instances(cfg(tmp_path, data, epochs=1, resume=True), quiet=True)
    assert not marker.exists() and "weights_only=False" not in str(err.value)
