"""mini-fsvlm: rsvl's built-in, offline, CPU-sized language-guided segmentation model.

mini-chat (the built-in LLaVA: Lite0 tower -> projector -> SmolLM2-135M with merged LoRA)
extended the LISA / FSVLM way:

* a ``[SEG]`` token: one more row of the language model's output layer (``seg_head``); the
  answer to a segmentation request is ``"[SEG]."`` (FSVLM's shortest answer template);
* ``text_hidden_fcs`` (LISA's Linear-ReLU-Linear): the last-layer hidden state *that
  predicts* ``[SEG]`` -> ``words`` prompt vectors of ``text_dim`` channels;
* a mask decoder on the same image tower's stride 8/16/32 maps: mini-refer's
  :class:`~rsvl.models.mini.refer.ReferDecoder` (pixel-word attention, FiLM, a top-down
  path and a stride-4 refinement), initialised from mini-refer's trained weights, its
  "words" the prompt vectors.

One Lite0 pass at ``image_size`` (384 px) feeds both the language model (its maps pooled
to mini-chat's 8x8 tokens) and the decoder. The language model and mini-chat's adapters
stay frozen, so the state before ``[SEG]`` is a function of the image and the request;
``rsvl train fsvlm`` caches it and trains ``seg_head``, ``text_hidden_fcs`` and the decoder
with FSVLM's loss (CE + 2 BCE + 0.5 Dice). Generation stops at ``[SEG]`` (its embedding
is never fed back), so a mini-fsvlm answer is ``"[SEG]."`` or a plain chat answer.

Masks come back as logits at the input image's size (``> 0`` inside), as
:class:`rsvl.models.segchat.SegChatModel` asks.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from rsvl.errors import CheckpointMismatchError, PromptError
from rsvl.models.checkpoint import load_strict
from rsvl.models.mini.cards import assets_dir
from rsvl.models.mini.chat import GRID, MiniChat, as_rgb, cache_arg, load_mini_chat
from rsvl.models.mini.files import read_weights, write_weights
from rsvl.models.mini.refer import DEFAULT_WEIGHTS as REFER_WEIGHTS
from rsvl.models.mini.refer import MiniReferConfig, ReferDecoder, load_decoder
from rsvl.models.preprocess import expand_to_square
from rsvl.models.segchat import SegAnswer

FORMAT = "rsvl-mini-fsvlm-v1"
DEFAULT_WEIGHTS = assets_dir("mini-fsvlm") / "fsvlm.safetensors"
SEG_TOKEN = "[SEG]"
#: the answer mini-fsvlm gives (and is trained on) for a segmentation request
SEG_ANSWER = "[SEG]."


@dataclass
class MiniFSVLMConfig:
    image_size: int = 384
    #: prompt vectors produced from the [SEG] state
    words: int = 4
    decoder: dict[str, Any] = field(default_factory=lambda: asdict(MiniReferConfig()))
    #: the mini-chat weights the frozen part came from (checked when loading)
    chat: str = "mini-chat"

    def __post_init__(self) -> None:  # the decoder's config as JSON has it (tuples -> lists)
        self.decoder = json.loads(json.dumps(self.decoder))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> MiniFSVLMConfig:
        unknown = sorted(set(d) - set(cls.__dataclass_fields__))
        if unknown:
            raise TypeError(f"MiniFSVLMConfig: unknown field(s) {unknown}")
        return cls(**dict(d))


class TextHiddenFcs(nn.Module):
    """LISA's ``text_hidden_fcs[0]``: Linear(H, H) - ReLU - Linear(H, words x text_dim)."""

    def __init__(self, hidden: int, words: int, text_dim: int) -> None:
        super().__init__()
        self.words, self.text_dim = words, text_dim
        self.fc1 = nn.Linear(hidden, hidden)
        self.fc2 = nn.Linear(hidden, words * text_dim)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(h))).view(h.shape[0], self.words, self.text_dim)


