"""``rsvl train fsvlm --model fsvlm-7b|fsvlm-13b|lisa-7b-v1``: LISA / FSVLM training as
upstream's ``train_ds.py`` does it (``../shared/reference/farslip-fsvlm-fianet.md`` 2.1-2.2),
with Lightning instead of DeepSpeed.

**Start.** ``--base`` is a LLaVA folder (LLaMA + ``mm_projector``, what upstream's
``--version`` names) or a LISA / FSVLM folder (merged, or an unmerged training output: it is
merged first). From a LLaVA base, SAM comes from ``--sam`` (``sam_vit_h_4b8939.pth``),
``text_hidden_fcs`` is new (PyTorch's default init), and ``[SEG]`` then the card's image
markers are added to the base's tokenizer (those it lacks), the new rows of ``embed_tokens``
and ``lm_head`` set to the mean of the old ones [inf: LLaVA's ``initialize_vision_tokenizer``
rule; upstream's ``resize_token_embeddings`` draws them at random]. From a LISA base, SAM,
``text_hidden_fcs`` and the tokens are the base's own. The CLIP tower is ``--vision-tower``
(else ``BASE/vision_tower``, rsvl's cache, the Hugging Face cache of
``openai/clip-vit-large-patch14``).

**What trains.** peft LoRA (r 8, alpha 16, dropout 0.05) on every LLaMA ``q_proj`` /
``v_proj`` (named in full, so SAM's attention projections, also called ``q_proj`` /
``v_proj``, are not wrapped); ``mask_decoder``, ``text_hidden_fcs``, ``lm_head`` and
``embed_tokens`` in full. Frozen: CLIP, ``mm_projector``, SAM's image and prompt encoders
and every other LLaMA weight.

**Data.** A FIT-layout folder (:mod:`rsvl.data.farmseg`): each train image gets one of
FSVLM's four questions with its ``img_description_eg`` in front (or the json's own
``question``) and one of FSVLM's five answers, in the llava_v1 conversation
``{system} USER: <im_start><image><im_end>\\n{question} ASSISTANT: {answer}</s>`` (FSVLM's
``<|im_start|>``/``<|im_end|>`` for the FSVLM cards), tokenised as LLaVA's
``tokenizer_image_token`` does, truncated to ``max_length`` counting the image's patch tokens.
The image goes to CLIP (224 px centre crop) and to SAM (ResizeLongestSide(1024), SAM's
normalisation, zero padding); the label is compared at its own size.

**Loss.** ``1.0 * CE + 2.0 * BCE + 0.5 * Dice``: CE over the answer tokens and ``</s>``
(BOS, system, question and image positions are -100), mean over the batch's tokens; each
``[SEG]`` takes the last-layer state of the position before it -> ``text_hidden_fcs`` ->
SAM's decoder (``no_mask_embed``, one mask) -> ``postprocess_masks`` to the label's size;
BCE and Dice (:mod:`rsvl.models.lisa.loss`) are averaged over the batch's masks.

**Schedule.** AdamW (lr 3e-4, betas 0.9 / 0.95, weight decay 0), DeepSpeed's WarmupDecayLR
(linear from 0 over ``warmup`` = 100 optimiser steps, then linear to 0 at ``steps``), gradient
clipping 1.0, ``batch_size`` x ``grad_accumulation`` samples per optimiser step (upstream:
2 x 5, 10 epochs x 1000 steps). bf16 autocast on CUDA, fp32 on the CPU.

**Output** (``OUT``): ``merged/`` (the published layout, :func:`rsvl.models.lisa.save.save_merged`:
what ``rsvl.load(card, weights=OUT/merged)`` and ``rsvl segment --weights`` read),
``lora/pytorch_model.bin`` (upstream's unmerged ``zero_to_fp32`` layout, with config,
tokenizer and ``adapter_config.json``: it loads the same way and merges to the same model),
``checkpoints/last.ckpt`` (the trained tensors, optimiser, schedule and step: ``--resume``
continues from it) and ``summary.json``. Upstream's in-training validation (teacher-forced
``[SEG].`` on the test split) is not run: score the result with ``rsvl eval farmland``.
"""

