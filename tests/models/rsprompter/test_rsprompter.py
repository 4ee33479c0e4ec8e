"""RSPrompter (anchor, query) and the SAM-seg / SAM-det baselines on tiny random SAMs.

No network, no downloaded weights: every SAM here is a tiny random config (128 px, 4 ViT
blocks, 32-d) so that a few optimiser steps per variant take a second or two on one thread.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from rsvl.errors import CheckpointMismatchError, UnknownModelError
from rsvl.models.rsprompter.aggregator import FeatureAggregator
from rsvl.models.rsprompter.build import INSTANCE_MODELS, build, prompt_shape
from rsvl.models.rsprompter.convert import (
    load_prompter_checkpoint,
    save_prompter_checkpoint,
    upstream_name,
)
from rsvl.models.rsprompter.losses import hungarian_match, match_masks
from rsvl.models.rsprompter.prompts import RoIPromptHead, sincos_prompts
from rsvl.models.sam.config import SamConfig

TINY = SamConfig(
    image_size=128,
    patch_size=16,
    encoder_embed_dim=32,
    encoder_depth=4,
    encoder_num_heads=2,
    encoder_global_attn_indexes=(1, 3),
    window_size=4,
    prompt_embed_dim=32,
    mask_in_chans=16,
    decoder_depth=2,
    decoder_num_heads=2,
    decoder_mlp_dim=64,
    iou_head_hidden_dim=32,
)

#: small heads so that training steps stay fast (architecture otherwise as upstream)
SMALL: dict[str, dict] = {
    "rsprompter-anchor": dict(representation_size=64),
    "rsprompter-query": dict(
        num_queries=6, feat_channels=32, ffn_channels=64, num_decoder_layers=2, encoder_layers=1,
        loss_points=256,
    ),
    "sam-seg": dict(representation_size=64, mask_head_channels=32),
    "sam-det": dict(representation_size=64, box_batch_size_per_image=64),
}


class _TinyDetBackbone(torch.nn.Module):
    """Strides 4-32 + a pooled level, 16 channels: stands in for ResNet-50-FPN in tests."""

    out_channels = 16

    def __init__(self) -> None:
        super().__init__()
        c = self.out_channels
        self.stem = torch.nn.Sequential(torch.nn.Conv2d(3, c, 4, 4), torch.nn.ReLU())
        self.down = torch.nn.ModuleList(torch.nn.Conv2d(c, c, 3, 2, 1) for _ in range(3))

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        feats = [self.stem(x)]
        for conv in self.down:
            feats.append(torch.relu(conv(feats[-1])))
        out = OrderedDict((str(i), f) for i, f in enumerate(feats))
        out["pool"] = torch.nn.functional.max_pool2d(feats[-1], 1, 2)
        return out
LOSSES = {
    "rsprompter-anchor": {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg", "loss_mask"},
    "rsprompter-query": {
        f"{p}{k}" for p in ("", "d0.", "d1.")
        for k in ("loss_cls", "loss_mask", "loss_dice", "loss_mask_plus", "loss_dice_plus")
    },
    "sam-seg": {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg", "loss_mask"},
    "sam-det": {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg"},
}


@pytest.fixture(autouse=True)
def _threads():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _build(name: str, **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    if name == "sam-det":
        kw.setdefault("backbone", _TinyDetBackbone())
    return build(name, num_classes=2, sam=TINY, **{**SMALL[name], **kw})


def _sample() -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """One 128 x 96 image with two bright rectangles of two classes."""
    g = torch.Generator().manual_seed(0)
    img = torch.rand(3, 128, 96, generator=g) * 0.2
    masks = torch.zeros(2, 128, 96, dtype=torch.uint8)
    masks[0, 20:60, 10:50] = 1
    masks[1, 70:110, 40:90] = 1
    img[:, masks[0].bool()] += 0.6
    img[1, masks[1].bool()] += 0.7
    target = dict(
        boxes=torch.tensor([[10.0, 20, 50, 60], [40, 70, 90, 110]]),
        labels=torch.tensor([1, 2]),
        masks=masks,
    )
    return [img.clamp(0, 1)], [target]


@pytest.mark.parametrize("name", INSTANCE_MODELS)
def test_train_losses_decrease_and_eval_structure(name: str) -> None:
    model = _build(name)
    images, targets = _sample()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    totals = []
    for _ in range(10):
        losses = model(images, targets)
        assert set(losses) == LOSSES[name]
        assert all(torch.isfinite(v) and v.ndim == 0 for v in losses.values())
        total = sum(losses.values())
        opt.zero_grad()
        total.backward()
        opt.step()
        totals.append(float(total.detach()))
    assert np.mean(totals[-3:]) < np.mean(totals[:3]), totals

    model.eval()
    with torch.no_grad():
        preds = model(images)
    assert isinstance(preds, list) and len(preds) == 1
    p = preds[0]
    assert set(p) == {"boxes", "labels", "scores", "masks"}
    n = p["boxes"].shape[0]
    assert p["boxes"].shape == (n, 4) and p["boxes"].dtype == torch.float32
    assert p["labels"].shape == (n,) and p["labels"].dtype == torch.int64
    assert p["scores"].shape == (n,)
    assert p["masks"].shape == (n, 1, 128, 96) and p["masks"].dtype == torch.float32
    if n:
        assert 1 <= int(p["labels"].min()) and int(p["labels"].max()) <= 2
        assert 0.0 <= float(p["masks"].min()) and float(p["masks"].max()) <= 1.0
        assert float(p["boxes"][:, 2].max()) <= 96 + 1e-3 and float(p["boxes"][:, 3].max()) <= 128 + 1e-3


def test_vit_frozen_without_lora_and_lora_trains_only_qkv_adapters() -> None:
    model = _build("rsprompter-anchor")
    enc = model.sam.image_encoder
    assert not any(p.requires_grad for p in enc.parameters())
    # the mask decoder is fine-tuned (upstream decoder_freeze=False), the aggregator trains
    assert all(p.requires_grad for p in model.sam.mask_decoder.parameters())
    assert all(p.requires_grad for p in model.aggregator.parameters())
    model.train()
    assert not enc.training  # a frozen ViT stays in eval mode

    lora = _build("rsprompter-anchor", lora=True)
    names = [n for n, p in lora.sam.image_encoder.named_parameters() if p.requires_grad]
    assert names and all(".attn.qkv.lora_" in n for n in names)
    assert len(names) == 2 * TINY.encoder_depth  # lora_A and lora_B per block
    a = dict(lora.sam.image_encoder.named_parameters())[names[0]]
    assert 16 in a.shape  # rank 16
    before = {n: p.detach().clone() for n, p in lora.sam.image_encoder.named_parameters()}
    images, targets = _sample()
    opt = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        loss = sum(lora(images, targets).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
    changed = {n for n, p in lora.sam.image_encoder.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n for n in changed)


def test_aggregator_uses_every_other_layer() -> None:
    agg = FeatureAggregator(768, 13, 32, 256)
    assert agg.select_layers == (1, 3, 5, 7, 9, 11)  # ViT-B: range(1, 13, 2)
    assert len(agg.downconvs) == 6
    assert FeatureAggregator(1280, 33, 8, 16).select_layers == tuple(range(1, 33, 2))

    tiny = FeatureAggregator(8, 5, 4, 6).eval()
    states = [torch.randn(1, 4, 4, 8) for _ in range(5)]
    out = tiny(states)
    assert out.shape == (1, 6, 4, 4)
    # changing an unselected layer (0, 2, 4) changes nothing; a selected one (1, 3) does
    for i, used in [(0, False), (1, True), (2, False), (3, True), (4, False)]:
        mod = list(states)
        mod[i] = torch.randn(1, 4, 4, 8)
        assert (not torch.allclose(tiny(mod), out)) == used, i


def test_sincos_prompt_shapes() -> None:
    v = torch.randn(7, 5 * 2 * 32)
    p = sincos_prompts(v, 5)
    assert p.shape == (7, 5, 32)
    pairs = v.view(7, 5, 64)
    torch.testing.assert_close(p, torch.sin(pairs[..., 0::2]) + pairs[..., 1::2])

    head = RoIPromptHead(in_channels=16, prompt_dim=32, roi_size=14, num_points=5)
    assert head(torch.randn(3, 16, 14, 14)).shape == (3, 5, 32)

    model = _build("rsprompter-query", num_points=4)
    q = model.head
    assert q.point_emb[-1].out_features == 4 * 2 * TINY.prompt_embed_dim


def test_prompt_shapes_per_dataset() -> None:
    assert prompt_shape("rsprompter-anchor", "nwpu") == (70, 5)
    assert prompt_shape("rsprompter-anchor", "WHU") == (100, 5)
    assert prompt_shape("rsprompter-query", "ssdd") == (30, 5)
    m = build("rsprompter-query", num_classes=1, sam=TINY, dataset="ssdd", feat_channels=32, ffn_channels=64,
        num_decoder_layers=1, encoder_layers=1,
    )
    assert (m.num_queries, m.num_points) == (30, 5)
    assert m.head.query_feat.weight.shape[0] == 30
    with pytest.raises(UnknownModelError):
        prompt_shape("rsprompter-query", "dota")
    with pytest.raises(UnknownModelError):
        build("rsprompter-box", num_classes=1, sam=TINY)


def test_hungarian_matching_matches_scipy() -> None:
    cost = torch.tensor([[4.0, 1.0, 3.0], [2.0, 0.0, 5.0], [3.0, 2.0, 2.0], [9.0, 9.0, 0.5]])
    rows, cols = hungarian_match(cost)
    r, c = linear_sum_assignment(cost.numpy())
    assert rows.tolist() == r.tolist() and cols.tolist() == c.tolist()
    # hand-checked optimum: pred 1 -> gt 1 is cheap but pred 0 must then take gt 0 or 2 ...
    assert sorted(zip(rows.tolist(), cols.tolist(), strict=True)) == [(0, 1), (1, 0), (3, 2)]
    assert float(cost[rows, cols].sum()) == pytest.approx(3.5)

    # mask matching: query k predicts gt (k + 1) % 3 exactly -> that is the assignment
    gt = torch.zeros(3, 32, 32)
    gt[0, :10, :10] = 1
    gt[1, 15:30, 5:20] = 1
    gt[2, 2:12, 18:30] = 1
    perm = [1, 2, 0]
    logits = torch.full((4, 32, 32), -8.0)
    for k, g in enumerate(perm):
        logits[k][gt[g] > 0] = 8.0
    cls = torch.zeros(4, 3)
    q, g = match_masks(cls, logits, torch.tensor([0, 1, 0]), gt, num_points=512)
    assert dict(zip(g.tolist(), q.tolist(), strict=True)) == {1: 0, 2: 1, 0: 2}


def test_checkpoint_roundtrip_in_mmdet_layout(tmp_path) -> None:
    for name in ("rsprompter-anchor", "rsprompter-query"):
        model = _build(name)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.01)
        path = save_prompter_checkpoint(model, tmp_path / f"{name}.pth", meta={"epoch": 3})
        raw = torch.load(path, weights_only=True)
        assert set(raw) == {"state_dict", "meta"} and raw["meta"]["epoch"] == 3
        sd = raw["state_dict"]
        assert any(k.startswith("backbone.vision_encoder.layers.0.attn.qkv") for k in sd)
        assert any(k.startswith("neck.feature_aggregator.downconvs.0.") for k in sd)
        assert any(k.startswith("neck.feature_spliter.lateral_convs.0.norm_layer.") for k in sd)
        assert "shared_image_embedding.shared_image_embedding.positional_embedding" in sd
        if name == "rsprompter-anchor":
            assert "roi_head.mask_head.no_mask_embed.weight" in sd
            assert "roi_head.mask_head.point_emb.8.weight" in sd
            assert "roi_head.mask_head.mask_decoder.mask_decoder.upscale_conv1.weight" in sd
            assert sd["roi_head.bbox_head.fc_cls.weight"].shape[0] == 3  # 2 classes + bg (last)
            assert sd["roi_head.bbox_head.fc_reg.weight"].shape[0] == 8  # class-specific, no bg
            assert "rpn_head.rpn_cls.weight" in sd
        else:
            assert "panoptic_head.sam_mask_embed.conv1.weight" in sd
            assert "panoptic_head.pixel_decoder.encoder.layers.0.self_attn.sampling_offsets.weight" in sd
            assert "panoptic_head.transformer_decoder.layers.0.cross_attn.attn.in_proj_weight" in sd
            assert "panoptic_head.mask_decoder.mask_decoder.iou_token.weight" in sd
        assert not any("point_embed" in k or "not_a_point" in k for k in sd)

        fresh = _build(name)
        load_prompter_checkpoint(fresh, path)
        want, got = model.state_dict(), fresh.state_dict()
        for k, v in want.items():
            if upstream_name(model, k) is None:
                continue
            if k.endswith("box_predictor.bbox_pred.weight") or k.endswith("box_predictor.bbox_pred.bias"):
                torch.testing.assert_close(got[k][4:], v[4:])  # the unused bg rows are not stored
            else:
                torch.testing.assert_close(got[k], v, msg=k)

    # mismatches name the keys as spelled in the file
    sd = dict(raw["state_dict"])
    sd.pop("panoptic_head.query_feat.weight")
    sd["panoptic_head.extra.weight"] = torch.zeros(1)
    sd["panoptic_head.level_embed.weight"] = torch.zeros(5, 5)
    with pytest.raises(CheckpointMismatchError) as exc:
        load_prompter_checkpoint(_build("rsprompter-query"), {"state_dict": sd})
    msg = str(exc.value)
    assert "panoptic_head.query_feat.weight" in msg
    assert "panoptic_head.extra.weight" in msg
    assert "panoptic_head.level_embed.weight" in msg
    with pytest.raises(CheckpointMismatchError):  # the wrong variant
        load_prompter_checkpoint(_build("rsprompter-anchor"), tmp_path / "rsprompter-query.pth")


def test_lora_checkpoint_roundtrip(tmp_path) -> None:
    model = _build("sam-seg", lora=True)
    path = save_prompter_checkpoint(model, tmp_path / "samseg.pth")
    sd = torch.load(path, weights_only=True)["state_dict"]
    assert "backbone.vision_encoder.layers.0.attn.qkv.lora_A.default.weight" in sd
    assert "roi_head.mask_head.conv_logits.weight" in sd
    fresh = _build("sam-seg", lora=True)
    load_prompter_checkpoint(fresh, path)
    key = "sam.image_encoder.blocks.0.attn.qkv.lora_A.default.weight"
    torch.testing.assert_close(fresh.state_dict()[key], model.state_dict()[key])
    with pytest.raises(CheckpointMismatchError, match="lora"):
        load_prompter_checkpoint(_build("sam-seg"), path)


def test_prompter_cards_registered() -> None:
    from rsvl.models.registry import get_card

    card = get_card("rsprompter-anchor-nwpu")
    assert card.family == "rsprompter" and card.sha256 is None
    assert card.metadata["num_classes"] == 10 and card.metadata["prompt_shape"] == (70, 5)
    assert get_card("rsprompter-query-ssdd").metadata["prompt_shape"] == (30, 5)


def test_pickled_objects_in_an_rsprompter_checkpoint_get_the_one_line_conversion_advice(tmp_path):
    import os

    from rsvl.errors import CheckpointMismatchError
    from rsvl.models.checkpoint import CONVERT_HINT
    from rsvl.models.rsprompter.convert import load_prompter_checkpoint

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    bad = tmp_path / "mmdet.pth"
    torch.save({"state_dict": {"a": torch.zeros(1)}, "message_hub": Payload()}, bad)
    with pytest.raises(CheckpointMismatchError, match="rsvl refuses to unpickle") as err:
        load_prompter_checkpoint(torch.nn.Linear(1, 1), bad)
    text = str(err.value)
    assert not marker.exists()
    assert "weights_only=False" not in text and "\n" not in text
    assert CONVERT_HINT in text and "safetensors" in text
