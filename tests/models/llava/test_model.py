"""``LlavaChat``: preprocessing and ``chat()`` end to end on a tiny VHM folder."""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import pytest
import torch
from models.llava.tiny import write_tiny_vhm
from torch import nn

from rsvl.errors import InputNotFoundError
from rsvl.models import llava
from rsvl.models.cards import OPENAI_MEAN, OPENAI_STD
from rsvl.models.chat import Box, ChatAnswer, ChatModel
from rsvl.models.llava.model import expand_to_square, preprocess_image

IMAGE = (np.random.default_rng(5).random((48, 64, 3)) * 255).astype(np.uint8)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return llava.load("vhm-7b", write_tiny_vhm(tmp_path_factory.mktemp("m") / "vhm"))


def test_padding_centres_the_image_on_the_clip_mean_colour():
    img = np.full((2, 4, 3), 9, dtype=np.uint8)
    sq = expand_to_square(img, (122, 116, 104))
    assert sq.shape == (4, 4, 3)
    assert (sq[0] == (122, 116, 104)).all() and (sq[3] == (122, 116, 104)).all()
    assert (sq[1:3] == 9).all()
    tall = expand_to_square(np.zeros((5, 2, 3), np.uint8), (1, 2, 3))
    assert (
        (tall[:, 0] == (1, 2, 3)).all()
        and (tall[:, 1:3] == 0).all()
        and (tall[:, 4] == (1, 2, 3)).all()
    )


def test_preprocessing_normalises_like_clip_without_resampling_a_square_of_the_right_size():
    img = (np.arange(4 * 4 * 3) % 256).astype(np.uint8).reshape(4, 4, 3)
    got = preprocess_image(img, 4)
    want = (
        torch.tensor(img).permute(2, 0, 1).float() / 255 - torch.tensor(OPENAI_MEAN).view(3, 1, 1)
    ) / torch.tensor(OPENAI_STD).view(3, 1, 1)
    torch.testing.assert_close(got[0], want)


def test_preprocessing_agrees_with_transformers_llava_processor_to_one_grey_level():
    from transformers import LlavaImageProcessor

    proc = LlavaImageProcessor(
        do_pad=True,
        size={"shortest_edge": 336},
        crop_size={"height": 336, "width": 336},
        image_mean=list(OPENAI_MEAN),
        image_std=list(OPENAI_STD),
    )
    ref = proc(images=IMAGE, return_tensors="pt")["pixel_values"]
    got = preprocess_image(IMAGE, 336)
    assert got.shape == ref.shape == (1, 3, 336, 336)
    diff = (got - ref).abs()
    assert (
        diff.max() < 2.01 / 255 / min(OPENAI_STD) and diff.mean() < 1e-3
    )  # upstream rounds to uint8


def test_bad_images_are_refused(model):
    with pytest.raises(InputNotFoundError, match=r"\(H, W, 3\) uint8"):
        model.chat(IMAGE.astype(np.float32), "What is in this image?")
    with pytest.raises(InputNotFoundError):
        model.chat(IMAGE[..., :2], "What is in this image?")


def test_chat_is_a_chat_model_greedy_and_deterministic_and_streams_its_text(model):
    assert isinstance(model, ChatModel) and model.image_size == 336
    pieces: list[str] = []
    one = model.chat(
        IMAGE, "What is in this image?", task="cls", max_new_tokens=6, on_text=pieces.append
    )
    two = model.chat(IMAGE, "What is in this image?", task="cls", max_new_tokens=6)
    assert isinstance(one, ChatAnswer) and one.text == two.text
    assert "".join(pieces) == one.text
    assert one.new_tokens == 6  # random weights never pick </s> here
    assert one.prompt_tokens == len(model.prompt_ids("What is in this image?", task="cls"))
    assert one.prompt_tokens > model.num_image_tokens
    assert 0 < one.first_token_s <= one.total_s


def test_sampling_is_repeatable_with_a_seed(model):
    a = model.chat(IMAGE, "What is in this image?", temperature=1.0, max_new_tokens=5, seed=3)
    b = model.chat(IMAGE, "What is in this image?", temperature=1.0, max_new_tokens=5, seed=3)
    assert a.text == b.text


@contextmanager
def scripted(model, ids: list[int], runner_up: int | None = None):
    """``model`` whose lm_head emits ``ids`` one by one (then repeats the last), with
    ``runner_up`` second best every time."""
    path = model.layout.lm_head[: -len(".weight")]
    head = model.net.get_submodule(path)
    model.net.set_submodule(path, Scripted(head, ids, runner_up))
    try:
        yield model
    finally:
        model.net.set_submodule(path, head)


class Scripted(nn.Module):
    """An lm_head that emits ``ids`` one by one (then repeats the last)."""

    def __init__(self, head: nn.Module, ids: list[int], runner_up: int | None = None) -> None:
        super().__init__()
        self.head, self.ids, self.runner_up, self.calls = head, ids, runner_up, 0

    @property
    def weight(self) -> torch.Tensor:
        return self.head.weight

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(*hidden.shape[:-1], self.head.weight.shape[0])
        if self.runner_up is not None:
            logits[..., self.runner_up] = 5.0
        logits[..., self.ids[min(self.calls, len(self.ids) - 1)]] = 10.0
        self.calls += 1
        return logits


def test_chat_stops_at_eos_and_parses_the_boxes_of_the_answer(model):
    tok = model.tokenizer
    ids = tok.encode("[100, 250, 300, 400] plane", add_bos=False) + [tok.eos_id, 5, 6]
    pieces: list[str] = []
    with scripted(model, ids):
        answer = model.chat(
            IMAGE, "Where is the plane?", task="vg", max_new_tokens=50, on_text=pieces.append
        )
    assert answer.text == "[100, 250, 300, 400] plane"
    assert answer.new_tokens == ids.index(tok.eos_id)
    assert answer.boxes == [Box(0.1, 0.25, 0.3, 0.4)]
    assert "".join(pieces) == answer.text


def test_the_image_token_is_never_generated(model):
    yes = model.tokenizer.pieces.index("▁yes")
    with scripted(model, [model.image_token_id], runner_up=yes):
        answer = model.chat(IMAGE, "What is in this image?", max_new_tokens=3)
    assert answer.new_tokens == 3 and answer.text == "yes yes yes"