from __future__ import annotations

import json
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import peft
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import Tensor, nn

from rsvl.console import state as console
from rsvl.data.farmseg import ANSWER_TEMPLATES, FarmSample, read_split
from rsvl.errors import (
    CheckpointMismatchError,
    DatasetError,
    OutputError,
    ResumeError,
    UnknownModelError,
    WeightsNotFoundError,
)
from rsvl.io import read_rgb, write_text
from rsvl.models.cards import ModelCard, find_card
from rsvl.models.device import check_device
from rsvl.models.lisa import CARDS, LisaSeg
from rsvl.models.lisa.build import assemble, vision_path
from rsvl.models.lisa.config import lisa_fields
from rsvl.models.lisa.convert import (
    DEFAULT_LORA_ALPHA,
    DROPPED,
    clean_state_dict,
    is_unmerged,
    merge_lora,
    projector_of,
)
from rsvl.models.lisa.loss import BCE_WEIGHT, CE_WEIGHT, DICE_WEIGHT, bce_loss, dice_loss
from rsvl.models.lisa.model import clip_pixels
from rsvl.models.lisa.network import text_hidden_fcs
from rsvl.models.lisa.prompt import IMAGE_TOKEN_INDEX, build_prompt, prompt_ids
from rsvl.models.lisa.save import lisa_config, save_merged, save_unmerged
from rsvl.models.lisa.tokenizer import SEG_TOKEN, LisaTokenizer
from rsvl.models.llava.config import read_json
from rsvl.models.llava.convert import read_weights
from rsvl.models.llava.prompt import tokenize_prompt
from rsvl.models.sam.build import load_sam
from rsvl.models.sam.transforms import ResizeLongestSide
from rsvl.train.resume import fit

IGNORE = -100
#: parameters trained in full (upstream's name fragments)
TRAINABLE: tuple[str, ...] = ("lm_head", "embed_tokens", "mask_decoder", "text_hidden_fcs")
#: modules never wrapped with LoRA (upstream's find_linear_layers exclusions)
LORA_EXCLUDED: tuple[str, ...] = ("visual_model", "vision_tower", "mm_projector", "text_hidden_fcs")
#: the LLaVA parts a LLaVA base may hold (its CLIP tower keys are dropped)
_LLAVA_PARTS: tuple[str, ...] = ("model.embed_tokens.", "model.layers.", "model.norm.", "lm_head.", "model.mm_projector.")


@dataclass
class LisaTrainConfig:
    """Upstream's ``train_ds.py`` defaults (FSVLM's loss weights)."""

    steps: int = 10_000  # optimiser steps: 10 epochs x 1000
    batch_size: int = 2
    grad_accumulation: int = 5
    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    warmup: int = 100
    grad_clip: float = 1.0
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")
    ce_weight: float = CE_WEIGHT
    bce_weight: float = BCE_WEIGHT
    dice_weight: float = DICE_WEIGHT
    max_length: int = 512
    save_every: int = 500  # optimiser steps between resume checkpoints
    save_dtype: str = "float32"  # of merged/ (lora/ is float32, as zero_to_fp32 writes it)
    seed: int = 42
    device: str = "auto"
    max_minutes: float | None = None
    num_workers: int = 0
    limit_train: int | None = None
    threads: int | None = None


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# --------------------------------------------------------------------------------------------
# the starting model
# --------------------------------------------------------------------------------------------


