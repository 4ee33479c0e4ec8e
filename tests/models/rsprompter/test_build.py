"""Every RSPrompter card's load path, offline (torchgeo's weight tests).

RSPrompter publishes no trained weights: a user passes their own checkpoint with
``--weights``. Each card's test writes a random checkpoint in that layout (MMDetection's
``{'state_dict', 'meta'}`` with RSPrompter's key names, an MMEngine-style ``epoch_12.pth``)
and loads it strictly through ``registry.load(card.name, weights=...)``.

The architectures are shrunk through the family's overrides so that the test runs in seconds:
a tiny SAM (128 px, 4-block 32-d ViT) instead of ViT-B and smaller heads. The card's variant,
class count and prompt shape, and the naming of every key, stay those of the card; SAM-det's
ResNet-50-FPN becomes a ResNet-18-FPN (same MMDetection ResNet / FPN key names, fewer blocks).
"""

from __future__ import annotations

import pytest
import torch

from rsvl.errors import CheckpointMismatchError, WeightsNotFoundError
from rsvl.models import registry
from rsvl.models.rsprompter import CARDS, build, card_name
from rsvl.models.rsprompter.convert import save_prompter_checkpoint, to_mmdet_state_dict
from rsvl.models.sam.config import SamConfig

TINY_SAM = SamConfig(
    image_size=128,
    encoder_embed_dim=32,
    encoder_depth=4,
    encoder_num_heads=2,
    encoder_global_attn_indexes=(1, 3),
    window_size=4,
    prompt_embed_dim=32,
    decoder_num_heads=2,
    decoder_mlp_dim=64,
    iou_head_hidden_dim=32,
)
SMALL: dict[str, dict] = {
    "rsprompter-anchor": dict(representation_size=64),
    "rsprompter-query": dict(feat_channels=32, ffn_channels=64, num_decoder_layers=2, encoder_layers=1),
    "sam-seg": dict(representation_size=64, mask_head_channels=32),
    "sam-det": dict(representation_size=64, backbone="resnet18"),
}


def _overrides(card) -> dict:
    return {"sam": TINY_SAM, **SMALL[card.metadata["variant"]]}


@pytest.mark.parametrize("card", CARDS, ids=lambda c: c.name)
def test_every_card_loads_a_checkpoint_in_mmdetection_layout(card, tmp_path):
    torch.manual_seed(0)
    model = build(card.name, **_overrides(card))
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.copy_(torch.randn_like(t))
    path = save_prompter_checkpoint(model, tmp_path / "epoch_12.pth", meta={"epoch": 12})
    written = torch.load(path, weights_only=True)["state_dict"]
    prefix = "segmentor.sam_model." if card.metadata["variant"] == "sam-det" else "backbone.vision_encoder."
    assert any(k.startswith(prefix) for k in written)

    loaded = registry.load(card.name, weights=path, **_overrides(card))
    assert not loaded.training
    assert loaded.num_classes == card.metadata["num_classes"]
    if card.metadata["prompt_shape"] and card.metadata["variant"] == "rsprompter-query":
        assert (loaded.num_queries, loaded.num_points) == card.metadata["prompt_shape"]
    got = to_mmdet_state_dict(loaded)
    assert set(got) == set(written)
    for k, v in written.items():
        torch.testing.assert_close(got[k], v, msg=k)

    # strict: a checkpoint of another class count is refused, naming the file's keys
    other = {**_overrides(card), "num_classes": card.metadata["num_classes"] + 1}
    with pytest.raises(CheckpointMismatchError, match=r"shape mismatch\(es\)"):
        registry.load(card.name, weights=path, **other)


def test_no_weights_says_what_to_do():
    with pytest.raises(WeightsNotFoundError, match="publishes no trained checkpoint"):
        registry.load(CARDS[0].name)


def test_card_names_by_dataset_folder():
    assert card_name("rsprompter-query", "nwpu_vhr10") == "rsprompter-query-nwpu"
    assert card_name("sam_seg", "WHU") == "sam-seg-whu"
    assert card_name("sam-det", "my_fields") == "sam-det-nwpu"  # dataset= then overrides
