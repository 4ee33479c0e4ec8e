"""Layers whose settings must be upstream's (MMDetection / mmcv) for the same weights to give
the same numbers: the simple FPN's LayerNorm eps and the RoIAlign sampling grid.

The RoIAlign check is a hand computation: on a feature map that is a linear ramp, bilinear
sampling is exact and the mean over a bin is the ramp's value at the bin centre, so every
pooled value is known in closed form. mmcv's ``RoIAlign(aligned=True)`` shifts the box by half
a pixel onto pixel centres; torchvision's default (``aligned=False``) does not.
"""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torchvision.ops import MultiScaleRoIAlign

from rsvl.models.rsprompter.build import build
from rsvl.models.rsprompter.roi_pool import AlignedMultiScaleRoIAlign
from rsvl.models.sam.common import LayerNorm2d
from rsvl.models.sam.config import SamConfig

TINY = SamConfig(
    image_size=128, patch_size=16, encoder_embed_dim=32, encoder_depth=4, encoder_num_heads=2,
    encoder_global_attn_indexes=(1, 3), window_size=4, prompt_embed_dim=32, mask_in_chans=16,
    decoder_depth=2, decoder_num_heads=2, decoder_mlp_dim=64, iou_head_hidden_dim=32,
)
SMALL = dict(representation_size=64)


