"""The Python API: ``rsvl.load`` gives a Model whose task methods match the task functions."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
import torch
from conftest import write_raster
from PIL import Image

import rsvl
from rsvl.api import Model
from rsvl.data.classes import parse_class_list
from rsvl.errors import BandSelectionError, PromptError, UnknownModelError
from rsvl.models.registry import get_card
from rsvl.tasks.classify import classify

WORDS = {"red": 0, "crimson": 0, "green": 1, "blue": 2}


class ColourNet(torch.nn.Module):
    """Embeds an image by its mean colour; "red", "green", "blue" are the unit vectors."""

    name = "colour"
    logit_scale = 100.0
    default_templates = ("{}",)
    image_size = 32
    preferred_tile = 64

    def encode_text(self, texts):
        out = torch.zeros(len(texts), 3)
        for i, t in enumerate(texts):
            out[i, WORDS[t]] = 1.0
        return out

    def encode_image(self, images):
        return torch.nn.functional.normalize(torch.as_tensor(images).float().mean(dim=(2, 3)) + 1e-3, dim=-1)

    def dense_features(self, images):
        f = torch.nn.functional.avg_pool2d(torch.as_tensor(images).float(), 4) + 1e-3
        return torch.nn.functional.normalize(f, dim=1)


def colour_model() -> Model:
    return Model(ColourNet(), get_card("mini-clip"))


def solid(ch: int, value: int = 180) -> np.ndarray:
    a = np.zeros((40, 50, 3), np.uint8)
    a[..., ch] = value
    return a


def test_load_gives_a_model_with_the_network_underneath():
    m = rsvl.load("mini-clip")
    assert isinstance(m, Model) and m.card.name == "mini-clip" and "classify" in repr(m)
    assert m.encode_text(["a forest"]).shape == m.module.encode_text(["a forest"]).shape
    assert m.image_size == m.module.image_size
    with pytest.raises(UnknownModelError, match="mini-clp|Unknown|unknown"):
        rsvl.load("mini-clp")


def test_classify_arrays_equals_classify_files(tmp_path):
    m = colour_model()
    for name, ch in (("r.png", 0), ("g.png", 1), ("b.png", 2)):
        Image.fromarray(solid(ch)).save(tmp_path / name)
    from_files = classify(ColourNet(), tmp_path, parse_class_list("red|crimson, green, blue"), top_k=3)
    by_name = {p.source.split("/")[-1]: p for p in from_files.predictions}
    arrays = m.classify([solid(0), solid(1), solid(2).transpose(2, 0, 1)], ["red|crimson", "green", "blue"], top_k=3)
    assert [p.label for p in arrays.predictions] == ["red", "green", "blue"]
    for p, name in zip(arrays.predictions, ("r.png", "g.png", "b.png"), strict=True):
        assert [t[0] for t in p.topk] == [t[0] for t in by_name[name].topk]
        assert [t[1] for t in p.topk] == pytest.approx([t[1] for t in by_name[name].topk], abs=1e-6)
        assert p.score == pytest.approx(by_name[name].score, abs=1e-6)
    one = m.classify(solid(1), "red, green, blue")  # one array, inline class list
    assert len(one.predictions) == 1 and one.predictions[0].label == "green"
    path = m.classify(str(tmp_path / "b.png"), "red, green, blue")
    assert path.predictions[0].label == "blue"


def test_class_lists_and_bad_inputs():
    m = colour_model()
    with pytest.raises(PromptError, match="comma"):
        m.classify(solid(0), ["red, green", "blue"])
    with pytest.raises(PromptError, match="no classes"):
        m.classify(solid(0), [])
    with pytest.raises(BandSelectionError, match="float32"):
        m.classify(solid(0).astype(np.float32), "red, green")
    with pytest.raises(BandSelectionError, match="shape"):
        m.classify(np.zeros((5, 40, 50), np.uint8), "red, green")


def test_a_task_the_card_does_not_serve_names_the_models_that_do():
    m = Model(ColourNet(), get_card("sam_vit_b"))
    with pytest.raises(UnknownModelError, match="does not serve 'segment'") as e:
        m.segment("x.tif", "red", "out")
    assert "mini-clip" in e.value.hint


def test_segment_writes_the_task_outputs(tmp_path):
    img = np.zeros((3, 64, 96), np.uint8)
    img[0, :, :48] = 200
    img[2, :, 48:] = 200
    src = write_raster(tmp_path / "s.tif", img)
    res = colour_model().segment(src, "red, blue", tmp_path / "o", tile=64, overlap=16)
    with rasterio.open(res.outputs["classes"]) as ds:
        labels = ds.read(1)
    assert (labels[:, :40] == 0).all() and (labels[:, 56:] == 1).all()
    assert res.settings["model"] == "mini-clip"


def test_build_index_and_search_round_trip(tmp_path):
    m = rsvl.load("mini-clip")
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    m.build_index([folder], tmp_path / "idx")
    hits = m.search(tmp_path / "idx", image=folder / "1.png", k=2).hits
    assert hits[0].source.endswith("1.png") and hits[0].score == pytest.approx(1.0, abs=1e-4)
    assert len(m.search(tmp_path / "idx", "a forest", k=3).hits) == 3


def test_refer_goes_to_a_referring_model(tmp_path):
    clip = colour_model()
    with pytest.raises(UnknownModelError, match="does not serve 'refer'") as e:
        clip.refer("x.png", "the ship", tmp_path / "o")
    assert "mini-refer" in e.value.hint
    m = rsvl.load("mini-refer")
    Image.fromarray(np.full((96, 128, 3), 120, np.uint8)).save(tmp_path / "grey.png")
    with pytest.raises(PromptError):
        m.refer(tmp_path / "grey.png", "   ", tmp_path / "o")
    res = m.refer(tmp_path / "grey.png", "the storage tank on the left", tmp_path / "o")
    assert res.to_dict()["expression"] == "the storage tank on the left"


def test_instances_goes_to_an_instance_model(tmp_path):
    with pytest.raises(UnknownModelError, match="does not serve 'instances'") as e:
        colour_model().instances("x.png", tmp_path / "o")
    assert "mini-instances" in e.value.hint


class AnswerChat:
    """A chat model that says what it was asked and how many earlier turns it saw."""

    name = "answer-chat"
    image_size = 32

    def chat(self, image, question, *, history=(), task=None, max_new_tokens=256, temperature=0.0, on_text=None):
        from rsvl.models.chat import Box, ChatAnswer

        return ChatAnswer(f"{len(history)} earlier, {image.shape[1]}x{image.shape[0]}: {question}",
                          [Box(0.5, 0.25, 1.0, 0.75)])


def test_chat_on_arrays_and_files_with_history(tmp_path):
    from types import SimpleNamespace

    m = Model(AnswerChat(), SimpleNamespace(name="answer-chat", family="test", tasks=("chat",)))
    res = m.chat(solid(0), "Describe this image.")
    assert res.answer == "0 earlier, 50x40: Describe this image." and res.kind == "describe"
    assert res.boxes[0]["x1"] == 25.0 and res.boxes[0]["y2"] == 30.0  # fractions of 50 x 40 pixels
    assert res.settings["model"] == "answer-chat"
    Image.fromarray(solid(1)).save(tmp_path / "g.png")
    res = m.chat(str(tmp_path / "g.png"), "And now?", history=[("Describe this image.", res.answer)])
    assert res.answer == "1 earlier, 50x40: And now?"
    with pytest.raises(UnknownModelError, match="does not serve 'chat'"):
        colour_model().chat(solid(0), "Describe this image.")
