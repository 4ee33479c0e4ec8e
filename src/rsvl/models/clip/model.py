"""RS CLIP family: FarSLIP, RemoteCLIP, GeoRSCLIP, SkyCLIP and OpenAI CLIP (open_clip format).

The published checkpoints are loaded as they are:

* FarSLIP / SkyCLIP training checkpoints ``{'epoch', 'state_dict': {'module.…'}, 'optimizer'}``;
* bare state dicts (RemoteCLIP, GeoRSCLIP), ``{'model': …}`` / ``{'state_dict': …}`` wrappers;
* open_clip's own files (``open_clip_pytorch_model.bin`` / ``.safetensors``) and JIT-free
  OpenAI state dicts (the ``input_resolution``/``context_length``/``vocab_size`` entries are
  dropped).

Only ``safetensors`` or ``torch.load(weights_only=True)`` is used: a checkpoint is untrusted
input. Loading is strict; what does not fit raises
:class:`~rsvl.errors.CheckpointMismatchError` naming the keys and the architecture tried.

**Long-text (Long-CLIP) text towers** (FarSLIP2) are detected from the file: a
``positional_embedding_res`` entry or a text ``positional_embedding`` with more than 77 rows
builds the text tower with that many positions (248) - never squashed to 77. With the two
tables the token input is ``tok + pos * mask1 + pos_res * mask2`` where ``mask1`` selects the
first 20 positions (taken from the stored ``mask1``/``mask2`` buffers when present).

**Dense features** (``ClipModel.dense_features``) follow the training-free OVSS recipe shared
by FarSLIP/RS-OVSS and SegEarth-OV: blocks ``0..L-2`` run normally, the last block is replaced
by ``out_proj(A · v)`` on ``ln_1(x)`` with ``A = softmax(qqᵀs) + softmax(kkᵀs) + softmax(vvᵀs)``
(``attn="segearth"``), without residual and MLP, then ``ln_post`` and ``proj``. The global
image embedding (``encode_image``) is untouched: it is the CLS output of the original block.
"""

from __future__ import annotations

import functools
import logging
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from rsvl.errors import CheckpointMismatchError, PromptError, UnknownModelError
from rsvl.models.cards import ModelCard, pick_card
from rsvl.models.clip.cards import CARDS

if TYPE_CHECKING:
    import numpy as np
    import torch
    from torch import nn

log = logging.getLogger(__name__)

#: attention used in the last block by ``dense_features``
DenseAttention = Literal["segearth", "sclip", "clearclip", "maskclip", "vanilla"]
DENSE_ATTENTIONS: tuple[str, ...] = ("segearth", "sclip", "clearclip", "maskclip", "vanilla")

#: default number of leading positions that use ``positional_embedding`` in a Long-CLIP tower
LONG_CLIP_KEEP = 20

_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "module")
_PREFIXES = ("module.", "_orig_mod.")
#: entries of OpenAI / old open_clip files that are not parameters of open_clip's CLIP
_DROP_KEYS = ("input_resolution", "context_length", "vocab_size", "attn_mask")
_CUSTOM_TEXT_MAP = {
    "text.token_embedding.": "token_embedding.",
    "text.positional_embedding": "positional_embedding",
    "text.transformer.": "transformer.",
    "text.ln_final.": "ln_final.",
    "text.text_projection": "text_projection",
}
#: (vision width, patch, layers) -> open_clip name, for hints in mismatch messages
_KNOWN_VITS = {
    (768, 16, 12): "ViT-B-16",
    (768, 32, 12): "ViT-B-32",
    (1024, 14, 24): "ViT-L-14",
    (1280, 14, 32): "ViT-H-14",
}


# ============================================================================================
# reading checkpoint files
# ============================================================================================