class MiniFSVLM(nn.Module):
    """See the module docstring; implements :class:`rsvl.models.segchat.SegChatModel` and
    :class:`rsvl.models.chat.ChatModel` (plain questions go to mini-chat unchanged)."""

    name = "mini-fsvlm"

    def __init__(self, config: MiniFSVLMConfig, chat: MiniChat) -> None:
        super().__init__()
        self.config = config
        self.image_size = config.image_size
        self.chat_model = chat
        for p in chat.parameters():
            p.requires_grad_(False)
        hidden = int(chat.causal_lm.config.hidden_size)
        dcfg = MiniReferConfig.from_dict(config.decoder)
        self.seg_head = nn.Linear(hidden, 1)
        nn.init.zeros_(self.seg_head.weight)
        nn.init.zeros_(self.seg_head.bias)
        self.text_hidden_fcs = TextHiddenFcs(hidden, config.words, dcfg.text_dim)
        self.decoder = ReferDecoder(dcfg)

    # -- parts -----------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.seg_head.weight.device

    def train(self, mode: bool = True) -> MiniFSVLM:  # the frozen chat model stays in eval mode
        super().train(mode)
        self.chat_model.eval()
        return self

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        out = {f"seg_head.{k}": v for k, v in self.seg_head.state_dict().items()}
        out.update({f"text_hidden_fcs.{k}": v for k, v in self.text_hidden_fcs.state_dict().items()})
        out.update({f"decoder.{k}": v for k, v in self.decoder.state_dict().items()})
        return out

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [*self.seg_head.parameters(), *self.text_hidden_fcs.parameters(), *self.decoder.parameters()]

    # -- inputs ----------------------------------------------------------------------------
    def pixels(self, images: Sequence[np.ndarray]) -> tuple[torch.Tensor, list[tuple[int, int, int]]]:
        """uint8 images -> normalised (B, 3, S, S) padded to square with the mean, and per
        image (side of the square before resizing, height, width) to undo it."""
        s = self.image_size
        chat = self.chat_model
        batch, geom = [], []
        for image in images:
            rgb = as_rgb(image)
            sq = expand_to_square(rgb, chat.fill)
            geom.append((sq.shape[0], rgb.shape[0], rgb.shape[1]))
            if sq.shape[0] != s:
                sq = np.asarray(Image.fromarray(sq).resize((s, s), Image.BICUBIC))
            batch.append(torch.from_numpy(np.array(sq)).permute(2, 0, 1))
        x = torch.stack(batch).to(self.device, torch.float32) / 255.0
        return (x - chat.mean) / chat.std, geom

    @torch.no_grad()
    def image_features(self, x: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], torch.Tensor, torch.Tensor]:
        """Normalised (B, 3, S, S) -> ((f8, f16, f32), 4x-pooled image, (B, 64, C) chat tokens)."""
        f8, f16, f32 = self.chat_model.features.tower(x)
        size = (GRID, GRID)
        maps = [F.adaptive_avg_pool2d(f, size) if f.shape[-2:] != size else f for f in (f32, f16, f8)]
        tokens = torch.cat(maps, dim=1).flatten(2).transpose(1, 2)
        return (f8, f16, f32), F.avg_pool2d(x, 4), tokens

    def check_prompt(self, prompt: str) -> str:
        prompt = (prompt or "").strip()
        if not prompt:
            raise PromptError("the segmentation request is empty.",
                              hint='Ask e.g. "Please segment the farmland." (a description of the scene may come first).')
        return prompt

    @torch.no_grad()
    def prompt_states(self, tokens: torch.Tensor, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Last-layer states at the last prompt position (what predicts the answer's first
        token: ``[SEG]`` for a segmentation request) -> (B, H), and the language model's own
        logits there (B, V)."""
        chat = self.chat_model
        lm = chat.causal_lm
        image = chat.projector(tokens)
        rows = []
        for b, prompt in enumerate(prompts):
            before, after = chat.prompt_ids(self.check_prompt(prompt))
            rows.append(torch.cat([chat.embed(before), image[b], chat.embed(after)]))
        # one right-padded batch: the state of each row is at its last real position
        width = max(r.shape[0] for r in rows)
        embeds = rows[0].new_zeros(len(rows), width, rows[0].shape[1])
        mask = torch.zeros(len(rows), width, dtype=torch.long, device=embeds.device)
        for b, r in enumerate(rows):
            embeds[b, : r.shape[0]] = r
            mask[b, : r.shape[0]] = 1
        hidden = lm.model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        last = torch.tensor([r.shape[0] - 1 for r in rows], device=hidden.device)
        states = hidden[torch.arange(len(rows), device=hidden.device), last]
        return states.float(), lm.lm_head(states).float()

    # -- the trained part ------------------------------------------------------------------
    def decode(self, feats: tuple[torch.Tensor, ...], small: torch.Tensor, states: torch.Tensor,
               out_size: int | tuple[int, int] | None = None) -> torch.Tensor:
        """[SEG] states (B, H) + tower maps -> (B, S, S) mask logits (inside minus outside)."""
        words = self.text_hidden_fcs(states.float())
        mask = torch.ones(words.shape[:2], dtype=torch.long, device=words.device)
        size = out_size if out_size is not None else small.shape[-1] * 4
        two = self.decoder(feats, small, words, mask, size)
        return two[:, 1] - two[:, 0]

    def seg_logit(self, states: torch.Tensor) -> torch.Tensor:
        """The ``[SEG]`` row of the output layer on states (B, H) -> (B,)."""
        return self.seg_head(states.float())[:, 0]

    def _unpad(self, logits: torch.Tensor, geom: tuple[int, int, int]) -> np.ndarray:
        """(S, S) logits of the padded square -> (H, W) at the input image's size."""
        side, h, w = geom
        full = F.interpolate(logits[None, None], size=(side, side), mode="bilinear", align_corners=False)[0, 0]
        top, left = (side - h) // 2, (side - w) // 2
        return full[top: top + h, left: left + w].float().cpu().numpy()

    # -- inference -------------------------------------------------------------------------
    @torch.no_grad()
    def seg_chat(self, image: Any, prompt: str, *, max_new_tokens: int = 32, force_seg: bool = False) -> SegAnswer:
        t0 = time.perf_counter()
        prompt = self.check_prompt(prompt)
        x, geom = self.pixels([image])
        feats, small, tokens = self.image_features(x)
        states, logits = self.prompt_states(tokens, [prompt])
        seg = self.seg_logit(states)
        if force_seg or float(seg[0]) > float(logits[0].max()):
            masks = self.decode(feats, small, states, self.image_size)
            return SegAnswer(text=SEG_ANSWER, masks=[self._unpad(masks[0], geom[0])], new_tokens=1,
                             total_s=time.perf_counter() - t0)
        # not a segmentation request: mini-chat answers it, watching for [SEG] at every step
        text, state = self._generate(image, prompt, max_new_tokens)
        masks = []
        if state is not None:
            masks = [self._unpad(self.decode(feats, small, state[None], self.image_size)[0], geom[0])]
        return SegAnswer(text=text, masks=masks, new_tokens=len(text.split()), total_s=time.perf_counter() - t0)

    @torch.no_grad()
    def _generate(self, image: Any, prompt: str, max_new_tokens: int) -> tuple[str, torch.Tensor | None]:
        chat = self.chat_model
        lm = chat.causal_lm
        before, after = chat.prompt_ids(prompt)
        x = chat.pixels([as_rgb(image)])
        embeds = torch.cat([chat.embed(before), chat.projector(chat.features(x))[0], chat.embed(after)])[None]
        ids: list[int] = []
        past: dict[str, Any] = {}
        key = cache_arg(lm)
        for _ in range(max(0, int(max_new_tokens))):
            out = lm.model(inputs_embeds=embeds, use_cache=True, **past)
            past = {key: getattr(out, "cache", None) or out.past_key_values}
            h = out.last_hidden_state[0, -1]
            logits = lm.lm_head(h[None])[0].float()
            if float(self.seg_logit(h[None])[0]) > float(logits.max()):
                text = chat.tokenizer.decode(ids, skip_special_tokens=True).strip()
                return (text + " " + SEG_ANSWER).strip(), h.float()
            token = int(torch.argmax(logits))
            if token in (chat.end_id, chat.tokenizer.eos_token_id):
                break
            ids.append(token)
            embeds = chat.embed([token])[None]
        return chat.tokenizer.decode(ids, skip_special_tokens=True).strip(), None

    def chat(self, image: Any, question: str, **kwargs: Any) -> Any:
        """Plain chat (:class:`rsvl.models.chat.ChatModel`): mini-chat's answer."""
        return self.chat_model.chat(image, question, **kwargs)


def build_mini_fsvlm(config: MiniFSVLMConfig | None = None, *, chat: MiniChat | None = None,
                     device: str = "cpu", init_decoder: str | Path | None = "mini-refer") -> MiniFSVLM:
    """mini-fsvlm with fresh trained parts on the shipped mini-chat (what training starts
    from); the decoder starts from mini-refer's trained weights unless ``init_decoder`` is
    None (or a path to another mini-refer decoder file)."""
    config = config or MiniFSVLMConfig()
    chat = chat if chat is not None else load_mini_chat(device=device)
    if init_decoder is not None:
        dec = load_decoder(REFER_WEIGHTS if init_decoder == "mini-refer" else init_decoder)
        config.decoder = json.loads(json.dumps(asdict(dec.config)))
        model = MiniFSVLM(config, chat)
        model.decoder.load_state_dict(dec.state_dict())
    else:
        model = MiniFSVLM(config, chat)
    return model.to(device)


def save_mini_fsvlm(model: MiniFSVLM, path: str | Path, extra: Mapping[str, Any] | None = None) -> Path:
    """The trained parts, float16, config in the metadata (atomic)."""
    meta = {"format": FORMAT, "config": json.dumps(model.config.to_dict()), **(extra or {})}
    tensors = {k: v.half() if v.is_floating_point() else v for k, v in model.trainable_state_dict().items()}
    return write_weights(tensors, path, meta)


def load_mini_fsvlm(weights: str | Path | None = None, device: str = "cpu", *, chat: MiniChat | None = None) -> MiniFSVLM:
    """mini-fsvlm with trained weights (default: the shipped ``assets/mini-fsvlm``) on the
    shipped mini-chat. Needs no network."""
    path = Path(weights) if weights is not None else DEFAULT_WEIGHTS
    hint = "Use a file written by `rsvl train fsvlm --model mini-fsvlm`."
    tensors, meta = read_weights(path, what="mini-fsvlm", fmt=FORMAT, hint=hint,
                                 missing_hint="Reinstall rsvl, or train one with `rsvl train fsvlm --model mini-fsvlm`.")
    try:
        config = MiniFSVLMConfig.from_dict(json.loads(meta.get("config", "{}")))
    except (TypeError, ValueError) as e:
        raise CheckpointMismatchError(f"{path}: unreadable mini-fsvlm config ({e}).", hint=hint) from e
    model = MiniFSVLM(config, chat if chat is not None else load_mini_chat(device=device))
    sd = {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}
    holder = nn.ModuleDict({"seg_head": model.seg_head, "text_hidden_fcs": model.text_hidden_fcs,
                            "decoder": model.decoder})
    load_strict(holder, sd, what=f"{path} does not match mini-fsvlm")
    return model.to(device).eval()


__all__ = ["DEFAULT_WEIGHTS", "FORMAT", "SEG_ANSWER", "MiniFSVLM", "MiniFSVLMConfig", "build_mini_fsvlm",
           "load_mini_fsvlm", "save_mini_fsvlm"]
