"""Model cards of the published LLaVA-family remote-sensing chat models (pure data: no torch).

* **VHM** (``vhm-7b``; AAAI 2025, formerly H2RSVLM, arXiv 2403.20213): LLaVA-1.5 layout on
  Vicuna-7B-v1.5 whose projector reads three CLIP layers (8, 16, 24) concatenated.
  ``FitzPC/vhm_7B`` holds the LLaMA + projector weights only; the vision tower is the separate
  repository ``FitzPC/vhm_7b_pretrain_vit`` (``CLIPVisionModel``, keys ``vision_model.*``).
* **GeoChat** (``geochat-7b``; CVPR 2024, arXiv 2311.15826): LLaVA-1.5 on Vicuna-7B with CLIP
  ViT-L/14-336 whose position embeddings are interpolated to 504 px (36 x 36 patches), one
  CLIP layer (-2), oriented boxes ``{<x1><y1><x2><y2>|angle}`` in 0-100.

A card's ``source`` names the repository's ``config.json``: a chat model is a folder
(config, sharded weights, ``tokenizer.model``), which :func:`rsvl.models.llava.load` reads
from ``weights=FOLDER``, rsvl's cache folder ``$RSVL_CACHE/<card name>/`` or the Hugging Face
cache. ``metadata["files"]`` lists what that folder must hold.

Revisions: only abbreviated commits of the two repositories could be read offline (the Hub's
commit-history pages), so neither card pins a revision; the short ids are in ``notes``.
"""

from __future__ import annotations

from typing import Any

from rsvl.models.cards import OPENAI_MEAN, OPENAI_STD, ModelCard, WeightsSource

#: what a published model folder holds (both repositories; the index names the shards)
VHM_FILES: tuple[str, ...] = (
    "config.json",
    "pytorch_model.bin.index.json",
    "pytorch_model-00001-of-00002.bin",
    "pytorch_model-00002-of-00002.bin",
    "tokenizer.model",
)

LLAVA_CARDS: list[dict[str, Any]] = [
    {
        "name": "vhm-7b",
        "variant": "vhm",
        "hf_repo": "FitzPC/vhm_7B",
        "short_commit": "4cdc097 (main, 'Update config.json')",
        "vision_repo": "FitzPC/vhm_7b_pretrain_vit",
        "vision_files": ("config.json", "pytorch_model.bin"),
        "image_size": 336,
        "licence": "Apache-2.0 (opendatalab/VHM code); the weights' Hugging Face page states no "
        "licence and the LLM is Vicuna-7B-v1.5 (Llama 2 Community License)",
        "description": "VHM-7B remote-sensing chat (classification, VQA, counting, grounding "
        "with [x1, y1, x2, y2] boxes in 0-1000, honest refusals): CLIP ViT-L/14-336 layers 8, 16 "
        "and 24 concatenated -> mlp2x_gelu -> Vicuna-7B-v1.5, 576 image tokens, pad-to-square.",
        "paper": "arXiv:2403.20213 (AAAI 2025)",
        "code": "https://github.com/opendatalab/VHM",
    },
    {
        "name": "geochat-7b",
        "variant": "geochat",
        "hf_repo": "MBZUAI/geochat-7B",
        "short_commit": "cca91eb (main, 'Update README.md'; "
        "weights from 9194958 'geochat_uploaded')",
        "vision_repo": "openai/clip-vit-large-patch14-336",
        "vision_files": ("config.json", "pytorch_model.bin"),
        "image_size": 504,
        "licence": "Apache-2.0 (Hugging Face model card); the LLM is Vicuna-7B (Llama licence)",
        "description": "GeoChat-7B grounded remote-sensing chat: CLIP ViT-L/14 with position "
        "embeddings interpolated to 504 px (1296 image tokens), layer -2, mlp2x_gelu -> Vicuna-7B; "
        "task tags [grounding] [refer] [identify], oriented boxes "
        "{<x1><y1><x2><y2>|angle} in 0-100.",
        "paper": "arXiv:2311.15826 (CVPR 2024)",
        "code": "https://github.com/mbzuai-oryx/GeoChat",
    },
]


def _to_card(d: dict[str, Any]) -> ModelCard:
    return ModelCard(
        name=d["name"],
        family="llava",
        architecture=f"LLaVA-1.5 ({d['variant']}): CLIP ViT-L/14 at {d['image_size']} px + "
        "mlp2x_gelu + LLaMA-7B",
        source=WeightsSource(filename="config.json", hf_repo=d["hf_repo"], revision=None),
        licence=d["licence"],
        description=d["description"],
        sha256=None,
        mean=OPENAI_MEAN,
        std=OPENAI_STD,
        image_size=d["image_size"],
        context_length=2048,
        tasks=("chat",),
        notes=(
            f"Revision not pinned: only the abbreviated commit {d['short_commit']} of "
            f"{d['hf_repo']} could be read offline, so a download follows main. The model is a "
            f"folder: place the files of {d['hf_repo']} ({', '.join(VHM_FILES)}) in "
            f"$RSVL_CACHE/{d['name']}/ or pass --weights FOLDER; the vision tower "
            f"({d['vision_repo']}: {', '.join(d['vision_files'])}) goes in its vision_tower/ "
            "sub-folder (or pass vision_tower=FOLDER). Upstream's loader picks the model class "
            "from the folder name; rsvl reads config.json and the card instead, so a renamed "
            "folder loads the same. 7B in fp16 needs about 14 GB of GPU memory (see "
            "rsvl.models.llava.memory_estimate); on a CPU it runs in fp32 (about 28 GB) and takes "
            "minutes per answer."
        ),
        metadata={
            "variant": d["variant"],
            "files": VHM_FILES,
            "vision_repo": d["vision_repo"],
            "vision_files": d["vision_files"],
            "vision_folder": "vision_tower",
            "paper": d["paper"],
            "code": d["code"],
        },
    )


CARDS: tuple[ModelCard, ...] = tuple(_to_card(d) for d in LLAVA_CARDS)

__all__ = ["CARDS", "LLAVA_CARDS", "VHM_FILES"]
