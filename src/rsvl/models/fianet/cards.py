"""Model cards of FIANet, the referring-segmentation model (pure data: no torch import).

FIANet (Lei et al., "Exploring Fine-Grained Image-Text Alignment for Referring Remote Sensing
Image Segmentation", TGRS 2024, arXiv:2409.13637; code Shaosifan/FIANet) was trained by its
authors on RRSIS-D and on RefSegRS. **The authors publish no weights** (as of the snapshot
read, 89a234a): these cards describe the two published settings so that a checkpoint trained
with upstream's code, or with rsvl's trainer, loads as it is. There is nothing to download:
pass ``--weights PATH`` (or place the file in rsvl's cache, see each card's notes).

Each checkpoint also needs bert-base-uncased's WordPiece vocabulary, ``vocab.txt``, placed
next to the checkpoint (upstream's ``--bert_tokenizer ./bert-base-uncased``).

The cards' ``source`` is marked ``bundled`` with a path that does not exist in the package:
``WeightsSource`` has no "unpublished" kind, and a URL source would make ``rsvl fetch``
download a web page as a checkpoint. ``rsvl.models.fianet.model.load_fianet`` checks for the file
first and says that the weights are unpublished and must be given with ``--weights``.
"""

from __future__ import annotations

from typing import Any

from rsvl.models.cards import ModelCard, WeightsSource

#: ImageNet normalisation on the 0-1 scale (upstream ``T.Normalize``)
FIANET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
FIANET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

_CODE = "https://github.com/Shaosifan/FIANet"
BERT_VOCAB_URL = "https://huggingface.co/google-bert/bert-base-uncased/resolve/main/vocab.txt"
SWIN_22K_URL = (
    "https://github.com/SwinTransformer/storage/releases/download/v1.0.0/"
    "swin_base_patch4_window12_384_22k.pth"
)

FIANET_CARDS: list[dict[str, Any]] = [
    {
        "name": "fianet-rrsisd",
        "dataset": "rrsisd",
        "filename": "fianet_rrsisd.pth",
        "num_tmem": 3,
        "max_tokens": 22,
        "train": "--dataset rrsisd --epochs 40 --lr 3e-5 --num_tmem 3",
        "published": {"split": "test", "oIoU": 76.91, "mIoU": 64.01, "Pr@0.5": 74.46,
                      "Pr@0.7": 56.31, "Pr@0.9": 24.13},  # fmt: skip
        "data": "RRSIS-D (17,402 image-expression-mask triplets over the 20 DIOR classes)",
    },
    {
        "name": "fianet-refsegrs",
        "dataset": "refsegrs",
        "filename": "fianet_refsegrs.pth",
        "num_tmem": 1,
        "max_tokens": 20,
        "train": "--dataset refsegrs --epochs 60 --lr 5e-5 --num_tmem 1",
        "published": {"split": "test", "oIoU": 78.32, "mIoU": 68.67, "Pr@0.5": 84.09,
                      "Pr@0.7": 61.86, "Pr@0.9": 7.10},  # fmt: skip
        "data": "RefSegRS (about 4,420 triplets, 14 urban classes)",
    },
]


def _to_card(d: dict[str, Any]) -> ModelCard:
    return ModelCard(
        name=d["name"],
        family="fianet",
        architecture=(
            f"FIANet (lavt_one): Swin-B window 12 + bert-base-uncased x3 passes, "
            f"PWAM + OPAB + channel gate per stage, TMEM x{d['num_tmem']}, LAVT decoder"
        ),
        source=WeightsSource(
            filename=d["filename"],
            unpublished="The FIANet authors publish no trained weights: train one with "
            "`rsvl train refer --model fianet` or get a checkpoint from the authors "
            "(with bert-base-uncased's vocab.txt beside it).",
        ),
        licence="Not stated: the upstream README (Shaosifan/FIANet) names no licence; "
        "no weights are published",
        description=(
            f"FIANet referring segmentation trained on {d['data']}: a referring expression "
            "('the large storage tank next to the road') -> a binary mask. "
            f"{d['max_tokens']} BERT tokens; ground-object and spatial-phrase masks from the "
            "upstream rules (rsvl.data.refer_text). Checkpoint layout: upstream's training "
            "file {'model': {backbone.*, classifier.*, text_encoder.*}, 'optimizer', 'epoch', "
            "'args', ...} or its bare 'model' dict."
        ),
        sha256=None,
        mean=FIANET_MEAN,
        std=FIANET_STD,
        image_size=480,
        context_length=d["max_tokens"],
        tasks=("refer",),
        notes=(
            "No public download: the FIANet authors publish no checkpoints, so rsvl cannot "
            "fetch one; pass --weights PATH to a checkpoint trained with upstream's train.py "
            f"({d['train']}) or with rsvl's trainer, or place it as "
            f"$RSVL_CACHE/{d['name']}/{d['filename']}. Also place bert-base-uncased's "
            f"vocab.txt ({BERT_VOCAB_URL}) next to the checkpoint. Training starts from "
            f"{SWIN_22K_URL} and bert-base-uncased. Input: resize to 480 x 480, ImageNet "
            "normalisation; prediction = argmax of 2 logits at 480 x 480. Published numbers "
            "are quoted by a third paper (RS2-SAM2) and were selected on the test split."
        ),
        metadata={
            "dataset": d["dataset"],
            "num_tmem": d["num_tmem"],
            "max_tokens": d["max_tokens"],
            "vocab_file": "vocab.txt",
            "vocab_url": BERT_VOCAB_URL,
            "swin_init_url": SWIN_22K_URL,
            "code": _CODE,
            "paper": "arXiv:2409.13637",
            "published": d["published"],
        },
    )


CARDS: tuple[ModelCard, ...] = tuple(_to_card(d) for d in FIANET_CARDS)

__all__ = ["BERT_VOCAB_URL", "FIANET_CARDS", "FIANET_MEAN", "CARDS", "FIANET_STD"]
