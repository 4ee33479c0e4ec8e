"""The LLaVA family's cards in the registry."""

from __future__ import annotations

import re

from rsvl.models import registry
from rsvl.models.llava import CARDS


def test_cards_are_registered_chat_models_with_honest_revisions():
    assert {c.name for c in registry.list_cards(family="llava")} == {"vhm-7b", "geochat-7b"}
    assert [c.name for c in registry.list_cards(task="chat")] == ["geochat-7b", "mini-chat", "vhm-7b"]
    for card in CARDS:
        assert card.tasks == ("chat",) and card.family == "llava"
        rev = card.source.revision
        assert rev is None or re.fullmatch(r"[0-9a-f]{40}", rev)
        if rev is None:
            assert "not pinned" in card.notes
        assert card.metadata["vision_folder"] == "vision_tower"
    vhm, geochat = registry.get_card("vhm-7b"), registry.get_card("geochat-7b")
    assert (vhm.source.hf_repo, vhm.image_size) == ("FitzPC/vhm_7B", 336)
    assert vhm.metadata["vision_repo"] == "FitzPC/vhm_7b_pretrain_vit"
    assert (geochat.source.hf_repo, geochat.image_size) == ("MBZUAI/geochat-7B", 504)
    assert registry.get_card("VHM_7B") is vhm
