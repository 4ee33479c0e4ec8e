"""The one EfficientNet-Lite0 tower and the one MiniLM tower of the built-in models."""

from __future__ import annotations

import pytest
import torch

from rsvl.errors import CheckpointMismatchError
from rsvl.models.mini.towers import Lite0Tower, MiniLMTower, map_lite0_state_dict

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


def test_minilm_tower_mean_pools_sentences():
    tower = MiniLMTower(max_length=16)
    emb = tower(["a harbor with boats", "a forest"])
    assert emb.shape == (2, MiniLMTower.dim)
    assert not any(p.requires_grad for p in tower.parameters()) and not tower.train().training


def test_fused_lite0_gives_the_same_maps():
    """BatchNorms folded into the convolutions, channels-last: the same three maps (ImageNet
    statistics, so the folding really rescales every channel), no BatchNorm left."""
    torch.manual_seed(0)
    ref = Lite0Tower(True, last_block=6, head=True)
    fused = Lite0Tower(True, last_block=6, head=True).fuse_for_inference()
    n_bn = sum(isinstance(m, torch.nn.BatchNorm2d) for m in ref.modules())
    assert n_bn > 40 and not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    assert fused.fuse_for_inference() is fused  # idempotent
    x = torch.randn(2, 3, 96, 128)
    with torch.inference_mode():
        for a, b in zip(ref(x), fused(x), strict=True):
            assert a.shape == b.shape
            assert (a - b).abs().max() <= 1e-4 * max(1.0, float(a.abs().max()))


def test_fusing_a_training_tower_is_refused():
    with pytest.raises(ValueError, match="frozen tower"):
        Lite0Tower(False, last_block=5, train_from=3).fuse_for_inference()
