"""Cards of the published RS CLIPs (open_clip format) and the OpenAI baselines."""

from __future__ import annotations

from rsvl.models.cards import ModelCard, WeightsSource, normalise_name

# --------------------------------------------------------------------------------------------
# Built-in cards: published RS CLIPs (open_clip format) and the OpenAI baselines.
# --------------------------------------------------------------------------------------------

_CLIP_TASKS = ("classify", "search", "segment")

_FARSLIP_NOTES = (
    "Hugging Face revision not pinned: no commit of ZhenShiL/FarSLIP could be confirmed "
    "offline, so downloads follow 'main'. No published sha256. "
    "Evaluate with QuickGELU (the checkpoints are fine-tuned from OpenAI CLIP; nn.GELU silently "
    "degrades results, open_clip #771)."
)


def _farslip(stage: int, patch: int) -> ModelCard:
    arch = f"ViT-B-{patch}"
    fname = f"FarSLIP{stage}_ViT-B-{patch}.pt"
    long_text = stage == 2
    text = (
        "Long-CLIP text encoder: 248 positions (positional_embedding + positional_embedding_res, "
        "first 20 positions from the first table); detected from the checkpoint."
        if long_text
        else "Standard 77-token text encoder."
    )
    return ModelCard(
        name=f"farslip{stage}-vit-b{patch}",
        family="clip",
        architecture=arch,
        quick_gelu=True,
        source=WeightsSource(filename=fname, hf_repo="ZhenShiL/FarSLIP"),
        licence="MIT",
        image_size=224,
        context_length=248 if long_text else 77,
        tasks=_CLIP_TASKS,
        description=(
            f"FarSLIP stage {stage} ({arch}, NJU-LHRS 2025): CLIP fine-tuned for fine-grained RS "
            + (
                "alignment on RS5M (stage 1, global ITC + patch-to-crop distillation). "
                if stage == 1
                else "alignment on MGRS-200k (stage 2, global + region ITC, from stage 1). "
            )
            + text
            + " Checkpoint layout: {'state_dict': {'module.*': ...}} from open_clip training."
        ),
        notes=_FARSLIP_NOTES,
        metadata={
            "paper": "arXiv:2511.14901",
            "code": "https://github.com/NJU-LHRS/FarSLIP",
            "published": {
                (1, 32): {"ovss_miou_mean8": 29.87, "zsc_top1_mean8": 58.64},
                (2, 32): {"ovss_miou_mean8": 30.49, "zsc_top1_mean8": 60.12},
                (1, 16): {"ovss_miou_mean8": 35.44, "zsc_top1_mean8": 61.89},
                (2, 16): {"ovss_miou_mean8": 35.41, "zsc_top1_mean8": 62.24},
            }[(stage, patch)],
        },
    )


_REMOTECLIP_REV = "bf1d8a3ccf2ddbf7c875705e46373bfe542bce38"  # "Upload 3 files", 2023-07-27


def _remoteclip(arch: str) -> ModelCard:
    name = {
        "RN50": "remoteclip-rn50",
        "ViT-B-32": "remoteclip-vit-b32",
        "ViT-L-14": "remoteclip-vit-l14",
    }[arch]
    return ModelCard(
        name=name,
        family="clip",
        architecture=arch,
        quick_gelu=False,
        source=WeightsSource(
            filename=f"RemoteCLIP-{arch}.pt",
            hf_repo="chendelong/RemoteCLIP",
            revision=_REMOTECLIP_REV,
        ),
        licence="Apache-2.0",
        image_size=224,
        context_length=77,
        tasks=("classify", "search") if arch == "RN50" else _CLIP_TASKS,
        description=(
            f"RemoteCLIP {arch} (TGRS 2024): CLIP continually trained on RET-3 + DET-10 + SEG-4 "
            "(165k RS image-text pairs). Bare open_clip state dict. Its retrieval training "
            "includes the RSICD/RSITMD/UCM train splits (FarSLIP marks it 'in-hold supervision')."
        ),
        notes=(
            f"Revision {_REMOTECLIP_REV[:7]} is the repository's only upload commit (also the "
            "snapshot path RS-OVSS checks in). No published sha256. Built with nn.GELU as the "
            "authors' own loading code does (open_clip.create_model_and_transforms"
            f"('{arch}')) and as FarSLIP's benchmark loads it; whether training used QuickGELU is "
            "not documented - pass quick_gelu=True to load_clip to compare."
        ),
    )


