"""Every FIANet card's load path, offline, the torchgeo way.

The authors publish no weights, so the published layout is upstream ``train.py``'s
checkpoint: ``torch.save({'model': state_dict, 'optimizer': ..., 'epoch': ..., 'args':
argparse.Namespace(...), 'lr_scheduler': ...})``, with bert-base-uncased's ``vocab.txt``
placed beside it. For each card of :data:`rsvl.models.fianet.CARDS` a random checkpoint in
that layout is written at ``weights.cache_path(card)`` (``RSVL_CACHE`` pointed at a temporary
folder) and loaded through :func:`rsvl.models.registry.load`.

Swin-B + BERT-base (about 200 M parameters) is too large for a unit test: the model is
shrunk through the family's ``build`` overrides (Swin width 16, depths 1-1-2-1, window 4;
BERT 2 layers of width 32 over a 60-word vocabulary). The key names, the wrapping, the
file name and the card's own settings (its TMEM depth, token count and class list) are the
card's.
"""

from __future__ import annotations

import argparse

import pytest
import torch

from rsvl.models import registry
from rsvl.models.fianet import CARDS
from rsvl.models.weights import cache_path

torch.set_num_threads(1)

WORDS = ("the a of on in at to and large small left right top bottom middle near next road "
         "car building tank storage ship harbor bridge vehicle airplane two three").split()
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]

#: Swin / BERT widths and depths shrunk for a unit test (the layout stays the card's)
SHRUNK = dict(
    image_size=64, embed_dim=16, depths=(1, 1, 2, 1), num_heads=(1, 2, 2, 4), window_size=4,
    drop_path_rate=0.0, vocab_size=len(VOCAB), text_hidden_size=32, text_layers=2, text_heads=1,
    text_intermediate_size=64, text_max_positions=64, text_dropout=0.0,
)


@pytest.fixture(params=CARDS, ids=[c.name for c in CARDS])
def card(request):
    return request.param


def _upstream_checkpoint(model: torch.nn.Module) -> dict:
    """What upstream's ``train.py`` saves (``utils.save_on_master``)."""
    opt = torch.optim.AdamW(model.parameters(), lr=3e-5)
    return {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "epoch": 7,
        "args": argparse.Namespace(dataset="rrsisd", model="lavt_one", swin_type="base", num_tmem=3,
                                   bert_tokenizer="./bert-base-uncased", lr=3e-5, epochs=40),
        "lr_scheduler": {"last_epoch": 7, "base_lrs": [3e-5]},
    }


def test_random_checkpoint_in_the_upstream_layout_loads_from_the_cache(card, tmp_path, monkeypatch):
    monkeypatch.setenv("RSVL_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(0)
    built = registry.build(card.name, **SHRUNK)
    assert built.config.num_tmem == card.metadata["num_tmem"]
    assert built.config.max_tokens == card.metadata["max_tokens"]
    path = cache_path(card)
    path.parent.mkdir(parents=True)
    torch.save(_upstream_checkpoint(built), path)
    (path.parent / "vocab.txt").write_text("\n".join(VOCAB) + "\n", encoding="utf-8")

    model = registry.load(card.name)
    assert model.name == card.name and not model.training
    assert model.config.num_tmem == card.metadata["num_tmem"]
    expected, got = built.state_dict(), model.state_dict()
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert torch.equal(got[key], value), key
    text = model.tokenize(["the small ship on the left"])
    assert text["input_ids"].shape == (1, card.metadata["max_tokens"])
    with torch.no_grad():
        logits = model(torch.zeros(1, 3, 64, 64), text)
    assert logits.shape == (1, 2, 64, 64)


def test_same_file_passed_as_weights(card, tmp_path):
    torch.manual_seed(1)
    built = registry.build(card.name, **SHRUNK)
    path = tmp_path / card.source.filename
    torch.save(_upstream_checkpoint(built), path)
    (tmp_path / "vocab.txt").write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    model = registry.load(card.name, weights=path)
    assert set(model.state_dict()) == set(built.state_dict())