def lisa_card(name: str | ModelCard) -> ModelCard:
    """The LISA-family card to train, or an :class:`UnknownModelError` naming those there are."""
    card = find_card(CARDS, name)
    if card is None:
        names = ", ".join(c.name for c in CARDS)
        raise UnknownModelError(f"rsvl train fsvlm cannot train {name!r}: it is not a LISA-family model.",
                                hint=f"Train mini-fsvlm (built in) or one of {names} (with --base, --sam).")
    return card


@dataclass
class Start:
    """What a run starts from."""

    model: LisaSeg
    #: the folder whose config.json and tokenizer files the outputs carry
    base: Path
    #: "llava" (new SAM / [SEG] head) or "lisa" (fine-tuning a LISA / FSVLM folder)
    kind: str
    config: dict[str, Any]
    vision: Path
    added_tokens: list[str]


def _grow(weight: Tensor, rows: int) -> Tensor:
    """``weight`` with new rows set to the mean of the old ones."""
    extra = rows - weight.shape[0]
    if extra <= 0:
        return weight
    mean = weight.float().mean(0, keepdim=True).to(weight.dtype)
    return torch.cat([weight, mean.expand(extra, -1)])


def base_state_dict(folder: Path, lora_alpha: float | None = None) -> tuple[dict[str, Tensor], str]:
    """(merged state dict, ``"lisa"`` or ``"llava"``) of a base folder's weights."""
    raw = read_weights(folder, "Base model folder")
    source = f"Base model in {folder}"
    if is_unmerged(raw):
        alpha = lora_alpha
        if alpha is None and (folder / "adapter_config.json").is_file():
            alpha = float(read_json(folder / "adapter_config.json", "Adapter config").get("lora_alpha", 16))
        raw, _ = merge_lora(raw, DEFAULT_LORA_ALPHA if alpha is None else alpha, source)
    if any(k.startswith("model.visual_model.") for k in raw):
        return clean_state_dict(raw, source), "lisa"
    sd = {k: v for k, v in raw.items() if not any(frag in k for frag in DROPPED)}
    unknown = sorted(k for k in sd if not k.startswith(_LLAVA_PARTS))
    if unknown:
        raise CheckpointMismatchError(
            f"{source} has {len(unknown)} key(s) that are no part of a LLaVA-v1 or LISA model: "
            f"{', '.join(unknown[:8])}.",
            hint="--base is the LLaVA folder upstream trains from (e.g. LLaVA-Lightning-7B-v1-1) or a "
            "LISA / FSVLM folder.")
    if "model.embed_tokens.weight" not in sd or "lm_head.weight" not in sd:
        raise CheckpointMismatchError(f"{source} has no model.embed_tokens / lm_head weights: it is not a LLaMA.",
                                      hint="Point --base at a LLaVA or LISA folder.")
    projector_of(sd)  # refuses a base without mm_projector
    return sd, "llava"


