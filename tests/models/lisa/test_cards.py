"""The LISA family's cards: registered, served by the farmland task, unpublished FSVLM weights
explained; the published key layout of every card on the meta device (no 7B in memory), and
the LoRA merge against peft's own ``merge_and_unload``."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from rsvl.errors import WeightsNotFoundError
from rsvl.models import registry
from rsvl.models.lisa import CARDS, build
from rsvl.models.lisa.build import SHAPES, _net
from rsvl.models.lisa.convert import merge_lora
from rsvl.models.llava.config import text_config
from rsvl.models.sam.build import sam_config
from rsvl.models.weights import weights_state

NAMES = ("lisa-7b-v1", "fsvlm-7b", "fsvlm-13b")


@pytest.mark.parametrize("name", NAMES)
def test_card_is_registered_for_the_farmland_task(name):
    card = registry.get_card(name)
    assert card.family == "lisa" and card.tasks == ("farmland",)
    assert card in registry.list_cards(task="farmland")
    assert card.metadata["vision_repo"] == "openai/clip-vit-large-patch14"
    assert card.sha256 is None


def test_lisa_is_on_hugging_face_and_fsvlm_is_unpublished():
    lisa = registry.get_card("lisa-7b-v1")
    assert lisa.source.hf_repo == "xinlai/LISA-7B-v1" and "not pinned" in lisa.notes
    assert lisa.metadata["image_markers"] == ("<im_start>", "<im_end>")
    for name in ("fsvlm-7b", "fsvlm-13b"):
        card = registry.get_card(name)
        assert card.source.unpublished and weights_state(card) == "bring your own"
        assert card.metadata["image_markers"] == ("<|im_start|>", "<|im_end|>")


@pytest.mark.parametrize("name", ["fsvlm-7b", "fsvlm-13b"])
def test_fetch_of_unpublished_weights_says_what_to_place_where(name, tmp_path, monkeypatch):
    monkeypatch.setenv("RSVL_CACHE", str(tmp_path))
    with pytest.raises(WeightsNotFoundError, match="publish no weights") as err:
        registry.fetch(name)
    hint = str(err.value.hint)
    assert str(tmp_path / name) in hint and "added_tokens.json" in hint and "pytorch_model.bin" in hint
    with pytest.raises(WeightsNotFoundError, match="not on this machine"):
        registry.load(name)


@pytest.mark.parametrize("card", CARDS, ids=lambda c: c.name)
def test_published_key_layout_and_shapes(card):
    """Every key a merged upstream folder holds, at the published shapes (meta device)."""
    cfg = {**SHAPES[card.name], "mm_vision_select_layer": -2}
    net = _net(text_config(cfg, cfg["vocab_size"]), sam_config("vit_h"), 1024, "linear", 256, dtype=torch.float16)
    sd = net.state_dict()
    hidden, layers = cfg["hidden_size"], cfg["num_hidden_layers"]
    assert sd["model.embed_tokens.weight"].shape == (cfg["vocab_size"], hidden)
    assert sd["lm_head.weight"].shape == (cfg["vocab_size"], hidden)
    assert sd["model.mm_projector.weight"].shape == (hidden, 1024)
    assert sd["model.text_hidden_fcs.0.0.weight"].shape == (hidden, hidden)
    assert sd["model.text_hidden_fcs.0.2.weight"].shape == (256, hidden)
    assert sd["model.visual_model.image_encoder.patch_embed.proj.weight"].shape == (1280, 3, 16, 16)
    assert sd["model.visual_model.prompt_encoder.no_mask_embed.weight"].shape == (1, 256)
    assert f"model.layers.{layers - 1}.self_attn.q_proj.weight" in sd
    assert f"model.layers.{layers}.self_attn.q_proj.weight" not in sd
    prefixes = {k.split(".")[0] + "." + k.split(".")[1] for k in sd}
    assert prefixes <= {"model.embed_tokens", "model.layers", "model.norm", "model.mm_projector",
                        "model.visual_model", "model.text_hidden_fcs", "lm_head.weight"}
    assert not any("vision_tower" in k or "rotary_emb" in k or "pixel_mean" in k for k in sd)


def test_build_gives_a_trainable_model_without_a_tokenizer():
    m = build("fsvlm-7b", text={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 100},
              vision={"hidden_size": 64, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                      "patch_size": 56},
              sam={"image_size": 64, "encoder_embed_dim": 32, "encoder_depth": 1, "encoder_num_heads": 2,
                   "encoder_global_attn_indexes": (0,), "window_size": 4, "prompt_embed_dim": 32,
                   "decoder_mlp_dim": 32, "iou_head_hidden_dim": 32},
              out_dim=32, seed=0)
    assert m.seg_token_id is None and m.image_size == 512
    assert m.net.seg_fc[2].out_features == 32


def test_explicit_lora_merge_equals_peft_merge_and_unload():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False))
    cfg = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=["q_proj", "v_proj"],
                          bias="none", task_type="CAUSAL_LM")
    wrapped = peft.get_peft_model(base, cfg)
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    sd = {k: v.clone() for k, v in wrapped.state_dict().items()}
    ours, report = merge_lora(sd, 16)
    assert report.rank == 8 and report.layers == 4 and report.targets == ("q_proj", "v_proj")
    theirs = wrapped.merge_and_unload().state_dict()
    assert set(ours) == set(theirs)
    for k, v in theirs.items():
        assert torch.allclose(ours[k], v, atol=1e-6), k
