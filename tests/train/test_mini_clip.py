"""``rsvl train mini-clip``: the CLI trains end to end on a tiny synthetic UCM and writes heads
that load, and a card that records the command."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_ucm import tiny_ucm

from rsvl.cli import main

pytest.importorskip("PIL")


def test_cli_trains_tiny_ucm_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.set_num_threads(1)
    data = tiny_ucm(tmp_path / "ucm")
    out = tmp_path / "run" / "heads.safetensors"
    code = main(["train", "mini-clip", "--data", str(data), "--out", str(out), "--cache", str(tmp_path / "cache"),
                 "--epochs", "1", "--dense-epochs", "1", "--mosaics", "4", "--val-mosaics", "2",
                 "--threads", "1", "--json"])
    assert code == 0
    doc = json.loads(capsys.readouterr().out)
    assert 0.0 <= doc["val"]["zero_shot_top1"] <= 100.0 and "mean_recall" in doc["val"]

    from rsvl.models.mini.clip import MiniClip, load_heads

    heads = load_heads(out)
    assert heads.config.pooling == "mean+max"
    card = json.loads((out.parent / "card.json").read_text())
    assert card["training"]["command"].startswith("rsvl train mini-clip --data ")
    assert "--epochs 1" in card["training"]["command"]
    assert card["val"] == doc["val"]
    assert card["training"]["data"]["train_images"] == 12 and card["training"]["data"]["val_images"] == 6
    # the trained heads run as a model on the cached towers' inputs
    model = MiniClip(heads)
    emb = model.encode_image(np.zeros((1, 3, 64, 64), np.uint8))
    assert emb.shape == (1, heads.config.embed_dim)


def test_cli_reports_a_missing_dataset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["train", "mini-clip", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "h.safetensors")])
    assert code != 0
    assert "ucm.json" in capsys.readouterr().err


def test_cli_trains_with_aid_and_reports_held_out_classes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from PIL import Image

    torch.set_num_threads(1)
    data = tiny_ucm(tmp_path / "ucm")
    rng = np.random.default_rng(1)
    for ci, folder in enumerate(("Forest", "Desert", "Beach", "Pond")):  # Pond: held out
        (tmp_path / "aid" / folder).mkdir(parents=True)
        for i in range(5):
            img = np.full((40, 40, 3), 60, np.uint8)
            img[..., ci % 3] = 200
            Image.fromarray(np.clip(img + rng.integers(0, 40, img.shape), 0, 255).astype(np.uint8)).save(
                tmp_path / "aid" / folder / f"{i}.jpg")
    out = tmp_path / "run" / "heads.safetensors"
    code = main(["train", "mini-clip", "--data", str(data), "--aid", str(tmp_path / "aid"), "--out", str(out),
                 "--cache", str(tmp_path / "cache"), "--epochs", "1", "--dense-epochs", "1", "--mosaics", "4",
                 "--val-mosaics", "2", "--threads", "1", "--json"])
    assert code == 0
    val = json.loads(capsys.readouterr().out)["val"]
    for key in ("aid_val_top1", "aid_heldout_top1", "aid_heldout_top1_among_heldout"):
        assert 0.0 <= val[key] <= 100.0
    assert val["aid_heldout_top1_among_heldout"] == 100.0  # one held-out class: nothing to confuse it with
    card = json.loads((out.parent / "card.json").read_text())
    aid = card["training"]["data"]["aid"]
    assert (aid["train_images"], aid["val_images"], aid["heldout_images"]) == (12, 3, 5)
    assert aid["heldout_classes"] == ["Pond"] and " --aid " in card["training"]["command"]