def start_model(card: str | ModelCard, base: str | Path, *, vision_tower: str | Path | None = None,
                sam: str | Path | None = None, seed: int = 42,
                log: Callable[[str], None] = console.notice) -> Start:
    """The model a run starts from (fp32, CPU, every parameter frozen); see the module doc."""
    card = lisa_card(card)
    folder = Path(base).expanduser()
    if not (folder / "config.json").is_file():
        what = "does not exist" if not folder.exists() else "has no config.json"
        raise WeightsNotFoundError(
            f"--base {folder} {what}: training starts from a LLaVA or LISA folder.",
            hint="Pass --base LLAVA_FOLDER (upstream's --version, e.g. LLaVA-Lightning-7B-v1-1 for the 7B cards) "
            "with --sam sam_vit_h_4b8939.pth, or --base LISA_FOLDER to fine-tune a LISA / FSVLM model.")
    cfg = dict(read_json(folder / "config.json", "Base model config"))
    sd, kind = base_state_dict(folder)
    if kind == "llava":  # train_ds.py's --use_mm_start_end (default True), whatever the base used
        cfg["mm_use_im_start_end"] = True
    fields = lisa_fields(cfg)
    tokenizer = LisaTokenizer.from_folder(folder)
    rows = int(sd["model.embed_tokens.weight"].shape[0])
    if len(tokenizer) != rows:
        raise CheckpointMismatchError(
            f"The tokenizer in {folder} has {len(tokenizer)} tokens but the base's embeddings have {rows} rows.",
            hint="Use the base model's own tokenizer files (tokenizer.model, added_tokens.json).")
    markers = tuple(card.metadata.get("image_markers", ())) if fields.use_im_start_end else ()
    added = tokenizer.add_tokens([SEG_TOKEN, *markers])
    vocab = len(tokenizer)
    hidden = int(sd["model.embed_tokens.weight"].shape[1])
    if added:
        sd["model.embed_tokens.weight"] = _grow(sd["model.embed_tokens.weight"], vocab)
        sd["lm_head.weight"] = _grow(sd["lm_head.weight"], vocab)
        log(f"added {', '.join(added)} to the tokenizer (ids {rows}-{vocab - 1})")
    if kind == "llava":
        if sam is None:
            raise WeightsNotFoundError(
                f"--base {folder} is a LLaVA model without SAM: the mask decoder starts from SAM's weights.",
                hint="Pass --sam sam_vit_h_4b8939.pth (Meta's SAM ViT-H, upstream's --vision_pretrained).")
        sam_model = load_sam(Path(sam).expanduser())
        sd.update({f"model.visual_model.{k}": v for k, v in sam_model.state_dict().items()})
        torch.manual_seed(seed)
        fcs = text_hidden_fcs(hidden, int(sam_model.config.prompt_embed_dim))
        sd.update({f"model.text_hidden_fcs.{k}": v for k, v in fcs.state_dict().items()})
        sd = clean_state_dict(sd, f"Base model in {folder} with SAM {sam}")
    elif sam is not None:
        log(f"--sam {sam} is not used: the LISA base {folder} has its own SAM")
    vision = vision_path(card, folder, vision_tower)
    model = assemble(card, cfg, sd, tokenizer, vision, device="cpu", dtype=torch.float32,
                     source=f"Base model in {folder}")
    return Start(model, folder, kind, cfg, vision, added)


def lora_names(net: nn.Module, targets: Sequence[str]) -> list[str]:
    """Full names of the LLaMA Linear layers LoRA wraps (upstream's ``find_linear_layers``)."""
    return sorted(name for name, m in net.named_modules()
                  if isinstance(m, nn.Linear) and not any(x in name for x in LORA_EXCLUDED)
                  and name.rsplit(".", 1)[-1] in targets)


def add_lora(model: LisaSeg, cfg: LisaTrainConfig) -> peft.PeftModel:
    """Wrap ``model.net`` with peft LoRA (in place) and unfreeze :data:`TRAINABLE`; returns
    the peft model whose ``state_dict`` is upstream's unmerged layout."""
    targets = lora_names(model.net, cfg.lora_targets)
    if not targets:
        raise CheckpointMismatchError(f"The model has no {', '.join(cfg.lora_targets)} layers to adapt.")
    lcfg = peft.LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                           target_modules=targets, bias="none")
    wrapped = peft.get_peft_model(model.net, lcfg)
    for name, p in model.net.named_parameters():
        if any(x in name for x in TRAINABLE) or ".lora_" in name:
            p.requires_grad_(True)
    return wrapped


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------


def conversation(tokenizer: LisaTokenizer, request: str, answer: str, markers: Sequence[str] | None,
                 max_length: int, image_tokens: int) -> tuple[list[int], list[int]]:
    """(ids with one :data:`IMAGE_TOKEN_INDEX`, labels): llava_v1 with the answer and ``</s>``,
    everything before the answer -100 (see the module doc)."""
    prompt = prompt_ids(request, tokenizer.encode, tokenizer.bos_id, markers)
    ids = tokenize_prompt(f"{build_prompt(request, markers)} {answer}", tokenizer.encode, tokenizer.bos_id,
                          IMAGE_TOKEN_INDEX) + [tokenizer.eos_id]
    if ids[: len(prompt)] != prompt:  # the answer must not change how the prompt tokenises
        raise DatasetError(f"the answer {answer!r} changes the tokens of the question before it.")
    labels = [IGNORE] * len(prompt) + ids[len(prompt):]
    keep = max(1, max_length - (image_tokens - 1))
    return ids[:keep], labels[:keep]


