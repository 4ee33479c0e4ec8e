"""The LLaVA family's entry points: :func:`build` (random weights at any size: what tests
and training start from) and :func:`load_llava` (a published VHM / GeoChat folder).

A published model is a folder in its Hugging Face layout (``config.json``, the weight shards
and their index, ``tokenizer.model``) plus a CLIP vision tower: VHM's is a separate
repository (``FitzPC/vhm_7b_pretrain_vit``), GeoChat's may be inside its checkpoint or come
from ``openai/clip-vit-large-patch14-336``. The tower is looked for in this order: the
``vision_tower=`` option, the GeoChat checkpoint itself, the folder's ``vision_tower/``
sub-folder, ``$RSVL_CACHE/<card name>/vision_tower/``, the Hugging Face cache's copy of the
card's vision repository.

The network is built with its parameters on the meta device and the checkpoint's tensors are
assigned in place (no 28 GB random initialisation before the load), in the dtype asked:
fp16 on CUDA by default (bf16 on request), fp32 on the CPU.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import huggingface_hub
import torch
from torch import Tensor, nn
from transformers import LlavaForConditionalGeneration

from rsvl.console import state as console
from rsvl.errors import (
    CheckpointMismatchError,
    DeviceError,
    UnknownModelError,
    WeightsNotFoundError,
)
from rsvl.models.cards import ModelCard, pick_card
from rsvl.models.checkpoint import load_strict, read_file, unwrap
from rsvl.models.device import check_device
from rsvl.models.llava.cards import CARDS
from rsvl.models.llava.config import (
    detect_variant,
    infer_vision_fields,
    llava_config,
    read_json,
    vision_fields_from_json,
)
from rsvl.models.llava.convert import (
    layout_of,
    read_weights,
    split_checkpoint,
    to_llava_state_dict,
    vision_from_folder_weights,
)
from rsvl.models.llava.model import LlavaChat
from rsvl.models.llava.tokenizer import SentencePieceBPE
from rsvl.models.weights import cache_root, is_offline

#: the published 7B shapes (config.json of FitzPC/vhm_7B as read; GeoChat is the same LLaMA-7B)
LLAMA_7B: dict[str, Any] = {
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "hidden_act": "silu",
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
    "mm_projector_type": "mlp2x_gelu",
    "mm_vision_select_feature": "patch",
    "mm_hidden_size": 1024,
    "mm_use_im_start_end": False,
}
#: CLIP ViT-L/14-336 (both towers)
CLIP_L14_336: dict[str, Any] = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "image_size": 336,
    "patch_size": 14,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "projection_dim": 768,
}
#: each variant's published config.json fields beyond the LLaMA shape
VARIANT_FIELDS: dict[str, dict[str, Any]] = {
    "vhm": {"mm_vision_select_layer": [8, 16, 24], "image_aspect_ratio": "pad"},
    "geochat": {"mm_vision_select_layer": -2, "image_aspect_ratio": "pad"},
}
#: the dtypes :func:`load_llava` accepts by name
DTYPES: dict[str, torch.dtype] = {
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
}


def variant_of(card: ModelCard) -> str:
    return str(card.metadata.get("variant", "vhm"))


def published_config(card: ModelCard) -> dict[str, Any]:
    """The config.json fields of a card's published model (for :func:`build` and
    :func:`memory_estimate`; loading reads the real file)."""
    return {**LLAMA_7B, **VARIANT_FIELDS[variant_of(card)]}


# --------------------------------------------------------------------------------------------
# building
# --------------------------------------------------------------------------------------------


@contextmanager
def params_on_meta() -> Iterator[None]:
    """Inside: every parameter a module registers is moved to the meta device at once, so a
    7B network costs no memory until a checkpoint is assigned; buffers stay real."""
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(
                param.to("meta"), requires_grad=param.requires_grad
            )

    nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def meta_as(net: nn.Module, dtype: torch.dtype) -> nn.Module:
    """``net`` (built under :func:`params_on_meta`) with its floating-point meta parameters
    given ``dtype`` and frozen, ready for a checkpoint to be assigned."""
    for module in net.modules():
        for name, param in list(module._parameters.items()):
            if param is not None and param.is_floating_point():
                module._parameters[name] = nn.Parameter(param.to(dtype), requires_grad=False)
    return net


def empty_network(config: Any, dtype: torch.dtype) -> nn.Module:
    """A ``LlavaForConditionalGeneration`` whose parameters are meta tensors of ``dtype``."""
    with params_on_meta():
        net = LlavaForConditionalGeneration(config)
    return meta_as(net, dtype)


def build(
    name: str | ModelCard = "vhm-7b",
    *,
    tokenizer: SentencePieceBPE | None = None,
    vision: Mapping[str, Any] | None = None,
    seed: int | None = None,
    **overrides: Any,
) -> LlavaChat:
    """A card's architecture with random weights (fp32, CPU).

    ``overrides`` replace fields of the card's config.json (``hidden_size``,
    ``num_hidden_layers``, ``vocab_size``, ``mm_vision_select_layer`` ...); ``vision`` replaces
    CLIP fields (``hidden_size``, ``num_hidden_layers``, ``patch_size`` ...); ``image_size``
    sets the tower's input size (the card's by default). The full 7B needs about 28 GB.
    """
    card = pick_card(CARDS, name, "llava")
    image_size = int(overrides.pop("image_size", card.image_size))
    cfg = {**published_config(card), **overrides}
    fields = {**CLIP_L14_336, **dict(vision or {})}
    llava_cfg = llava_config(
        cfg, fields, image_size=image_size, image_token_id=int(cfg["vocab_size"])
    )
    if seed is not None:
        torch.manual_seed(seed)
    net = LlavaForConditionalGeneration(llava_cfg).eval()
    return LlavaChat(
        net,
        tokenizer,
        variant=detect_variant(cfg),
        name=card.name,
        image_size=image_size,
        mean=card.mean,
        std=card.std,
    )


def memory_estimate(card: str | ModelCard, dtype: str = "float16") -> int:
    """Bytes of a card's published weights in ``dtype`` ("float32", "float16"/"bfloat16",
    "int8", "int4"), counted from the config's shapes on the meta device (no memory used).

    int8 / int4 count the LLaMA blocks' linear weights at 1 / 0.5 byte plus bitsandbytes'
    scales (one fp32 per row for int8, one per 64 weights for int4); everything else (vision
    tower, projector, embeddings, lm_head, norms) stays fp16, as bitsandbytes loads it.
    Activations and the key/value cache come on top (about 0.5 MB per token in fp16 for 7B).
    """
    card = pick_card(CARDS, card, "llava")
    cfg = published_config(card)
    llava_cfg = llava_config(
        cfg, CLIP_L14_336, image_size=card.image_size, image_token_id=int(cfg["vocab_size"])
    )
    net = empty_network(llava_cfg, torch.float16)
    layout = layout_of(net)
    quantisable = 0
    rows = 0
    total = 0
    for key, param in net.state_dict().items():
        total += param.numel()
        if key.startswith(layout.text + "layers.") and key.endswith("proj.weight"):
            quantisable += param.numel()
            rows += param.shape[0]
    other = total - quantisable
    if dtype in ("float32", "fp32"):
        return 4 * total
    if dtype in ("float16", "bfloat16", "fp16", "bf16"):
        return 2 * total
    if dtype == "int8":
        return 2 * other + quantisable + 4 * rows
    if dtype == "int4":
        return 2 * other + quantisable // 2 + 4 * (quantisable // 64)
    raise ValueError(f"unknown dtype {dtype!r}; use float32, float16, bfloat16, int8 or int4")


# --------------------------------------------------------------------------------------------
# finding the files
# --------------------------------------------------------------------------------------------


def _place_hint(card: ModelCard, folder: Path) -> str:
    files = ", ".join(card.metadata.get("files", ()))
    return (
        f"Download {card.source.hf_repo} ({files}) into {folder}, e.g. `huggingface-cli download "
        f"{card.source.hf_repo} --local-dir {folder}`, or pass --weights FOLDER."
    )


def model_folder(card: ModelCard, weights: str | Path | None) -> Path:
    """The folder holding ``card``'s published files: ``weights`` (a folder or its
    config.json), else rsvl's cache folder, else the Hugging Face cache's snapshot."""
    if weights is not None:
        path = Path(weights).expanduser()
        if path.is_file() and path.name == "config.json":
            path = path.parent
        if not path.is_dir():
            raise WeightsNotFoundError(
                f"--weights {path} is not a folder: {card.name} is a folder of files "
                f"({', '.join(card.metadata.get('files', ()))}).",
                hint=_place_hint(card, path if path.suffix == "" else path.parent),
            )
        if not (path / "config.json").is_file():
            raise WeightsNotFoundError(
                f"{path} has no config.json, so it is not a {card.name} folder.",
                hint=_place_hint(card, path),
            )
        return path
    cached = cache_root() / card.name
    if (cached / "config.json").is_file():
        return cached
    snapshot = _hf_snapshot(str(card.source.hf_repo), card.source.revision)
    if snapshot is not None:
        return snapshot
    why = (
        "offline mode is on" if is_offline() else "rsvl does not download 13 GB folders implicitly"
    )
    raise WeightsNotFoundError(
        f"Weights of model {card.name!r} are not on this machine ({why}).",
        hint=_place_hint(card, cached),
    )


def fetch_folder(card: ModelCard | str, *, force: bool = False) -> Path:
    """Download ``card``'s published folder (and its vision tower into ``vision_tower/``)
    into rsvl's cache, where :func:`load` finds it; returns the folder.

    Only the files the card lists are fetched (``huggingface_hub.snapshot_download`` with
    ``allow_patterns``: no optimizer states or duplicate safetensors copies), at the card's
    revision when it pins one. The folder's config.json is written last, so an interrupted
    download is never taken for a complete folder: rerun to continue (files already there
    are kept)."""
    card = pick_card(CARDS, card, "llava")
    dest = cache_root() / card.name
    if (dest / "config.json").is_file() and not force:
        return dest
    if is_offline():
        raise WeightsNotFoundError(f"Weights of model {card.name!r} are not cached and offline mode is on.",
                                   hint=_place_hint(card, dest))
    files = [f for f in card.metadata.get("files", ()) if f != "config.json"]
    parts = [(str(card.source.hf_repo), card.source.revision, dest, files)]
    vision_repo = str(card.metadata.get("vision_repo", ""))
    if vision_repo:
        sub = dest / str(card.metadata.get("vision_folder", "vision_tower"))
        parts.append((vision_repo, None, sub, list(card.metadata.get("vision_files", ("config.json", "pytorch_model.bin")))))
    try:
        for repo, revision, folder, names in parts:
            folder.mkdir(parents=True, exist_ok=True)
            if names:
                huggingface_hub.snapshot_download(repo, revision=revision, local_dir=str(folder), allow_patterns=names)
        huggingface_hub.snapshot_download(str(card.source.hf_repo), revision=card.source.revision,
                                          local_dir=str(dest), allow_patterns=["config.json"])
    except Exception as exc:  # network, HTTP, disk: one line, and how to do it by hand
        raise WeightsNotFoundError(f"Downloading {card.name} failed ({type(exc).__name__}: {exc}).",
                                   hint=_place_hint(card, dest)) from exc
    if not (dest / "config.json").is_file():
        raise WeightsNotFoundError(f"Downloading {card.name} left no config.json in {dest}.", hint=_place_hint(card, dest))
    return dest


def vision_folder(card: ModelCard, folder: Path, option: str | Path | None) -> Path | None:
    """The vision tower folder (or file) to use, or None when none is found."""
    if option is not None:
        path = Path(option).expanduser()
        if not path.exists():
            raise WeightsNotFoundError(
                f"vision_tower {path} does not exist.",
                hint=f"Pass the folder of {card.metadata.get('vision_repo')}.",
            )
        return path
    sub = str(card.metadata.get("vision_folder", "vision_tower"))
    for cand in (folder / sub, cache_root() / card.name / sub):
        if cand.is_dir():
            return cand
    return _hf_snapshot(str(card.metadata.get("vision_repo", "")))


def _hf_snapshot(repo: str, revision: str | None = None) -> Path | None:
    """The Hugging Face cache's snapshot folder of ``repo`` (no network), if it has a config."""
    if not repo:
        return None
    try:
        found = huggingface_hub.try_to_load_from_cache(
            repo, "config.json", revision=revision or "main"
        )
    except Exception:  # a malformed Hugging Face cache must not break loading
        return None
    return Path(found).parent if isinstance(found, str) and Path(found).is_file() else None


