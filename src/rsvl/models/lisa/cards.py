"""Model cards of the published LISA-family segmentation chat models (pure data: no torch).

* **LISA-7B-v1** (``lisa-7b-v1``; Lai et al., "LISA: Reasoning Segmentation via Large
  Language Model", CVPR 2024, arXiv:2308.00692; code dvlab-research/LISA): LLaVA-Lightning-7B
  (LLaMA-7B, a linear ``mm_projector`` on CLIP ViT-L/14 at 224 px, layer -2, 256 patch tokens,
  ``<im_start>``/``<im_end>`` around the image) + SAM ViT-H; ``[SEG]`` = 32003 of 32004 rows.
  The merged folder is on Hugging Face as ``xinlai/LISA-7B-v1``; the CLIP tower is its own
  repository (``openai/clip-vit-large-patch14``), which upstream re-downloads at load time.
* **FSVLM** (``fsvlm-7b``, ``fsvlm-13b``; WithoutOcean/FSVLM, "farmland segmentation VLM"):
  LISA with ``<|im_start|>``/``<|im_end|>`` markers and three tokens added to the base
  vocabulary, trained on FarmSeg-VL / FIT 512 px tiles. **No FSVLM weights are published**
  (the README points to a Baidu link for data at most): the cards describe what a folder
  merged with upstream's ``merge_lora_weights_and_save_hf_model.py`` (or its unmerged
  ``pytorch_model.bin``) looks like, and ``rsvl fetch`` says where to place it.

A card's ``source`` names the folder's ``config.json``; :func:`rsvl.models.lisa.load` reads
the folder from ``weights=FOLDER``, rsvl's cache folder ``$RSVL_CACHE/<card name>/`` or (for
LISA) the Hugging Face cache. ``metadata["files"]`` lists what the folder holds.

Revision: no full commit of ``xinlai/LISA-7B-v1`` could be read offline, so the card pins
none (a download follows ``main``) and says so in its notes.
"""

from __future__ import annotations

from typing import Any

from rsvl.models.cards import OPENAI_MEAN, OPENAI_STD, ModelCard, WeightsSource

#: the merged Hugging Face folder as LISA publishes it (slow LLaMA tokenizer files)
LISA_FILES: tuple[str, ...] = (
    "config.json",
    "pytorch_model.bin.index.json",
    "pytorch_model-00001-of-00002.bin",
    "pytorch_model-00002-of-00002.bin",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
)
#: what an FSVLM folder written by upstream's merge script holds (shard names vary)
FSVLM_FILES: tuple[str, ...] = (
    "config.json",
    "pytorch_model.bin.index.json (+ its shards) or model.safetensors",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
)
CLIP_REPO = "openai/clip-vit-large-patch14"
CLIP_FILES: tuple[str, ...] = ("config.json", "pytorch_model.bin")

_FSVLM_UNPUBLISHED = (
    "The FSVLM authors publish no trained weights (WithoutOcean/FSVLM a8cb8a6). Train one with "
    "`rsvl train fsvlm DATA --model fsvlm-7b --base LLAVA_FOLDER --sam sam_vit_h_4b8939.pth --out RUN` "
    "(a GPU; RUN/merged is the folder to place), or with upstream's train_ds.py, then either merge "
    "it with upstream's "
    "merge_lora_weights_and_save_hf_model.py (a Hugging Face folder: config.json, weight "
    "shards, tokenizer.model, added_tokens.json) or keep the unmerged pytorch_model.bin from "
    "zero_to_fp32.py next to the base LLaVA's config.json and tokenizer files (rsvl merges the "
    "LoRA weights itself)."
)

