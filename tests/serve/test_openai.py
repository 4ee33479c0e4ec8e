"""The OpenAI-compatible endpoints, driven by the official ``openai`` client over the test
client's transport, and by raw HTTP for the stream's frames and the error shape."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import openai
import pytest
from fastapi.testclient import TestClient
from serve_util import png_b64, shared_loader

from rsvl.serve.app import create_app


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> TestClient:
    app = create_app([], "tok", state_dir=tmp_path_factory.mktemp("serve-openai"), model_loader=shared_loader)
    return TestClient(app, raise_server_exceptions=False, headers={"Authorization": "Bearer tok"})


@pytest.fixture(scope="module")
def oai(client: TestClient) -> openai.OpenAI:
    return openai.OpenAI(base_url="http://testserver/v1", api_key="tok", http_client=client, max_retries=0)


def message(text: str) -> list[dict]:
    return [{"role": "system", "content": "You are helpful."},
            {"role": "user", "content": [{"type": "text", "text": text},
                                         {"type": "image_url", "image_url": {"url": png_b64()}}]}]


def test_chat_completion_with_the_openai_client(oai: openai.OpenAI) -> None:
    out = oai.chat.completions.create(model="mini-chat", messages=message("What is in this image?"), max_tokens=5)
    assert out.object == "chat.completion" and out.choices[0].message.role == "assistant"
    assert isinstance(out.choices[0].message.content, str)
    assert out.usage.completion_tokens <= 5 and out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    assert out.choices[0].finish_reason in ("stop", "length")
    # history: an earlier turn, then a string-content question
    msgs = message("What is in this image?") + [{"role": "assistant", "content": "A forest."},
                                                 {"role": "user", "content": "Is there a river?"}]
    out = oai.chat.completions.create(model="mini-chat", messages=msgs, max_tokens=3, temperature=0)
    assert out.choices[0].message.content is not None


def test_chat_completion_stream(oai: openai.OpenAI, client: TestClient) -> None:
    chunks = list(oai.chat.completions.create(model="mini-chat", messages=message("Describe the image."),
                                              max_tokens=6, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1
    # the same answer as without streaming (greedy decoding)
    whole = oai.chat.completions.create(model="mini-chat", messages=message("Describe the image."), max_tokens=6)
    assert text == whole.choices[0].message.content
    raw = client.post("/v1/chat/completions", json={"model": "mini-chat", "messages": message("Hi?"),
                                                      "max_tokens": 2, "stream": True})
    frames = [f for f in raw.text.split("\n\n") if f]
    assert raw.headers["content-type"].startswith("text/event-stream")
    assert all(f.startswith("data: ") for f in frames) and frames[-1] == "data: [DONE]"
    assert json.loads(frames[0][6:])["object"] == "chat.completion.chunk"


@pytest.mark.parametrize("body, status, code", [
    ({"model": "no-such", "messages": message("Hi?")}, 404, "unknown_model"),
    ({"model": "mini-clip", "messages": message("Hi?")}, 404, "unknown_model"),
    ({"model": "vhm-7b", "messages": message("Hi?")}, 503, "weights_not_found"),
    ({"messages": [{"role": "user", "content": "no image here"}]}, 400, "prompt"),
    ({"messages": [{"role": "assistant", "content": "hello"}]}, 400, "prompt"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x.test/a.png"}},
                                                {"type": "text", "text": "what?"}]}]}, 400, "raster_read"),
    ({"messages": []}, 422, "invalid_request"),
    ({"messages": message("Hi?"), "max_tokens": 0}, 422, "invalid_request"),
    ({"messages": message("Hi?"), "n": 2}, 422, "invalid_request"),
])
def test_chat_completion_errors(client: TestClient, body: dict, status: int, code: str) -> None:
    resp = client.post("/v1/chat/completions", json=body)
    assert resp.status_code == status, resp.text
    assert resp.json()["error"]["code"] == code


def test_openai_client_sees_errors(oai: openai.OpenAI, client: TestClient) -> None:
    with pytest.raises(openai.NotFoundError, match="no-such"):
        oai.chat.completions.create(model="no-such", messages=message("Hi?"))
    wrong = openai.OpenAI(base_url="http://testserver/v1", api_key="wrong", max_retries=0,
                          http_client=TestClient(client.app, raise_server_exceptions=False))
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()


def test_embeddings(oai: openai.OpenAI, client: TestClient) -> None:
    out = oai.embeddings.create(model="mini-clip", input=["a river", "a stadium", "a river"])  # base64 on the wire
    vecs = np.array([d.embedding for d in out.data])
    assert vecs.shape[0] == 3 and np.allclose(np.linalg.norm(vecs, axis=1), 1, atol=1e-4)
    assert np.allclose(vecs[0], vecs[2], atol=1e-5) and not np.allclose(vecs[0], vecs[1])
    doc = client.post("/v1/embeddings", json={"input": "a river"}).json()
    assert doc["object"] == "list" and len(doc["data"][0]["embedding"]) == vecs.shape[1]
    assert np.allclose(doc["data"][0]["embedding"], vecs[0], atol=1e-5)
    for body, status in (({"input": ""}, 400), ({"input": []}, 400), ({"model": "mini-chat", "input": "x"}, 404),
                         ({"input": 5}, 422)):
        resp = client.post("/v1/embeddings", json=body)
        assert resp.status_code == status and "error" in resp.json(), resp.text


def test_models_list_is_openai_shaped(oai: openai.OpenAI) -> None:
    ids = [m.id for m in oai.models.list()]
    assert "mini-chat" in ids and "mini-clip" in ids


def test_no_roots_means_no_server_files(client: TestClient, tmp_path: Path) -> None:
    resp = client.post("/layers", json={"path": "x.tif"})
    assert resp.status_code == 403 and "--root" in resp.json()["error"]["message"]
