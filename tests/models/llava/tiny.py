"""Tiny VHM / GeoChat folders in their published layouts, for tests anywhere in the suite.

``write_tiny_vhm(folder)`` writes what ``FitzPC/vhm_7B`` holds (``config.json`` with
``mm_vision_select_layer`` a list, two ``pytorch_model-0000N-of-00002.bin`` shards and their
``pytorch_model.bin.index.json``, ``tokenizer.model``) plus the separate vision tower
(``FitzPC/vhm_7b_pretrain_vit``: ``config.json`` + ``pytorch_model.bin`` with
``vision_model.*`` keys) in ``vision_tower/``. ``write_tiny_geochat(folder)`` writes GeoChat's
layout (one CLIP layer, the tower inside the checkpoint at 336 px, or in ``vision_tower/``).

Shapes: LLaMA 2 x 32 wide with a ~330-piece SentencePiece BPE vocabulary (byte fallback, so
"\\n" is ``<0x0A>`` as in LLaMA), CLIP 3 x 128 wide (64 per head, as every OpenAI CLIP:
a tower inside a GeoChat checkpoint has no config, its heads are width / 64) with 84 px
patches: 336 px -> 4 x 4 = 16 image tokens (VHM), 504 px -> 6 x 6 = 36 (GeoChat).
Everything is random but seeded.

The tokenizer file is written with the SentencePiece protobuf schema that transformers ships
(``transformers.utils.sentencepiece_model_pb2_new``), independently of rsvl's reader.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM
from transformers.utils import sentencepiece_model_pb2_new as pb

#: words whose left-to-right prefixes become BPE pieces (so they tokenise to one piece each)
WORDS = (
    "▁A",
    "▁chat",
    "▁between",
    "▁a",
    "▁curious",
    "▁user",
    "▁human",
    "▁and",
    "▁an",
    "▁artificial",
    "▁intelligence",
    "▁assistant.",
    "▁The",
    "▁assistant",
    "▁gives",
    "▁helpful,",
    "▁detailed,",
    "▁polite",
    "▁answers",
    "▁to",
    "▁the",
    "▁user's",
    "▁human's",
    "▁questions.",
    "▁USER:",
    "▁ASSISTANT:",
    "USER:",
    "▁What",
    "▁is",
    "▁in",
    "▁this",
    "▁image?",
    "▁Where",
    "▁plane?",
    "▁{CLS}",
    "▁{VQA}",
    "▁{VG}",
    "▁{IDK}",
    "▁{IT}",
    "▁[refer]",
    "▁[grounding]",
    "▁[identify]",
    "▁yes",
    "▁no",
    "▁plane",
    "▁road",
)
CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,:;'?!{}[]<>()|-_/ "
VISION: dict[str, Any] = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 3,
    "num_attention_heads": 2,
    "image_size": 336,
    "patch_size": 84,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "projection_dim": 8,
}
TEXT: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "hidden_act": "silu",
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
}


def tiny_pieces() -> list[tuple[str, float, int]]:
    """(piece, score, type) of the tiny vocabulary: <unk> <s> </s>, 256 byte pieces, "▁",
    single characters, then every prefix of :data:`WORDS` (longer = lower score)."""
    pieces: list[tuple[str, float, int]] = [("<unk>", 0.0, 2), ("<s>", 0.0, 3), ("</s>", 0.0, 3)]
    pieces += [(f"<0x{b:02X}>", 0.0, 6) for b in range(256)]
    seen = {p for p, _, _ in pieces}
    score = 0.0

    def add(piece: str) -> None:
        nonlocal score
        if piece not in seen:
            seen.add(piece)
            pieces.append((piece, score, 1))
            score -= 1.0

    add("▁")
    for ch in CHARS.replace(" ", ""):
        add(ch)
    for word in WORDS:
        for end in range(2, len(word) + 1):
            add(word[:end])
    return pieces


def write_tokenizer(path: Path) -> list[str]:
    """A SentencePiece BPE ``tokenizer.model`` (LLaMA's settings); returns the pieces."""
    model = pb.ModelProto()
    for piece, score, kind in tiny_pieces():
        p = model.pieces.add()
        p.piece, p.score, p.type = piece, score, kind
    model.trainer_spec.model_type = 2  # BPE
    model.trainer_spec.byte_fallback = True
    model.trainer_spec.unk_id, model.trainer_spec.bos_id, model.trainer_spec.eos_id = 0, 1, 2
    model.trainer_spec.pad_id = -1
    model.normalizer_spec.add_dummy_prefix = True
    model.normalizer_spec.remove_extra_whitespaces = False
    path.write_bytes(model.SerializeToString())
    return [p for p, _, _ in tiny_pieces()]


def tiny_text_config() -> LlamaConfig:
    return LlamaConfig(vocab_size=len(tiny_pieces()), tie_word_embeddings=False, **TEXT)


def tiny_vision_config(image_size: int = 336) -> CLIPVisionConfig:
    return CLIPVisionConfig(**{**VISION, "image_size": image_size})


def _save_sharded(sd: dict[str, torch.Tensor], folder: Path, shards: int) -> None:
    keys = list(sd)
    per = -(-len(keys) // shards)
    weight_map = {}
    for i in range(shards):
        name = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = {k: sd[k].clone() for k in keys[i * per : (i + 1) * per]}
        torch.save(part, folder / name)
        weight_map.update(dict.fromkeys(part, name))
    index = {
        "metadata": {"total_size": sum(v.numel() * v.element_size() for v in sd.values())},
        "weight_map": weight_map,
    }
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=2))


