"""A tiny LISA training start in upstream's layouts: a LLaVA-v1 base folder (LLaMA +
``mm_projector`` + tokenizer without ``[SEG]`` or image markers), a CLIP tower folder, a
segment-anything SAM checkpoint (``sam_vit_h_4b8939.pth``'s layout) and a FIT-layout folder
of bright-square "fields". Parts come from :mod:`models.lisa.tiny` (independent of rsvl)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from models.lisa.tiny import VISION, TinyParts
from PIL import Image
from safetensors.torch import save_file


def write_llava_base(root: Path, seed: int = 0) -> dict[str, Path]:
    """``{"base", "vision", "sam"}`` paths under ``root``."""
    parts = TinyParts(seed)
    n = min(parts.added.values())  # the SentencePiece vocabulary: the base has no added tokens
    base = root / "llava"
    base.mkdir(parents=True, exist_ok=True)
    sd = {k: v for k, v in parts.llama.state_dict().items() if "rotary_emb" not in k}
    sd["model.embed_tokens.weight"] = sd["model.embed_tokens.weight"][:n]
    sd["lm_head.weight"] = sd["lm_head.weight"][:n]
    sd.update({f"model.mm_projector.{k}": v for k, v in parts.projector.state_dict().items()})
    save_file({k: v.contiguous().clone() for k, v in sd.items()}, str(base / "model.safetensors"))
    cfg = parts.config()
    for k in ("out_dim", "train_mask_decoder"):
        cfg.pop(k)
    cfg.update({"architectures": ["LlavaLlamaForCausalLM"], "vocab_size": n, "mm_vision_tower": cfg.pop("vision_tower"),
                "mm_hidden_size": VISION["hidden_size"]})
    (base / "config.json").write_text(json.dumps(cfg))
    parts.write_tokenizer(base, added=False)
    vision = parts.write_tower(root / "clip")
    sam = root / "sam_tiny.pth"
    torch.save(parts.sam.state_dict(), sam)
    return {"base": base, "vision": vision, "sam": sam}


def write_fit(root: Path, n: int = 4, size: int = 64, seed: int = 0, split: str = "train") -> Path:
    """A FIT folder whose labels are bright squares on a dark background."""
    rng = np.random.default_rng(seed)
    for sub in ("img", "lbl", "json"):
        (root / split / sub).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
        lbl = np.zeros((size, size), np.uint8)
        r, c = rng.integers(0, size // 2, 2)
        img[r:r + size // 2, c:c + size // 2] += 180
        lbl[r:r + size // 2, c:c + size // 2] = 1
        Image.fromarray(img).save(root / split / "img" / f"f{i}.png")
        Image.fromarray(lbl * 255).save(root / split / "lbl" / f"f{i}.png")
        desc = "" if i % 2 else "Fields in summer."
        (root / split / "json" / f"f{i}.json").write_text(json.dumps({"img_description_eg": desc}))
    return root
