"""The one EfficientNet-Lite0 tower and the one MiniLM tower of the built-in models."""

from __future__ import annotations

import pytest
import torch

from rsvl.errors import CheckpointMismatchError
from rsvl.models.checkpoint import read_file
from rsvl.models.mini.towers import (
    Lite0Tower,
    MiniLMTower,
    lite0_network,
    lite0_weights_path,
    map_lite0_state_dict,
    minilm_encoder,
    minilm_path,
    minilm_tokenizer,
)

torch.set_num_threads(2)


@pytest.mark.parametrize(("kwargs", "channels"), [
    ({"last_block": 6, "head": True}, (40, 112, 1280)),   # mini-clip
    ({"last_block": 6}, (40, 112, 320)),                  # mini-refer
    ({"last_block": 5, "train_from": 3}, (40, 112, 192)),  # mini-instances
])
def test_lite0_tower_maps_at_strides_8_16_32(kwargs, channels):
    tower = Lite0Tower(pretrained=False, **kwargs)
    assert tower.channels == channels
    f8, f16, f32 = tower(torch.zeros(1, 3, 64, 96))
    assert [f.shape[1] for f in (f8, f16, f32)] == list(channels)
    assert [tuple(f.shape[-2:]) for f in (f8, f16, f32)] == [(8, 12), (4, 6), (2, 3)]


def test_lite0_tower_freezing():
    frozen = Lite0Tower(pretrained=False)
    assert not any(p.requires_grad for p in frozen.parameters())
    assert not frozen.train().training
    partly = Lite0Tower(pretrained=False, last_block=5, train_from=3)
    partly.train()
    assert partly.training
    assert not any(p.requires_grad for n, p in partly.named_parameters()
                   if n.startswith(("stem.", "block0.", "block1.", "block2.")))
    assert all(p.requires_grad for p in partly.block3.parameters())
    assert not any(m.training for m in partly.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert not hasattr(partly, "block6")
    with pytest.raises(ValueError):
        Lite0Tower(pretrained=False, last_block=5, head=True)


def test_pretrained_lite0_weights_map_strictly():
    tower = Lite0Tower(pretrained=True, last_block=6, head=True)
    assert tower.stem[0].weight.abs().sum() > 0
    with pytest.raises(CheckpointMismatchError, match="unexpected key"):
        map_lite0_state_dict({"_something_else.weight": torch.zeros(1)})


@pytest.mark.parametrize("size", [(224, 224), (257, 131), (64, 96)])
def test_lite0_network_equals_timms_tf_efficientnet_lite0(size):
    """rsvl's own Lite0 (no timm import at load) computes what timm's network does with the
    same weights, at odd sizes too (TF "SAME" padding), and has the same parameter names."""
    timm = pytest.importorskip("timm")
    ours = lite0_network(pretrained=True).eval()
    ref = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    ref.load_state_dict(map_lite0_state_dict(read_file(lite0_weights_path(), "Lite0")))
    ref.eval()
    assert sorted(ours.state_dict()) == sorted(k for k in ref.state_dict() if not k.startswith("classifier."))
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = ref.bn2(ref.conv_head(ref.blocks(ref.bn1(ref.conv_stem(x)))))
        torch.testing.assert_close(ours(x), expected, rtol=1e-5, atol=1e-5)


def test_minilm_tower_mean_pools_sentences():
    tower = MiniLMTower(max_length=16)
    emb = tower(["a harbor with boats", "a forest"])
    assert emb.shape == (2, MiniLMTower.dim)
    assert not any(p.requires_grad for p in tower.parameters()) and not tower.train().training


TEXTS = ["a harbor with boats", "A FOREST", "", "café naïve 123",
         "the large storage tank next to the road, left of the white building near a crossing with cars"]


@pytest.mark.parametrize("options", [{"padding": True, "truncation": True, "max_length": 12},
                                     {"padding": "max_length", "truncation": True, "max_length": 20},
                                     {"padding": True, "truncation": True, "max_length": 128}])
def test_minilm_tokenizer_and_encoder_equal_transformers(options):
    """rsvl's tokenizer (the ``tokenizers`` library) and BERT encoder (no transformers import
    at load) give transformers' token ids and word states on the same files."""
    transformers = pytest.importorskip("transformers")
    path = str(minilm_path())
    ref_tok = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    ref = transformers.AutoModel.from_pretrained(path, local_files_only=True).eval()
    tok, enc = minilm_tokenizer(), minilm_encoder()
    expected, got = ref_tok(TEXTS, return_tensors="pt", **options), tok(TEXTS, **options)
    for key in ("input_ids", "token_type_ids", "attention_mask"):
        assert torch.equal(got[key], expected[key]), key
    assert tok.vocab_size == ref_tok.vocab_size
    with torch.no_grad():
        torch.testing.assert_close(enc(**got).last_hidden_state, ref(**expected).last_hidden_state,
                                   rtol=1e-5, atol=1e-5)
