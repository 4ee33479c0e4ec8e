"""``LisaSeg``: a LISA / FSVLM model behind :class:`~rsvl.models.segchat.SegChatModel`.

Three image streams, as upstream's ``chat.py`` / FSVLM's ``test.py`` prepare them:

* CLIP: ``CLIPImageProcessor`` of ``openai/clip-vit-large-patch14`` (shortest side to 224
  bicubic, centre crop 224, 0-1, OpenAI mean/std) -> hidden states of layer
  ``mm_vision_select_layer`` (-2) without CLS -> ``mm_projector`` -> the 256 embeddings that
  replace the ``<image>`` placeholder;
* SAM: ResizeLongestSide(1024) (bilinear) -> pixel mean/std -> zero pad bottom/right to
  1024 -> image encoder;
* the answer's masks come back at the input image's size (``postprocess_masks``: upsample to
  1024, crop the un-padded region, resize to the original size).

Decoding is greedy with a key/value cache and stops at ``</s>``. The ``[SEG]`` state is the
last-layer hidden state at the position *before* each ``[SEG]`` (upstream's
``output_ids[:, 1:] == seg_token_idx`` mask shifted by the 255 extra image positions): with a
cache that is the state of the step that *produced* ``[SEG]``. Each state ->
``text_hidden_fcs[0]`` -> one sparse prompt token (after SAM's empty point/box prompts);
dense prompt = ``no_mask_embed``; ``multimask_output=False``; a logit > 0 is inside.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from rsvl.errors import InputNotFoundError, PromptError
from rsvl.models.cards import OPENAI_MEAN, OPENAI_STD
from rsvl.models.lisa.network import LisaNet
from rsvl.models.lisa.prompt import IMAGE_TOKEN_INDEX, prompt_ids
from rsvl.models.lisa.tokenizer import SEG_TOKEN, LisaTokenizer
from rsvl.models.llava.prompt import IMAGE_TOKEN
from rsvl.models.sam.transforms import ResizeLongestSide
from rsvl.models.segchat import SegAnswer

#: upstream's teacher-forced answer (LISA's validation, FSVLM's shortest template)
FORCED_ANSWER = "[SEG]."


def check_rgb(image: Any) -> np.ndarray:
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8 or min(arr.shape[:2]) < 1:
        raise InputNotFoundError(
            f"A segmentation image must be an (H, W, 3) uint8 RGB array; got shape {arr.shape}, "
            f"dtype {arr.dtype}.",
            hint="Read the image as 8-bit RGB (rsvl segment converts rasters for you).",
        )
    return np.ascontiguousarray(arr)


def clip_pixels(image: np.ndarray, size: int, mean: Sequence[float] = OPENAI_MEAN,
                std: Sequence[float] = OPENAI_STD) -> Tensor:
    """(1, 3, size, size): ``CLIPImageProcessor`` (shortest side -> ``size`` bicubic, centre
    crop, 0-1, mean/std)."""
    h, w = image.shape[:2]
    short, long = (h, w) if h <= w else (w, h)
    new_long = int(size * long / short)
    nh, nw = (size, new_long) if h <= w else (new_long, size)
    if (nh, nw) != (h, w):
        image = np.asarray(Image.fromarray(image).resize((nw, nh), Image.Resampling.BICUBIC))
    top, left = (nh - size) // 2, (nw - size) // 2
    crop = np.array(image[top: top + size, left: left + size], copy=True)
    x = torch.from_numpy(crop).permute(2, 0, 1).float() / 255.0
    x = (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    return x.unsqueeze(0)


class LisaSeg(nn.Module):
    """A LISA-family model answering segmentation requests about one image."""

    def __init__(
        self,
        net: LisaNet,
        vision_tower: nn.Module,
        tokenizer: LisaTokenizer | None,
        *,
        name: str = "",
        image_size: int = 1024,
        select_layer: int = -2,
        markers: Sequence[str] | None = ("<im_start>", "<im_end>"),
        clip_size: int = 224,
        mean: Sequence[float] = OPENAI_MEAN,
        std: Sequence[float] = OPENAI_STD,
    ) -> None:
        super().__init__()
        self.net = net
        self.vision_tower = vision_tower
        self.tokenizer = tokenizer
        self.name = name
        self.image_size = int(image_size)
        self.select_layer = int(select_layer)
        self.markers = tuple(markers) if markers else None
        self.clip_size = int(clip_size)
        self.mean, self.std = tuple(mean), tuple(std)
        #: read from the checkpoint's tokenizer, never assumed (None: a model built for training)
        self.seg_token_id = tokenizer.seg_id if tokenizer is not None else None
        if self.markers and tokenizer is not None:
            for m in self.markers:
                tokenizer.token_id(m)
        params = inspect.signature(net.llm.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"

    # ------------------------------------------------------------------ pieces

    @property
    def device(self) -> torch.device:
        return self.net.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.net.lm_head.weight.dtype

    def prompt_ids(self, request: str) -> list[int]:
        """The prompt's ids with one :data:`IMAGE_TOKEN_INDEX` for the image."""
        if IMAGE_TOKEN in request:
            raise PromptError(f"the request contains {IMAGE_TOKEN}, which marks the image in the prompt.",
                              hint=f"Remove {IMAGE_TOKEN} from the request: rsvl places the image itself.")
        tok = self.tokenizer
        if tok is None:
            raise PromptError(f"{self.name or 'this model'} has no tokenizer (built with random weights).",
                              hint="Load a model folder with its tokenizer files, or pass tokenizer= to build().")
        return prompt_ids(request, lambda t: tok.encode(t), tok.bos_id, self.markers)

    def image_features(self, pixel_values: Tensor) -> Tensor:
        """(1, 3, S, S) CLIP input -> (1, patches, hidden): layer ``select_layer`` without CLS,
        through ``mm_projector``."""
        out = self.vision_tower(pixel_values.to(self.device, self.vision_dtype), output_hidden_states=True)
        feats = out.hidden_states[self.select_layer][:, 1:]
        return self.net.projector(feats.to(self.dtype))

    @property
    def vision_dtype(self) -> torch.dtype:
        return next(self.vision_tower.parameters()).dtype

    def embed(self, ids: Sequence[int], pixel_values: Tensor) -> Tensor:
        """(1, T, H): token embeddings with the image features where the placeholder is."""
        if list(ids).count(IMAGE_TOKEN_INDEX) != 1:
            raise ValueError("a LISA prompt holds exactly one image placeholder")
        pos = list(ids).index(IMAGE_TOKEN_INDEX)
        table = self.net.llm.embed_tokens
        before = table(torch.tensor(ids[:pos], device=self.device, dtype=torch.long))
        after = table(torch.tensor(ids[pos + 1:], device=self.device, dtype=torch.long))
        feats = self.image_features(pixel_values)[0].to(before.dtype)
        return torch.cat([before, feats, after])[None]

    def sam_input(self, image: np.ndarray) -> tuple[Tensor, tuple[int, int], tuple[int, int]]:
        """(1, 3, S, S) SAM input, the resized size, the original size."""
        sam = self.net.sam
        resized = ResizeLongestSide(sam.img_size).apply_image(image)
        x = torch.from_numpy(np.array(resized, copy=True)).permute(2, 0, 1)[None].float()
        x = sam.preprocess(x.to(self.device))
        return x.to(self.dtype), (resized.shape[0], resized.shape[1]), (image.shape[0], image.shape[1])

    def masks_from_states(self, states: Tensor, image_embeddings: Tensor, input_size: tuple[int, int],
                          original_size: tuple[int, int]) -> Tensor:
        """[SEG] states (K, H) -> (K, H0, W0) float32 mask logits at the original size."""
        sam = self.net.sam
        prompts = self.net.seg_fc(states.to(self.dtype))  # (K, 256)
        k = prompts.shape[0]
        sparse, dense = sam.prompt_encoder()  # no points / boxes / masks: (1, 0, C), no_mask_embed
        sparse = torch.cat([sparse.expand(k, -1, -1).to(prompts.dtype), prompts[:, None]], dim=1)
        dense = dense.expand(k, -1, -1, -1)
        low, _ = sam.mask_decoder(image_embeddings, sam.prompt_encoder.get_dense_pe(), sparse,
                                  dense.to(sparse.dtype), False)
        return sam.postprocess_masks(low, input_size, original_size)[:, 0].float()

    def _step(self, embeds: Tensor, cache: Any) -> tuple[Tensor, Any]:
        out = self.net.llm(inputs_embeds=embeds, use_cache=True, **{self._cache_arg: cache})
        new_cache = getattr(out, "cache", None)
        if new_cache is None:
            new_cache = getattr(out, "past_key_values", None)
        return out.last_hidden_state, new_cache

    # ------------------------------------------------------------------ the interface

    @torch.no_grad()
    def seg_chat(self, image: Any, prompt: str, *, max_new_tokens: int = 32,
                 force_seg: bool = False) -> SegAnswer:
        """Answer ``prompt`` about ``image`` and decode every ``[SEG]`` (see
        :class:`rsvl.models.segchat.SegChatModel`)."""
        t0 = time.perf_counter()
        rgb = check_rgb(image)
        ids = self.prompt_ids(prompt)
        pixels = clip_pixels(rgb, self.clip_size, self.mean, self.std)
        hidden, cache = self._step(self.embed(ids, pixels), None)
        states: list[Tensor] = []
        new: list[int] = []
        if force_seg:
            states.append(hidden[0, -1])
            text = FORCED_ANSWER
        else:
            tok = self.tokenizer
            assert tok is not None  # prompt_ids checked it
            table = self.net.llm.embed_tokens
            for step in range(max(0, int(max_new_tokens))):
                h = hidden[0, -1]
                next_id = int(self.net.lm_head(h).float().argmax())
                if next_id == tok.eos_id:
                    break
                new.append(next_id)
                if next_id == self.seg_token_id:
                    states.append(h)
                if step + 1 < max_new_tokens:
                    nxt = table(torch.tensor([[next_id]], device=self.device))
                    hidden, cache = self._step(nxt, cache)
            text = tok.decode(new).strip()
        masks: list[np.ndarray] = []
        if states:
            x, input_size, original_size = self.sam_input(rgb)
            emb = self.net.sam.encode_image(x)
            logits = self.masks_from_states(torch.stack(states), emb, input_size, original_size)
            masks = [m.cpu().numpy().astype(np.float32) for m in logits]
        n_prompt = len(ids) - 1 + (self.clip_size // self._patch) ** 2
        return SegAnswer(text=text, masks=masks, prompt_tokens=n_prompt,
                         new_tokens=1 if force_seg else len(new), total_s=time.perf_counter() - t0)

    @property
    def _patch(self) -> int:
        return int(self.vision_tower.config.patch_size)


__all__ = ["FORCED_ANSWER", "SEG_TOKEN", "LisaSeg", "check_rgb", "clip_pixels"]