def _looks_like_safetensors(path: Path) -> bool:
    if path.suffix == ".safetensors":
        return True
    try:
        with open(path, "rb") as fh:
            head = fh.read(9)
        size = path.stat().st_size
    except OSError:
        return False
    if len(head) < 9:
        return False
    header_len = int.from_bytes(head[:8], "little")
    return 0 < header_len < size and head[8:9] == b"{"


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a checkpoint file into a flat ``{name: tensor}`` dict (not yet key-normalised).

    Unwraps ``{'state_dict': …}``, ``{'model': …}`` (and nested) training checkpoints. Uses
    ``safetensors`` or ``torch.load(weights_only=True)`` only.
    """
    import pickle

    path = Path(path)
    try:
        if _looks_like_safetensors(path):
            from safetensors.torch import load_file

            obj: Any = load_file(str(path), device="cpu")
        else:
            obj = _torch_load(path)
    except FileNotFoundError as exc:
        raise CheckpointMismatchError(f"Checkpoint {path} does not exist.") from exc
    except pickle.UnpicklingError as exc:
        raise CheckpointMismatchError(
            f"Checkpoint {path} contains Python objects that rsvl refuses to unpickle "
            f"(only tensors and plain containers are loaded; {exc}).",
            hint="Convert it to a plain state dict or a .safetensors file.",
        ) from exc
    except Exception as exc:  # corrupt zip, truncated download, TorchScript archive ...
        if "TorchScript" in str(exc):
            raise CheckpointMismatchError(
                f"Checkpoint {path} is a TorchScript (JIT) archive, which rsvl does not load.",
                hint="Use the JIT-free open_clip file instead (for OpenAI CLIP: "
                "open_clip_pytorch_model.bin from the timm/*.openai Hugging Face repositories, "
                "which `rsvl fetch openai-vit-b16` downloads).",
            ) from exc
        raise CheckpointMismatchError(
            f"Checkpoint {path} cannot be read ({type(exc).__name__}: {exc}).",
            hint="The file is probably truncated or corrupt: delete it and download it again.",
        ) from exc
    return _unwrap(obj, path)


def _torch_load(path: Path) -> Any:
    """``torch.load(weights_only=True)``, memory-mapped when the file format allows it (a
    training checkpoint's optimizer state is then never read into memory)."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as exc:
        if "mmap" not in str(exc):  # legacy (non-zip) serialisation cannot be mapped
            raise
    return torch.load(path, map_location="cpu", weights_only=True)


def _unwrap(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    import torch

    for _ in range(4):  # {'state_dict': {'model': {...}}} at worst
        if not isinstance(obj, Mapping):
            break
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return dict(obj)
        inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if isinstance(obj, Mapping):
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        others = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
        # OpenAI files carry plain ints (input_resolution ...): those are the only tolerated extras
        if tensors and all(k in _DROP_KEYS for k in others):
            return tensors
        raise CheckpointMismatchError(
            f"Checkpoint {path} is not a state dict: top-level entries "
            f"{sorted(map(str, obj))[:10]} hold no model weights rsvl recognises "
            f"(looked for a flat tensor dict or one under {list(_WRAPPER_KEYS)}).",
        )
    raise CheckpointMismatchError(
        f"Checkpoint {path} holds a {type(obj).__name__}, not a state dict.",
    )


def normalise_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip DDP / torch.compile prefixes, drop non-parameter entries, map the
    CustomTextCLIP ``text.*`` layout onto CLIP's."""
    out = dict(sd)
    changed = True
    while changed and out:
        changed = False
        for prefix in _PREFIXES:
            if all(k.startswith(prefix) for k in out):
                out = {k[len(prefix) :]: v for k, v in out.items()}
                changed = True
    for key in _DROP_KEYS:
        out.pop(key, None)
    out.pop("text.transformer.embeddings.position_ids", None)
    if "token_embedding.weight" not in out and "text.token_embedding.weight" in out:
        mapped = {}
        for k, v in out.items():
            for old, new in _CUSTOM_TEXT_MAP.items():
                if k.startswith(old):
                    k = new + k[len(old) :]
                    break
            mapped[k] = v
        out = mapped
    return out


# ============================================================================================
# inspecting a state dict
# ============================================================================================


def _count_blocks(sd: Mapping[str, Any], prefix: str) -> int:
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    idx = {int(m.group(1)) for k in sd if (m := pat.match(k))}
    return max(idx) + 1 if idx else 0


def describe_state_dict(sd: Mapping[str, torch.Tensor]) -> str:
    """One line on what a CLIP state dict looks like (used in mismatch messages)."""
    parts: list[str] = []
    if "visual.attnpool.c_proj.weight" in sd:
        stages = [_count_blocks(sd, f"visual.layer{i}.") for i in range(1, 5)]
        pos = sd.get("visual.attnpool.positional_embedding")
        px = f", {int(math.isqrt(pos.shape[0] - 1)) * 32} px" if pos is not None else ""
        parts.append(f"vision ModifiedResNet stages {stages}{px}")
    elif "visual.conv1.weight" in sd and "visual.class_embedding" in sd:
        w = sd["visual.conv1.weight"]
        width, patch = int(w.shape[0]), int(w.shape[-1])
        layers = _count_blocks(sd, "visual.transformer.resblocks.")
        pos = sd.get("visual.positional_embedding")
        px = f", {int(math.isqrt(pos.shape[0] - 1)) * patch} px" if pos is not None else ""
        guess = _KNOWN_VITS.get((width, patch, layers))
        parts.append(
            f"vision ViT width {width}, patch {patch}, {layers} layers{px}"
            + (f" (= open_clip {guess})" if guess else "")
        )
    elif any(k.startswith("visual.") for k in sd):
        parts.append("an unrecognised vision tower")
    else:
        parts.append("no 'visual.*' weights (not an open_clip CLIP state dict?)")
    pos_t = sd.get("positional_embedding")
    if pos_t is not None:
        long = "positional_embedding_res" in sd
        parts.append(
            f"text context {pos_t.shape[0]}, width {pos_t.shape[1]}, "
            f"{_count_blocks(sd, 'transformer.resblocks.')} layers"
            + (" (Long-CLIP: positional_embedding_res)" if long else "")
        )
    if "text_projection" in sd:
        parts.append(f"embed dim {sd['text_projection'].shape[-1]}")
    return "; ".join(parts)


def _text_layout(sd: Mapping[str, torch.Tensor]) -> tuple[int | None, bool]:
    """(text context length stored in the file, has a Long-CLIP second table)."""
    pos = sd.get("positional_embedding")
    ctx = int(pos.shape[0]) if pos is not None and pos.ndim == 2 else None
    return ctx, "positional_embedding_res" in sd


def long_clip_positional_tables(
    pos: torch.Tensor, keep: int = LONG_CLIP_KEEP
) -> tuple[torch.Tensor, torch.Tensor]:
    """Long-CLIP's stretch of a short text positional table (FarSLIP ``load_from_clip``).

    The first ``keep`` rows are kept; every later gap between rows ``i`` and ``i + 1`` is
    filled with 4 linearly interpolated rows (weights 0, 1/4, 2/4, 3/4), and 4 rows
    extrapolated past the last one close the table: 77 rows -> ``4 * 77 - 3 * 20 = 248``.
    Returns ``(positional_embedding, positional_embedding_res)`` (equal copies: training then
    freezes the first and fine-tunes the second). Only for building a long-text model from a
    short one; published long-text checkpoints are loaded as stored.
    """
    import torch

    length = pos.shape[0]
    if not 0 < keep < length - 1:
        raise ValueError(f"keep must be in 1..{length - 2}, got {keep}")
    w = torch.arange(4, dtype=pos.dtype, device=pos.device).view(1, 4, 1) / 4
    a, b = pos[keep : length - 1].unsqueeze(1), pos[keep + 1 : length].unsqueeze(1)
    middle = ((1 - w) * a + w * b).reshape(-1, pos.shape[1])
    last, step = pos[length - 1], pos[length - 1] - pos[length - 2]
    tail = last.unsqueeze(0) + w.view(4, 1) * step.unsqueeze(0)
    table = torch.cat([pos[:keep], middle, tail], dim=0)
    return table, table.clone()


def to_long_text_state_dict(
    state_dict: Mapping[str, torch.Tensor], keep: int = LONG_CLIP_KEEP
) -> dict[str, torch.Tensor]:
    """A short-context CLIP state dict turned into FarSLIP's Long-CLIP layout
    (``positional_embedding`` / ``positional_embedding_res`` / ``mask1`` / ``mask2``)."""
    import torch

    sd = normalise_state_dict(state_dict)
    if "positional_embedding_res" in sd:
        return sd
    pos, pos_res = long_clip_positional_tables(sd["positional_embedding"], keep)
    mask1 = torch.zeros(pos.shape[0], 1, dtype=pos.dtype)
    mask1[:keep] = 1
    sd.update(positional_embedding=pos, positional_embedding_res=pos_res)
    sd.update(mask1=mask1, mask2=1 - mask1)
    return sd


# ============================================================================================
# building the network
# ============================================================================================


@functools.cache
def _long_text_clip_class() -> type:
    """open_clip ``CLIP`` with FarSLIP/Long-CLIP's second positional table."""
    import open_clip
    import torch
    import torch.nn.functional as F
    from torch import nn

    class LongTextCLIP(open_clip.CLIP):  # type: ignore[misc,name-defined]
        """Text input = token + pos·mask1 + pos_res·mask2 (Long-CLIP, 248 positions)."""

        def __init__(self, *args: Any, keep_len: int = LONG_CLIP_KEEP, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            n_pos, width = self.positional_embedding.shape
            self.positional_embedding_res = nn.Parameter(torch.zeros(n_pos, width))
            mask1 = torch.zeros(n_pos, 1)
            mask1[:keep_len] = 1
            self.register_buffer("mask1", mask1)
            self.register_buffer("mask2", 1 - mask1)

        def encode_text(self, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
            cast_dtype = self.transformer.get_cast_dtype()
            x = self.token_embedding(text).to(cast_dtype)
            x = (
                x
                + (self.positional_embedding * self.mask1).to(cast_dtype)
                + (self.positional_embedding_res * self.mask2).to(cast_dtype)
            )
            batch_first = getattr(self.transformer, "batch_first", False)
            if not batch_first:
                x = x.transpose(0, 1)
            x = self.transformer(x, attn_mask=self.attn_mask)
            if not batch_first:
                x = x.transpose(0, 1)
            x = self.ln_final(x)
            x = x[torch.arange(x.shape[0], device=x.device), text.argmax(dim=-1)]
            if isinstance(self.text_projection, nn.Linear):
                x = self.text_projection(x)
            elif self.text_projection is not None:
                x = x @ self.text_projection
            return F.normalize(x, dim=-1) if normalize else x

    return LongTextCLIP


def _model_config(card: ModelCard, model_cfg: Mapping[str, Any] | None) -> dict[str, Any]:
    import copy

    if model_cfg is not None:
        return copy.deepcopy(dict(model_cfg))
    import open_clip

    if card.architecture not in open_clip.list_models():  # never resolve hf-hub: names here
        raise UnknownModelError(
            f"Model {card.name!r} names open_clip architecture {card.architecture!r}, "
            "which this open_clip installation does not define.",
            hint="Upgrade open_clip_torch, or pass model_cfg= with the architecture's config.",
        )
    cfg = open_clip.get_model_config(card.architecture)
    assert cfg is not None
    return cfg


def build_clip(
    card: ModelCard,
    state_dict: Mapping[str, torch.Tensor],
    *,
    quick_gelu: bool | None = None,
    model_cfg: Mapping[str, Any] | None = None,
    source: str | Path | None = None,
) -> nn.Module:
    """Build the open_clip network ``card`` describes, shaped to the text layout found in
    ``state_dict``, and load ``state_dict`` into it strictly.

    The parameters are the state dict's own tensors (no copy; they keep the file's dtype -
    :class:`ClipModel` casts to the dtype it runs in).
    """
    import copy

    import open_clip
    import torch

    sd = normalise_state_dict(state_dict)
    cfg = _model_config(card, model_cfg)
    cfg.pop("custom_text", None)
    cfg_quick_gelu = bool(cfg.pop("quick_gelu", False))  # "*-quickgelu" open_clip configs
    qg = (card.quick_gelu or cfg_quick_gelu) if quick_gelu is None else bool(quick_gelu)
    text_cfg = dict(cfg.get("text_cfg", {}))
    ctx, long_text = _text_layout(sd)
    if ctx is not None and ctx != text_cfg.get("context_length", 77):
        log.info("%s: text context %s taken from the checkpoint", card.name, ctx)
        text_cfg["context_length"] = ctx
    cfg["text_cfg"] = text_cfg

    keep = LONG_CLIP_KEEP
    if long_text and sd.get("mask1") is not None:
        keep = int(sd["mask1"].sum().item())

    def construct() -> nn.Module:
        if long_text:
            return _long_text_clip_class()(**copy.deepcopy(cfg), quick_gelu=qg, keep_len=keep)
        return open_clip.CLIP(**copy.deepcopy(cfg), quick_gelu=qg)

    tried = (
        f"open_clip {card.architecture} ({'QuickGELU' if qg else 'nn.GELU'}, text context "
        f"{text_cfg.get('context_length', 77)}{', Long-CLIP' if long_text else ''})"
    )
    # Build on the meta device (no random init, no second copy of the weights), check the file
    # against it, then take the file's tensors as the parameters. Anything unusual falls back
    # to an ordinary CPU build.
    try:
        with torch.device("meta"):
            model = construct()
    except Exception:  # pragma: no cover - depends on the open_clip version
        model = construct()
    _check_keys(model, sd, card=card, tried=tried, source=source, long_text=long_text)
    if not _assign_weights(model, sd, keep):  # pragma: no cover - see _assign_weights
        model = construct()
        model.load_state_dict(sd, strict=False)
    return model.eval()


def _assign_weights(model: nn.Module, sd: dict[str, torch.Tensor], keep: int) -> bool:
    """Load ``sd`` into a (meta) model by assignment and rebuild the derivable buffers the file
    does not hold. False when something would stay unmaterialised (caller rebuilds on CPU)."""
    import torch

    if not any(t.is_meta for t in model.state_dict(keep_vars=True).values()):
        model.load_state_dict(sd, strict=False)
        return True
    model.load_state_dict(sd, strict=False, assign=True)
    for module in model.modules():
        for name, buf in list(module._buffers.items()):
            if buf is None or not buf.is_meta:
                continue
            if name == "attn_mask":  # causal text mask, as open_clip builds it
                value = torch.full(tuple(buf.shape), float("-inf")).triu_(1)
            elif name in ("mask1", "mask2"):
                first = torch.zeros(tuple(buf.shape))
                first[:keep] = 1
                value = first if name == "mask1" else 1 - first
            elif name == "num_batches_tracked":
                value = torch.zeros((), dtype=torch.long)
            else:
                return False
            module._buffers[name] = value.to(buf.dtype)
    remaining = [n for n, t in model.named_parameters() if t.is_meta]
    remaining += [n for n, t in model.named_buffers() if t.is_meta]
    return not remaining


def _check_keys(
    model: nn.Module,
    sd: dict[str, torch.Tensor],
    *,
    card: ModelCard,
    tried: str,
    source: str | Path | None,
    long_text: bool,
) -> None:
    expected = model.state_dict()
    if "logit_scale" in sd and "logit_scale" in expected:
        sd["logit_scale"] = sd["logit_scale"].reshape(expected["logit_scale"].shape)
    # derivable buffers a file may lack without changing the function
    optional = {k for k in expected if k.endswith("num_batches_tracked")}
    if long_text:
        optional |= {"mask1", "mask2"}
    missing = sorted(k for k in expected if k not in sd and k not in optional)
    unexpected = sorted(k for k in sd if k not in expected)
    wrong_shape = sorted(
        f"{k}: file {tuple(sd[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in sd and tuple(sd[k].shape) != tuple(v.shape)
    )
    if missing or unexpected or wrong_shape:
        where = f"Checkpoint {source}" if source else "The checkpoint"

        def _some(items: list[str]) -> str:
            more = f", … (+{len(items) - 10} more)" if len(items) > 10 else ""
            return ", ".join(items[:10]) + more

        details = []
        if missing:
            details.append(f"{len(missing)} missing key(s): {_some(missing)}")
        if unexpected:
            details.append(f"{len(unexpected)} unexpected key(s): {_some(unexpected)}")
        if wrong_shape:
            details.append(f"{len(wrong_shape)} shape mismatch(es): {_some(wrong_shape)}")
        raise CheckpointMismatchError(
            f"{where} does not fit model {card.name!r} built as {tried}. "
            + ". ".join(details)
            + f". The file looks like: {describe_state_dict(sd)}.",
            hint="Check that --weights points at this model's file (`rsvl models` lists each "
            "model's file), or pick the model whose architecture matches the file.",
        )


# ============================================================================================
# the model the tasks use
# ============================================================================================


def _resolve_dtype(device: torch.device, dtype: Any) -> torch.dtype:
    import torch

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
    from open_clip.tokenizer import SimpleTokenizer

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
    ) -> None:
        import torch

        self.card = card
        self.name = card.name
        self.device = torch.device(device)
        self.dtype = _resolve_dtype(self.device, dtype)
        self.model = model.to(device=self.device, dtype=self.dtype).eval()
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
            f"text {self.context_length} tokens, {self.device}, {self.dtype})"
        )

    # ---------------------------------------------------------------- properties
    @property
    def logit_scale(self) -> float:
        """exp(learned log-scale), capped at 100 as CLIP training clamps it."""
        return float(min(self.model.logit_scale.detach().float().exp().max().item(), 100.0))

    # ---------------------------------------------------------------- preprocessing
    def _as_uint8_batch(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        import numpy as np
        import torch

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
        import torch.nn.functional as F

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
        import torch
        import torch.nn.functional as F

        with torch.inference_mode():
            feats = self.model.encode_image(self.preprocess(images))
            return F.normalize(feats.float(), dim=-1)

    def encode_text(self, texts: list[str], *, batch_size: int = 256) -> torch.Tensor:
        """N strings -> (N, D) L2-normalised float32 text embeddings (run ``batch_size`` at a
        time, so 80 templates x many classes stay within memory)."""
        import torch
        import torch.nn.functional as F

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
        import torch
        import torch.nn.functional as F

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
                cls, tokens, (gh, gw) = self._vit_dense(x, attn, ignore_residual)
            else:
                cls, tokens, (gh, gw) = self._resnet_dense(x)
            dense = tokens.float().transpose(1, 2).reshape(x.shape[0], -1, gh, gw)
            dense = F.normalize(dense, dim=1)
            if return_cls:
                return dense, F.normalize(cls.float(), dim=-1)
            return dense

    def _pos_embed(
        self, table: torch.Tensor, gh: int, gw: int, grid: tuple[int, int]
    ) -> torch.Tensor:
        """Class row + spatial rows of a positional table, resized to (gh, gw) when needed."""
        import torch
        import torch.nn.functional as F

        if (gh, gw) == tuple(grid):
            return table
        cls_row, spatial = table[:1], table[1:]
        dim = spatial.shape[-1]
        spatial = spatial.reshape(1, grid[0], grid[1], dim).permute(0, 3, 1, 2).float()
        spatial = F.interpolate(spatial, size=(gh, gw), mode="bicubic", align_corners=False)
        spatial = spatial.permute(0, 2, 3, 1).reshape(gh * gw, dim).to(table.dtype)
        return torch.cat([cls_row, spatial], dim=0)

    def _vit_dense(
        self, x: torch.Tensor, attn: str, ignore_residual: bool
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        import torch

        v = self.model.visual
        if getattr(v, "attn_pool", None) is not None or getattr(v, "final_ln_after_pool", False):
            raise NotImplementedError("dense_features supports CLIP ViTs with CLS pooling only")
        x = v.conv1(x)
        gh, gw = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)
        cls = v.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        grid = tuple(getattr(v, "grid_size", (gh, gw)))
        x = x + self._pos_embed(v.positional_embedding, gh, gw, grid).to(x.dtype)
        x = v.ln_pre(x)
        blocks = v.transformer.resblocks
        batch_first = getattr(v.transformer, "batch_first", False)
        if not batch_first:
            x = x.transpose(0, 1)
        for blk in blocks[:-1]:
            x = blk(x)
        if not batch_first:
            x = x.transpose(0, 1)
        last = blocks[-1]
        y = _last_block_attention(last.attn, last.ln_1(x), attn)
        if not ignore_residual:
            y = x + last.ls_1(y)
            y = y + last.ls_2(last.mlp(last.ln_2(y)))
        y = v.ln_post(y)
        if v.proj is not None:
            y = y @ v.proj
        return y[:, 0], y[:, 1:], (int(gh), int(gw))

    def _resnet_dense(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        import torch
        import torch.nn.functional as F

        r = self.model.visual
        feat = r.layer4(r.layer3(r.layer2(r.layer1(r.stem(x)))))
        gh, gw = feat.shape[-2:]
        ap = r.attnpool
        side = int(math.isqrt(ap.positional_embedding.shape[0] - 1))
        pos = self._pos_embed(ap.positional_embedding, gh, gw, (side, side)).to(feat.dtype)
        t = feat.flatten(2).transpose(1, 2)  # (B, HW, C)
        t = torch.cat([t.mean(dim=1, keepdim=True), t], dim=1) + pos
        # CLS: the attention pool's own query (mean token), with the resized positional table
        seq = t.transpose(0, 1)  # (1 + HW, B, C)
        cls, _ = F.multi_head_attention_forward(
            query=seq[:1],
            key=seq,
            value=seq,
            embed_dim_to_check=seq.shape[-1],
            num_heads=ap.num_heads,
            q_proj_weight=ap.q_proj.weight,
            k_proj_weight=ap.k_proj.weight,
            v_proj_weight=ap.v_proj.weight,
            in_proj_weight=None,
            in_proj_bias=torch.cat([ap.q_proj.bias, ap.k_proj.bias, ap.v_proj.bias]),
            bias_k=None,
            bias_v=None,
            add_zero_attn=False,
            dropout_p=0.0,
            out_proj_weight=ap.c_proj.weight,
            out_proj_bias=ap.c_proj.bias,
            use_separate_proj_weight=True,
            training=False,
            need_weights=False,
        )
        # dense: MaskCLIP's value path, each location through v_proj and c_proj
        tokens = ap.c_proj(ap.v_proj(t[:, 1:]))
        return cls[0], tokens, (int(gh), int(gw))


def _last_block_attention(attn_mod: nn.Module, x: torch.Tensor, kind: str) -> torch.Tensor:
    """``out_proj(A · v)`` with training-free attention ``kind`` on batch-first ``x`` (B, L, C)."""
    import torch.nn.functional as F

    b, n, c = x.shape
    heads = int(attn_mod.num_heads)
    hd = c // heads
    scale = hd**-0.5
    q, k, v = F.linear(x, attn_mod.in_proj_weight, attn_mod.in_proj_bias).chunk(3, dim=-1)
    q, k, v = (t.reshape(b, n, heads, hd).transpose(1, 2) for t in (q, k, v))

    def sm(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        return ((left @ right.transpose(-2, -1)) * scale).softmax(dim=-1)

    if kind == "segearth":
        out = (sm(q, q) + sm(k, k) + sm(v, v)) @ v
    elif kind == "sclip":
        out = (sm(q, q) + sm(k, k)) @ v
    elif kind == "clearclip":
        out = sm(q, q) @ v
    elif kind == "vanilla":
        out = sm(q, k) @ v
    elif kind == "maskclip":
        out = v
    else:  # pragma: no cover - validated by the caller
        raise ValueError(kind)
    out = out.transpose(1, 2).reshape(b, n, c)
    return attn_mod.out_proj(out)


# ============================================================================================
# entry points
# ============================================================================================


def from_open_clip(
    model: nn.Module,
    card: ModelCard | str,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = None,
) -> ClipModel:
    """Wrap an already built open_clip ``CLIP`` (tests, notebooks, fine-tuned models).

    The module is moved to ``device``/``dtype`` in place and put in eval mode.
    """
    return ClipModel(model, pick_card(CARDS, card, "clip"), device=device, dtype=dtype)


def load_clip(
    name_or_card: str | ModelCard,
    weights: str | Path | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = None,
    *,
    quick_gelu: bool | None = None,
    model_cfg: Mapping[str, Any] | None = None,
) -> ClipModel:
    """Load a registered RS CLIP (or any open_clip-format card) ready for the tasks.

    ``weights`` is the user's ``--weights`` (else rsvl's cache / a download, see
    :func:`rsvl.models.weights.resolve_weights`). ``dtype`` defaults to bfloat16 on CUDA and
    float32 elsewhere. ``quick_gelu`` overrides the card's activation; ``model_cfg`` overrides
    the open_clip architecture config (an ``{embed_dim, vision_cfg, text_cfg}`` dict).
    """
    from rsvl.models.weights import resolve_weights

    card = pick_card(CARDS, name_or_card, "clip")
    path = resolve_weights(card, weights)
    sd = read_checkpoint(path)
    model = build_clip(card, sd, quick_gelu=quick_gelu, model_cfg=model_cfg, source=path)
    return ClipModel(model, card, device=device, dtype=dtype)


__all__ = [
    "DENSE_ATTENTIONS",
    "LONG_CLIP_KEEP",
    "ClipModel",
    "build_clip",
    "describe_state_dict",
    "from_open_clip",
    "load_clip",
    "long_clip_positional_tables",
    "normalise_state_dict",
    "read_checkpoint",
    "to_long_text_state_dict",
]
