"""``LlavaChat``: a VHM / GeoChat model behind rsvl's :class:`~rsvl.models.chat.ChatModel`.

The network is transformers' ``LlavaForConditionalGeneration`` (CLIP vision tower,
``multi_modal_projector``, LLaMA); this class adds what upstream's inference does around it:

* preprocessing: pad the image to a square with the CLIP mean colour (122, 116, 104), centred
  (LLaVA's ``expand2square``), resize to the card's size (336 / 504) bicubically, scale to
  0-1 and apply CLIP's normalisation: ``CLIPImageProcessor`` on a square image;
* the prompt (:mod:`~rsvl.models.llava.prompt`): vicuna_v1 template, task tags, LLaVA's
  chunked tokenisation, the image placeholder expanded to one id per image token;
* decoding: greedy (``temperature=0``, upstream's ``do_sample=False``) or sampling, with a
  key/value cache, stopping at ``</s>``; each new piece of text goes to ``on_text``.

The forward pass is written out here (vision hidden states -> layer selection -> projector
-> spliced into the token embeddings -> LLaMA -> lm_head) instead of calling the
transformers model's own ``forward``, whose argument names changed across releases.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from rsvl.errors import InputNotFoundError
from rsvl.models.cards import OPENAI_MEAN, OPENAI_STD
from rsvl.models.chat import ChatAnswer
from rsvl.models.llava.convert import layout_of
from rsvl.models.llava.parse import parse_boxes
from rsvl.models.llava.prompt import build_prompt, tokenize_prompt
from rsvl.models.llava.tokenizer import SentencePieceBPE
from rsvl.models.preprocess import expand_to_square


def preprocess_image(
    image: np.ndarray,
    size: int,
    mean: Sequence[float] = OPENAI_MEAN,
    std: Sequence[float] = OPENAI_STD,
) -> Tensor:
    """A (1, 3, size, size) float tensor: pad to square with the mean colour, bicubic resize,
    CLIP normalisation."""
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8 or min(arr.shape[:2]) < 1:
        raise InputNotFoundError(
            "A chat image must be an (H, W, 3) uint8 RGB array; "
            f"got shape {arr.shape}, dtype {arr.dtype}.",
            hint="Read the image as 8-bit RGB (rsvl chat converts rasters for you).",
        )
    fill = tuple(int(m * 255) for m in mean)
    square = expand_to_square(arr, fill)
    if square.shape[0] != size:
        square = np.asarray(Image.fromarray(square).resize((size, size), Image.BICUBIC))
    x = torch.from_numpy(np.array(square, copy=True)).permute(2, 0, 1).float() / 255.0
    x = (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    return x.unsqueeze(0)


def _stream(text: str, shown: str, on_text: Callable[[str], None], *, final: bool = False) -> str:
    """Send the part of ``text`` (stripped, as the answer will be) not sent yet; hold back
    a trailing incomplete UTF-8 character. Returns what has been sent so far."""
    visible = text.strip()
    if not final and visible.endswith("\ufffd"):
        return shown
    if len(visible) > len(shown) and visible.startswith(shown):
        on_text(visible[len(shown) :])
        return visible
    return shown


class LlavaChat(nn.Module):
    """A LLaVA-1.5 family chat model (VHM or GeoChat) answering questions about one image."""

    def __init__(
        self,
        net: nn.Module,
        tokenizer: SentencePieceBPE | None,
        *,
        variant: str,
        name: str = "",
        image_size: int = 336,
        mean: Sequence[float] = OPENAI_MEAN,
        std: Sequence[float] = OPENAI_STD,
    ) -> None:
        super().__init__()
        self.net = net
        self.tokenizer = tokenizer
        self.variant = variant
        self.name = name
        self.image_size = int(image_size)
        self.mean, self.std = tuple(mean), tuple(std)
        cfg = net.config
        self.image_token_id = int(getattr(cfg, "image_token_id", None) or cfg.image_token_index)
        layers = cfg.vision_feature_layer
        self.feature_layers: list[int] = (
            list(layers) if isinstance(layers, (list, tuple)) else [int(layers)]
        )
        vision = cfg.vision_config
        self.num_image_tokens = (self.image_size // vision.patch_size) ** 2
        #: where the parts live inside ``net`` (transformers' names vary by release)
        self.layout = layout_of(net)
        params = inspect.signature(self.decoder.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"

    # ------------------------------------------------------------------ pieces

    @property
    def vision_tower(self) -> nn.Module:
        return self.net.get_submodule(self.layout.vision.rstrip("."))

    @property
    def projector(self) -> nn.Module:
        return self.net.get_submodule(self.layout.projector.rstrip("."))

    @property
    def decoder(self) -> nn.Module:
        """The LLaMA without its head (``LlamaModel``)."""
        return self.net.get_submodule(self.layout.text.rstrip("."))

    @property
    def lm_head(self) -> nn.Module:
        return self.net.get_submodule(self.layout.lm_head[: -len(".weight")])

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        w = self.projector.linear_1.weight
        return w.dtype if w.is_floating_point() else torch.float16

    def pixel_values(self, image: np.ndarray) -> Tensor:
        """The preprocessed image on the model's device and dtype."""
        x = preprocess_image(image, self.image_size, self.mean, self.std)
        return x.to(self.device, self.dtype)

    def image_features(self, pixel_values: Tensor) -> Tensor:
        """(B, tokens, text width): the selected CLIP hidden states without CLS, concatenated
        in layer order, through the projector."""
        out = self.vision_tower(pixel_values.to(self.dtype), output_hidden_states=True)
        states = out.hidden_states
        feats = torch.cat([states[layer][:, 1:] for layer in self.feature_layers], dim=-1)
        return self.projector(feats)

    def embed(self, input_ids: Tensor, pixel_values: Tensor | None) -> Tensor:
        """Token embeddings with the image features written over the image placeholders."""
        mask = input_ids == self.image_token_id
        embeds = self.decoder.get_input_embeddings()(input_ids.masked_fill(mask, 0))
        if pixel_values is not None and bool(mask.any()):
            feats = self.image_features(pixel_values).to(embeds.dtype)
            if int(mask.sum()) != feats.shape[0] * feats.shape[1]:
                raise ValueError(
                    f"{int(mask.sum())} image placeholders for {feats.shape[1]} image tokens"
                )
            embeds = embeds.masked_scatter(mask.unsqueeze(-1), feats)
        return embeds

    def _decode_step(self, embeds: Tensor, cache: Any) -> tuple[Tensor, Any]:
        out = self.decoder(inputs_embeds=embeds, use_cache=True, **{self._cache_arg: cache})
        new_cache = getattr(out, "cache", None)
        if new_cache is None:
            new_cache = getattr(out, "past_key_values", None)
        return out.last_hidden_state, new_cache

    @torch.no_grad()
    def forward(self, input_ids: Tensor, pixel_values: Tensor | None = None) -> Tensor:
        """Logits (B, T, vocab) of a full sequence whose image placeholders are already
        expanded (one ``image_token_id`` per image token)."""
        hidden = self.decoder(inputs_embeds=self.embed(input_ids, pixel_values)).last_hidden_state
        return self.lm_head(hidden)

    # ------------------------------------------------------------------ prompt

    def prompt_ids(
        self, question: str, *, task: str | None = None, history: Sequence[tuple[str, str]] = ()
    ) -> list[int]:
        """The prompt's ids with the image placeholder expanded to one id per image token."""
        if self.tokenizer is None:
            raise InputNotFoundError(
                "This model has no tokenizer.",
                hint="Place the model's tokenizer.model next to its config.json.",
            )
        tok = self.tokenizer
        prompt = build_prompt(question, variant=self.variant, task=task, history=history)
        ids = tokenize_prompt(
            prompt, lambda t: tok.encode(t, add_bos=False), tok.bos_id, self.image_token_id
        )
        expanded: list[int] = []
        for i in ids:
            expanded.extend([i] * self.num_image_tokens if i == self.image_token_id else [i])
        return expanded

    # ------------------------------------------------------------------ chat

    @torch.no_grad()
    def chat(
        self,
        image: np.ndarray,
        question: str,
        *,
        history: Sequence[tuple[str, str]] = (),
        task: str | None = None,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        on_text: Callable[[str], None] | None = None,
        seed: int | None = None,
    ) -> ChatAnswer:
        """Answer ``question`` about ``image`` (see :class:`rsvl.models.chat.ChatModel`).

        ``seed`` makes sampling (``temperature > 0``) repeatable; greedy decoding needs none.
        """
        start = time.perf_counter()
        tok = self.tokenizer
        ids = self.prompt_ids(question, task=task, history=history)
        assert tok is not None  # prompt_ids checked it
        input_ids = torch.tensor([ids], device=self.device)
        pixels = self.pixel_values(image)
        generator = None
        if temperature > 0 and seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(int(seed))
        hidden, cache = self._decode_step(self.embed(input_ids, pixels), None)
        new: list[int] = []
        shown = ""
        first_token_s = 0.0
        for _ in range(max(0, int(max_new_tokens))):
            logits = self.lm_head(hidden[:, -1]).float()
            logits[:, self.image_token_id :] = float("-inf")  # the added rows are never text
            if temperature > 0:
                probs = torch.softmax(logits / temperature, dim=-1)
                next_id = int(torch.multinomial(probs, 1, generator=generator).item())
            else:
                next_id = int(logits.argmax(dim=-1).item())
            if not new:
                first_token_s = time.perf_counter() - start
            if next_id == tok.eos_id:
                break
            new.append(next_id)
            if on_text is not None:
                shown = _stream(tok.decode(new), shown, on_text)
            step = self.decoder.get_input_embeddings()(
                torch.tensor([[next_id]], device=self.device)
            )
            hidden, cache = self._decode_step(step, cache)
        answer = tok.decode(new).strip()
        if on_text is not None:
            _stream(answer, shown, on_text, final=True)
        return ChatAnswer(
            text=answer,
            boxes=parse_boxes(answer, self.variant),
            prompt_tokens=len(ids),
            new_tokens=len(new),
            first_token_s=first_token_s,
            total_s=time.perf_counter() - start,
        )


__all__ = ["LlavaChat", "expand_to_square", "preprocess_image"]
