"""``--fast`` for SAM and RSPrompter: the ViT's linear layers in int8 (LoRA merged first),
embeddings close to the float ones, and the flag carried through the family loaders."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from models.rsprompter.test_build import TINY_SAM

from rsvl.models import registry
from rsvl.models.int8 import is_int8
from rsvl.models.rsprompter import build as build_prompter
from rsvl.models.rsprompter.convert import save_prompter_checkpoint
from rsvl.models.sam.build import build_sam, load_sam, make_fast
from rsvl.models.sam.fast import merge_adapters

#: the tiny SAM of the RSPrompter load tests (128 px, 4-block 32-d ViT)
TINY = TINY_SAM


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)
    yield


def _pixels(seed: int = 0) -> torch.Tensor:
    return torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(seed))


def _min_cos(a: torch.Tensor, b: torch.Tensor) -> float:
    """Smallest cosine between the two embeddings' per-pixel channel vectors."""
    return F.cosine_similarity(a.flatten(2), b.flatten(2), dim=1).min().item()


def test_fast_encoder_is_int8_and_close_to_float():
    torch.manual_seed(0)
    sd = build_sam(TINY).state_dict()
    ref = load_sam(sd, TINY)
    fast = load_sam(sd, TINY, fast=True)
    assert fast.fast and not getattr(ref, "fast", False)
    assert is_int8(fast.image_encoder) and not is_int8(ref.image_encoder)
    assert not is_int8(fast.mask_decoder)  # only the encoder: the decoder is < 1 % of the time
    x = _pixels()
    with torch.inference_mode():
        want, want_hidden = ref.image_encoder(x, return_hidden_states=True)
        got, got_hidden = fast.image_encoder(x, return_hidden_states=True)
    assert got.shape == want.shape and len(got_hidden) == len(want_hidden)
    assert 0.99 < _min_cos(got, want) < 1.0  # int8: close, not equal
    assert not torch.equal(got, want)


def test_fast_is_a_cpu_float32_path_only(caplog):
    torch.manual_seed(0)
    with caplog.at_level(logging.WARNING, logger="rsvl.models.sam.build"):
        half = load_sam(build_sam(TINY).state_dict(), TINY, dtype=torch.bfloat16, fast=True)
    assert half.fast is False and not is_int8(half.image_encoder)
    assert "runs bfloat16 on cpu as it is" in caplog.text


def test_lora_is_merged_exactly_before_quantising():
    torch.manual_seed(0)
    model = build_prompter("rsprompter-anchor", num_classes=3, sam=TINY, lora=True,
                           representation_size=64).eval()
    enc = model.sam.image_encoder
    with torch.no_grad():
        for name, p in enc.named_parameters():
            if "lora_B" in name:  # zero at init: give the adapters an effect
                p.copy_(0.05 * torch.randn_like(p))
    x = _pixels(1)
    with torch.inference_mode():
        want = enc(x)
        merged = merge_adapters(enc)
        after = enc(x)
    assert merged == TINY.encoder_depth  # one adapted qkv per block
    assert not any("lora_" in n for n, _ in enc.named_parameters())
    torch.testing.assert_close(after, want, atol=1e-5, rtol=1e-4)


def test_registry_gives_fast_to_rsprompter(tmp_path):
    torch.manual_seed(0)
    card = "rsprompter-anchor-nwpu"
    model = build_prompter(card, sam=TINY, representation_size=64, lora=True)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn_like(p))
    path = save_prompter_checkpoint(model, tmp_path / "epoch_12.pth")
    plain = registry.load(card, weights=path, sam=TINY, representation_size=64, lora=True)
    fast = registry.load(card, weights=path, sam=TINY, representation_size=64, lora=True, fast=True)
    assert fast.fast and is_int8(fast.sam.image_encoder) and not is_int8(plain.sam.image_encoder)
    x = _pixels(2)
    with torch.inference_mode():
        assert 0.99 < _min_cos(fast.sam.image_encoder(x), plain.sam.image_encoder(x)) < 1.0
        out = fast([torch.rand(3, 128, 128)])  # the whole detector runs on the int8 encoder
    assert set(out[0]) >= {"boxes", "labels", "scores", "masks"}


def test_make_fast_on_an_already_loaded_model():
    torch.manual_seed(0)
    sam = build_sam(TINY).eval()
    assert make_fast(sam).fast and is_int8(sam.image_encoder)