class FitTrainSet(torch.utils.data.Dataset):
    """FIT-layout train samples as tensors: CLIP input, SAM input (resized, not yet
    normalised), label, conversation ids and labels. Question and answer templates are drawn
    per access (upstream draws them per sample, every epoch)."""

    def __init__(self, samples: Sequence[FarmSample], model: LisaSeg, max_length: int, seed: int) -> None:
        if model.tokenizer is None:
            raise ValueError("the model has no tokenizer")
        self.samples = list(samples)
        self.tokenizer = model.tokenizer
        self.markers = model.markers
        self.clip_size = model.clip_size
        self.mean, self.std = model.mean, model.std
        self.resize = ResizeLongestSide(model.net.sam.img_size)
        self.image_tokens = (model.clip_size // int(model.vision_tower.config.patch_size)) ** 2
        self.max_length = max_length
        self.rng = random.Random(seed)
        self._worker: int | None = None

    def __len__(self) -> int:
        return len(self.samples)

    def _draw(self) -> random.Random:
        """The template RNG: in a DataLoader worker, one seeded by the worker's own seed
        (a worker's copy of the parent's RNG would repeat every other worker's draws)."""
        info = torch.utils.data.get_worker_info()
        if info is not None and self._worker != info.id:
            self.rng, self._worker = random.Random(info.seed), info.id
        return self.rng

    def __getitem__(self, i: int) -> dict[str, Any]:
        s = self.samples[i]
        rng = self._draw()
        rgb = read_rgb(s.image)
        label = s.read_label()
        if label.shape != rgb.shape[:2]:
            raise DatasetError(f"{s.label} is {label.shape[1]} x {label.shape[0]} px but {s.image} is "
                               f"{rgb.shape[1]} x {rgb.shape[0]}.", hint="A label has its image's size.")
        ids, labels = conversation(self.tokenizer, s.request(rng), rng.choice(ANSWER_TEMPLATES),
                                   self.markers, self.max_length, self.image_tokens)
        resized = self.resize.apply_image(rgb)
        return {"clip": clip_pixels(rgb, self.clip_size, self.mean, self.std)[0],
                "sam": torch.from_numpy(np.array(resized, copy=True)).permute(2, 0, 1),
                "label": torch.from_numpy(label), "ids": ids, "labels": labels}


def collate(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    return {"clip": torch.stack([it["clip"] for it in items]), "sam": [it["sam"] for it in items],
            "label": [it["label"] for it in items], "ids": [it["ids"] for it in items],
            "labels": [it["labels"] for it in items]}


# --------------------------------------------------------------------------------------------
# the loss
# --------------------------------------------------------------------------------------------


def lisa_losses(model: LisaSeg, batch: dict[str, Any], cfg: LisaTrainConfig | None = None) -> dict[str, Tensor]:
    """``{"loss", "ce", "bce", "dice"}`` of one batch (see the module doc)."""
    cfg = cfg or LisaTrainConfig()
    net, dev = model.net, model.device
    seg_id = model.seg_token_id
    with torch.no_grad():
        image_tokens = model.image_features(batch["clip"])
        sam = net.sam
        x = torch.cat([sam.preprocess(s[None].to(dev).float()) for s in batch["sam"]])
        embeddings = sam.encode_image(x.to(model.dtype))
    table = net.llm.embed_tokens
    rows, targets, tokens = [], [], []
    for i, (ids, labels) in enumerate(zip(batch["ids"], batch["labels"], strict=True)):
        pos = ids.index(IMAGE_TOKEN_INDEX)
        n = image_tokens.shape[1]
        before = table(torch.tensor(ids[:pos], device=dev))
        after = table(torch.tensor(ids[pos + 1:], device=dev, dtype=torch.long))
        rows.append(torch.cat([before, image_tokens[i].to(before.dtype), after]))
        targets.append(labels[:pos] + [IGNORE] * n + labels[pos + 1:])
        tokens.append(ids[:pos] + [IGNORE] * n + ids[pos + 1:])
    length = max(r.shape[0] for r in rows)
    embeds = torch.zeros(len(rows), length, rows[0].shape[1], device=dev, dtype=rows[0].dtype)
    mask = torch.zeros(len(rows), length, device=dev, dtype=torch.long)
    label_t = torch.full((len(rows), length), IGNORE, device=dev, dtype=torch.long)
    for i, r in enumerate(rows):
        embeds[i, : r.shape[0]] = r
        mask[i, : r.shape[0]] = 1
        label_t[i, : r.shape[0]] = torch.tensor(targets[i], device=dev)
    hidden = net.llm(inputs_embeds=embeds, attention_mask=mask, use_cache=False).last_hidden_state
    logits = net.lm_head(hidden)
    ce = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), label_t[:, 1:].flatten(), ignore_index=IGNORE)
    bce = dice = hidden.new_zeros((), dtype=torch.float32)
    n_masks = 0
    for i, seq in enumerate(tokens):
        where = [t for t in range(len(seq) - 1) if seq[t + 1] == seg_id]
        if not where:
            continue  # [SEG] truncated away
        states = hidden[i, where]
        size = tuple(batch["sam"][i].shape[-2:])
        gt = batch["label"][i].to(dev).float()
        pred = model.masks_from_states(states, embeddings[i: i + 1], size, tuple(gt.shape))
        target = gt.expand(len(where), -1, -1)
        bce = bce + bce_loss(pred, target) * len(where)
        dice = dice + dice_loss(pred, target) * len(where)
        n_masks += len(where)
    bce, dice = bce / (n_masks + 1e-8), dice / (n_masks + 1e-8)
    loss = cfg.ce_weight * ce + cfg.bce_weight * bce + cfg.dice_weight * dice
    return {"loss": loss, "ce": ce, "bce": bce, "dice": dice}


