"""``rsvl chat``: one question, an interactive session from stdin, --json, errors before loading."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from conftest import write_raster
from PIL import Image
from rasterio.transform import from_origin
from scipy import ndimage

from rsvl.cli import chat as chat_cli
from rsvl.cli import main
from rsvl.models.chat import Box, ChatAnswer


class SpotChat:
    """Counts the bright spots of the image (with their boxes); answers "what did I ask"
    from the history it is given; records every (question, history)."""

    name = "spot-chat"
    image_size = 64

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[tuple[str, str]]]] = []
        self.streamed: list[bool] = []

    def chat(self, image, question, *, history=(), task=None, max_new_tokens=256, temperature=0.0, on_text=None):
        self.calls.append((question, [tuple(t) for t in history]))
        self.streamed.append(on_text is not None)
        h, w = image.shape[:2]
        labels, n = ndimage.label(image.mean(2) > 128)
        boxes = [Box(s[1].start / w, s[0].start / h, s[1].stop / w, s[0].stop / h, label="spot")
                 for s in ndimage.find_objects(labels)]
        if "how many" in question.lower():
            text, found = f"{n}", boxes
        else:
            text, found = (f"you asked: {history[-1][0]}" if history else "a dark image"), []
        if on_text is not None:  # streamed in two pieces
            on_text(text[:3])
            on_text(text[3:])
        return ChatAnswer(text, found)


def _image(h: int, w: int, spots: list[tuple[int, int, int, int]]) -> np.ndarray:
    a = np.full((h, w, 3), 20, np.uint8)
    for r0, r1, c0, c1 in spots:
        a[r0:r1, c0:c1] = 250
    return a


@pytest.fixture
def model(monkeypatch):
    m = SpotChat()
    monkeypatch.setattr(chat_cli, "load_chat_model", lambda name, weights, device: m)
    return m


@pytest.fixture
def png(tmp_path):
    p = tmp_path / "chip.png"
    Image.fromarray(_image(40, 60, [(10, 20, 30, 45)])).save(p)
    return p


def test_one_question_prints_the_answer_and_boxes(model, png, capsys):
    assert main(["chat", str(png), "How many spots are there?"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "1"
    assert "box 1 spot: 30, 10, 45, 20 (pixel)" in out
    assert model.streamed == [False]  # not a terminal: printed whole


def test_answers_stream_on_a_terminal_and_print_once(model, png, monkeypatch, capsys):
    import sys

    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    monkeypatch.setattr("sys.stdin", io.StringIO("Describe it.\nWhat did I ask?\n"))
    assert main(["chat", str(png)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines() == ["a dark image", "you asked: Describe it."] and model.streamed == [True, True]


def test_json_document(model, png, capsys):
    assert main(["chat", str(png), "How many spots are there?", "--json", "--max-new-tokens", "32",
                 "--temperature", "0.5"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["answer"] == "1" and doc["number"] == 1 and doc["kind"] == "count"
    assert doc["boxes"][0]["x1"] == pytest.approx(30.0) and doc["boxes"][0]["label"] == "spot"
    assert doc["settings"]["max_new_tokens"] == 32 and doc["settings"]["temperature"] == 0.5
    assert doc["settings"]["model"] == "mini-chat"


def test_raster_says_how_the_answer_was_combined_and_writes_boxes(model, tmp_path, capsys):
    import geopandas as gpd

    scene = _image(90, 90, [(40, 50, 42, 52)]).transpose(2, 0, 1)  # in the overlap of all four windows
    src = write_raster(tmp_path / "scene.tif", scene, transform=from_origin(500000.0, 4100000.0, 0.5, 0.5))
    out = tmp_path / "spots.geojson"
    assert main(["chat", str(src), "How many spots are there?", "--tile", "64", "--overlap", "28",
                 "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert text.splitlines()[0] == "1"
    assert "(summed over 4 windows, 3 duplicates across overlaps removed by box IoU >= 0.5)" in text
    gdf = gpd.read_file(out)
    assert len(gdf) == 4 and set(gdf["group"]) == {0} and gdf.crs.to_epsg() == 32618
    assert gdf.geometry.iloc[0].bounds == pytest.approx((500021.0, 4099975.0, 500026.0, 4099980.0))


def test_interactive_session_from_a_pipe_keeps_history(model, png, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("How many spots are there?\n\nWhat did I ask?\nexit\nnever asked\n"))
    assert main(["chat", str(png)]) == 0
    out = capsys.readouterr().out
    assert [q for q, _ in model.calls] == ["How many spots are there?", "What did I ask?"]
    assert model.calls[1][1] == [("How many spots are there?", "1")]
    assert "you asked: How many spots are there?" in out


def test_interactive_json_is_one_document_with_every_turn(model, png, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("Describe it.\nWhat did I ask?"))  # EOF ends it
    assert main(["chat", str(png), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [t["question"] for t in doc["turns"]] == ["Describe it.", "What did I ask?"]
    assert doc["turns"][1]["answer"] == "you asked: Describe it."


@pytest.fixture
def no_model(monkeypatch):
    def load(*args, **kwargs):
        raise AssertionError("the model was loaded before the inputs were checked")

    monkeypatch.setattr(chat_cli, "load_chat_model", load)


def _fails(args: list[str], capsys, expected: str) -> None:
    assert main([str(a) for a in args]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in err, err


def test_errors_are_one_line_before_the_model_loads(no_model, png, tmp_path, capsys):
    _fails(["chat", png, "   "], capsys, "the question is empty")
    _fails(["chat", tmp_path / "missing.tif", "How many?"], capsys, "no such file")
    _fails(["chat", tmp_path, "How many?"], capsys, "is a folder")
    _fails(["chat", png, "How many?", "--temperature", "-1"], capsys, "--temperature must be >= 0")
    _fails(["chat", png, "How many?", "--max-new-tokens", "0"], capsys, "--max-new-tokens")
    _fails(["chat", png, "How many?", "--task", "qa"], capsys, "unknown task kind")
    _fails(["chat", png, "How many?", "--tile", "8"], capsys, "tile size")
    _fails(["chat", png, "How many?", "--iou", "0"], capsys, "--iou must be in (0, 1]")
    _fails(["chat", png, "How many?", "--gsd", "-1"], capsys, "GSD")
    _fails(["chat", png, "How many?", "--gsd", "0.5"], capsys, "has no CRS")
    _fails(["chat", png, "How many?", "-o", tmp_path / "x.txt"], capsys, "unknown output format")
    (tmp_path / "x.gpkg").write_bytes(b"")
    _fails(["chat", png, "Where?", "-o", tmp_path / "x.gpkg"], capsys, "x.gpkg exists")
    _fails(["chat", png, "-o", tmp_path / "y.gpkg"], capsys, "--out needs a QUESTION")


def test_a_model_that_does_not_chat_is_refused_before_loading(png, monkeypatch, capsys):
    from rsvl.models import registry

    monkeypatch.setattr(registry, "load", lambda *a, **k: pytest.fail("loaded"))
    _fails(["chat", png, "How many?", "-m", "mini-clip"], capsys, "mini-clip is not a chat model")
