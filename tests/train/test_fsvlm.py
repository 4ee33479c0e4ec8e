"""rsvl train fsvlm (mini-fsvlm) on a tiny model: the cached-state cross-entropy teaches
[SEG], the mask losses teach the decoder, selection writes loadable weights."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_lm import tiny_language_model

from rsvl.models.mini.chat import MiniChatConfig, build_mini_chat
from rsvl.models.mini.fsvlm import MiniFSVLMConfig, build_mini_fsvlm, load_mini_fsvlm
from rsvl.models.mini.refer import MiniReferConfig
from rsvl.train.fsvlm import FsvlmTrainConfig, square_label, train_fsvlm

torch.set_num_threads(1)


def _fit(root, split, n, seed):
    rng = np.random.default_rng(seed)
    for sub in ("img", "lbl", "json"):
        (root / split / sub).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img = rng.integers(0, 60, (64, 64, 3), dtype=np.uint8)
        lbl = np.zeros((64, 64), np.uint8)
        r, c = rng.integers(0, 32, 2)
        img[r:r + 32, c:c + 32] += 180  # the "field": a bright square
        lbl[r:r + 32, c:c + 32] = 1
        Image.fromarray(img).save(root / split / "img" / f"s{i}.png")
        Image.fromarray(lbl * 255).save(root / split / "lbl" / f"s{i}.png")
        (root / split / "json" / f"s{i}.json").write_text(json.dumps({"img_description_eg": "", "source": "toy"}))


def test_square_label_places_the_label_like_the_image():
    lbl = np.zeros((4, 8), np.uint8)
    lbl[:, :2] = 7
    sq = square_label(lbl, 8)
    assert sq.shape == (8, 8) and sq[2:6, :2].all() and sq.sum() == 8 and sq[:2].sum() == 0


@pytest.mark.slow
def test_training_learns_seg_and_writes_loadable_weights(tmp_path):
    _fit(tmp_path / "data", "train", 12, 0)
    _fit(tmp_path / "data", "val", 4, 1)
    torch.manual_seed(0)
    chat = build_mini_chat(MiniChatConfig(image_size=64, lora_r=4, lora_alpha=8, lora_dropout=0.0),
                           pretrained=False, language_model=tiny_language_model())
    chat.merge_adapters()
    from dataclasses import asdict

    dec = MiniReferConfig(image_size=64, text_dim=16, dim=16, heads=2, global_layers=1, fine_dim=8, dropout=0.0)
    model = build_mini_fsvlm(MiniFSVLMConfig(image_size=64, words=2, decoder=asdict(dec)), chat=chat.eval(),
                             init_decoder=None)
    summary = train_fsvlm(tmp_path / "data", tmp_path / "run", FsvlmTrainConfig(steps=60, eval_every=20, batch_size=4,
                                                                              lr=3e-3, warmup=5), model=model)
    before, last = summary["val_before"], summary["history"][-1]
    # [SEG] starts unlikely (bias -4) and the cross-entropy makes it the answer
    assert before["seg_rate"] == 0.0 and last["seg_rate"] == 1.0
    assert summary["best_val_score"] > before["score"] + 0.1
    assert summary["train_requests"] == 12 and summary["val_requests"] == 4
    loaded = load_mini_fsvlm(tmp_path / "run" / "fsvlm.safetensors", chat=chat)
    img = np.asarray(Image.open(tmp_path / "data" / "val" / "img" / "s0.png"))
    ans = loaded.seg_chat(img, "Can you segment the farmland in this image?")
    assert ans.text == "[SEG]." and ans.logits.shape == (64, 64)
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["best_step"] == summary["best_step"]
