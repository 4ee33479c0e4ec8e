"""``rsvl.models.llava.prompt``: the vicuna_v1 template, task tags, chunked tokenisation."""

from __future__ import annotations

import pytest

from rsvl.errors import PromptError
from rsvl.models.llava.prompt import build_prompt, tag_question, tokenize_prompt

VHM_SYS = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant "
    "gives helpful, detailed, and polite answers to the user's questions."
)
GEO_SYS = (
    "A chat between a curious human and an artificial intelligence assistant. The assistant "
    "gives helpful, detailed, and polite answers to the human's questions."
)


def test_vhm_template_is_vicuna_v1_with_the_task_tag_after_the_image():
    got = build_prompt("What is in this image?", variant="vhm", task="cls")
    assert got == VHM_SYS + " USER: <image>\n{CLS} What is in this image? ASSISTANT:"


@pytest.mark.parametrize(
    ("task", "tag"),
    [("cls", "{CLS}"), ("vqa", "{VQA}"), ("vg", "{VG}"), ("idk", "{IDK}"), ("it", "{IT}")],
)
def test_every_vhm_task_kind_has_its_tag(task, tag):
    assert tag_question(" Is there a ship? ", task, "vhm") == f"{tag} Is there a ship?"


def test_no_task_means_no_tag_and_a_typed_tag_is_not_doubled():
    assert tag_question("Count the cars.", None, "vhm") == "Count the cars."
    assert tag_question("{VG} the red roof", "vg", "vhm") == "{VG} the red roof"
    assert tag_question("[grounding] describe", "vg", "geochat") == "[grounding] describe"


def test_geochat_uses_llava_v1_and_refer_for_grounding_only():
    got = build_prompt("Where is the plane?", variant="geochat", task="vg")
    assert got == GEO_SYS + " USER: <image>\n[refer] Where is the plane? ASSISTANT:"
    assert tag_question("What is this scene?", "cls", "geochat") == "What is this scene?"


def test_history_turns_end_with_eos_and_the_image_stays_in_the_first_turn():
    got = build_prompt(
        "How many?",
        variant="vhm",
        task="vqa",
        history=[("What is it?", "A harbour."), ("Ships?", "Yes.")],
    )
    assert got == (
        VHM_SYS + " USER: <image>\nWhat is it? ASSISTANT: A harbour.</s>"
        "USER: Ships? ASSISTANT: Yes.</s>USER: {VQA} How many? ASSISTANT:"
    )


def test_bad_questions_and_task_kinds_are_refused():
    with pytest.raises(PromptError, match="empty"):
        build_prompt("   ", variant="vhm")
    with pytest.raises(PromptError, match="Unknown task kind 'caption'"):
        build_prompt("Describe", variant="vhm", task="caption")


def test_chunked_tokenisation_keeps_one_bos_and_puts_the_image_id_between_chunks():
    def encode(text: str) -> list[int]:  # SentencePiece-like: a piece per character, "▁" first
        return [1000] + [ord(c) for c in text] if text else []

    ids = tokenize_prompt("ab<image>\nc", encode, bos_id=1, image_id=-200)
    assert ids == [1, 1000, ord("a"), ord("b"), -200, 1000, ord("\n"), ord("c")]
    assert tokenize_prompt("<image>x", encode, bos_id=1, image_id=7) == [1, 7, 1000, ord("x")]