LISA_CARDS: list[dict[str, Any]] = [
    {
        "name": "lisa-7b-v1",
        "variant": "lisa",
        "hf_repo": "xinlai/LISA-7B-v1",
        "files": LISA_FILES,
        "window": 1024,
        "size": "7B",
        "licence": "Apache-2.0 (dvlab-research/LISA code); the LLM is LLaMA-7B "
        "(LLaVA-Lightning-7B-v1-1, LLaMA licence)",
        "description": "LISA-7B-v1 reasoning segmentation: LLaVA-Lightning-7B (CLIP ViT-L/14 at "
        "224 px, layer -2, linear projector, <im_start>/<im_end>) answers with [SEG], whose "
        "hidden state prompts SAM ViT-H (sparse prompt from text_hidden_fcs, dense no_mask_embed, "
        "one mask). Natural-image model; a baseline for farmland requests.",
        "paper": "arXiv:2308.00692 (CVPR 2024)",
        "code": "https://github.com/dvlab-research/LISA",
        "markers": ("<im_start>", "<im_end>"),
    },
    {
        "name": "fsvlm-7b",
        "variant": "fsvlm",
        "files": FSVLM_FILES,
        "window": 512,
        "size": "7B",
        "base": "liuhaotian/LLaVA-Lightning-7B-delta-v1-1 (README example)",
        "licence": "Not stated for weights (none published); code WithoutOcean/FSVLM; the LLM is "
        "LLaMA (LLaMA licence)",
        "description": "FSVLM-7B language-guided farmland segmentation: LISA on LLaVA-Lightning-7B "
        "with <|im_start|>/<|im_end|> image markers, trained on FarmSeg-VL / FIT 512 px tiles with "
        "CE + 2 BCE + 0.5 Dice; [SEG] -> SAM ViT-H mask, logit > 0 is farmland.",
        "paper": "FSVLM (WithoutOcean/FSVLM README)",
        "code": "https://github.com/WithoutOcean/FSVLM",
        "markers": ("<|im_start|>", "<|im_end|>"),
    },
    {
        "name": "fsvlm-13b",
        "variant": "fsvlm",
        "files": FSVLM_FILES,
        "window": 512,
        "size": "13B",
        "base": "liuhaotian/llava-llama-2-13b-chat-lightning-preview (train_ds.py default)",
        "licence": "Not stated for weights (none published); code WithoutOcean/FSVLM; the LLM is "
        "LLaMA-2-13B-chat (Llama 2 Community License)",
        "description": "FSVLM-13B language-guided farmland segmentation: LISA on "
        "llava-llama-2-13b-chat-lightning-preview (hidden 5120) with <|im_start|>/<|im_end|> "
        "image markers; [SEG] -> SAM ViT-H mask, logit > 0 is farmland.",
        "paper": "FSVLM (WithoutOcean/FSVLM README)",
        "code": "https://github.com/WithoutOcean/FSVLM",
        "markers": ("<|im_start|>", "<|im_end|>"),
    },
]


def _source(d: dict[str, Any]) -> WeightsSource:
    if d.get("hf_repo"):
        return WeightsSource(filename="config.json", hf_repo=d["hf_repo"], revision=None)
    return WeightsSource(filename="config.json", unpublished=_FSVLM_UNPUBLISHED)


def _notes(d: dict[str, Any]) -> str:
    folder = f"$RSVL_CACHE/{d['name']}/"
    tower = (f"The CLIP tower ({CLIP_REPO}: {', '.join(CLIP_FILES)}) goes in its vision_tower/ "
             "sub-folder (or pass vision_tower=FOLDER, or have it in the Hugging Face cache).")
    common = (
        " config.json says model_type 'llava', which rsvl reads as plain JSON (transformers' "
        "LlavaConfig is another model). The [SEG] id is read from the folder's tokenizer "
        "(added_tokens.json / tokenizer_config.json), never assumed. "
        f"{d['size']} in bf16/fp16 needs about {'16' if d['size'] == '7B' else '28'} GB of GPU "
        "memory with SAM ViT-H; on a CPU it runs in fp32 and takes minutes per window."
    )
    if d.get("hf_repo"):
        return (
            f"Revision not pinned: no full commit of {d['hf_repo']} could be read offline, so a "
            f"download follows main. The model is a folder: `rsvl fetch {d['name']}` downloads "
            f"{', '.join(d['files'])} into {folder} (the names upstream's save_pretrained writes; the "
            "Hub listing could not be read offline), or place them there yourself, or pass "
            f"--weights FOLDER. " + tower + common
        )
    return (
        "No public download: " + _FSVLM_UNPUBLISHED + f" Place the folder as {folder} (or pass "
        f"--weights FOLDER). Base model: {d['base']}. " + tower + common
    )


def _to_card(d: dict[str, Any]) -> ModelCard:
    return ModelCard(
        name=d["name"],
        family="lisa",
        architecture=f"LISA ({d['variant']}): CLIP ViT-L/14 at 224 px + linear projector + "
        f"LLaMA-{d['size']} + text_hidden_fcs + SAM ViT-H",
        source=_source(d),
        licence=d["licence"],
        description=d["description"],
        sha256=None,
        mean=OPENAI_MEAN,
        std=OPENAI_STD,
        image_size=d["window"],
        context_length=512,
        tasks=("farmland",),
        notes=_notes(d),
        metadata={
            "variant": d["variant"],
            "files": d["files"],
            "vision_repo": CLIP_REPO,
            "vision_files": CLIP_FILES,
            "vision_folder": "vision_tower",
            "image_markers": d["markers"],
            "sam": "vit_h",
            "lora": {"r": 8, "alpha": 16, "dropout": 0.05, "targets": ("q_proj", "v_proj")},
            "paper": d["paper"],
            "code": d["code"],
            "trained_weights_published": bool(d.get("hf_repo")),
        },
    )


CARDS: tuple[ModelCard, ...] = tuple(_to_card(d) for d in LISA_CARDS)

__all__ = ["CARDS", "CLIP_REPO", "FSVLM_FILES", "LISA_CARDS", "LISA_FILES"]