def warmup_decay(total: int, warmup: int) -> Callable[[int], float]:
    """DeepSpeed's WarmupDecayLR factor (linear warm-up from 0, linear decay to 0 at ``total``)."""
    def factor(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        return max(0.0, (total - step) / max(1, total - warmup))
    return factor


class LisaLitModule(L.LightningModule):
    """Trains a :class:`LisaSeg` whose net carries LoRA; checkpoints hold the trained tensors only."""

    def __init__(self, model: LisaSeg, cfg: LisaTrainConfig) -> None:
        super().__init__()
        self.model = model
        self.cfg = cfg
        self.strict_loading = False  # frozen weights come from --base, not from the checkpoint
        self.history: list[dict[str, float]] = []

    def trained_names(self) -> set[str]:
        return {n for n, p in self.named_parameters() if p.requires_grad}

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        parts = lisa_losses(self.model, batch, self.cfg)
        n = len(batch["ids"])
        for k, v in parts.items():
            self.log(f"train_{k}", v.detach(), prog_bar=k == "loss", on_step=True, batch_size=n)
        self.history.append({"step": int(self.global_step), **{k: float(v.detach()) for k, v in parts.items()}})
        return parts["loss"]

    def configure_optimizers(self) -> Any:
        params = [p for p in self.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=self.cfg.lr, betas=tuple(self.cfg.betas),
                                weight_decay=self.cfg.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_decay(self.cfg.steps, self.cfg.warmup))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        keep = self.trained_names()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        checkpoint["rsvl_history"] = self.history

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        missing = sorted(self.trained_names() - set(checkpoint["state_dict"]))
        if missing:
            raise ResumeError(f"the checkpoint lacks {len(missing)} trained tensors (e.g. {missing[:3]}).",
                              hint="Resume with the same --model, --base and LoRA settings it was trained with.")
        self.history = list(checkpoint.get("rsvl_history", []))


class _Log(L.Callback):
    def __init__(self, log: Callable[[str], None], every: int) -> None:
        self.emit, self.every, self.t0 = log, max(1, every), time.time()

    def on_train_batch_end(self, trainer: Any, module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if module.history and (batch_idx + 1) % (self.every * trainer.accumulate_grad_batches) == 0:
            h = module.history[-1]
            lr = trainer.optimizers[0].param_groups[0]["lr"]
            self.emit(f"step {trainer.global_step}: loss {h['loss']:.4f} (ce {h['ce']:.4f}, bce {h['bce']:.4f}, "
                      f"dice {h['dice']:.4f}), lr {lr:.2e}, {time.time() - self.t0:.0f} s")


# --------------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------------


def _merged_state(wrapped: peft.PeftModel, alpha: float) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(upstream's unmerged state dict, the merged one) of the trained model."""
    raw = {k: v.detach().float().cpu() for k, v in wrapped.state_dict().items()
           if "rotary_emb" not in k}
    merged, _ = merge_lora(raw, alpha, "The trained model")
    return raw, clean_state_dict(merged, "The trained model")


def _link_tower(folder: Path, vision: Path) -> None:
    if vision.is_dir() and not (folder / "vision_tower").exists():
        (folder / "vision_tower").symlink_to(vision.resolve(), target_is_directory=True)


def train_lisa(model_name: str, data: str | Path, out: str | Path, config: LisaTrainConfig | None = None, *,
               base: str | Path | None = None, vision_tower: str | Path | None = None, sam: str | Path | None = None,
               resume: bool = False, quiet: bool = False, log: Callable[[str], None] | None = None,
               start: Start | None = None) -> dict[str, Any]:
    """Train a LISA-family model on ``data/train``; write ``out/merged``, ``out/lora``,
    ``out/checkpoints/last.ckpt`` and ``out/summary.json`` (see the module doc). ``start``
    replaces building from ``base`` (tests)."""
    cfg = config or LisaTrainConfig()
    log = log or (lambda m: None if quiet else print(m, file=sys.stderr, flush=True))
    card = lisa_card(model_name)
    device = check_device(cfg.device)
    accel = "gpu" if device.startswith("cuda") else "cpu"
    save_dtype = DTYPES.get(cfg.save_dtype)
    if save_dtype is None:
        raise OutputError(f"--save-dtype {cfg.save_dtype!r} is not a dtype rsvl saves.",
                          hint=f"Use one of {', '.join(DTYPES)}.")
    out = Path(out)
    last = out / "checkpoints" / "last.ckpt"
    if resume and not last.is_file():
        raise ResumeError(f"nothing to resume: {last} not found.", hint="Run once without --resume.")
    samples = read_split(data, "train")
    if start is None:
        if base is None:
            raise WeightsNotFoundError(f"training {card.name} needs --base (a LLaVA or LISA folder).",
                                       hint="Pass --base LLAVA_FOLDER --sam sam_vit_h_4b8939.pth.")
        start = start_model(card, base, vision_tower=vision_tower, sam=sam, seed=cfg.seed, log=log)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    rng = random.Random(cfg.seed)
    if cfg.limit_train:
        samples = rng.sample(samples, min(cfg.limit_train, len(samples)))
    out.mkdir(parents=True, exist_ok=True)
    model = start.model
    wrapped = add_lora(model, cfg)
    model.train()
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log(f"{card.name} from {start.kind} base {start.base}: {len(samples)} train samples, "
        f"{n_train / 1e6:.1f} M trained parameters")
    ds = FitTrainSet(samples, model, cfg.max_length, cfg.seed)
    loader = torch.utils.data.DataLoader(ds, batch_size=cfg.batch_size, shuffle=True, collate_fn=collate,
                                         num_workers=cfg.num_workers,
                                         generator=torch.Generator().manual_seed(cfg.seed))
    module = LisaLitModule(model, cfg)
    ckpt = ModelCheckpoint(dirpath=out / "checkpoints", filename="last", every_n_train_steps=cfg.save_every,
                           save_top_k=1, monitor=None, enable_version_counter=False)
    precision = "bf16-mixed" if accel == "gpu" and torch.cuda.is_bf16_supported() else \
        ("16-mixed" if accel == "gpu" else "32-true")
    trainer = L.Trainer(
        max_steps=cfg.steps, max_epochs=-1, accelerator=accel, devices=1, precision=precision,
        accumulate_grad_batches=cfg.grad_accumulation, gradient_clip_val=cfg.grad_clip,
        callbacks=[ckpt, _Log(log, 25)], default_root_dir=str(out), logger=False,
        max_time={"minutes": cfg.max_minutes} if cfg.max_minutes else None,
        enable_progress_bar=not quiet and sys.stderr.isatty(), enable_model_summary=False,
        num_sanity_val_steps=0, limit_val_batches=0,
    )
    resumed_from = None
    if resume:
        resumed_from = int(torch.load(last, map_location="cpu", weights_only=True).get("global_step", 0))
        log(f"resuming from {last} (step {resumed_from})")
    t0 = time.time()
    fit(trainer, module, loader, ckpt_path=last if resume else None)
    trainer.save_checkpoint(last, weights_only=False)  # optimiser, schedule and step too
    model.eval()
    tok = model.tokenizer
    assert tok is not None
    raw, merged = _merged_state(wrapped, cfg.lora_alpha)
    out_cfg = lisa_config(start.config, vocab_size=len(tok),
                          vision_width=projector_of(merged)[1],
                          out_dim=int(merged["model.text_hidden_fcs.0.2.weight"].shape[0]),
                          vision_tower=str(card.metadata.get("vision_repo", "openai/clip-vit-large-patch14")),
                          dtype=torch.float32)
    lora_dir = save_unmerged(out / "lora", raw, out_cfg, tok, start.base, r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                             lora_dropout=cfg.lora_dropout, target_modules=list(cfg.lora_targets),
                             base=str(start.base))
    del raw
    merged_dir = save_merged(out / "merged", merged, out_cfg, tok, start.base, dtype=save_dtype)
    for folder in (lora_dir, merged_dir):
        _link_tower(folder, start.vision)
    hist = module.history
    summary: dict[str, Any] = {
        "model": card.name, "base": str(start.base), "base_kind": start.kind, "added_tokens": start.added_tokens,
        "seg_token_id": model.seg_token_id, "data": str(Path(data).resolve()), "train_samples": len(samples),
        "config": asdict(cfg), "steps": int(trainer.global_step), "resumed_from": resumed_from,
        "precision": precision, "seconds": round(time.time() - t0, 1),
        "first_loss": hist[0] if hist else None, "last_loss": hist[-1] if hist else None,
        "merged": str(merged_dir), "lora": str(lora_dir / "pytorch_model.bin"), "checkpoint": str(last),
        "load": f"rsvl.load({card.name!r}, weights={str(merged_dir)!r})",
    }
    write_text(out / "summary.json", json.dumps({**summary, "history": hist}, indent=2, default=str) + "\n")
    return summary


__all__ = ["LisaLitModule", "LisaTrainConfig", "Start", "add_lora", "base_state_dict", "conversation",
           "lisa_card", "lisa_losses", "lora_names", "start_model", "train_lisa", "warmup_decay"]