_GEORSCLIP_REV = "4920188e6eba4e711ef9848cfd7cb77e874ee33f"  # "Upload RS5M_ViT-B-32_RSICD.pt"


def _georsclip(arch: str) -> ModelCard:
    b32 = arch == "ViT-B-32"
    return ModelCard(
        name="georsclip-vit-b32" if b32 else "georsclip-vit-h14",
        family="clip",
        architecture=arch,
        quick_gelu=b32,
        source=WeightsSource(
            filename=f"RS5M_{arch}.pt",
            hf_repo="Zilun/GeoRSCLIP",
            hf_filename=f"ckpt/RS5M_{arch}.pt",
            revision=_GEORSCLIP_REV,
        ),
        licence="CC-BY-4.0 (Hugging Face model card; the RS5M code repository is MIT)",
        image_size=224,
        context_length=77,
        tasks=_CLIP_TASKS,
        description=(
            f"GeoRSCLIP {arch} (RS5M, TGRS 2024): CLIP fine-tuned on the 5M-pair RS5M dataset. "
            "Bare open_clip state dict. Inference normalisation is OpenAI's (the RS5M "
            "inference_tool default subset 'clip'; RS5M statistics exist but are not the default)."
        ),
        notes=(
            f"Revision {_GEORSCLIP_REV[:7]} (head of Zilun/GeoRSCLIP as read from its tree page). "
            "No published sha256. "
            + (
                "QuickGELU: the authors load it into open_clip 'ViT-B/32' with pretrained='openai', "
                "which builds QuickGELU (FarSLIP's benchmark loaded it with nn.GELU instead)."
                if b32
                else "nn.GELU is inferred (ViT-H-14 has no OpenAI initialisation; the LAION "
                "open_clip ViT-H-14 uses nn.GELU); not confirmed from the authors' code."
            )
        ),
    )


_SKYSCRIPT_CKPT = "https://opendatasharing.s3.us-west-2.amazonaws.com/SkyScript/ckpt/"


def _skyclip(arch: str) -> ModelCard:
    b32 = arch == "ViT-B-32"
    stem = (
        "SkyCLIP_ViT_B32_top50pct" if b32 else "SkyCLIP_ViT_L14_top30pct_filtered_by_CLIP_laion_RS"
    )
    return ModelCard(
        name="skyclip-vit-b32" if b32 else "skyclip-vit-l14",
        family="clip",
        architecture=arch,
        quick_gelu=not b32,
        source=WeightsSource(
            filename=f"{stem}_epoch_20.pt",
            url=f"{_SKYSCRIPT_CKPT}{stem}.zip",
            archive_member="epoch_20.pt",
        ),
        licence="MIT (SkyScript repository; the checkpoints carry no separate licence)",
        image_size=224,
        context_length=77,
        tasks=_CLIP_TASKS,
        description=(
            f"SkyCLIP {arch} (SkyScript, AAAI 2024): CLIP continually pre-trained on SkyScript "
            + (
                "top-50% pairs (filtered by OpenAI CLIP), initialised from LAION-2B e16. "
                if b32
                else "top-30% pairs filtered by the CLIP-LAION-RS model, initialised from OpenAI "
                "(the best SkyScript L/14: 60.69 mean top-1 on its 7 scene datasets). "
            )
            + "Published as a zip of an open_clip training checkpoint "
            "({'epoch', 'state_dict', 'optimizer'})."
        ),
        notes=(
            "Not on Hugging Face: an S3 zip without checksum or version, so it cannot be pinned. "
            "The member name 'epoch_20.pt' follows the paths RS-OVSS and SegEarth-OV check in; "
            "rsvl extracts the *.pt whose name matches (or the only *.pt). "
            + (
                "nn.GELU: initialised from LAION-2B ViT-B-32 (nn.GELU)."
                if b32
                else "QuickGELU is inferred from the OpenAI initialisation (SkyScript trains with "
                "--pretrained openai); FarSLIP's benchmark loaded SkyCLIP with nn.GELU."
            )
        ),
    )


