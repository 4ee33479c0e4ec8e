"""``rsvl.models.mini.build`` through the registry: the trainable architecture of each
built-in model with the overrides trainers pass."""

from __future__ import annotations

import pytest
import torch

from rsvl.models import registry
from rsvl.models.mini.clip import MiniClipHeads
from rsvl.models.mini.instances import FROZEN_PREFIXES, MiniInstances
from rsvl.models.mini.refer import MiniRefer


def test_build_mini_clip_heads_from_heads_config_fields():
    heads = registry.build("mini-clip", embed_dim=128, pooling="mean+max")
    assert isinstance(heads, MiniClipHeads)
    assert heads.config.embed_dim == 128 and heads.image_head.linear.out_features == 128
    assert heads.image_head.linear.in_features == 2 * (40 + 112 + 1280)
    with pytest.raises(TypeError, match="embed_dims"):
        registry.build("mini-clip", embed_dims=128)


def test_build_mini_instances_with_a_class_count():
    """The signature the instance trainer uses: num_classes=N, pretrained=..."""
    model = registry.build("mini-instances", num_classes=3, pretrained=False)
    assert isinstance(model, MiniInstances) and len(model.classes) == 3
    assert model.model.roi_heads.box_predictor.cls_score.out_features == 4
    trainable = {n for n, p in model.model.named_parameters() if p.requires_grad}
    assert trainable and not any(n.startswith(FROZEN_PREFIXES) for n in trainable)
    assert any(n.startswith("backbone.body.block3.") for n in trainable)
    named = registry.build("mini-instances", classes=["ship", "tank"], backbone="tiny", fpn_channels=32)
    assert named.classes == ["ship", "tank"] and named.config.fpn_channels == 32
    with pytest.raises(TypeError, match="num_classes"):
        registry.build("mini-instances")
    with pytest.raises(ValueError, match="num_classes"):
        registry.build("mini-instances", num_classes=3, classes=["a"])


def test_built_mini_instances_train_and_predict():
    model = registry.build("mini-instances", num_classes=2, backbone="tiny", train_min_size=(64,),
                           test_min_size=64, max_size=96)
    image = torch.rand(3, 64, 64)
    target = {"boxes": torch.tensor([[8.0, 8.0, 40.0, 40.0]]), "labels": torch.tensor([1]),
              "masks": torch.zeros(1, 64, 64, dtype=torch.uint8)}
    target["masks"][0, 8:40, 8:40] = 1
    model.train()
    losses = model([image], [target])
    assert set(losses) >= {"loss_classifier", "loss_mask"}
    model.eval()
    with torch.no_grad():
        (out,) = model([image])
    assert set(out) >= {"boxes", "labels", "scores", "masks"}


def test_build_mini_refer_with_decoder_overrides():
    model = registry.build("mini-refer", pretrained=False, dim=32, heads=2, global_layers=0)
    assert isinstance(model, MiniRefer)
    assert model.config.dim == 32 and len(model.decoder.global_layers) == 0
    assert all(not p.requires_grad for p in model.image_encoder.parameters())
    assert all(p.requires_grad for p in model.decoder.parameters())
    text = model.tokenize(["the ship on the left"])
    with torch.no_grad():
        logits = model(torch.zeros(1, 3, 64, 64), text)
    assert logits.shape == (1, 2, 64, 64)
