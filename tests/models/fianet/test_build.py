"""``rsvl.models.fianet.build`` through the registry (tiny configs, no downloads)."""

from __future__ import annotations

import pytest

from rsvl.errors import WeightsNotFoundError
from rsvl.models import registry
from rsvl.models.fianet import FianetConfig, FianetModel


def test_build_takes_the_card_settings_and_config_overrides():
    model = registry.build("fianet-refsegrs", config=FianetConfig.tiny(), num_tmem=2)
    assert isinstance(model, FianetModel) and model.config.num_tmem == 2
    assert model.config.embed_dim == FianetConfig.tiny().embed_dim
    small = registry.build("fianet-refsegrs", **{k: getattr(FianetConfig.tiny(), k) for k in (
        "image_size", "embed_dim", "depths", "num_heads", "window_size", "vocab_size", "text_hidden_size",
        "text_layers", "text_heads", "text_intermediate_size", "text_max_positions")})
    assert small.config.dataset == "refsegrs" and small.config.num_tmem == 1
    assert small.config.max_tokens == 20


def test_pretrained_start_needs_both_swin_and_bert(tmp_path):
    with pytest.raises(WeightsNotFoundError, match="both"):
        registry.build("fianet-rrsisd", config=FianetConfig.tiny(), swin=tmp_path / "swin.pth")
    with pytest.raises(TypeError):
        registry.build("fianet-rrsisd", config=FianetConfig.tiny(), not_a_field=1)