_OPENAI_B32_REV = "ab5b8ef490e86faa07d3523926b842c765de1de5"  # tree with open_clip files


def _openai(arch: str) -> ModelCard:
    repo = {
        "ViT-B-16": "timm/vit_base_patch16_clip_224.openai",
        "ViT-B-32": "timm/vit_base_patch32_clip_224.openai",
        "ViT-L-14": "timm/vit_large_patch14_clip_224.openai",
    }[arch]
    rev = _OPENAI_B32_REV if arch == "ViT-B-32" else None
    return ModelCard(
        name="openai-" + arch.lower().replace("vit-b-", "vit-b").replace("vit-l-", "vit-l"),
        family="clip",
        architecture=arch,
        quick_gelu=True,
        source=WeightsSource(
            filename=f"openai_{arch}.bin",
            hf_repo=repo,
            hf_filename="open_clip_pytorch_model.bin",
            revision=rev,
        ),
        licence="MIT (OpenAI CLIP release; the timm mirror is tagged Apache-2.0)",
        image_size=224,
        context_length=77,
        tasks=_CLIP_TASKS,
        description=(
            f"OpenAI CLIP {arch} (WIT-400M), the general-domain baseline every RS CLIP is compared "
            "with, as the JIT-free open_clip state dict that open_clip itself downloads."
        ),
        notes=(
            f"Revision {rev[:7]} is a tree of {repo} that holds open_clip_pytorch_model.bin. "
            if rev
            else "Revision not pinned: no commit of this timm repository could be confirmed "
            "offline, so downloads follow 'main'. "
        )
        + "No published sha256 for this file (OpenAI's own URLs hash the TorchScript archives, "
        "which rsvl does not load).",
    )


#: the published RS CLIPs and the OpenAI baselines
CARDS: tuple[ModelCard, ...] = (
    _farslip(1, 16),
    _farslip(1, 32),
    _farslip(2, 16),
    _farslip(2, 32),
    _remoteclip("RN50"),
    _remoteclip("ViT-B-32"),
    _remoteclip("ViT-L-14"),
    _georsclip("ViT-B-32"),
    _georsclip("ViT-H-14"),
    _skyclip("ViT-B-32"),
    _skyclip("ViT-L-14"),
    _openai("ViT-B-16"),
    _openai("ViT-B-32"),
    _openai("ViT-L-14"),
)


def open_clip_architecture_card(arch: str, known: list[str]) -> ModelCard | None:
    """An unregistered card for a bare open_clip architecture name (``ViT-S-32``,
    ``ViT-B-16-quickgelu``), for checkpoints the user trained (``rsvl train clip``) and
    loads with ``--weights``; None when ``arch`` is not in ``known`` (open_clip's list)."""
    base = arch.strip()
    quick = base.lower().endswith("-quickgelu")
    if quick:
        base = base[: -len("-quickgelu")]
    match = next((k for k in known if k.lower() == base.lower()), None)
    if match is None:
        return None
    return ModelCard(
        name=normalise_name(arch),
        family="clip",
        architecture=match,
        quick_gelu=quick,
        source=WeightsSource(filename=f"{match}.pt", unpublished="A bare open_clip architecture has no weights file of its own."),
        licence="as the checkpoint's",
        description=f"open_clip {match} from a local checkpoint",
        tasks=_CLIP_TASKS,
        notes="Not a registered model: built from open_clip's architecture config and --weights.",
    )
