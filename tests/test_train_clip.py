"""`rsvl train clip` (FarSLIP stages 1 and 2) on a tiny open_clip config.

Each loss term is checked against an independent computation on small tensors, each term is
shown to decrease when optimised, the total is the weighted sum, resume restores the step and
the optimizer state, and the exported checkpoint reloads through rsvl and open_clip.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
open_clip = pytest.importorskip("open_clip")
pytest.importorskip("lightning")
F = torch.nn.functional

from rsvl.data.mgrs import MgrsDataset, MgrsRegion, select_regions  # noqa: E402
from rsvl.errors import DatasetError, OutputError, ResumeError  # noqa: E402
from rsvl.models.clip import model as rclip  # noqa: E402
from rsvl.models.cards import ModelCard, WeightsSource  # noqa: E402
from rsvl.train import clip as tc  # noqa: E402

torch.set_num_threads(1)

TINY = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 32, "patch_size": 16, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
TINY_NAME = "rsvl-tiny-train-test"


def _net(seed: int = 0):
    torch.manual_seed(seed)
    net, card = tc.build_train_model(TINY_NAME, model_cfg=TINY, quick_gelu=True)
    return net, card


def _card() -> ModelCard:
    return ModelCard(
        name="tiny-train-test", family="clip", architecture="tiny (test config)", quick_gelu=True,
        source=WeightsSource(filename="tiny.pt", url="https://example.invalid/tiny.pt"),
        licence="test", description="tiny", image_size=64, context_length=77,
    )


def _stage1_batch(b: int = 4, k: int = 2, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    x1y1 = torch.rand(b, k, 2, generator=g) * 0.5
    wh = 0.2 + torch.rand(b, k, 2, generator=g) * 0.3
    return {
        "image": torch.randn(b, 3, 64, 64, generator=g),
        "text": torch.randint(1, 49000, (b, 77), generator=g),
        "crops": torch.randn(b, k, 3, 64, 64, generator=g),
        "boxes": torch.cat([x1y1, x1y1 + wh], dim=-1),
        "box_valid": torch.ones(b, k, dtype=torch.bool),
    }


def _stage2_batch(b: int = 4, k: int = 2, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    labels = torch.tensor([[0, 1], [1, -1], [2, 0], [-1, 2]])[:b, :k]
    return {
        "image": torch.randn(b, 3, 64, 64, generator=g),
        "text": torch.randint(1, 49000, (b, 77), generator=g),
        "region_images": torch.randn(b, k, 3, 64, 64, generator=g),
        "region_texts": torch.randint(1, 49000, (b, k, 77), generator=g),
        "region_labels": labels,
    }


# ------------------------------------------------------------------------------ loss terms


def test_infonce_matches_manual_cross_entropy():
    g = torch.Generator().manual_seed(0)
    img, txt = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g)
    scale = 7.0
    a = img / img.norm(dim=1, keepdim=True)
    t = txt / txt.norm(dim=1, keepdim=True)
    total = 0.0
    for i in range(5):
        row = [scale * float(a[i] @ t[j]) for j in range(5)]
        col = [scale * float(t[i] @ a[j]) for j in range(5)]
        total += -row[i] + math.log(sum(math.exp(v) for v in row))
        total += -col[i] + math.log(sum(math.exp(v) for v in col))
    assert float(tc.clip_infonce(img, txt, scale)) == pytest.approx(total / 10, abs=1e-5)


def test_roi_distill_matches_hand_loop_with_roi_align():
    from torchvision.ops import roi_align

    g = torch.Generator().manual_seed(1)
    dense = torch.randn(2, 6, 4, 5, generator=g)  # non-square grid: x scales by gw, y by gh
    boxes = torch.tensor([[[0.0, 0.0, 0.5, 0.5], [0.2, 0.3, 0.9, 1.0]],
                          [[0.1, 0.6, 0.4, 0.9], [0.0, 0.0, 1.0, 1.0]]])
    valid = torch.tensor([[True, True], [False, True]])
    target = torch.randn(3, 6, generator=g)
    cos = []
    m = 0
    for b in range(2):
        for k in range(2):
            if not valid[b, k]:
                continue
            x1, y1, x2, y2 = boxes[b, k].tolist()
            roi = torch.tensor([[0.0, x1 * 5, y1 * 4, x2 * 5, y2 * 4]])
            out = roi_align(dense[b : b + 1], roi, output_size=(4, 5), spatial_scale=1.0,
                            sampling_ratio=-1, aligned=True)
            v = out.mean(dim=(2, 3))[0]
            cos.append(float(F.cosine_similarity(v, target[m], dim=0)))
            m += 1
    expected = 1 - sum(cos) / len(cos)
    assert float(tc.roi_distill_loss(dense, boxes, valid, target)) == pytest.approx(expected, abs=1e-5)
    # no valid box: zero that still back-propagates
    d = dense.clone().requires_grad_(True)
    z = tc.roi_distill_loss(d, boxes, torch.zeros_like(valid), target)
    z.backward()
    assert float(z.detach()) == 0.0 and d.grad is not None


def test_multi_positive_contrastive_keyed_on_category_id():
    g = torch.Generator().manual_seed(2)
    img, txt = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g)
    labels = torch.tensor([3, 1, 3, -1, 7, 1])
    scale = 5.0
    keep = [i for i in range(6) if labels[i] >= 0]
    a = F.normalize(img, dim=1)
    t = F.normalize(txt, dim=1)

    def direction(q, k):
        total = 0.0
        for i in keep:
            logits = [scale * float(q[i] @ k[j]) for j in keep]
            lse = math.log(sum(math.exp(v) for v in logits))
            pos = [jj for jj, j in enumerate(keep) if labels[j] == labels[i]]
            total += -sum(logits[jj] - lse for jj in pos) / len(pos)
        return total / len(keep)

    expected = (direction(a, t) + direction(t, a)) / 2
    got = tc.multi_positive_contrastive(img, txt, labels, scale)
    assert float(got) == pytest.approx(expected, abs=1e-5)
    # all-distinct ids reduce to CLIP InfoNCE
    ids = torch.arange(6)
    assert float(tc.multi_positive_contrastive(img, txt, ids, scale)) == pytest.approx(
        float(tc.clip_infonce(img, txt, scale)), abs=1e-5)


def test_training_forward_matches_inference_paths():
    net, card = _net()
    x = torch.randn(3, 3, 64, 64)
    glob, dense = tc.encode_image_and_dense(net, x)
    with torch.no_grad():
        assert torch.allclose(glob, net.encode_image(x), atol=1e-6)
        ref = rclip.ClipModel(copy.deepcopy(net), _card())
        _, tokens, (gh, gw) = ref._vit_dense(x, "segearth", True)
    assert dense.shape == (3, 32, 4, 4)
    assert torch.allclose(dense, tokens.transpose(1, 2).reshape(3, 32, gh, gw), atol=1e-6)


def test_module_terms_and_weighted_total():
    torch.manual_seed(0)
    net, _ = _net()
    cfg = tc.ClipTrainConfig(stage=1, max_boxes=2, w_global=0.7, w_distill=0.3)
    m = tc.ClipFineTuner(net, cfg)
    batch = _stage1_batch()
    with torch.no_grad():
        losses = m.compute_losses(batch)
        # independent pieces: inference encoders + rsvl's dense path
        scale = net.logit_scale.exp()
        ref = rclip.ClipModel(copy.deepcopy(net), _card())
        g_ref = net.encode_image(batch["image"])
        t_ref = net.encode_text(batch["text"])
        _, tok, _ = ref._vit_dense(batch["image"], "segearth", True)
        _, ctok, _ = ref._vit_dense(batch["crops"].flatten(0, 1), "segearth", True)
        dense = tok.transpose(1, 2).reshape(4, 32, 4, 4)
        target = ctok.mean(dim=1)
    assert float(losses["global_itc"]) == pytest.approx(float(tc.clip_infonce(g_ref, t_ref, scale)), abs=1e-5)
    expected_d = tc.roi_distill_loss(dense, batch["boxes"], batch["box_valid"], target)
    assert float(losses["distill"]) == pytest.approx(float(expected_d), abs=1e-5)
    assert float(losses["total"]) == pytest.approx(
        0.7 * float(losses["global_itc"]) + 0.3 * float(losses["distill"]), abs=1e-6)
    assert "region_itc" not in losses

    cfg2 = tc.ClipTrainConfig(stage=2, max_boxes=2, w_global=1.0, w_region=0.5)
    m2 = tc.ClipFineTuner(net, cfg2)
    b2 = _stage2_batch()
    with torch.no_grad():
        l2 = m2.compute_losses(b2)
        valid = b2["region_labels"] >= 0
        ri = net.encode_image(b2["region_images"][valid])
        rt = net.encode_text(b2["region_texts"][valid])
        exp_r = tc.multi_positive_contrastive(ri, rt, b2["region_labels"][valid], scale)
    assert float(l2["region_itc"]) == pytest.approx(float(exp_r), abs=1e-5)
    assert float(l2["total"]) == pytest.approx(float(l2["global_itc"]) + 0.5 * float(l2["region_itc"]), abs=1e-6)
    assert "distill" not in l2


@pytest.mark.parametrize(
    ("stage", "term", "weights"),
    [
        (1, "global_itc", {"w_global": 1.0, "w_distill": 0.0}),
        (1, "distill", {"w_global": 0.0, "w_distill": 1.0}),
        (2, "region_itc", {"w_global": 0.0, "w_region": 1.0}),
    ],
)
def test_each_term_decreases(stage, term, weights):
    torch.manual_seed(0)
    net, _ = _net()
    m = tc.ClipFineTuner(net, tc.ClipTrainConfig(stage=stage, max_boxes=2, **weights))
    batch = _stage1_batch() if stage == 1 else _stage2_batch()
    opt = torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=3e-3)
    values = []
    for _ in range(20):
        losses = m.compute_losses(batch)
        values.append(float(losses[term].detach()))
        opt.zero_grad()
        losses["total"].backward()
        opt.step()
    assert values[-1] < 0.8 * values[0], values


def test_ema_teacher_is_frozen_and_follows_student():
    net, _ = _net()
    m = tc.ClipFineTuner(net, tc.ClipTrainConfig(stage=1, max_boxes=2, distill_type="ema", ema_momentum=0.5))
    assert m.teacher is not None and not any(p.requires_grad for p in m.teacher.parameters())
    before = m.teacher.visual.proj.detach().clone()
    with torch.no_grad():
        net.visual.proj.add_(1.0)
    m.on_train_batch_end(None, None, 0)
    assert torch.allclose(m.teacher.visual.proj, 0.5 * before + 0.5 * net.visual.proj)
    with torch.no_grad():
        net.logit_scale.fill_(10.0)
    m.on_train_batch_end(None, None, 0)
    assert float(net.logit_scale) == pytest.approx(math.log(100.0))


# ------------------------------------------------------------------------------ data


def _write_images(root: Path, n: int, size: tuple[int, int] = (80, 72), folder: str = "images") -> list[str]:
    from PIL import Image

    rng = np.random.default_rng(0)
    (root / folder).mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        name = f"{folder}/im{i}.png"
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(root / name)
        names.append(name)
    return names


def _ucm(root: Path, n: int = 6) -> Path:
    names = _write_images(root, n)
    samples = [{"image": nm, "label": "a" if i % 2 else "b", "split": "train",
                "captions": [f"caption {i} one", f"caption {i} two"]} for i, nm in enumerate(names)]
    samples.append({"image": names[0], "label": "a", "split": "val", "captions": ["v"]})
    p = root / "ucm.json"
    p.write_text(json.dumps({"classes": ["a", "b"], "samples": samples}))
    return p


def _mgrs(root: Path) -> Path:
    names = _write_images(root, 4, size=(200, 160), folder="global_imgs")
    items = []
    for i, nm in enumerate(names):
        items.append({
            "global_filepath": nm.split("/", 1)[1],
            "global_caption": f"scene {i}",
            "segment": [
                {"bbox": {"x1": 0, "y1": 0, "x2": 100, "y2": 90, "W": 200, "H": 160},
                 "category": "tank", "category_id": 1},
                {"bbox": {"x1": 50, "y1": 40, "x2": 150, "y2": 150, "W": 200, "H": 160},
                 "category": "ship", "category_id": 2 + i % 2},
                {"bbox": {"x1": 10, "y1": 10, "x2": 190, "y2": 150, "W": 200, "H": 160},
                 "cap": "a free text region"},
                {"bbox": {"x1": 0, "y1": 0, "x2": 20, "y2": 20, "W": 200, "H": 160},
                 "category": "car", "category_id": 4},  # below min_size**2: never chosen
            ],
        })
    p = root / "text_info.json"
    p.write_text(json.dumps(items))
    return p


def test_mgrs_reader_and_region_selection(tmp_path):
    ds = MgrsDataset(_mgrs(tmp_path))
    assert ds.image_root == tmp_path / "global_imgs"  # MGRS-200k layout found
    item = ds[0]
    assert item.caption == "scene 0" and item.size == (200, 160)
    r0, _, r2, _ = item.regions
    assert r0.box == (0.0, 0.0, 100.0, 90.0) and r0.category_id == 1
    assert r0.text == "a satellite image of tank"
    assert r2.category_id == -1 and r2.text == "a free text region"
    assert ds.categories == {1: "tank", 2: "ship", 3: "ship", 4: "car"}
    import random

    chosen = select_regions(item.regions, max_boxes=2, min_size=64, rng=random.Random(0))
    assert len(chosen) == 2 and all(r.area >= 64**2 for r in chosen)
    assert select_regions([MgrsRegion((0, 0, 2000, 2000), 1, "x")], max_size=1024) == []


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"global_caption": "c", "segment": []}, "global_filepath"),
        ({"global_filepath": "a.png", "segment": []}, "no caption"),
        ({"global_filepath": "a.png", "global_caption": "c", "segment": [{"category": "x", "category_id": 1}]}, "no 'bbox'"),
        ({"global_filepath": "a.png", "global_caption": "c", "segment": [{"bbox": [0, 0, 5], "category": "x", "category_id": 1}]}, "6 numbers"),
        ({"global_filepath": "a.png", "global_caption": "c", "segment": [{"bbox": [5, 5, 1, 9], "category": "x", "category_id": 1}]}, "inverted"),
        ({"global_filepath": "a.png", "global_caption": "c", "segment": [{"bbox": [0, 0, 5, 5], "category": "x"}]}, "category_id"),
        ({"global_filepath": "a.png", "global_caption": "c", "segment": [{"bbox": [0, 0, 5, 5], "category": "x", "category_id": "7"}]}, "integer"),
    ],
)
def test_mgrs_reader_errors(tmp_path, record, message):
    p = tmp_path / "bad.json"
    p.write_text(json.dumps([record]))
    with pytest.raises(DatasetError, match=message) as info:
        MgrsDataset(p)
    assert "Item 0" in str(info.value)


def test_datasets_produce_the_stage_tensors(tmp_path):
    cfg = tc.ClipTrainConfig(stage=1, max_boxes=3)
    items, layout = tc.open_train_items(_ucm(tmp_path / "u"))
    assert layout == "ucm.json" and len(items) == 6  # train split only
    ds = tc.ClipTrainData(items, stage=1, image_size=64, context_length=77, config=cfg)
    s = ds[0]
    assert s["image"].shape == (3, 64, 64) and s["crops"].shape == (3, 3, 64, 64)
    area = (s["boxes"][:, 2] - s["boxes"][:, 0]) * (s["boxes"][:, 3] - s["boxes"][:, 1])
    assert bool(((s["boxes"] >= 0) & (s["boxes"] <= 1)).all()) and bool((area > 0.25).all() & (area < 0.75).all())
    with pytest.raises(DatasetError, match="Stage 2"):
        tc.ClipTrainData(items, stage=2, image_size=64, context_length=77, config=cfg)

    items2, layout2 = tc.open_train_items(_mgrs(tmp_path / "m"))
    assert layout2 == "mgrs"
    ds2 = tc.ClipTrainData(items2, stage=2, image_size=64, context_length=77,
                           config=tc.ClipTrainConfig(stage=2, max_boxes=4))
    s2 = ds2[1]
    labels = sorted(s2["region_labels"].tolist())
    assert labels == [-1, -1, 1, 3]  # free-text region (-1), padding (-1), tank, ship
    assert s2["region_images"].shape == (4, 3, 64, 64) and s2["region_texts"].shape == (4, 77)


# ------------------------------------------------------------------------------ runs


class _Probe(__import__("lightning").Callback):
    def __init__(self):
        self.start_step = None
        self.exp_avg = None

    def on_train_start(self, trainer, pl_module):
        self.start_step = trainer.global_step
        state = trainer.optimizers[0].state_dict()["state"]
        self.exp_avg = {k: v["exp_avg"].clone() for k, v in state.items()}


def test_train_resume_and_export(tmp_path):
    data = _ucm(tmp_path / "data")
    out = tmp_path / "run"
    cfg = tc.ClipTrainConfig(stage=1, batch_size=3, max_boxes=1, lr=1e-3, max_steps=3, ckpt_every=2)
    kw = dict(model=TINY_NAME, model_cfg=TINY, quick_gelu=True, progress=False)
    res = tc.train_clip(data, out, config=cfg, **kw)
    assert res.steps == 3 and len(res.history) == 3
    assert (out / "checkpoints" / "last.ckpt").is_file() and not list(out.rglob("*.tmp"))
    assert list(out.glob("logs/version_*/metrics.csv"))
    saved = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert saved["global_step"] == 3 and saved["rsvl_config"]["stage"] == 1

    with pytest.raises(OutputError, match="--resume"):
        tc.train_clip(data, out, config=cfg, **kw)
    with pytest.raises(ResumeError):
        tc.train_clip(data, tmp_path / "empty", config=cfg, resume=True, **kw)
    with pytest.raises(ResumeError, match="stage"):
        tc.train_clip(_mgrs(tmp_path / "m"), out, resume=True,
                      config=tc.ClipTrainConfig(stage=2, batch_size=3, max_steps=4), **kw)

    probe = _Probe()
    cfg5 = tc.ClipTrainConfig(**{**cfg.to_dict(), "max_steps": 5})
    res2 = tc.train_clip(data, out, config=cfg5, resume=True, callbacks=[probe], **kw)
    assert probe.start_step == 3 and res2.steps == 5 and len(res2.history) == 2
    ref = saved["optimizer_states"][0]["state"]
    assert probe.exp_avg.keys() == ref.keys()
    assert all(torch.equal(probe.exp_avg[k], ref[k]["exp_avg"]) for k in ref)

    # final weights: FarSLIP layout, reload through rsvl and open_clip with equal embeddings
    raw = torch.load(res2.weights, map_location="cpu", weights_only=True)
    assert raw["step"] == 5 and all(k.startswith("module.") for k in raw["state_dict"])
    ck = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    trained = open_clip.CLIP(**copy.deepcopy(TINY), quick_gelu=True)
    trained.load_state_dict({k[len("model."):]: v for k, v in ck["state_dict"].items() if k.startswith("model.")})
    trained.eval()
    loaded = rclip.load_clip(_card(), weights=res2.weights, model_cfg=TINY)
    oc = open_clip.CLIP(**copy.deepcopy(TINY), quick_gelu=True)
    open_clip.load_checkpoint(oc, str(res2.weights))
    oc.eval()
    rng = np.random.default_rng(3)
    imgs = rng.integers(0, 256, (2, 3, 64, 64), dtype=np.uint8)
    texts = ["a harbor", "farmland with roads"]
    with torch.no_grad():
        x = loaded.preprocess(imgs)
        tok = loaded.tokenize(texts)
        want_i = F.normalize(trained.encode_image(x), dim=-1)
        want_t = F.normalize(trained.encode_text(tok), dim=-1)
        assert torch.allclose(loaded.encode_image(imgs), want_i, atol=1e-5)
        assert torch.allclose(loaded.encode_text(texts), want_t, atol=1e-5)
        assert torch.allclose(F.normalize(oc.encode_image(x), dim=-1), want_i, atol=1e-5)


def test_cli_trains_stage2_on_mgrs_and_reports_errors(tmp_path, capsys):
    from rsvl.cli import main

    cfg_dir = tmp_path / "cfg"
    cfg_dir.mkdir()
    (cfg_dir / f"{TINY_NAME}.json").write_text(json.dumps({**TINY, "quick_gelu": True}))
    open_clip.add_model_config(cfg_dir)
    data = _mgrs(tmp_path / "m")
    out = tmp_path / "run2"
    code = main(["--quiet", "train", "clip", "--stage", "2", "--model", TINY_NAME, "--data", str(data),
                 "--out", str(out), "--batch-size", "2", "--max-steps", "2", "--lr", "1e-4", "--json"])
    assert code == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["steps"] == 2 and "region_itc" in doc["losses"] and Path(doc["weights"]).is_file()
    # stage 2 on a caption-only dataset: a user error with a hint, no traceback
    code = main(["train", "clip", "--stage", "2", "--model", TINY_NAME, "--data",
                 str(_ucm(tmp_path / "u")), "--out", str(tmp_path / "run3")])
    assert code != 0
    assert "MGRS" in capsys.readouterr().err


def test_long_text_init_and_reload_from_weights(tmp_path):
    net, _ = _net()
    path = tc.save_farslip_checkpoint(net, tmp_path / "short.pt", name="tiny")
    long_net, _ = tc.build_train_model(TINY_NAME, path, model_cfg=TINY, quick_gelu=True, long_text=True)
    assert long_net.positional_embedding.shape[0] == 248 and hasattr(long_net, "positional_embedding_res")
    assert not long_net.positional_embedding.requires_grad and long_net.positional_embedding_res.requires_grad
    # the short weights were taken as they are (vision tower untouched)
    assert torch.equal(long_net.visual.proj, net.visual.proj)
    tc.save_farslip_checkpoint(long_net, tmp_path / "long.pt")
    loaded = rclip.load_clip(_card(), weights=tmp_path / "long.pt", model_cfg=TINY)
    assert loaded.long_text and loaded.context_length == 248
    with torch.no_grad():
        want = F.normalize(long_net.eval().encode_text(loaded.tokenize(["a long caption"])), dim=-1)
    assert torch.allclose(loaded.encode_text(["a long caption"]), want, atol=1e-5)
