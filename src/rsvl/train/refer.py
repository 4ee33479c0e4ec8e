"""Train a referring-segmentation model (FIANet or the built-in mini-refer) with Lightning.

    rsvl train refer --model mini-refer --data DATA --out runs/mini-refer
    rsvl train refer --model fianet --data ROOT --out runs/fianet   # GPU

The recipe is FIANet's (``../shared/reference/farslip-fsvlm-fianet.md`` 3.1, 3.3):

* images resized to ``model.image_size`` squared (bilinear), masks NEAREST, the model's
  normalisation;
* loss = 0.9 x class-weighted cross-entropy (weights [0.9, 1.1] for background/referred,
  PyTorch's weighted mean) + 0.1 x Dice (:func:`dice_loss`);
* AdamW (weight decay 1e-2), what is trained comes from ``model.param_groups`` (for FIANet:
  the backbone, the classifier and BERT layers 0-9), poly LR ``(1 - it / N) ** 0.9`` stepped
  per iteration;
* AMP (bfloat16/float16 autocast) on CUDA, checkpoints every epoch (``last.ckpt`` and the
  best one), ``--resume`` continues from ``last.ckpt``;
* the best checkpoint is selected on the **val** split (by oIoU, as upstream does on its
  test split; never the test split here).

Two departures are options, not defaults for FIANet: the RRSIS-D augmentation (20% of the
training references get 20-60 black 32x32 boxes) is applied on the image path only; and
models with frozen towers (mini-refer) use
a **feature cache**: the towers' outputs for every image (and every expression) are
computed once and stored on disk, so an epoch only runs the decoder. Each training
sample is then seen in one of three views chosen at random: as is, or with the cached
feature maps, the pooled image and the mask flipped left-right or top-bottom, paired with the expression whose
direction words are swapped (:func:`flip_expression`: "leftmost" <-> "rightmost", "upper
left" <-> "lower left", ...), so the geometry words stay true. (Flipping the cached
features approximates the features of a flipped image; the towers are not re-run.)
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from safetensors.torch import save_file

from rsvl.data.refer import RRSISD, decode_segmentation
from rsvl.errors import DatasetError, ResumeError, UnknownModelError, WeightsNotFoundError
from rsvl.io import atomic_path, write_text
from rsvl.metrics import ReferringAccumulator
from rsvl.models import registry
from rsvl.models.cards import normalise_name
from rsvl.models.checkpoint import read_file
from rsvl.models.device import check_device
from rsvl.models.mini.refer import ReferDecoder, save_decoder
from rsvl.train.refer_data import (
    VIEWS,
    CachedReferDataset,
    FeatureCache,
    ImageReferDataset,
    collate_cached,
    collate_images,
    normalise,
    resize_mask,
)
from rsvl.train.resume import fit

__all__ = [
    "CE_WEIGHTS",
    "ReferLitModule",
    "ReferTrainConfig",
    "model_to_train",
    "dice_loss",
    "reference_baselines",
    "refer_loss",
    "train_refer",
]

#: FIANet's class weights of the cross-entropy (background, referred object)
CE_WEIGHTS = (0.9, 1.1)
CE_FACTOR, DICE_FACTOR = 0.9, 0.1
MODELS = ("mini-refer", "fianet")


# --------------------------------------------------------------------------------------
# loss
# --------------------------------------------------------------------------------------


def dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1e-6) -> torch.Tensor:
    """Soft Dice of the softmax against the one-hot target, sums over batch x class x pixels.

    ``1 - (2 * sum(p * t) + smooth) / (sum(p) + sum(t) + smooth)`` where the sums run over
    every sample, both classes and every pixel at once (FIANet / RMSIN: softmax, one-hot
    target, smooth 1e-6).
    """
    p = logits.float().softmax(1)
    t = F.one_hot(target.long(), p.shape[1]).permute(0, 3, 1, 2).to(p.dtype)
    inter = (p * t).sum()
    return 1 - (2 * inter + smooth) / (p.sum() + t.sum() + smooth)


def refer_loss(logits: torch.Tensor, target: torch.Tensor,
               ce_weights: Sequence[float] = CE_WEIGHTS, ce_factor: float = CE_FACTOR,
               dice_factor: float = DICE_FACTOR) -> torch.Tensor:
    """FIANet's loss: ``0.9 * CE(weights [0.9, 1.1]) + 0.1 * Dice``.

    ``logits`` (B, 2, H, W), ``target`` (B, H, W) in {0, 1}. The CE is PyTorch's weighted
    mean: sum of w[y] * -log p[y] over pixels divided by the sum of w[y].
    """
    w = torch.tensor(ce_weights, dtype=torch.float32, device=logits.device)
    ce = F.cross_entropy(logits.float(), target.long(), weight=w)
    return ce_factor * ce + dice_factor * dice_loss(logits, target)



def reference_baselines(data: str | Path, split: str = "val", size: int | None = 480) -> dict[str, dict[str, float]]:
    """Reference points scored exactly like a model (per sentence, at ``size`` with the GT
    NEAREST-resized): ``empty`` (predict nothing), ``full`` (the whole image) and
    ``class_union`` (the union of every instance of the referred object's class in the
    image: what knowing the class name, but not which one, gives)."""
    ds = RRSISD(data, split)
    accs = {k: ReferringAccumulator() for k in ("empty", "full", "class_union")}
    by_image: dict[Any, list[dict[str, Any]]] = {}
    for ann in ds.anns.values():
        by_image.setdefault(ann["image_id"], []).append(ann)
    for ref, _ in ds.pairs:
        im = ds.images[ref["image_id"]]
        h, w = int(im["height"]), int(im["width"])
        gt = ds.mask(ref)
        target = ds.anns[ref["ann_id"]]
        union = np.zeros((h, w), dtype=bool)
        for ann in by_image.get(ref["image_id"], []):
            if ann.get("category_id") == target.get("category_id"):
                union |= decode_segmentation(ann["segmentation"], h, w, "union")
        if size:
            gt, union = resize_mask(gt, size), resize_mask(union, size)
        accs["empty"].update(np.zeros_like(gt), gt)
        accs["full"].update(np.ones_like(gt), gt)
        accs["class_union"].update(union, gt)
    return {k: a.compute() for k, a in accs.items()}


# --------------------------------------------------------------------------------------
# Lightning module
# --------------------------------------------------------------------------------------


def poly_lambda(total_steps: int, power: float = 0.9) -> Callable[[int], float]:
    """``(1 - it / N) ** power`` (FIANet's per-iteration schedule), floored at 0."""
    return lambda it: max(0.0, 1.0 - it / max(1, total_steps)) ** power


class ReferLitModule(L.LightningModule):
    """Trains any model with the shared referring interface; validates mIoU / oIoU / Pr@0.5.

    Batches are either ``{"image" (uint8), "text", "mask"}`` (full forward) or the cached
    form ``{"feats", "small", "words", "text_mask", "mask"}`` (``model.decode``).
    Checkpoints hold only what is not a frozen tower (``model.frozen_prefixes``).
    """

    def __init__(self, model: Any, *, lr: float, weight_decay: float = 1e-2,
                 total_steps: int = 1000, ce_weights: Sequence[float] = CE_WEIGHTS) -> None:
        super().__init__()
        self.model = model
        self.lr = lr
        self.weight_decay = weight_decay
        self.total_steps = total_steps
        self.ce_weights = tuple(ce_weights)
        self.strict_loading = False  # frozen towers are rebuilt from their packages
        self._val: list[tuple[float, int, int]] = []
        self.history: list[dict[str, float]] = []

    def _frozen_prefixes(self) -> tuple[str, ...]:
        return tuple("model." + p for p in getattr(self.model, "frozen_prefixes", ()))

    def logits(self, batch: dict[str, Any]) -> torch.Tensor:
        if "feats" in batch:
            return self.model.decode(tuple(batch["feats"]), batch["small"], batch["words"],
                                     batch["text_mask"], tuple(batch["mask"].shape[-2:]))
        images = normalise(batch["image"], self.model.mean, self.model.std)
        return self.model(images, batch["text"])

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = refer_loss(self.logits(batch), batch["mask"], self.ce_weights)
        self.log("train_loss", loss, prog_bar=True, on_step=True, on_epoch=True,
                 batch_size=batch["mask"].shape[0])
        return loss

    def on_validation_epoch_start(self) -> None:
        self._val = []

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        logits = self.logits(batch)
        loss = refer_loss(logits, batch["mask"], self.ce_weights)
        self.log("val_loss", loss, on_epoch=True, batch_size=batch["mask"].shape[0])
        pred = logits.argmax(1).bool()
        gt = batch["mask"].bool()
        inter = (pred & gt).flatten(1).sum(1)
        union = (pred | gt).flatten(1).sum(1)
        for i, u in zip(inter.tolist(), union.tolist(), strict=True):
            self._val.append((i / u if u else 0.0, i, u))

    def on_validation_epoch_end(self) -> None:
        if not self._val:
            return
        ious = np.array([v[0] for v in self._val])
        cum_u = sum(v[2] for v in self._val)
        metrics = {"val_mIoU": float(ious.mean()),
                   "val_oIoU": float(sum(v[1] for v in self._val) / cum_u) if cum_u else 0.0,
                   "val_Pr@0.5": float((ious >= 0.5).mean())}
        for k, v in metrics.items():
            self.log(k, v, prog_bar=k != "val_Pr@0.5")
        self.history.append({"epoch": int(self.current_epoch), **metrics})

    def configure_optimizers(self) -> Any:
        groups = self.model.param_groups(self.lr, self.weight_decay)
        opt = torch.optim.AdamW(groups, lr=self.lr, weight_decay=self.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, poly_lambda(self.total_steps))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        frozen = self._frozen_prefixes()
        if frozen:
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items()
                                        if not k.startswith(frozen)}
        checkpoint["rsvl_history"] = self.history

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        frozen = self._frozen_prefixes()
        own = {k for k in self.state_dict() if not k.startswith(frozen)} if frozen \
            else set(self.state_dict())
        missing = sorted(own - set(checkpoint["state_dict"]))
        if missing:
            raise ResumeError(f"checkpoint lacks {len(missing)} trained tensors (e.g. {missing[:3]}).",
                              hint="Resume with the same --model and settings it was trained with.")
        self.history = list(checkpoint.get("rsvl_history", []))


