"""mini-refer: the interface shared with FIANet, weights round trip, the shipped model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import shared_data

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny():
    from rsvl.models.mini.refer import tiny_mini_refer

    return tiny_mini_refer(32).eval()


def test_interface_shapes_and_tokenizer(tiny):
    text = tiny.tokenize(["the leftmost of the three storage tanks", "the ship"])
    assert set(text) == {"input_ids", "attention_mask"}
    assert text["input_ids"].shape == (2, tiny.max_tokens)
    assert text["attention_mask"][1].sum() < text["attention_mask"][0].sum()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = tiny(x, text)
    assert out.shape == (2, 2, 32, 32) and torch.isfinite(out).all()
    assert tiny.image_size == 32 and len(tiny.mean) == 3 and len(tiny.std) == 3
    # the cached path (frozen towers once, decoder alone) gives the same logits
    feats, small = tiny.image_features(x)
    words, mask = tiny.text_features(text)
    with torch.no_grad():
        assert torch.allclose(tiny.decode(feats, small, words, mask, 32), out, atol=1e-5)


def test_expression_changes_the_prediction(tiny):
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        a = tiny(x, tiny.tokenize(["the ship on the left"]))
        b = tiny(x, tiny.tokenize(["the largest airplane"]))
    assert not torch.allclose(a, b)


def test_empty_expression_is_a_prompt_error(tiny):
    from rsvl.errors import PromptError

    with pytest.raises(PromptError):
        tiny.tokenize(["  "])
    with pytest.raises(PromptError):
        tiny.tokenize([])


def test_param_groups_cover_the_decoder_only(tiny):
    groups = tiny.param_groups(1e-3, 0.01)
    ids = {id(p) for g in groups for p in g["params"]}
    assert ids == {id(p) for p in tiny.decoder.parameters()}
    assert {g["weight_decay"] for g in groups} == {0.01, 0.0}
    assert not any(p.requires_grad for p in tiny.text_encoder.parameters())


def test_decoder_weights_round_trip_and_refuse_other_files(tiny, tmp_path):
    from safetensors.torch import save_file

    from rsvl.errors import CheckpointMismatchError, WeightsNotFoundError
    from rsvl.models.mini.refer import load_decoder, save_decoder

    path = save_decoder(tiny.decoder, tmp_path / "d.safetensors", metadata={"val": {"mIoU": 0.1}}, half=False)
    dec = load_decoder(path)
    assert dec.config == tiny.decoder.config
    for (k, a), (_, b) in zip(tiny.decoder.state_dict().items(), dec.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(CheckpointMismatchError):
        load_decoder(tmp_path / "other.safetensors")
    with pytest.raises(WeightsNotFoundError):
        load_decoder(tmp_path / "missing.safetensors")


def test_card_is_registered_for_refer():
    from rsvl.models.registry import get_card

    card = get_card("mini-refer")
    assert "refer" in card.tasks and card.image_size == 480
    from rsvl.models import mini

    assert card in mini.CARDS and mini.load(card).name == "mini-refer"
    assert card.source.bundled == "assets/mini-refer/decoder.safetensors"


def test_shipped_weights_beat_the_empty_and_full_baselines_on_real_val(tmp_path):
    """The shipped decoder on a few real (generated) NWPU val expressions."""
    from rsvl.cli import main
    from rsvl.eval import run_refer_model
    from rsvl.models.mini.refer import DEFAULT_WEIGHTS, load_mini_refer
    from rsvl.train.refer import reference_baselines

    coco = shared_data("nwpu_vhr10", "instances_train.json")
    if not DEFAULT_WEIGHTS.is_file():
        pytest.skip(f"shipped weights not found at {DEFAULT_WEIGHTS}")
    assert main(["data", "refgen", "--coco", str(coco), "--out", str(tmp_path / "refer"),
                 "--val-fraction", "0.15", "--seed", "0"]) == 0
    model = load_mini_refer()
    res = run_refer_model(model, tmp_path / "refer", split="val", limit=6, batch_size=3)
    base = reference_baselines(tmp_path / "refer", "val")
    assert res.metrics["n"] == 6
    assert res.metrics["mIoU"] > base["full"]["mIoU"] + 0.1
    assert res.metrics["oIoU"] > base["full"]["oIoU"] + 0.1
    assert np.isfinite(res.metrics["mIoU"])
