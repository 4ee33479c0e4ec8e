"""The LISA family's entry points: :func:`build` (random weights at any size: what tests and
training start from), :func:`load_lisa` (a published or user-trained folder) and
:func:`fetch` (``rsvl fetch``).

A model is a folder: ``config.json`` (read as plain JSON, :mod:`.config`), the weights
(merged shards, ``model.safetensors``, or the unmerged LoRA ``pytorch_model.bin``,
:mod:`.convert`), the tokenizer files (:mod:`.tokenizer`) and the CLIP tower, looked for in
this order: the ``vision_tower=`` option, the folder's ``vision_tower/`` sub-folder,
``$RSVL_CACHE/<card>/vision_tower/``, the Hugging Face cache's ``openai/clip-vit-large-patch14``.

The network is built with its parameters on the meta device and the checkpoint's tensors are
assigned in place (no 28 GB random initialisation), in the dtype asked: fp16 on CUDA by
default (bf16 on request, upstream's default precision), fp32 on the CPU.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import huggingface_hub
import torch
from torch import Tensor, nn
from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig

from rsvl.console import state as console
from rsvl.errors import CheckpointMismatchError, UnknownModelError, WeightsNotFoundError
from rsvl.models.cards import ModelCard, pick_card
from rsvl.models.checkpoint import load_strict, read_file, unwrap
from rsvl.models.device import check_device
from rsvl.models.lisa.cards import CARDS
from rsvl.models.lisa.config import lisa_fields
from rsvl.models.lisa.convert import (
    DEFAULT_LORA_ALPHA,
    clean_state_dict,
    is_unmerged,
    merge_lora,
    projector_of,
    sam_part,
)
from rsvl.models.lisa.model import LisaSeg
from rsvl.models.lisa.network import LisaNet
from rsvl.models.lisa.tokenizer import SEG_TOKEN, LisaTokenizer
from rsvl.models.llava.build import (
    CLIP_L14_336,
    fetch_folder,
    meta_as,
    params_on_meta,
    pick_dtype,
    read_vision,
    vision_folder,
)
from rsvl.models.llava.config import read_json, text_config
from rsvl.models.llava.convert import read_weights
from rsvl.models.sam.build import sam_config
from rsvl.models.sam.config import SamConfig
from rsvl.models.sam.convert import infer_sam_config
from rsvl.models.weights import cache_root, is_offline

#: LLaMA-7B as LISA-7B-v1's config.json has it (LLaVA-Lightning-7B-v1-1 + [SEG])
LLAMA_7B: dict[str, Any] = {
    "vocab_size": 32004, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 32, "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6, "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
}
#: LLaMA-2-13B (llava-llama-2-13b-chat-lightning-preview, FSVLM's default base) + 3 tokens [inf]
LLAMA_13B: dict[str, Any] = {
    **LLAMA_7B, "vocab_size": 32003, "hidden_size": 5120, "intermediate_size": 13824,
    "num_hidden_layers": 40, "num_attention_heads": 40, "num_key_value_heads": 40,
    "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
}
#: CLIP ViT-L/14 at 224 px (openai/clip-vit-large-patch14)
CLIP_L14_224: dict[str, Any] = {**CLIP_L14_336, "image_size": 224}
#: each card's published shape: (LLaMA fields, config.json multimodal fields)
SHAPES: dict[str, dict[str, Any]] = {
    "lisa-7b-v1": LLAMA_7B,
    "fsvlm-7b": {**LLAMA_7B, "vocab_size": 32006},  # LLaVA-Lightning-7B's 32003 + 3 [inf]
    "fsvlm-13b": LLAMA_13B,
}
_LISA_JSON = {"mm_vision_select_layer": -2, "mm_use_im_start_end": True, "out_dim": 256}


# --------------------------------------------------------------------------------------------
# building
# --------------------------------------------------------------------------------------------


def _net(text: LlamaConfig, sam: SamConfig, vision_width: int, projector: str, out_dim: int,
         dtype: torch.dtype | None = None) -> LisaNet:
    if dtype is None:
        return LisaNet(text, sam, vision_width=vision_width, projector=projector, out_dim=out_dim)
    with params_on_meta():
        net = LisaNet(text, sam, vision_width=vision_width, projector=projector, out_dim=out_dim)
    return meta_as(net, dtype)


def build(
    name: str | ModelCard = "fsvlm-7b",
    *,
    tokenizer: LisaTokenizer | None = None,
    text: Mapping[str, Any] | None = None,
    vision: Mapping[str, Any] | None = None,
    sam: Mapping[str, Any] | None = None,
    projector: str = "linear",
    out_dim: int = 256,
    seed: int | None = None,
) -> LisaSeg:
    """A card's architecture with random weights (fp32, CPU).

    ``text`` replaces LLaMA fields (``hidden_size``, ``num_hidden_layers``, ``vocab_size`` ...),
    ``vision`` CLIP fields, ``sam`` :class:`SamConfig` fields (of ViT-H). Without a
    ``tokenizer`` the model has no ``[SEG]`` id and can be trained but not asked. The full 7B
    needs about 30 GB.
    """
    card = pick_card(CARDS, name, "lisa")
    cfg = {**SHAPES[card.name], **_LISA_JSON, **dict(text or {})}
    vfields = {**CLIP_L14_224, **dict(vision or {})}
    sam_cfg = sam_config(str(card.metadata.get("sam", "vit_h")), **dict(sam or {}))
    if seed is not None:
        torch.manual_seed(seed)
    net = _net(text_config(cfg, int(cfg["vocab_size"])), sam_cfg, int(vfields["hidden_size"]), projector, out_dim)
    tower = CLIPVisionModel(CLIPVisionConfig(**vfields))
    return _wrap(card, net.eval(), tower.eval(), tokenizer, select_layer=int(cfg["mm_vision_select_layer"]),
                 use_markers=bool(cfg["mm_use_im_start_end"]), clip_size=int(vfields["image_size"]))


def _wrap(card: ModelCard, net: LisaNet, tower: nn.Module, tokenizer: LisaTokenizer | None, *,
          select_layer: int, use_markers: bool, clip_size: int) -> LisaSeg:
    markers = tuple(card.metadata.get("image_markers", ("<im_start>", "<im_end>"))) if use_markers else None
    return LisaSeg(net, tower, tokenizer, name=card.name, image_size=card.image_size,
                   select_layer=select_layer, markers=markers, clip_size=clip_size, mean=card.mean, std=card.std)


# --------------------------------------------------------------------------------------------
# finding the files
# --------------------------------------------------------------------------------------------


def _place_hint(card: ModelCard, folder: Path) -> str:
    if card.source.hf_repo:
        return (f"Run `rsvl fetch {card.name}`, or download {card.source.hf_repo} "
                f"({', '.join(card.metadata.get('files', ()))}) into {folder}, or pass --weights FOLDER.")
    return (f"{card.source.unpublished} Place the folder (config.json, weights, tokenizer.model, "
            f"added_tokens.json) as {folder}, or pass --weights FOLDER (or --weights pytorch_model.bin "
            "next to the base model's config.json and tokenizer files).")


def locate(card: ModelCard, weights: str | Path | None) -> tuple[Path, Path | None]:
    """(the folder with config.json and the tokenizer, the weights file when ``weights`` names
    one instead of a folder)."""
    if weights is not None:
        path = Path(weights).expanduser()
        if path.is_file():
            folder, file = path.parent, (None if path.name == "config.json" else path)
        elif path.is_dir():
            folder, file = path, None
        else:
            raise WeightsNotFoundError(f"--weights {path} does not exist.", hint=_place_hint(card, path))
        if not (folder / "config.json").is_file():
            raise WeightsNotFoundError(
                f"{folder} has no config.json, so it is not a {card.name} folder.",
                hint=_place_hint(card, folder))
        return folder, file
    cached = cache_root() / card.name
    if (cached / "config.json").is_file():
        return cached, None
    if card.source.hf_repo:
        snap = _hf_snapshot(card.source.hf_repo)
        if snap is not None:
            return snap, None
    why = ("its authors publish no weights" if card.source.unpublished else
           "offline mode is on" if is_offline() else "rsvl does not download 14 GB folders implicitly")
    raise WeightsNotFoundError(f"Weights of model {card.name!r} are not on this machine ({why}).",
                               hint=_place_hint(card, cached))


def _hf_snapshot(repo: str) -> Path | None:
    try:
        found = huggingface_hub.try_to_load_from_cache(repo, "config.json")
    except Exception:  # a malformed Hugging Face cache must not break loading
        return None
    return Path(found).parent if isinstance(found, str) and Path(found).is_file() else None


def fetch(card: ModelCard | str, *, force: bool = False) -> Path:
    """``rsvl fetch``: LISA's folder (and the CLIP tower) into rsvl's cache; for the FSVLM
    cards, whose weights are unpublished, an error saying what to place where."""
    card = pick_card(CARDS, card, "lisa")
    if card.source.unpublished:
        dest = cache_root() / card.name
        if (dest / "config.json").is_file():
            return dest
        raise WeightsNotFoundError(
            f"{card.name}: its authors publish no weights, so there is nothing to download.",
            hint=_place_hint(card, dest))
    return fetch_folder(card, force=force)


def _missing_vision(card: ModelCard, folder: Path) -> WeightsNotFoundError:
    repo = card.metadata.get("vision_repo")
    sub = folder / str(card.metadata.get("vision_folder", "vision_tower"))
    return WeightsNotFoundError(
        f"The CLIP tower of {card.name!r} is missing: LISA checkpoints never include it and there is "
        f"no {sub} folder.",
        hint=f"Download {repo} ({', '.join(card.metadata.get('vision_files', ()))}) into {sub} "
        f"(`huggingface-cli download {repo} --local-dir {sub}`), or pass vision_tower=FOLDER.")


def vision_path(card: ModelCard, folder: Path, option: str | Path | None = None) -> Path:
    """The CLIP tower to use (``option``, ``folder/vision_tower``, rsvl's cache, the Hugging
    Face cache), or a :class:`WeightsNotFoundError` saying what to download where."""
    found = vision_folder(card, folder, option)
    if found is None:
        raise _missing_vision(card, folder)
    return found


# --------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------


def tower_state_dict(tower: nn.Module, vision: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """CLIP ``vision_model.*`` tensors under ``tower``'s own key names (transformers 5 drops the
    ``vision_model.`` prefix from ``CLIPVisionModel``'s state dict, 4.x keeps it), and the file's
    spelling of each key."""
    anchor = "embeddings.patch_embedding.weight"
    prefix = next(k[: -len(anchor)] for k in tower.state_dict() if k.endswith(anchor))
    out: dict[str, Tensor] = {}
    shown: dict[str, str] = {}
    for key, value in vision.items():
        new = prefix + key[len("vision_model."):]
        out[new], shown[new] = value, key
    return out, shown


def read_checkpoint(folder: Path, file: Path | None, lora_alpha: float | None = None) -> dict[str, Tensor]:
    """The merged state dict of a folder (or one weights file): LoRA merged when the file is
    a training output, unloadable keys dropped, foreign keys refused."""
    if file is not None:
        sd = unwrap(read_file(file, "LISA checkpoint"), f"LISA checkpoint {file}")
        source = f"Checkpoint {file}"
    else:
        sd = read_weights(folder, "LISA folder")
        source = f"Checkpoint in {folder}"
    if is_unmerged(sd):
        alpha = lora_alpha
        adapter = folder / "adapter_config.json"
        if alpha is None and adapter.is_file():
            alpha = float(read_json(adapter, "Adapter config").get("lora_alpha", DEFAULT_LORA_ALPHA))
        sd, report = merge_lora(sd, DEFAULT_LORA_ALPHA if alpha is None else alpha, source)
        console.notice(f"merged LoRA r{report.rank} (alpha {report.alpha:g}) into {report.layers} layers "
                       f"({', '.join(report.targets)})")
    return clean_state_dict(sd, source)


def load_lisa(
    card: str | ModelCard,
    weights: str | Path | None = None,
    device: str = "cpu",
    *,
    vision_tower: str | Path | None = None,
    dtype: str | torch.dtype | None = None,
    lora_alpha: float | None = None,
) -> LisaSeg:
    """A LISA / FSVLM model as a :class:`LisaSeg` (``rsvl.load`` calls this).

    Args:
        card: ``lisa-7b-v1``, ``fsvlm-7b`` or ``fsvlm-13b`` (image markers, window size).
        weights: the model folder, or a weights file whose folder holds config.json and the
            tokenizer (an unmerged ``pytorch_model.bin`` beside its base model's files); else
            rsvl's cache folder ``$RSVL_CACHE/<card>/``, else the Hugging Face cache (LISA).
        device: ``cpu``, ``cuda``, ``cuda:N`` or ``auto``.
        vision_tower: the CLIP tower folder (config.json + weights) or weights file.
        dtype: ``float16`` / ``bfloat16`` / ``float32``; default fp16 on CUDA, fp32 on CPU.
        lora_alpha: LoRA scale numerator for an unmerged file (default: adapter_config.json
            beside it, else upstream's 16).
    """
    card = pick_card(CARDS, card, "lisa")
    if card.family != "lisa":
        raise UnknownModelError(f"{card.name} is a {card.family} model, not a LISA-family model.",
                                hint="Run `rsvl models --task farmland` to list them.")
    device = check_device(device)
    folder, file = locate(card, weights)
    cfg = read_json(folder / "config.json", "Model config")
    fields = lisa_fields(cfg)
    sd = read_checkpoint(folder, file, lora_alpha)
    tokenizer = LisaTokenizer.from_folder(folder)
    markers = tuple(card.metadata.get("image_markers", ())) if fields.use_im_start_end else ()
    if SEG_TOKEN not in tokenizer.added:  # the base model's tokenizer beside a training output
        tokenizer.add_tokens([SEG_TOKEN, *markers])
    vpath = vision_path(card, folder, vision_tower)
    return assemble(card, cfg, sd, tokenizer, vpath, device=device, dtype=dtype, source=f"Checkpoint in {folder}")


def assemble(card: str | ModelCard, cfg: Mapping[str, Any], sd: dict[str, Tensor], tokenizer: LisaTokenizer,
             vision: Path, *, device: str = "cpu", dtype: str | torch.dtype | None = None,
             source: str = "The checkpoint") -> LisaSeg:
    """A :class:`LisaSeg` from a merged state dict (:func:`read_checkpoint`'s keys), its
    config.json dict, its tokenizer and the CLIP tower at ``vision`` (what :func:`load_lisa`
    and the trainer share). ``sd`` is consumed; every parameter is frozen
    (``requires_grad=False``): a trainer unfreezes what it trains."""
    card = pick_card(CARDS, card, "lisa")
    fields = lisa_fields(cfg)
    vocab = int(sd["model.embed_tokens.weight"].shape[0])
    if len(tokenizer) != vocab:
        raise CheckpointMismatchError(
            f"The tokenizer has {len(tokenizer)} tokens but the checkpoint's embeddings have {vocab} rows "
            f"({source}).",
            hint="Use the tokenizer files saved with this checkpoint (its added_tokens.json names [SEG]).")
    projector, vision_width = projector_of(sd)
    sam_cfg = infer_sam_config(sam_part(sd), "meta")
    out_dim = int(sd["model.text_hidden_fcs.0.2.weight"].shape[0])
    compute = pick_dtype(device, dtype)
    net = _net(text_config(cfg, vocab), sam_cfg, vision_width, projector, out_dim, dtype=compute)
    load_strict(net, sd, what=f"{source} does not fit model {card.name!r}", assign=True)
    sd.clear()
    vision_sd, vfields = read_vision(vision)
    if int(vfields["hidden_size"]) != vision_width:
        raise CheckpointMismatchError(
            f"The CLIP tower in {vision} is {vfields['hidden_size']} wide but the projector reads "
            f"{vision_width} channels.", hint=f"Use {card.metadata.get('vision_repo')}.")
    tower = CLIPVisionModel(CLIPVisionConfig(**vfields))
    sd_tower, shown = tower_state_dict(tower, vision_sd)
    load_strict(tower, sd_tower, what=f"Vision tower {vision} does not fit its config", shown=lambda k: shown.get(k, k))
    tower.requires_grad_(False)
    n_params = sum(p.numel() for p in net.parameters())
    if device == "cpu" and n_params > 1_000_000_000:
        console.warn(f"{card.name} ({n_params / 1e9:.1f}B parameters) runs in fp32 on the CPU: expect "
                     "minutes per window; use a CUDA GPU.")
    net = net.to(device=device, dtype=compute).eval()
    tower = tower.to(device=device, dtype=compute).eval()
    return _wrap(card, net, tower, tokenizer, select_layer=fields.select_layer,
                 use_markers=fields.use_im_start_end, clip_size=int(vfields.get("image_size", 224)))


__all__ = ["CLIP_L14_224", "LLAMA_13B", "LLAMA_7B", "assemble", "build", "fetch", "load_lisa", "locate",
           "read_checkpoint", "vision_path"]