def _vision_json(image_size: int = 336) -> dict[str, Any]:
    return {
        "architectures": ["CLIPVisionModel"],
        "model_type": "clip_vision_model",
        **{**VISION, "image_size": image_size},
    }


def _llava_json(model_type: str, layers: Any, tower: str) -> dict[str, Any]:
    return {
        "architectures": [
            "VHMLlamaForCausalLM" if model_type == "vhm" else "GeoChatLlamaForCausalLM"
        ],
        "model_type": model_type,
        "vocab_size": len(tiny_pieces()),
        **TEXT,
        "mm_vision_tower": tower,
        "mm_vision_select_layer": layers,
        "mm_vision_select_feature": "patch",
        "mm_hidden_size": VISION["hidden_size"],
        "mm_projector_type": "mlp2x_gelu",
        "image_aspect_ratio": "pad",
        "mm_use_im_start_end": False,
        "mm_use_im_patch_token": False,
        "use_mm_proj": True,
        "torch_dtype": "float32",
        "transformers_version": "4.33.0",
    }


def tiny_parts(n_layers: int, seed: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(LLaMA + projector state dict in upstream's key names, CLIP ``vision_model.*`` dict)."""
    torch.manual_seed(seed)
    llama = LlamaForCausalLM(tiny_text_config())
    text = {k: v for k, v in llama.state_dict().items() if "rotary_emb" not in k}
    width = TEXT["hidden_size"]
    proj_in = VISION["hidden_size"] * n_layers
    text["model.mm_projector.0.weight"] = torch.randn(width, proj_in) * 0.2
    text["model.mm_projector.0.bias"] = torch.randn(width) * 0.1
    text["model.mm_projector.2.weight"] = torch.randn(width, width) * 0.2
    text["model.mm_projector.2.bias"] = torch.randn(width) * 0.1
    text["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)  # as LLaVA-era files carry
    vision = CLIPVisionModel(tiny_vision_config()).state_dict()  # 5.x drops "vision_model."
    vision = {
        k if k.startswith("vision_model.") else "vision_model." + k: v for k, v in vision.items()
    }
    return text, {k: v for k, v in vision.items() if "position_ids" not in k}


def write_tiny_vhm(
    folder: str | Path, *, seed: int = 0, shards: int = 2, vision: bool = True
) -> Path:
    """A tiny VHM folder in FitzPC/vhm_7B's layout, its tower in ``vision_tower/``."""
    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    text, tower = tiny_parts(3, seed)
    (root / "config.json").write_text(
        json.dumps(_llava_json("vhm", [1, 2, 3], "FitzPC/vhm_7b_pretrain_vit"))
    )
    _save_sharded(text, root, shards)
    write_tokenizer(root / "tokenizer.model")
    if vision:
        (root / "vision_tower").mkdir(exist_ok=True)
        (root / "vision_tower" / "config.json").write_text(json.dumps(_vision_json()))
        torch.save(tower, root / "vision_tower" / "pytorch_model.bin")
    return root


def write_tiny_geochat(folder: str | Path, *, seed: int = 1, embed_tower: bool = True) -> Path:
    """A tiny GeoChat folder: layer -2, the 336 px tower inside the checkpoint
    (``model.vision_tower.vision_tower.vision_model.*``) or, with ``embed_tower=False``, in
    ``vision_tower/`` as openai/clip-vit-large-patch14-336 would be."""
    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    text, tower = tiny_parts(1, seed)
    if embed_tower:
        text.update({"model.vision_tower.vision_tower." + k: v for k, v in tower.items()})
    else:
        (root / "vision_tower").mkdir(exist_ok=True)
        (root / "vision_tower" / "config.json").write_text(json.dumps(_vision_json()))
        torch.save(tower, root / "vision_tower" / "pytorch_model.bin")
    (root / "config.json").write_text(
        json.dumps(_llava_json("geochat", -2, "openai/clip-vit-large-patch14-336"))
    )
    _save_sharded(text, root, 2)
    write_tokenizer(root / "tokenizer.model")
    return root


__all__ = ["tiny_parts", "tiny_pieces", "write_tiny_geochat", "write_tiny_vhm", "write_tokenizer"]
