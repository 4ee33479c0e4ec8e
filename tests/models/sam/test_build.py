"""Every SAM card's load path, offline (torchgeo's weight tests): a random state dict in the
card's published layout is written where rsvl's cache keeps the card's file, resolved and
loaded strictly through the registry.

The published ViTs (B: 90M, L: 300M, H: 630M parameters) are too large for a unit test, so
every card is shrunk through the family's overrides (64 px, a 2-block 32-d ViT, a 32-d
decoder). The key names, the file name and format (Meta's ``.pth`` of segment-anything
names, transformers' ``model.safetensors`` with SamModel names and its tied Fourier matrix)
stay those of the published files.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from rsvl.errors import CheckpointMismatchError
from rsvl.models import registry
from rsvl.models.sam import CARDS, build
from rsvl.models.sam.build import SAM_BUILDERS, SAM_CONFIGS, build_sam_vit_h, build_sam_vit_l
from rsvl.models.sam.convert import hf_key_for
from rsvl.models.weights import cache_path

SHRINK = dict(
    image_size=64,
    encoder_embed_dim=32,
    encoder_depth=2,
    encoder_num_heads=2,
    encoder_global_attn_indexes=(1,),
    window_size=2,
    prompt_embed_dim=32,
    decoder_num_heads=2,
    decoder_mlp_dim=64,
    iou_head_hidden_dim=32,
)
#: SamModel keeps a second copy of the Fourier matrix, tied to shared_image_embedding
HF_TIED = "prompt_encoder.shared_embedding.positional_embedding"


def _published_file(card, tmp_path, monkeypatch) -> dict[str, torch.Tensor]:
    """Write a random checkpoint of ``card`` in its published layout at the card's cache path;
    return it under rsvl's (segment-anything) names."""
    monkeypatch.setenv("RSVL_CACHE", str(tmp_path))
    monkeypatch.setenv("RSVL_OFFLINE", "1")
    torch.manual_seed(0)
    model = build(card.name, **SHRINK)
    sd = {k: torch.randn_like(v) for k, v in model.state_dict().items()}
    path = cache_path(card)
    path.parent.mkdir(parents=True)
    if card.metadata["layout"] == "hf":
        assert path.name == "model.safetensors"
        hf = {hf_key_for(k, model.config): v for k, v in sd.items()}
        hf[HF_TIED] = hf["shared_image_embedding.positional_embedding"].clone()
        save_file(hf, path)
    else:
        assert path.suffix == ".pth"
        torch.save(sd, path)
    return sd


@pytest.mark.parametrize("card", CARDS, ids=lambda c: c.name)
def test_every_card_loads_its_published_layout(card, tmp_path, monkeypatch):
    sd = _published_file(card, tmp_path, monkeypatch)
    model = registry.load(card.name, **SHRINK)
    assert not model.training
    got = model.state_dict()
    assert set(got) == set(sd)
    for k, v in sd.items():
        torch.testing.assert_close(got[k], v, msg=k)
    want_eps = 1e-6 if card.metadata["layout"] == "hf" else 1e-5
    assert model.config.decoder_ln_eps == want_eps
    arch = SAM_CONFIGS[card.architecture]
    assert model.config.encoder_num_heads == SHRINK["encoder_num_heads"] != arch.encoder_num_heads


@pytest.mark.parametrize("card", CARDS[:1] + CARDS[3:4], ids=lambda c: c.name)
def test_a_wrong_size_is_refused_naming_the_files_keys(card, tmp_path, monkeypatch):
    _published_file(card, tmp_path, monkeypatch)
    with pytest.raises(CheckpointMismatchError, match=r"shape mismatch\(es\)") as err:
        registry.load(card.name, **{**SHRINK, "encoder_embed_dim": 64})
    spelled = "vision_encoder.layers.0." if card.metadata["layout"] == "hf" else "image_encoder.blocks.0."
    assert spelled in str(err.value)


def test_builders_are_the_published_sizes():
    with torch.device("meta"):
        assert build_sam_vit_l().config == SAM_CONFIGS["vit_l"]
        assert build_sam_vit_h(encoder_depth=2).config.encoder_embed_dim == 1280
    assert set(SAM_BUILDERS) == {c.architecture for c in CARDS} == set(SAM_CONFIGS)
    assert SAM_CONFIGS["vit_h"].encoder_global_attn_indexes == (7, 15, 23, 31)
    assert SAM_CONFIGS["vit_l"].encoder_depth == 24
