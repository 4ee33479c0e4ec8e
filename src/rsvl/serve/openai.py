"""OpenAI-compatible endpoints: ``POST /v1/chat/completions`` and ``POST /v1/embeddings``.

An OpenAI client pointed at the service (``base_url="http://127.0.0.1:8000/v1"``) talks to
mini-chat, VHM or GeoChat. A message's content is a string or a list of parts ``{"type":
"text"}`` / ``{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}``;
the last image of the user's messages is the image asked about, earlier user/assistant
pairs are the history, the last user message is the question. System messages are
accepted and not used (each chat model has its own system prompt). Remote image URLs are
not fetched. ``stream`` answers with server-sent ``chat.completion.chunk`` frames and a
final ``data: [DONE]``. Errors are ``{"error": {"message", "type", "code", ...}}``.
"""

from __future__ import annotations

import base64
import json
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any, Literal

import numpy as np
import torch
from fastapi import APIRouter
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from rsvl.errors import PromptError, RsvlError
from rsvl.serve.models import ModelCache
from rsvl.serve.safety import Limits, decode_base64, decode_image
from rsvl.tasks.chat import check_question


class ImageURL(BaseModel):
    model_config = ConfigDict(extra="ignore")
    url: str = Field(..., max_length=800_000_000)
    detail: str | None = None


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: ImageURL | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str = "mini-chat"
    messages: list[Message] = Field(..., min_length=1, max_length=200)
    max_tokens: int | None = Field(None, ge=1, le=4096)
    max_completion_tokens: int | None = Field(None, ge=1, le=4096)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1)


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str = "mini-clip"
    input: str | list[str] = Field(..., description="A text or a list of texts (at most 256).")
    encoding_format: Literal["float", "base64"] = "float"


def _text(content: str | list[ContentPart] | None) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "\n".join(p.text or "" for p in content if p.type == "text").strip()


def _images(content: str | list[ContentPart] | None) -> list[str]:
    if not isinstance(content, list):
        return []
    return [p.image_url.url for p in content if p.type == "image_url" and p.image_url is not None]


def conversation(messages: list[Message], limits: Limits) -> tuple[np.ndarray, list[tuple[str, str]], str]:
    """(image, history, question) from OpenAI messages."""
    turns = [m for m in messages if m.role in ("user", "assistant")]
    if not turns or turns[-1].role != "user":
        raise PromptError("the last message must be the user's question.",
                          hint='End messages with {"role": "user", "content": [...]}.')
    urls = [u for m in turns if m.role == "user" for u in _images(m.content)]
    if not urls:
        raise PromptError("no image in the messages: rsvl's chat models answer about an image.",
                          hint='Add a part {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}.')
    image = decode_image(decode_base64(urls[-1], limits), limits)
    history: list[tuple[str, str]] = []
    pending: str | None = None
    for m in turns[:-1]:
        if m.role == "user":
            pending = _text(m.content) if pending is None else f"{pending}\n{_text(m.content)}"
        elif pending is not None:
            history.append((pending, _text(m.content)))
            pending = None
    question = check_question(_text(turns[-1].content) if pending is None
                              else f"{pending}\n{_text(turns[-1].content)}")
    return image, history, question


def error_doc(exc: BaseException, code: str) -> dict[str, Any]:
    if isinstance(exc, RsvlError):
        return {"error": {"message": str(exc), "type": type(exc).__name__, "code": code, "param": None}}
    return {"error": {"message": f"unexpected {type(exc).__name__}: {exc}", "type": "InternalError",
                      "code": "internal_error", "param": None}}


def router(cache: ModelCache, limits: Limits, check: Callable[[str | None, str], Any]) -> APIRouter:
    """The two endpoints; ``check(model, task)`` refuses a model that cannot serve now."""
    r = APIRouter(tags=["openai"])

    @r.post("/v1/chat/completions", summary="OpenAI-compatible chat about an image")
    def chat_completions(req: ChatCompletionRequest) -> Any:
        image, history, question = conversation(req.messages, limits)
        max_tokens = req.max_completion_tokens or req.max_tokens or 256
        temperature = float(req.temperature or 0.0)
        check(req.model, "chat")  # an unknown model, one that does not chat, or no weights: refused now
        cid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        created = int(time.time())

        def answer(on_text: Any = None) -> Any:
            with cache.use(req.model, "chat") as m:
                return m.module.chat(image, question, history=history, max_new_tokens=max_tokens,
                                     temperature=temperature, on_text=on_text)

        def usage(ans: Any) -> dict[str, int]:
            return {"prompt_tokens": int(ans.prompt_tokens), "completion_tokens": int(ans.new_tokens),
                    "total_tokens": int(ans.prompt_tokens + ans.new_tokens)}

        def finish(ans: Any) -> str:
            return "length" if ans.new_tokens >= max_tokens else "stop"

        if not req.stream:
            ans = answer()
            return {"id": cid, "object": "chat.completion", "created": created, "model": req.model,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": ans.text},
                                 "finish_reason": finish(ans)}],
                    "usage": usage(ans)}

        pieces: queue.Queue[tuple[str, Any]] = queue.Queue()

        def work() -> None:
            try:
                ans = answer(on_text=lambda piece: pieces.put(("text", piece)))
                pieces.put(("end", ans))
            except BaseException as exc:  # sent to the client as an error frame
                pieces.put(("error", exc))

        def chunk(delta: dict[str, Any], finish_reason: str | None = None, **extra: Any) -> str:
            doc = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": req.model,
                   "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}], **extra}
            return f"data: {json.dumps(doc)}\n\n"

        def frames() -> Iterator[str]:
            threading.Thread(target=work, name="rsvl-chat-stream", daemon=True).start()
            yield chunk({"role": "assistant", "content": ""})
            while True:
                kind, value = pieces.get()
                if kind == "text":
                    if value:
                        yield chunk({"content": value})
                    continue
                if kind == "error":
                    yield f"data: {json.dumps(error_doc(value, 'generation_failed'))}\n\n"
                    break
                yield chunk({}, finish(value))
                if req.stream_options is not None and req.stream_options.include_usage:
                    doc = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": req.model,
                           "choices": [], "usage": usage(value)}
                    yield f"data: {json.dumps(doc)}\n\n"
                break
            yield "data: [DONE]\n\n"

        return StreamingResponse(frames(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @r.post("/v1/embeddings", summary="OpenAI-compatible CLIP text embeddings")
    def embeddings(req: EmbeddingRequest) -> Any:
        texts = [req.input] if isinstance(req.input, str) else list(req.input)
        if not texts or len(texts) > 256 or any(not isinstance(t, str) or not t.strip() for t in texts):
            raise PromptError("input must be 1 to 256 non-empty texts.")
        if sum(len(t) for t in texts) > 1_000_000:
            raise PromptError("input is longer than 1,000,000 characters in all.")
        check(req.model, "embeddings")
        with cache.use(req.model, "embeddings") as m, torch.no_grad():
            vectors = m.encode_text(texts)
        v = vectors.float().cpu().numpy() if hasattr(vectors, "cpu") else np.asarray(vectors, np.float32)
        v = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
        data = []
        for i, row in enumerate(v.astype("<f4")):
            emb: Any = base64.b64encode(row.tobytes()).decode() if req.encoding_format == "base64" else row.tolist()
            data.append({"object": "embedding", "index": i, "embedding": emb})
        words = sum(len(t.split()) for t in texts)
        return {"object": "list", "data": data, "model": req.model,
                "usage": {"prompt_tokens": words, "total_tokens": words}}

    return r
