"""mini-clip: offline loading, shapes, shipped-heads behaviour on real UCM val images, training."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SHARED_DATA

from rsvl.errors import BandSelectionError, PromptError, WeightsNotFoundError
from rsvl.models.base import ImageTextModel
from rsvl.models.mini.clip import (
    DEFAULT_WEIGHTS,
    HeadsConfig,
    MiniClip,
    MiniClipHeads,
    load_heads,
    load_mini_clip,
    save_heads,
)

DATA = SHARED_DATA
UCM = DATA / "ucm"


@pytest.fixture(scope="module")
def model() -> MiniClip:
    torch.set_num_threads(2)
    return load_mini_clip()


def test_loads_offline_without_network(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")

    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("mini-clip tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    m = load_mini_clip()
    assert isinstance(m, ImageTextModel)
    assert m.name == "mini-clip" and m.image_size == 256
    assert 1.0 < m.logit_scale <= 100.0


def test_missing_weights_raise_rsvl_error(tmp_path: Path) -> None:
    with pytest.raises(WeightsNotFoundError):
        load_heads(tmp_path / "nope.safetensors")


def test_shipped_heads_are_small_and_documented() -> None:
    assert DEFAULT_WEIGHTS.is_file()
    assert DEFAULT_WEIGHTS.stat().st_size < 8 * 2**20
    card = json.loads((DEFAULT_WEIGHTS.parent / "card.json").read_text())
    assert card["training"]["command"].startswith("rsvl train mini-clip ")
    assert card["dense_training"]["command"].startswith("rsvl train mini-clip-dense ")
    assert card["val"]["zero_shot_top1"] >= 85.0
    assert '": "/' not in json.dumps(card)  # no absolute paths of the training machine
    heads = load_heads(DEFAULT_WEIGHTS)
    assert heads.config.other and 0.0 < heads.other_threshold().item() < 1.0


@pytest.mark.realdata
def test_shipped_dense_head_beats_the_majority_guess_on_a_held_out_loveda_crop(model: MiniClip, tmp_path: Path) -> None:
    """The LoveDA crop that `rsvl data semseg-split` keeps for val (never trained on): mIoU and
    pixel accuracy both above predicting the crop's own majority class, as `rsvl eval ovss`
    scores them; with --no-other (every pixel forced into a name) pixel accuracy is not."""
    from conftest import shared_data

    from rsvl.data.classes import load_classes
    from rsvl.data.semseg_split import build_semseg_split
    from rsvl.eval import run_ovss
    from rsvl.train.mini_clip import majority_miou

    build_semseg_split(shared_data("semseg"), tmp_path / "px")
    folder = tmp_path / "px" / "val" / "loveda"
    specs = load_classes(file="loveda")
    base = majority_miou(folder, "loveda")
    res = run_ovss(model, folder, specs, preset="loveda", protocol="rsvl")
    assert res.settings["learned_other"] == "background"
    assert 100 * res.metrics["mIoU"] > base["miou"] + 3
    assert 100 * res.metrics["aAcc"] > base["pixel_acc"] + 2
    forced = run_ovss(model, folder, specs, preset="loveda", protocol="rsvl", other=False)
    assert forced.settings["learned_other"] is None and forced.metrics["aAcc"] < res.metrics["aAcc"]


def test_shapes_and_normalisation(model: MiniClip) -> None:
    imgs = np.random.default_rng(0).integers(0, 256, (2, 3, 200, 300), dtype=np.uint8)
    e = model.encode_image(imgs)
    assert e.shape == (2, 256)
    torch.testing.assert_close(e.norm(dim=-1), torch.ones(2))
    t = model.encode_text(["an aerial image of a river.", "buildings"])
    assert t.shape == (2, 256)
    torch.testing.assert_close(t.norm(dim=-1), torch.ones(2))


@pytest.mark.parametrize("hw", [(64, 64), (256, 256), (100, 333)])
def test_dense_features_grid(model: MiniClip, hw: tuple[int, int]) -> None:
    h, w = hw
    x = torch.randint(0, 256, (1, 3, h, w), dtype=torch.uint8)
    d = model.dense_features(x)
    assert d.shape == (1, 256, -(-h // 8), -(-w // 8))
    torch.testing.assert_close(d.norm(dim=1), torch.ones(d.shape[0], *d.shape[2:]))


def test_bad_inputs_raise(model: MiniClip) -> None:
    with pytest.raises(BandSelectionError):
        model.encode_image(np.zeros((1, 4, 32, 32), np.uint8))
    with pytest.raises(PromptError):
        model.encode_text(["  "])


def test_heads_roundtrip(tmp_path: Path) -> None:
    heads = MiniClipHeads(HeadsConfig(embed_dim=32, image_hidden=16, text_hidden=16, dense_hidden=32))
    save_heads(heads, tmp_path / "h.safetensors", metadata={"note": "test"})
    back = load_heads(tmp_path / "h.safetensors")
    for k, v in heads.state_dict().items():
        torch.testing.assert_close(back.state_dict()[k], v, atol=1e-3, rtol=1e-3)  # stored as fp16


@pytest.mark.realdata
def test_shipped_heads_classify_ucm_val(model: MiniClip) -> None:
    if not (UCM / "ucm.json").is_file():
        pytest.skip(f"UCM data not found at {UCM.resolve()} (../shared/data/ucm)")
    from rsvl.train.mini_clip_data import load_ucm, read_ucm_image, readable

    data = load_ucm(UCM)
    wanted = ["agricultural", "beach", "parkinglot", "storagetanks", "tenniscourt", "runway"]
    picks = {}
    for i in data.split("val"):
        lab = data.samples[i]["label"]
        if lab in wanted and lab not in picks:
            picks[lab] = i
    imgs = np.stack([read_ucm_image(UCM / data.samples[picks[c]]["image"]) for c in wanted]).transpose(0, 3, 1, 2)
    img = model.encode_image(imgs)
    cls = model.encode_classes([readable(c) for c in data.classes])
    pred = (img @ cls.t()).argmax(1).tolist()
    assert [data.classes[p] for p in pred] == wanted
    # retrieval: each image's own caption beats a caption of another class
    caps = model.encode_text([data.samples[picks[c]]["captions"][0] for c in wanted])
    sim = img @ caps.t()
    assert (sim.argmax(1) == torch.arange(len(wanted))).float().mean() >= 5 / 6


@pytest.mark.realdata
def test_dense_features_separate_a_real_mosaic(model: MiniClip) -> None:
    """Left half farmland, right half a parking lot: pixels follow the halves."""
    if not (UCM / "ucm.json").is_file():
        pytest.skip(f"UCM data not found at {UCM.resolve()} (../shared/data/ucm)")
    from rsvl.train.mini_clip_data import load_ucm, read_ucm_image

    data = load_ucm(UCM)
    first = {}
    for i in data.split("val"):
        first.setdefault(data.samples[i]["label"], i)
    a = read_ucm_image(UCM / data.samples[first["agricultural"]]["image"])
    b = read_ucm_image(UCM / data.samples[first["parkinglot"]]["image"])
    mosaic = np.concatenate([a[:, :128], b[:, 128:]], axis=1).transpose(2, 0, 1)[None]
    d = model.dense_features(mosaic)[0]
    text = model.encode_classes(["farmland", "a parking lot"])
    pred = torch.einsum("dhw,kd->khw", d, text).argmax(0)
    assert (pred[:, 2:14] == 0).float().mean() > 0.8
    assert (pred[:, 18:30] == 1).float().mean() > 0.8


def test_training_loss_decreases_on_tiny_synthetic_data() -> None:
    from rsvl.models.mini.clip import CH8, CH16, CH32, POOLED_DIM, TEXT_DIM
    from rsvl.train.mini_clip import TrainConfig, fit_standardize, train_dense, train_global

    g = torch.Generator().manual_seed(0)
    n, k = 48, 4
    labels = torch.arange(n) % k
    protos_img = torch.randn(k, POOLED_DIM, generator=g)
    protos_txt = torch.randn(k, TEXT_DIM, generator=g)
    img = protos_img[labels][None] + 0.5 * torch.randn(2, n, POOLED_DIM, generator=g)
    cap_owner = torch.arange(n).repeat_interleave(2)
    caps = protos_txt[labels[cap_owner]] + 0.5 * torch.randn(2 * n, TEXT_DIM, generator=g)
    cap_string = torch.arange(2 * n)
    cls = protos_txt[:, None] + 0.1 * torch.randn(k, 3, TEXT_DIM, generator=g)
    heads = MiniClipHeads(HeadsConfig(embed_dim=32, image_hidden=32, text_hidden=32, dense_hidden=32))
    fit_standardize(heads.image_head.norm, img.flatten(0, 1))
    fit_standardize(heads.text_head.norm, caps)
    cfg = TrainConfig(epochs=15, batch_size=16, lr=3e-3, dense_epochs=6, dense_batch=4)
    losses = train_global(heads, img, labels, caps, cap_owner, cap_string, cls, cfg)
    assert losses[-1] < 0.7 * losses[0]

    m = 12
    lab = torch.randint(k, (m, 1, 1), generator=g).expand(m, 4, 4).clone()
    lab[:, :, 2:] = (lab[:, :, 2:] + 1) % k
    up8 = lab.repeat_interleave(2, 1).repeat_interleave(2, 2)
    mos = {
        "f8": (torch.randn(k, CH8, generator=g)[up8].permute(0, 3, 1, 2)).half(),
        "f16": (torch.randn(k, CH16, generator=g)[lab].permute(0, 3, 1, 2)).half(),
        "f32": torch.randn(m, CH32, 2, 2, generator=g).half(),
        "label": up8,
    }
    cls_emb = torch.nn.functional.normalize(torch.randn(k, 32, generator=g), dim=-1)
    d_losses = train_dense(heads, mos, cls_emb, cfg)
    assert d_losses[-1] < 0.8 * d_losses[0]
