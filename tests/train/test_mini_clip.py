"""``rsvl train mini-clip``: the CLI trains end to end on a tiny synthetic UCM and writes heads
that load, and a card that records the command."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from rsvl.cli import main

pytest.importorskip("PIL")


def _tiny_ucm(root: Path, classes: tuple[str, ...] = ("beach", "forest", "parkinglot"),
              n_train: int = 4, n_val: int = 2) -> Path:
    """A ucm.json with a few 256x256 images per class (a distinct colour and texture each)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    samples = []
    for ci, c in enumerate(classes):
        (root / "images" / c).mkdir(parents=True, exist_ok=True)
        for k in range(n_train + n_val):
            base = np.zeros((256, 256, 3), np.uint8)
            base[..., ci] = 180
            img = np.clip(base + rng.integers(0, 60, (256, 256, 3)), 0, 255).astype(np.uint8)
            rel = f"images/{c}/{c}{k:02d}.jpg"
            Image.fromarray(img).save(root / rel, quality=90)
            caps = [f"There is a {c} here .", f"It is a {c} with {k} things .", f"A {c} .",
                    f"Some {c} in the scene .", f"There is a {c} here ."]
            samples.append({"image": rel, "label": c, "split": "train" if k < n_train else "val", "captions": caps})
    (root / "ucm.json").write_text(json.dumps({"classes": list(classes), "samples": samples}))
    return root


def test_cli_trains_tiny_ucm_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.set_num_threads(1)
    data = _tiny_ucm(tmp_path / "ucm")
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
