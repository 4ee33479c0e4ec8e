"""``--fast`` on the CPU: attention split into linear layers (exact), then int8 linear layers
(close to float), on tiny random open_clip configs compared with open_clip itself."""

from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch")
open_clip = pytest.importorskip("open_clip")
F = torch.nn.functional

from models.clip.test_model import (  # noqa: E402
    RN_CFG,
    TEXTS,
    VIT_CFG,
    _card,
    _images,
    _ref_image,
    _ref_text,
    _tiny,
)

from rsvl.models import clip as rclip  # noqa: E402
from rsvl.models.clip.fast import ProjAttention, split_attention  # noqa: E402

torch.set_num_threads(1)
QLINEAR = torch.ao.nn.quantized.dynamic.Linear


@pytest.fixture(scope="module")
def vit():
    return _tiny(VIT_CFG, seed=3)


def test_split_attention_is_exact(vit):
    """Same weights as linear layers + SDPA: open_clip's image and text outputs (the text
    tower's causal mask included) within float rounding."""
    net = copy.deepcopy(vit)
    n_mha = sum(isinstance(m, torch.nn.MultiheadAttention) for m in net.modules())
    assert split_attention(net) == n_mha == 4
    assert not any(isinstance(m, torch.nn.MultiheadAttention) for m in net.modules())
    card = _card()
    images = _images(3, 32)
    assert (_ref_image(net, images, card) - _ref_image(vit, images, card)).abs().max() <= 1e-5
    assert (_ref_text(net, TEXTS) - _ref_text(vit, TEXTS)).abs().max() <= 1e-5


def test_split_attention_sequence_first():
    """Older open_clip transformers are sequence-first (L, B, C)."""
    mha = torch.nn.MultiheadAttention(32, 2, batch_first=False).eval()
    x = torch.randn(7, 3, 32)
    mask = torch.full((7, 7), float("-inf")).triu(1)
    ref = mha(x, x, x, need_weights=False, attn_mask=mask)[0]
    out, weights = ProjAttention(mha)(x, x, x, need_weights=False, attn_mask=mask)
    assert weights is None and (out - ref).abs().max() <= 1e-5
    with pytest.raises(NotImplementedError, match="self-attention"):
        ProjAttention(mha)(x, torch.randn(7, 3, 32), x)


def test_fast_model_is_int8_and_close_to_float(vit):
    card = _card()
    slow = rclip.from_open_clip(copy.deepcopy(vit), card)
    fast = rclip.from_open_clip(copy.deepcopy(vit), card, fast=True)
    assert fast.fast and not slow.fast and "int8" in repr(fast)
    linears = [m for m in fast.model.modules() if isinstance(m, (torch.nn.Linear, QLINEAR))]
    assert linears and all(isinstance(m, QLINEAR) for m in linears)  # attention projections too
    images = _images(4, 32)
    cos_img = (fast.encode_image(images) * slow.encode_image(images)).sum(-1)
    cos_txt = (fast.encode_text(TEXTS) * slow.encode_text(TEXTS)).sum(-1)
    assert cos_img.min() > 0.98 and cos_txt.min() > 0.98
    assert cos_img.min() < 1 - 1e-7  # really quantised, not the float path
    # the dense path reads the last block's projections through the int8 layers
    d_fast, d_slow = fast.dense_features(_images(1, 64)), slow.dense_features(_images(1, 64))
    assert d_fast.shape == d_slow.shape == (1, 32, 4, 4)
    assert (d_fast * d_slow).sum(1).min() > 0.95


def test_fast_keeps_zero_shot_decisions(vit):
    """int8 changes scores a little, not which prompt an image is closest to (on images whose
    best and second-best prompts are apart)."""
    card = _card()
    slow = rclip.from_open_clip(copy.deepcopy(vit), card)
    fast = rclip.from_open_clip(copy.deepcopy(vit), card, fast=True)
    images = _images(32, 32, seed=5)
    s_slow = slow.encode_image(images) @ slow.encode_text(TEXTS).T
    s_fast = fast.encode_image(images) @ fast.encode_text(TEXTS).T
    top2 = s_slow.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 0.02
    assert clear.sum() >= 8
    assert torch.equal(s_slow.argmax(-1)[clear], s_fast.argmax(-1)[clear])


def test_fast_resnet_keeps_the_attention_pool_float():
    rn = _tiny(RN_CFG, seed=4)
    fast = rclip.from_open_clip(copy.deepcopy(rn), _card(image_size=64), fast=True)
    pool = fast.model.visual.attnpool
    assert isinstance(pool.q_proj, torch.nn.Linear) and not isinstance(pool.q_proj, QLINEAR)
    assert any(isinstance(m, QLINEAR) for m in fast.model.transformer.modules())
    images = _images(2, 64)
    ref = _ref_image(rn, images, _card(image_size=64))
    assert (fast.encode_image(images) - ref).abs().max() <= 1e-5  # image tower untouched
    dense, cls = fast.dense_features(images, return_cls=True)
    assert dense.shape == (2, 32, 2, 2)


def test_fast_load_from_a_checkpoint(vit, tmp_path):
    path = tmp_path / "tiny.pt"
    torch.save(vit.state_dict(), path)
    m = rclip.load_clip(_card(), weights=path, model_cfg=VIT_CFG, fast=True)
    assert m.fast
    assert (m.encode_image(_images(2, 32)) * _ref_image(vit, _images(2, 32), _card())).sum(-1).min() > 0.98


def test_fast_needs_float32_on_the_cpu(vit):
    with pytest.raises(ValueError, match="float32"):
        rclip.from_open_clip(copy.deepcopy(vit), _card(), dtype="bf16", fast=True)