def _build(name: str, **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    return build(name, num_classes=2, sam=TINY, **kw)


# ---------------------------------------------------------------- LayerNorm eps of the FPN


@pytest.mark.parametrize(
    "name, kw",
    [
        ("rsprompter-anchor", SMALL),
        ("rsprompter-query", dict(num_queries=4, feat_channels=32, ffn_channels=64, num_decoder_layers=1,
                                  encoder_layers=1)),
        ("sam-seg", dict(SMALL, mask_head_channels=32)),
        ("sam-seg", dict(head="mask2former", num_queries=4, feat_channels=32, ffn_channels=64,
                         num_decoder_layers=1)),
    ],
)
def test_fpn_layernorms_use_mmcv_eps(name: str, kw: dict) -> None:
    model = _build(name, **kw)
    norms = [m for m in model.fpn.modules() if isinstance(m, LayerNorm2d)]
    assert len(norms) == 1 + 4 + 4  # fpn1's norm, four lateral and four output convs
    assert all(m.eps == 1e-5 for m in norms)  # mmcv build_norm_layer's default, not SAM's 1e-6
    # SAM's own neck keeps segment-anything's 1e-6
    sam_norms = [m for m in model.sam.image_encoder.modules() if isinstance(m, LayerNorm2d)]
    assert sam_norms and all(m.eps == 1e-6 for m in sam_norms)


def test_fpn_layernorm_eps_changes_the_numbers_as_computed_by_hand() -> None:
    """Channels (+a, -a) have mean 0 and variance a^2: LN gives a / sqrt(a^2 + eps)."""
    norm = _build("rsprompter-anchor", **SMALL).fpn.lateral_convs[0].norm_layer
    c = norm.weight.shape[0]
    a = 1e-3
    x = torch.tensor([a, -a] * (c // 2), dtype=torch.float64).reshape(1, c, 1, 1)
    with torch.no_grad():
        norm.double().weight.fill_(1.0)
        norm.bias.zero_()
        y = norm(x)
    expected = a / (a * a + 1e-5) ** 0.5  # 0.3015..., with eps 1e-6 it would be 0.7071...
    assert float(y[0, 0, 0, 0]) == pytest.approx(expected, rel=1e-9)


# ---------------------------------------------------------------- RoIAlign, aligned=True

IMAGE = 512
STRIDES = (4, 8, 16, 32)
#: one box per pyramid level (MMDetection's finest_scale=56 mapping: side < 112 -> level 0, ...)
BOXES = torch.tensor([
    [8.0, 12.0, 48.0, 52.0],      # side 40   -> level 0 (stride 4)
    [100.0, 60.0, 250.0, 210.0],  # side 150  -> level 1 (stride 8)
    [96.0, 120.0, 396.0, 420.0],  # side 300  -> level 2 (stride 16)
    [8.0, 8.0, 472.0, 472.0],     # side 464  -> level 3 (stride 32)
])


def _ramp_levels(channels: int) -> OrderedDict[str, torch.Tensor]:
    """Level l holds f(y, x) = x + 2 y + 1000 l in every channel (x, y: pixel indices)."""
    out = OrderedDict()
    for level, s in enumerate(STRIDES):
        n = IMAGE // s
        y, x = torch.meshgrid(torch.arange(n, dtype=torch.float64), torch.arange(n, dtype=torch.float64),
                              indexing="ij")
        out[str(level)] = (x + 2 * y + 1000 * level).expand(1, channels, n, n).contiguous()
    return out


def _by_hand(out: int, aligned: bool) -> torch.Tensor:
    """Bin-centre values of the ramp: box corners / stride, minus half a pixel if aligned."""
    res = torch.zeros(len(BOXES), out, out, dtype=torch.float64)
    shift = 0.5 if aligned else 0.0
    centres = (torch.arange(out, dtype=torch.float64) + 0.5) / out
    for i, (level, s) in enumerate(zip(range(4), STRIDES, strict=True)):
        x1, y1, x2, y2 = (BOXES[i].double() / s).tolist()
        cx = x1 - shift + centres * (x2 - x1)
        cy = y1 - shift + centres * (y2 - y1)
        res[i] = cx[None, :] + 2 * cy[:, None] + 1000 * level
    return res


def _poolers() -> list[tuple[str, torch.nn.Module]]:
    anchor = _build("rsprompter-anchor", **SMALL)
    seg = _build("sam-seg", **SMALL, mask_head_channels=32)
    det = _build("sam-det", backbone="resnet18", representation_size=64)
    return [
        ("anchor box", anchor.roi_heads.box_roi_pool),
        ("anchor prompt", anchor.roi_heads.prompt_roi_pool),
        ("sam-seg box", seg.roi_heads.box_roi_pool),
        ("sam-seg mask", seg.roi_heads.mask_roi_pool),
        ("sam-det box", det.detector.roi_heads.box_roi_pool),
    ]


def test_every_roi_pooler_samples_like_mmcv_roialign_aligned_true() -> None:
    feats = _ramp_levels(2)
    for what, pool in _poolers():
        out = pool.output_size[0]
        got = pool(feats, [BOXES.double()], [(IMAGE, IMAGE)])
        assert got.shape == (len(BOXES), 2, out, out), what
        expected = _by_hand(out, aligned=True)
        torch.testing.assert_close(got[:, 0], expected, rtol=0, atol=1e-9, msg=what)
        torch.testing.assert_close(got[:, 1], expected, rtol=0, atol=1e-9, msg=what)
        assert isinstance(pool, AlignedMultiScaleRoIAlign), what
        assert pool.sampling_ratio == 0, what  # mmdet: RoIAlign(output_size, sampling_ratio=0)


def test_hand_computation_tells_aligned_from_torchvisions_default() -> None:
    """The same boxes through torchvision's pooler land half a pixel away: the check above
    would fail on an ``aligned=False`` pooler."""
    feats = _ramp_levels(1)
    plain = MultiScaleRoIAlign(list(feats), 7, 0)(feats, [BOXES.double()], [(IMAGE, IMAGE)])
    torch.testing.assert_close(plain[:, 0], _by_hand(7, aligned=False), rtol=0, atol=1e-9)
    assert not torch.allclose(plain[:, 0], _by_hand(7, aligned=True))
    # a half-pixel shift in x and y moves the ramp x + 2y by 1.5 everywhere
    torch.testing.assert_close(_by_hand(7, aligned=False) - _by_hand(7, aligned=True),
                               torch.full((4, 7, 7), 1.5, dtype=torch.float64))


def test_aligned_pooler_keeps_sub_pixel_boxes_unclamped() -> None:
    """aligned=True does not widen a box under one pixel (aligned=False clamps it to 1)."""
    feat = OrderedDict(a=torch.arange(16, dtype=torch.float64).reshape(1, 1, 1, 16).expand(1, 1, 16, 16))
    box = torch.tensor([[4.0, 4.0, 4.4, 4.4]], dtype=torch.float64)
    got = AlignedMultiScaleRoIAlign(["a"], 1, 1)(feat, [box], [(16, 16)])
    assert float(got) == pytest.approx(4.2 - 0.5)