class _LogProgress(L.Callback):
    """Plain log lines (for runs under nohup): every ``every`` steps and every validation."""

    def __init__(self, log: Callable[[str], None], every: int = 25) -> None:
        self.emit = log
        self.every = every
        self.t0 = time.time()

    def on_train_batch_end(self, trainer: Any, module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if step % self.every == 0:
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            lr = trainer.optimizers[0].param_groups[0]["lr"]
            self.emit(f"epoch {trainer.current_epoch} step {step}: loss {float(loss):.4f}, "
                     f"lr {lr:.2e}, {time.time() - self.t0:.0f} s")

    def on_validation_end(self, trainer: Any, module: Any) -> None:
        if module.history:
            h = module.history[-1]
            self.emit(f"val epoch {h['epoch']}: " + ", ".join(
                f"{k} {100 * v:.2f}" for k, v in h.items() if k != "epoch")
                + f", {time.time() - self.t0:.0f} s")


# --------------------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------------------


#: the card each trainable name starts from
CARDS = {"mini-refer": "mini-refer", "fianet": "fianet-rrsisd"}


def model_to_train(name: str, weights: str | Path | None = None, device: str = "cpu", *,
                   swin: str | Path | None = None, bert: str | Path | None = None,
                   vocab: str | Path | None = None) -> Any:
    """The model a run starts from, through the model registry: ``weights`` (a checkpoint of
    the model, to fine-tune) loaded with :func:`rsvl.models.registry.load`, else
    :func:`rsvl.models.registry.build` (mini-refer: a fresh decoder on the pretrained towers;
    FIANet: upstream's start, Swin-B 22k from ``swin`` and bert-base-uncased from ``bert``,
    with its ``vocab``)."""
    key = normalise_name(name)
    if key not in CARDS:
        raise UnknownModelError(f"cannot train model {name!r}.",
                                hint=f"Trainable referring models: {', '.join(MODELS)}.")
    card = CARDS[key]
    if weights is not None:
        options = {"vocab": vocab} if key == "fianet" and vocab is not None else {}
        return registry.load(card, weights, device, **options)
    if key == "fianet":
        if swin is None or bert is None:
            raise WeightsNotFoundError(
                "FIANet trains from Swin-B (ImageNet-22k) and bert-base-uncased weights, not from random ones.",
                hint="Pass --swin swin_base_patch4_window12_384_22k.pth and --bert BERT_FOLDER_OR_FILE "
                "(with vocab.txt), or --weights FIANET_CHECKPOINT to fine-tune.",
            )
        return registry.build(card, swin=swin, bert=bert, vocab=vocab).to(device)
    return registry.build(card).to(device)


# --------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------


@dataclass
class ReferTrainConfig:
    epochs: int = 40
    batch_size: int = 8
    lr: float = 3e-5
    weight_decay: float = 1e-2
    seed: int = 2401
    max_minutes: float | None = None
    #: use the feature cache when the model supports it (frozen towers)
    cache_features: bool = True
    #: flipped views (with swapped direction words) in the cached training set
    flip_views: bool = True
    #: RRSIS-D black-box augmentation on the image path
    black_boxes: bool = True
    num_workers: int = 0
    limit_train: int | None = None
    limit_val: int | None = None
    monitor: str = "val_oIoU"
    device: str = "auto"
    threads: int | None = None


def _can_cache(model: Any) -> bool:
    return all(hasattr(model, a) for a in ("image_features", "text_features", "decode"))


def train_refer(model_name: str, data: str | Path, out: str | Path, config: ReferTrainConfig | None = None,
                *, model: Any = None, weights: str | Path | None = None, resume: bool = False,
                swin: str | Path | None = None, bert: str | Path | None = None, vocab: str | Path | None = None,
                cache_dir: str | Path | None = None, quiet: bool = False,
                log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Train, select on val, export the best weights; returns the summary (also ``summary.json``).

    ``model`` overrides building by name (tests pass a tiny one). Output under ``out``:
    ``checkpoints/last.ckpt`` and ``checkpoints/best.ckpt`` (Lightning), ``summary.json``,
    and for mini-refer ``decoder.safetensors`` (the best decoder, the package's format).
    """
    cfg = config or ReferTrainConfig()
    log = log or (lambda m: None if quiet else print(m, file=sys.stderr, flush=True))
    accel = "gpu" if check_device(cfg.device).startswith("cuda") else "cpu"  # before anything is written
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_dir = out / "checkpoints"
    last = ckpt_dir / "last.ckpt"
    if resume and not last.is_file():
        raise ResumeError(f"nothing to resume: {last} not found.", hint="Run once without --resume.")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    if model is None:
        model = model_to_train(model_name, weights, "cuda" if accel == "gpu" else "cpu", swin=swin, bert=bert,
                            vocab=vocab)
    size = int(model.image_size)
    t0 = time.time()
    cached = cfg.cache_features and _can_cache(model)
    if cached:
        cache = FeatureCache(model, data, ("train", "val"), size, cache_dir,
                             views=VIEWS if cfg.flip_views else ("",), log=log)
        train_ds: Any = CachedReferDataset(cache, "train", VIEWS if cfg.flip_views else ("",),
                                           cfg.limit_train)
        val_ds: Any = CachedReferDataset(cache, "val", ("",), cfg.limit_val)
        collate: Any = collate_cached
        log(f"features cached in {time.time() - t0:.0f} s ({cache.dir})")
    else:
        train_ds = ImageReferDataset(data, "train", size, augment=cfg.black_boxes, seed=cfg.seed,
                                     limit=cfg.limit_train)
        val_ds = ImageReferDataset(data, "val", size, limit=cfg.limit_val)
        collate = collate_images(model.tokenize)
    if len(train_ds) == 0 or len(val_ds) == 0:
        raise DatasetError(f"{data}: the train or val split is empty.",
                           hint="Training needs train samples and val samples (for selection).")
    DataLoader = torch.utils.data.DataLoader
    gen = torch.Generator().manual_seed(cfg.seed)
    train_dl = DataLoader(train_ds, batch_size=cfg.batch_size, shuffle=True, collate_fn=collate,
                          num_workers=cfg.num_workers, generator=gen, drop_last=len(train_ds) > cfg.batch_size)
    val_dl = DataLoader(val_ds, batch_size=cfg.batch_size, shuffle=False, collate_fn=collate,
                        num_workers=cfg.num_workers)
    total_steps = cfg.epochs * max(1, len(train_dl))
    module = ReferLitModule(model, lr=cfg.lr, weight_decay=cfg.weight_decay, total_steps=total_steps)
    best_cb = ModelCheckpoint(dirpath=ckpt_dir, filename="best", monitor=cfg.monitor, mode="max",
                              save_last=True, save_top_k=1, enable_version_counter=False)
    precision = ("bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed") if accel == "gpu" \
        else "32-true"
    trainer = L.Trainer(
        max_epochs=cfg.epochs, accelerator=accel, devices=1, precision=precision,
        callbacks=[best_cb, _LogProgress(log)], default_root_dir=str(out), logger=False,
        max_time={"minutes": cfg.max_minutes} if cfg.max_minutes else None,
        enable_progress_bar=not quiet and sys.stderr.isatty(), enable_model_summary=False,
        log_every_n_steps=10, num_sanity_val_steps=0, deterministic=False,
    )
    fit(trainer, module, train_dl, val_dl, ckpt_path=last if resume else None)
    best_path = Path(best_cb.best_model_path) if best_cb.best_model_path else last
    summary: dict[str, Any] = {
        "model": model_name, "data": str(Path(data).resolve()), "train_samples": len(train_ds),
        "val_samples": len(val_ds), "image_size": size, "cached_features": cached,
        "config": asdict(cfg), "epochs_run": int(trainer.current_epoch),
        "global_steps": int(trainer.global_step), "precision": precision,
        "seconds": round(time.time() - t0, 1), "history": module.history,
        "best_checkpoint": str(best_path), "selected_on": f"{cfg.monitor} (val split)",
    }
    if best_path.is_file():
        state = read_file(best_path, "Best checkpoint")
        summary["best_epoch"] = int(state.get("epoch", -1))
        hist = {h["epoch"]: h for h in state.get("rsvl_history", [])}
        score = best_cb.best_model_score
        summary["best_val"] = {cfg.monitor: None if score is None else float(score)}
        if hist:
            best_row = max(hist.values(), key=lambda h: h.get(cfg.monitor, -math.inf))
            summary["best_val"] = best_row
        sd = {k[len("model."):]: v for k, v in state["state_dict"].items() if k.startswith("model.")}
        summary["weights"] = str(_export(model, sd, out, summary))
    write_text(out / "summary.json", json.dumps(summary, indent=2, default=str) + "\n")
    return summary


def _export(model: Any, state: dict[str, torch.Tensor], out: Path, summary: dict[str, Any]) -> Path:
    """Best weights in a loadable file: mini-refer's decoder format, else safetensors of the
    trained tensors."""
    if hasattr(model, "decoder") and getattr(model, "name", "") == "mini-refer":
        dec = ReferDecoder(model.decoder.config)
        dec.load_state_dict({k[len("decoder."):]: v for k, v in state.items() if k.startswith("decoder.")})
        meta = {"best_val": summary.get("best_val"), "data": summary["data"]}
        return save_decoder(dec, out / "decoder.safetensors", metadata=meta)
    path = out / "model.safetensors"
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))
    return path