def _missing_vision(card: ModelCard, folder: Path) -> WeightsNotFoundError:
    repo = card.metadata.get("vision_repo")
    files = ", ".join(card.metadata.get("vision_files", ()))
    sub = card.metadata.get("vision_folder", "vision_tower")
    return WeightsNotFoundError(
        f"The vision tower of {card.name!r} is missing: its checkpoint does not include one and "
        f"there is no {folder / sub} folder.",
        hint=f"Download {repo} ({files}) into {folder / sub} (e.g. `huggingface-cli "
        f"download {repo} "
        f"--local-dir {folder / sub}`), or pass vision_tower=FOLDER.",
    )


def read_vision(path: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The ``vision_model.*`` tensors and CLIPVisionConfig fields of a vision tower folder
    (config.json optional: shapes are read from the weights) or weights file."""
    if path.is_dir():
        sd = read_weights(path, "Vision tower folder")
        cfg_path = path / "config.json"
        fields = (
            vision_fields_from_json(read_json(cfg_path, "Vision tower config"))
            if cfg_path.is_file()
            else {}
        )
    else:
        sd = unwrap(read_file(path, "Vision tower checkpoint"), f"Vision tower checkpoint {path}")
        fields = {}
    vision = vision_from_folder_weights(sd)
    return vision, {**infer_vision_fields(vision), **fields}


# --------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------


def pick_dtype(device: str, dtype: str | torch.dtype | None) -> torch.dtype:
    """fp16 on CUDA, fp32 on the CPU, unless ``dtype`` says otherwise."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.float16 if device.startswith("cuda") else torch.float32
    key = str(dtype).lower()
    if key not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use float16, bfloat16 or float32")
    return DTYPES[key]


def require_bitsandbytes(bits: int) -> Any:
    """The ``bitsandbytes`` module, or a :class:`DeviceError` saying how to install it."""
    try:
        import bitsandbytes  # lazy: optional dependency, only for --load-in-8bit / 4-bit
    except ImportError as exc:
        raise DeviceError(
            f"--load-in-{bits}bit needs the bitsandbytes package, which is not installed.",
            hint="Install it on a machine with a CUDA GPU (`pip install bitsandbytes`), or load in "
            "fp16 / bf16 without quantisation.",
        ) from exc
    return bitsandbytes


def quantize(net: nn.Module, bits: int, compute_dtype: torch.dtype) -> None:
    """Replace the LLaMA blocks' linear layers by bitsandbytes 8-bit / 4-bit (NF4) layers
    (the vision tower, projector, embeddings and lm_head stay in ``compute_dtype``)."""
    bnb = require_bitsandbytes(bits)
    layout = layout_of(net)
    decoder = net.get_submodule(layout.text.rstrip("."))
    for parent in list(decoder.modules()):
        for child_name, child in list(parent.named_children()):
            if not isinstance(child, nn.Linear):
                continue
            if bits == 8:
                new = bnb.nn.Linear8bitLt(
                    child.in_features,
                    child.out_features,
                    bias=child.bias is not None,
                    has_fp16_weights=False,
                    threshold=6.0,
                )
                new.weight = bnb.nn.Int8Params(
                    child.weight.data.to(torch.float16), requires_grad=False, has_fp16_weights=False
                )
            else:
                new = bnb.nn.Linear4bit(
                    child.in_features,
                    child.out_features,
                    bias=child.bias is not None,
                    compute_dtype=compute_dtype,
                    quant_type="nf4",
                )
                new.weight = bnb.nn.Params4bit(
                    child.weight.data.to(torch.float16), requires_grad=False, quant_type="nf4"
                )
            if child.bias is not None:
                new.bias = nn.Parameter(child.bias.data.to(compute_dtype), requires_grad=False)
            setattr(parent, child_name, new)


def load_llava(
    card: str | ModelCard,
    weights: str | Path | None = None,
    device: str = "cpu",
    *,
    vision_tower: str | Path | None = None,
    dtype: str | torch.dtype | None = None,
    load_in_8bit: bool = False,
    load_in_4bit: bool = False,
) -> LlavaChat:
    """A published VHM / GeoChat model as a :class:`LlavaChat` (``rsvl.load`` calls this).

    Args:
        card: ``vhm-7b`` or ``geochat-7b`` (the card decides the variant, image size and
            tags; the folder's name never does).
        weights: the model folder (Hugging Face layout); else rsvl's cache folder
            ``$RSVL_CACHE/<card>/``, else the Hugging Face cache.
        device: ``cpu``, ``cuda``, ``cuda:N`` or ``auto``.
        vision_tower: the CLIP vision tower folder (``config.json`` + weights) or weights file.
        dtype: ``float16`` / ``bfloat16`` / ``float32``; default fp16 on CUDA, fp32 on CPU.
        load_in_8bit / load_in_4bit: quantise the LLaMA blocks with bitsandbytes (CUDA only).
    """
    card = pick_card(CARDS, card, "llava")
    if card.family != "llava":
        raise UnknownModelError(
            f"{card.name} is a {card.family} model, not a LLaVA-family chat model.",
            hint="Run `rsvl models --task chat` to list the chat models.",
        )
    device = check_device(device)
    if load_in_8bit and load_in_4bit:
        raise ValueError("choose one of load_in_8bit and load_in_4bit")
    bits = 8 if load_in_8bit else 4 if load_in_4bit else 0
    if bits:
        require_bitsandbytes(bits)
    if bits and not device.startswith("cuda"):
        raise DeviceError(
            f"--load-in-{bits}bit runs on a CUDA GPU only (device {device!r} was asked).",
            hint="Pass --device cuda, or drop the quantisation option on a CPU.",
        )
    folder = model_folder(card, weights)
    cfg = read_json(folder / "config.json", "Model config")
    variant = detect_variant(cfg)
    expected = str(card.metadata.get("variant"))
    if variant != expected:
        other = next((c.name for c in CARDS if c.metadata.get("variant") == variant), variant)
        raise CheckpointMismatchError(
            f"{folder} holds a {variant} model (mm_vision_select_layer="
            f"{cfg.get('mm_vision_select_layer')!r}), not {card.name}.",
            hint=f"Load it as {other}.",
        )
    tok_path = folder / "tokenizer.model"
    if not tok_path.is_file():
        raise WeightsNotFoundError(
            f"{folder} has no tokenizer.model.", hint=_place_hint(card, folder)
        )
    parts = split_checkpoint(read_weights(folder), f"Checkpoint in {folder}")
    vpath = vision_folder(card, folder, vision_tower)
    if vpath is not None:
        vision, vfields = read_vision(vpath)
    elif parts.vision:
        vision, vfields = parts.vision, infer_vision_fields(parts.vision)
    else:
        raise _missing_vision(card, folder)
    image_token_id = int(parts.text["model.embed_tokens.weight"].shape[0])
    llava_cfg = llava_config(
        cfg, vfields, image_size=card.image_size, image_token_id=image_token_id
    )
    compute = pick_dtype(device, dtype)
    if device == "cpu" and compute != torch.float32:
        console.warn(
            f"{card.name}: {compute} matrix products are slow or unsupported on a CPU; "
            "consider dtype=float32."
        )
    net = empty_network(llava_cfg, compute)
    layout = layout_of(net)
    sd, shown = to_llava_state_dict(
        parts,
        vision,
        layout,
        vocab_size=image_token_id + 1,
        patches_per_side=card.image_size // llava_cfg.vision_config.patch_size,
    )
    load_strict(
        net,
        sd,
        what=f"Checkpoint in {folder} does not fit model {card.name!r}",
        shown=lambda k: shown.get(k, k),
        assign=True,
    )
    del sd, parts, vision
    n_params = sum(p.numel() for p in net.parameters())
    if device == "cpu" and n_params > 1_000_000_000:
        console.warn(
            f"{card.name} ({n_params / 1e9:.1f}B parameters) runs in fp32 on the CPU: "
            "expect minutes per answer and about 4 bytes of memory per parameter; use a CUDA GPU."
        )
    if bits:
        quantize(net, bits, compute)
    net = net.to(device).eval()
    tokenizer = SentencePieceBPE.from_file(tok_path)
    return LlavaChat(
        net,
        tokenizer,
        variant=variant,
        name=card.name,
        image_size=card.image_size,
        mean=card.mean,
        std=card.std,
    )


__all__ = [
    "build",
    "fetch_folder",
    "empty_network",
    "load_llava",
    "memory_estimate",
    "model_folder",
    "params_on_meta",
    "pick_dtype",
    "published_config",
]
