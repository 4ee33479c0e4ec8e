"""The open_clip CLIP behind rsvl's image-text interface (what classify / search / segment use).

:class:`ClipModel` takes uint8 RGB ``(B, 3, H, W)`` images and strings, applies the card's
resize and normalisation, and returns L2-normalised embeddings; ``dense_features`` gives
per-location embeddings for open-vocabulary segmentation (:mod:`rsvl.models.clip.dense`).
The global image embedding (``encode_image``) is untouched by the dense path: it is the CLS
output of the original last block.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from open_clip.tokenizer import SimpleTokenizer
from torch import nn

from rsvl.errors import PromptError
from rsvl.models.cards import ModelCard, pick_card
from rsvl.models.clip.cards import CARDS
from rsvl.models.clip.dense import DENSE_ATTENTIONS, DenseAttention, resnet_dense, vit_dense
from rsvl.models.clip.fast import accelerate_cpu


def resolve_dtype(device: torch.device, dtype: Any) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {
        "bf16": torch.bfloat16,
        "bfloat16": torch.bfloat16,
        "fp16": torch.float16,
        "float16": torch.float16,
        "half": torch.float16,
        "fp32": torch.float32,
        "float32": torch.float32,
        "float": torch.float32,
    }
    try:
        return names[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(names)}") from None


@functools.lru_cache(maxsize=4)
def _tokenizer(context_length: int) -> Any:
    return SimpleTokenizer(context_length=context_length)


class ClipModel:
    """An open_clip CLIP behind rsvl's :class:`~rsvl.models.base.ImageTextModel` interface.

    Images are uint8 RGB ``(B, 3, H, W)`` arrays or tensors; the model applies the card's
    resize (shortest side to ``image_size``, bicubic with antialiasing, then a centre crop, as
    open_clip's preprocessing does, here with torch ops) and normalisation itself.
    """

    def __init__(
        self,
        model: nn.Module,
        card: ModelCard,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | str | None = None,
        fast: bool = False,
    ) -> None:
        self.card = card
        self.name = card.name
        self.device = torch.device(device)
        self.dtype = resolve_dtype(self.device, dtype)
        self.model = model.to(device=self.device, dtype=self.dtype).eval()
        #: int8 linear layers (``--fast`` on the CPU, :mod:`rsvl.models.clip.fast`)
        self.fast = bool(fast) and self.device.type == "cpu"
        if self.fast:
            if self.dtype != torch.float32:
                raise ValueError(f"--fast on the CPU quantises a float32 model; got dtype {self.dtype}")
            self.model = accelerate_cpu(self.model)
        visual = self.model.visual
        size = getattr(visual, "image_size", card.image_size)
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        patch = getattr(visual, "patch_size", None)
        #: input stride of one feature-grid cell (ViT patch, or 32 for ModifiedResNet)
        self.patch_size = int(patch[0] if isinstance(patch, (tuple, list)) else patch or 32)
        self.is_vit = hasattr(visual, "class_embedding")
        self.context_length = int(self.model.positional_embedding.shape[0])
        self.long_text = hasattr(self.model, "positional_embedding_res")
        self.embed_dim = int(
            self.model.text_projection.shape[-1]
            if isinstance(self.model.text_projection, torch.Tensor)
            else self.model.text_projection.out_features
        )
        self._mean = torch.tensor(card.mean, dtype=torch.float32, device=self.device).view(
            1, 3, 1, 1
        )
        self._std = torch.tensor(card.std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)

    def __repr__(self) -> str:
        return (
            f"ClipModel({self.name!r}, {self.card.architecture}, image {self.image_size}px, "
            f"text {self.context_length} tokens, {self.device}, {'int8 linear' if self.fast else self.dtype})"
        )

    # ---------------------------------------------------------------- properties
    @property
    def logit_scale(self) -> float:
        """exp(learned log-scale), capped at 100 as CLIP training clamps it."""
        return float(min(self.model.logit_scale.detach().float().exp().max().item(), 100.0))

    # ---------------------------------------------------------------- preprocessing
    def _as_uint8_batch(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        if isinstance(images, np.ndarray):
            if images.dtype != np.uint8:
                raise TypeError(f"images must be uint8 RGB, got numpy {images.dtype}")
            x = torch.from_numpy(np.ascontiguousarray(images))
        elif isinstance(images, torch.Tensor):
            if images.dtype != torch.uint8:
                raise TypeError(f"images must be uint8 RGB, got tensor {images.dtype}")
            x = images
        else:
            raise TypeError(f"images must be a numpy array or torch tensor, got {type(images)}")
        if x.ndim == 3:
            x = x.unsqueeze(0)
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"images must be shaped (B, 3, H, W), got {tuple(x.shape)}")
        return x.to(self.device)

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        """float 0..255 -> normalised, in the model's dtype."""
        return ((x / 255.0 - self._mean) / self._std).to(self.dtype)

    def preprocess(self, images: np.ndarray | torch.Tensor, *, resize: bool = True) -> torch.Tensor:
        """uint8 ``(B, 3, H, W)`` -> normalised float ``(B, 3, S, S)`` on the model's device.

        With ``resize`` (the default) the shortest side is resized to ``image_size`` (bicubic,
        antialiased, rounded back to 8-bit levels like PIL) and the centre is cropped; an input
        already at ``image_size`` square is used as is.
        """
        x = self._as_uint8_batch(images).float()
        if resize:
            size = self.image_size
            h, w = x.shape[-2:]
            if (h, w) != (size, size):
                if h <= w:
                    new_h, new_w = size, int(size * w / h)
                else:
                    new_h, new_w = int(size * h / w), size
                if (new_h, new_w) != (h, w):
                    x = F.interpolate(
                        x, size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=True
                    )
                    x = x.clamp_(0, 255).round_()
                top = int(round((new_h - size) / 2.0))
                left = int(round((new_w - size) / 2.0))
                x = x[..., top : top + size, left : left + size]
        return self._normalise(x)

    # ---------------------------------------------------------------- embeddings
    def tokenize(self, texts: list[str]) -> torch.Tensor:
        """open_clip's BPE tokenizer at this model's context length (77, or 248 for Long-CLIP)."""
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        if not texts:
            raise PromptError("No text given.", hint="Pass at least one prompt or class name.")
        empty = [i for i, t in enumerate(texts) if not isinstance(t, str) or not t.strip()]
        if empty:
            raise PromptError(
                f"Prompt(s) at position {empty[:10]} are empty.",
                hint="Remove empty class names or prompts.",
            )
        return _tokenizer(self.context_length)(texts)

    def encode_image(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) uint8 RGB -> (B, D) L2-normalised float32 image embeddings."""
        with torch.inference_mode():
            feats = self.model.encode_image(self.preprocess(images))
            return F.normalize(feats.float(), dim=-1)

    def encode_text(self, texts: list[str], *, batch_size: int = 256) -> torch.Tensor:
        """N strings -> (N, D) L2-normalised float32 text embeddings (run ``batch_size`` at a
        time, so 80 templates x many classes stay within memory)."""
        tokens = self.tokenize(texts)
        out = []
        with torch.inference_mode():
            for start in range(0, tokens.shape[0], max(1, batch_size)):
                chunk = tokens[start : start + batch_size].to(self.device)
                out.append(F.normalize(self.model.encode_text(chunk).float(), dim=-1))
        return torch.cat(out, dim=0)

    # ---------------------------------------------------------------- dense features
    def dense_features(
        self,
        images: np.ndarray | torch.Tensor,
        *,
        attn: DenseAttention = "segearth",
        ignore_residual: bool = True,
        return_cls: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, H, W) uint8 -> (B, D, h, w) L2-normalised per-location embeddings.

        No resize: the input is normalised, padded symmetrically (left/top get ``pad // 2``,
        as SegEarth-OV pads crops) to a multiple of :attr:`patch_size`, and
        ``h, w = ceil(H / patch), ceil(W / patch)``. The ViT positional table is bicubically
        resized when the grid differs from the training grid.

        ViT: the last block is replaced as in FarSLIP/RS-OVSS and SegEarth-OV (module
        docstring); ``attn`` picks its attention (``"segearth"`` = qq+kk+vv, the default of both
        projects; ``"sclip"`` = qq+kk; ``"clearclip"`` = qq; ``"maskclip"`` = identity;
        ``"vanilla"`` = qk), ``ignore_residual=False`` keeps the residual and MLP.
        ModifiedResNet (RN50): MaskCLIP-style value path - ``c_proj(v_proj(x + pos))`` per
        location of the attention-pool input; ``attn`` and ``ignore_residual`` do not apply.

        With ``return_cls`` also returns the (B, D) L2-normalised CLS embedding of the same
        modified pass (what SegEarth-OV's ``cls_token_lambda`` global-bias term uses); for
        ModifiedResNet this is the ordinary image embedding.
        """
        if attn not in DENSE_ATTENTIONS:
            raise ValueError(f"attn must be one of {DENSE_ATTENTIONS}, got {attn!r}")
        with torch.inference_mode():
            x = self._normalise(self._as_uint8_batch(images).float())
            h, w = x.shape[-2:]
            p = self.patch_size
            ph, pw = (-h) % p, (-w) % p
            if ph or pw:
                x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
            if self.is_vit:
                cls, tokens, (gh, gw) = vit_dense(self.model.visual, x, attn, ignore_residual)
            else:
                cls, tokens, (gh, gw) = resnet_dense(self.model.visual, x)
            dense = tokens.float().transpose(1, 2).reshape(x.shape[0], -1, gh, gw)
            dense = F.normalize(dense, dim=1)
            if return_cls:
                return dense, F.normalize(cls.float(), dim=-1)
            return dense


def from_open_clip(
    model: nn.Module,
    card: ModelCard | str,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = None,
    fast: bool = False,
) -> ClipModel:
    """Wrap an already built open_clip ``CLIP`` (tests, notebooks, fine-tuned models).

    The module is moved to ``device``/``dtype`` in place and put in eval mode (with ``fast``
    on the CPU its linear layers become int8 in place).
    """
    return ClipModel(model, pick_card(CARDS, card, "clip"), device=device, dtype=dtype, fast=fast)


__all__ = ["ClipModel", "from_open_clip", "resolve_dtype"]
