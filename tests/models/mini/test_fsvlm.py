"""mini-fsvlm: the SegChatModel interface, the [SEG] decision, the state that prompts the
decoder, batching, the weights round trip and its errors; on a tiny language model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_lm import tiny_language_model

from rsvl.errors import CheckpointMismatchError, PromptError, WeightsNotFoundError
from rsvl.models.mini.chat import MiniChatConfig, build_mini_chat
from rsvl.models.mini.fsvlm import (
    SEG_ANSWER,
    MiniFSVLM,
    MiniFSVLMConfig,
    build_mini_fsvlm,
    load_mini_fsvlm,
    save_mini_fsvlm,
)
from rsvl.models.mini.refer import MiniReferConfig
from rsvl.models.segchat import SegChatModel

torch.set_num_threads(1)


def tiny_chat():
    torch.manual_seed(0)
    chat = build_mini_chat(MiniChatConfig(image_size=64, lora_r=4, lora_alpha=8, lora_dropout=0.0),
                           pretrained=False, language_model=tiny_language_model())
    chat.merge_adapters()
    return chat.eval()


def tiny_config() -> MiniFSVLMConfig:
    dec = MiniReferConfig(image_size=64, text_dim=16, dim=16, heads=2, global_layers=1, fine_dim=8, dropout=0.0)
    from dataclasses import asdict

    return MiniFSVLMConfig(image_size=64, words=3, decoder=asdict(dec))


@pytest.fixture(scope="module")
def tiny() -> MiniFSVLM:
    torch.manual_seed(1)
    return build_mini_fsvlm(tiny_config(), chat=tiny_chat(), init_decoder=None).eval()


def _image(h=48, w=80, seed=0):
    return np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)


def test_implements_the_segchat_and_chat_interfaces(tiny):
    assert isinstance(tiny, SegChatModel)
    assert tiny.image_size == 64


def test_forced_answer_gives_a_mask_at_the_input_size_from_the_state_before_seg(tiny):
    image = _image()
    ans = tiny.seg_chat(image, "how many ships ?", force_seg=True)
    assert ans.text == SEG_ANSWER and len(ans.masks) == 1
    assert ans.logits.shape == (48, 80) and ans.logits.dtype == np.float32
    # the same mask, computed by hand: the state at the last prompt position (the one that
    # predicts the answer's first token, i.e. [SEG]) -> text_hidden_fcs -> decoder -> unpad
    x, geom = tiny.pixels([image])
    feats, small, tokens = tiny.image_features(x)
    chat = tiny.chat_model
    before, after = chat.prompt_ids("how many ships ?")
    seq = torch.cat([chat.embed(before), chat.projector(tokens)[0], chat.embed(after)])[None]
    with torch.no_grad():
        h = chat.causal_lm.model(inputs_embeds=seq).last_hidden_state[:, -1]
        square = tiny.decode(feats, small, h, 64)[0]
    full = torch.nn.functional.interpolate(square[None, None], size=(80, 80), mode="bilinear", align_corners=False)[0, 0]
    np.testing.assert_allclose(ans.logits, full[16:64, :].numpy(), atol=1e-5)


def test_seg_head_decides_between_a_mask_and_a_chat_answer(tiny):
    image = _image(seed=2)
    bias = tiny.seg_head.bias.data.clone()
    try:
        tiny.seg_head.bias.data.fill_(1e4)  # [SEG] beats every word
        ans = tiny.seg_chat(image, "describe this .")
        assert ans.text == SEG_ANSWER and ans.logits is not None
        tiny.seg_head.bias.data.fill_(-1e4)  # never [SEG]: a plain answer without a mask
        ans = tiny.seg_chat(image, "describe this .", max_new_tokens=5)
        assert ans.masks == [] and ans.logits is None and "[SEG]" not in ans.text
    finally:
        tiny.seg_head.bias.data.copy_(bias)


def test_batched_prompt_states_equal_one_by_one(tiny):
    images = [_image(64, 64, s) for s in range(3)]
    prompts = ["how many ships ?", "describe this .", "is there a ship ? yes or no ?"]
    x, _ = tiny.pixels(images)
    _, _, tokens = tiny.image_features(x)
    batched, logits = tiny.prompt_states(tokens, prompts)
    for b in range(3):
        one, one_logits = tiny.prompt_states(tokens[b: b + 1], prompts[b: b + 1])
        torch.testing.assert_close(batched[b], one[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(logits[b], one_logits[0], atol=1e-4, rtol=1e-5)


def test_empty_request_is_refused(tiny):
    with pytest.raises(PromptError, match="empty"):
        tiny.seg_chat(_image(), "  ")


def test_weights_round_trip(tiny, tmp_path):
    with torch.no_grad():
        for p in tiny.trainable_parameters():
            p.normal_(0, 0.05)
            p.copy_(p.half().float())  # the file stores float16
    path = save_mini_fsvlm(tiny, tmp_path / "fsvlm.safetensors")
    loaded = load_mini_fsvlm(path, chat=tiny.chat_model)
    assert loaded.config == tiny.config
    a = tiny.seg_chat(_image(seed=5), "how many ships ?", force_seg=True)
    b = loaded.seg_chat(_image(seed=5), "how many ships ?", force_seg=True)
    np.testing.assert_allclose(a.logits, b.logits, atol=1e-5)


def test_weights_errors(tiny, tmp_path):
    with pytest.raises(WeightsNotFoundError):
        load_mini_fsvlm(tmp_path / "missing.safetensors", chat=tiny.chat_model)
    from rsvl.models.mini.files import write_weights

    bad = write_weights({"x": torch.zeros(2)}, tmp_path / "other.safetensors", {"format": "rsvl-mini-chat-v1"})
    with pytest.raises(CheckpointMismatchError):
        load_mini_fsvlm(bad, chat=tiny.chat_model)
    sd = {k: v for k, v in tiny.trainable_state_dict().items() if not k.startswith("seg_head")}
    import json

    short = write_weights(sd, tmp_path / "short.safetensors",
                          {"format": "rsvl-mini-fsvlm-v1", "config": json.dumps(tiny.config.to_dict())})
    with pytest.raises(CheckpointMismatchError, match="seg_head"):
        load_mini_fsvlm(short, chat=tiny.chat_model)
