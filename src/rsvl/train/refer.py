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

import hashlib
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from rsvl.errors import DatasetError, ResumeError, UnknownModelError, WeightsNotFoundError

__all__ = [
    "CE_WEIGHTS",
    "ReferLitModule",
    "ReferTrainConfig",
    "build_model",
    "dice_loss",
    "flip_expression",
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


# --------------------------------------------------------------------------------------
# expressions under flips
# --------------------------------------------------------------------------------------

_H_SWAP = {"left": "right", "right": "left", "leftmost": "rightmost", "rightmost": "leftmost"}
_V_SWAP = {"top": "bottom", "bottom": "top", "topmost": "bottommost", "bottommost": "topmost",
           "upper": "lower", "lower": "upper", "above": "below", "below": "above"}
_WORD = re.compile(r"[A-Za-z]+")


def flip_expression(text: str, flip: str) -> str:
    """The expression that stays true after flipping the image: ``flip`` "h" (left-right)
    swaps left/right words, "v" (top-bottom) swaps top/bottom, upper/lower, above/below."""
    table = {"h": _H_SWAP, "v": _V_SWAP, "": {}}[flip]

    def sub(m: re.Match[str]) -> str:
        word = m.group(0)
        new = table.get(word.lower())
        if new is None:
            return word
        return new.capitalize() if word[0].isupper() else new

    return _WORD.sub(sub, text)


# --------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------

VIEWS = ("", "h", "v")


def _flip(x: torch.Tensor, view: str) -> torch.Tensor:
    return x.flip(-1) if view == "h" else x.flip(-2) if view == "v" else x


def read_image_tensor(path: Path, size: int) -> torch.Tensor:
    """RGB image -> uint8 (3, size, size), bilinear (upstream: ``Resize((480, 480))``)."""
    from PIL import Image

    if not Path(path).is_file():
        raise DatasetError(f"image {path} not found", hint="Check the dataset's image folder.")
    with Image.open(path) as im:
        im = im.convert("RGB").resize((size, size), Image.BILINEAR)
        return torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).contiguous()


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """(H, W) bool -> (size, size) bool, NEAREST (as upstream resizes the ground truth)."""
    from PIL import Image

    im = Image.fromarray(mask.astype(np.uint8) * 255)
    return np.asarray(im.resize((size, size), Image.NEAREST)) > 0


def normalise(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float normalised with 0-1 scale ``mean``/``std``."""
    m = torch.tensor(mean, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
    return (images.float() / 255.0 - m) / s


def black_boxes(image: torch.Tensor, rng: np.random.Generator, n_range: tuple[int, int] = (20, 60),
                box: int = 32) -> torch.Tensor:
    """RRSIS-D augmentation: paste ``n`` black ``box`` x ``box`` squares on a uint8 image."""
    out = image.clone()
    _, h, w = out.shape
    for _ in range(int(rng.integers(n_range[0], n_range[1] + 1))):
        y = int(rng.integers(0, max(1, h - box)))
        x = int(rng.integers(0, max(1, w - box)))
        out[:, y : y + box, x : x + box] = 0
    return out


class ImageReferDataset(torch.utils.data.Dataset):
    """Samples of a REFER-format split as (uint8 image, sentence, mask), resized to ``size``."""

    def __init__(self, root: str | Path, split: str, size: int, augment: bool = False,
                 seed: int = 0, limit: int | None = None) -> None:
        from rsvl.data.refer import RRSISD

        self.ds = RRSISD(root, split)
        self.size = size
        self.augment = augment
        self.rng = np.random.default_rng(seed)
        self.indices = list(range(len(self.ds)))[: limit or None]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, Any]:
        s = self.ds[self.indices[i]]
        image = read_image_tensor(s.image_path, self.size)
        if self.augment and self.rng.random() < 0.2:
            image = black_boxes(image, self.rng)
        mask = torch.from_numpy(resize_mask(s.mask, self.size))
        return {"image": image, "sentence": s.sentence, "mask": mask}


def collate_images(tokenize: Callable[[list[str]], dict[str, torch.Tensor]]) -> Callable[..., dict[str, Any]]:
    def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
        return {"image": torch.stack([it["image"] for it in items]),
                "text": tokenize([it["sentence"] for it in items]),
                "mask": torch.stack([it["mask"] for it in items])}
    return collate


def default_cache_dir() -> Path:
    root = os.environ.get("RSVL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", str(Path.home() / ".cache")), "rsvl")
    return Path(root) / "mini-refer-features"


def _image_list(root: Path, splits: Sequence[str]) -> tuple[list[Path], dict[str, list[tuple[int, str, np.ndarray]]]]:
    """Unique image paths and, per split, (image index, sentence, mask) of every sample."""
    from rsvl.data.refer import RRSISD

    paths: list[Path] = []
    index: dict[Path, int] = {}
    samples: dict[str, list[tuple[int, str, np.ndarray]]] = {}
    for split in splits:
        ds = RRSISD(root, split)
        rows = []
        for s in ds:
            if s.image_path not in index:
                index[s.image_path] = len(paths)
                paths.append(s.image_path)
            rows.append((index[s.image_path], s.sentence, s.mask))
        samples[split] = rows
    return paths, samples


class FeatureCache:
    """Frozen-tower outputs of every image (per view) and expression of a dataset, on disk.

    Files under ``cache_dir/<key>/``: ``images_<view>.pt`` (f8, f16, f32, small as
    float16, one row per image), ``text.pt`` (words float16, mask, sentence list); the key
    hashes the dataset's image paths, the image size and the model's tower description.
    """

    def __init__(self, model: Any, root: str | Path, splits: Sequence[str], size: int,
                 cache_dir: str | Path | None = None, views: Sequence[str] = VIEWS,
                 batch_size: int = 8, log: Callable[[str], None] = print) -> None:
        self.root = Path(root)
        self.size = size
        self.views = tuple(views)  # text views; image features are cached as is only
        self.paths, self.samples = _image_list(self.root, splits)
        ident = json.dumps({"images": [str(p.resolve()) for p in self.paths], "size": size,
                            "towers": getattr(model, "tower_id", type(model).__name__)})
        key = hashlib.sha256(ident.encode()).hexdigest()[:16]
        self.dir = Path(cache_dir or default_cache_dir()) / key
        self.dir.mkdir(parents=True, exist_ok=True)
        self.images = self._image_view(model, "", batch_size, log)
        sentences = sorted({flip_expression(s, v) for rows in self.samples.values()
                            for _, s, _ in rows for v in self.views})
        self.text_index, self.words, self.text_mask = self._text(model, sentences, log)

    def _image_view(self, model: Any, view: str, batch_size: int,
                    log: Callable[[str], None]) -> list[torch.Tensor]:
        path = self.dir / f"images_{view or 'id'}.pt"
        if path.is_file():
            return list(torch.load(path, weights_only=True))
        t0 = time.time()
        outs: list[list[torch.Tensor]] = [[], [], [], []]
        dev = model.device
        for i in range(0, len(self.paths), batch_size):
            batch = torch.stack([_flip(read_image_tensor(p, self.size), view)
                                 for p in self.paths[i : i + batch_size]]).to(dev)
            feats, small = model.image_features(normalise(batch, model.mean, model.std))
            for k, t in enumerate((*feats, small)):
                outs[k].append(t.half().cpu())
            if (i // batch_size) % 10 == 0:
                log(f"cache view {view or 'id'}: {i + len(batch)}/{len(self.paths)} images "
                    f"({time.time() - t0:.0f} s)")
        tensors = [torch.cat(o) for o in outs]
        tmp = path.with_name(f".{path.name}.tmp")
        torch.save(tensors, tmp)
        os.replace(tmp, path)
        return tensors

    def _text(self, model: Any, sentences: list[str],
              log: Callable[[str], None]) -> tuple[dict[str, int], torch.Tensor, torch.Tensor]:
        path = self.dir / "text.pt"
        if path.is_file():
            d = torch.load(path, weights_only=True)
            if list(d["sentences"]) == sentences:
                return {s: i for i, s in enumerate(sentences)}, d["words"], d["mask"]
        words, masks = [], []
        for i in range(0, len(sentences), 64):
            w, m = model.text_features(model.tokenize(sentences[i : i + 64]))
            words.append(w.half().cpu())
            masks.append(m.cpu())
        d = {"sentences": sentences, "words": torch.cat(words), "mask": torch.cat(masks)}
        tmp = path.with_name(f".{path.name}.tmp")
        torch.save(d, tmp)
        os.replace(tmp, path)
        log(f"cached {len(sentences)} expressions")
        return {s: i for i, s in enumerate(sentences)}, d["words"], d["mask"]


class CachedReferDataset(torch.utils.data.Dataset):
    """(cached features, cached words, packed mask) per sample.

    Each access picks one of ``views`` at random ("" as is, "h" left-right flip, "v"
    top-bottom flip, applied to the features, the mask and the words); with one view it is
    deterministic (validation).
    """

    def __init__(self, cache: FeatureCache, split: str, views: Sequence[str] = ("",),
                 limit: int | None = None) -> None:
        self.cache = cache
        self.views = tuple(views)
        rows = cache.samples[split][: limit or None]
        self.items: list[tuple[int, dict[str, int], np.ndarray]] = [
            (img, {v: cache.text_index[flip_expression(sentence, v)] for v in self.views},
             np.packbits(resize_mask(mask, cache.size)))
            for img, sentence, mask in rows]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        img, texts, packed = self.items[i]
        view = self.views[int(torch.randint(len(self.views), ()))] if len(self.views) > 1 else self.views[0]
        t = texts[view]
        size = self.cache.size
        mask = torch.from_numpy(np.unpackbits(packed)[: size * size].reshape(size, size).astype(bool))
        feats = [_flip(f[img], view) for f in self.cache.images]
        return {"feats": feats[:3], "small": feats[3],
                "words": self.cache.words[t], "text_mask": self.cache.text_mask[t],
                "mask": _flip(mask, view)}


def collate_cached(items: list[dict[str, Any]]) -> dict[str, Any]:
    return {"feats": [torch.stack([it["feats"][k] for it in items]) for k in range(3)],
            "small": torch.stack([it["small"] for it in items]),
            "words": torch.stack([it["words"] for it in items]),
            "text_mask": torch.stack([it["text_mask"] for it in items]),
            "mask": torch.stack([it["mask"] for it in items])}


def reference_baselines(data: str | Path, split: str = "val", size: int | None = 480) -> dict[str, dict[str, float]]:
    """Reference points scored exactly like a model (per sentence, at ``size`` with the GT
    NEAREST-resized): ``empty`` (predict nothing), ``full`` (the whole image) and
    ``class_union`` (the union of every instance of the referred object's class in the
    image: what knowing the class name, but not which one, gives)."""
    from rsvl.data.refer import RRSISD, decode_segmentation
    from rsvl.metrics import ReferringAccumulator

    ds = RRSISD(data, split)
    accs = {k: ReferringAccumulator() for k in ("empty", "full", "class_union")}
    by_image: dict[Any, list[dict[str, Any]]] = {}
    for ann in ds.anns.values():
        by_image.setdefault(ann["image_id"], []).append(ann)
    for ref, _ in ds._pairs:
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


def _lightning() -> Any:
    import lightning

    return lightning


def poly_lambda(total_steps: int, power: float = 0.9) -> Callable[[int], float]:
    """``(1 - it / N) ** power`` (FIANet's per-iteration schedule), floored at 0."""
    return lambda it: max(0.0, 1.0 - it / max(1, total_steps)) ** power


L = _lightning()


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


def build_model(name: str, weights: str | Path | None = None, device: str = "cpu", *,
                swin: str | Path | None = None, bert: str | Path | None = None,
                vocab: str | Path | None = None) -> Any:
    """A trainable model: ``mini-refer`` (fresh decoder, or ``weights`` to fine-tune) or
    ``fianet`` (imported lazily from :mod:`rsvl.models.fianet.model`): from a FIANet checkpoint
    (``weights``), or from upstream's starting point, Swin-B 22k (``swin``) and
    bert-base-uncased (``bert``: its weights file or folder; ``vocab``: its vocab.txt)."""
    key = name.strip().lower().replace("_", "-")
    if key == "mini-refer":
        from rsvl.models.mini.refer import build_mini_refer, load_decoder

        decoder = load_decoder(weights) if weights is not None else None
        return build_mini_refer(decoder=decoder).to(device)
    if key == "fianet":
        from rsvl.models.fianet import model as fianet_module

        if weights is not None:
            return fianet_module.load_fianet("fianet-rrsisd", weights=weights, device=device,
                                             **({"vocab": vocab} if vocab is not None else {}))
        if swin is None or bert is None:
            raise WeightsNotFoundError(
                "FIANet trains from Swin-B (ImageNet-22k) and bert-base-uncased weights, not from random ones.",
                hint="Pass --swin swin_base_patch4_window12_384_22k.pth and --bert BERT_FOLDER_OR_FILE "
                "(with vocab.txt), or --weights FIANET_CHECKPOINT to fine-tune.",
            )
        config = fianet_module.FianetConfig()
        return fianet_module.init_fianet_pretrained(config, swin, bert, vocab).to(device)
    raise UnknownModelError(f"cannot train model {name!r}.",
                            hint=f"Trainable referring models: {', '.join(MODELS)}.")


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
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_dir = out / "checkpoints"
    last = ckpt_dir / "last.ckpt"
    if resume and not last.is_file():
        raise ResumeError(f"nothing to resume: {last} not found.", hint="Run once without --resume.")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    accel = "gpu" if (cfg.device == "auto" and torch.cuda.is_available()) or cfg.device.startswith("cuda") \
        else "cpu"
    if model is None:
        model = build_model(model_name, weights, "cuda" if accel == "gpu" else "cpu", swin=swin, bert=bert,
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
    from lightning.pytorch.callbacks import ModelCheckpoint

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
    trainer.fit(module, train_dl, val_dl, ckpt_path=str(last) if resume else None)
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
        state = torch.load(best_path, map_location="cpu", weights_only=True)
        summary["best_epoch"] = int(state.get("epoch", -1))
        hist = {h["epoch"]: h for h in state.get("rsvl_history", [])}
        score = best_cb.best_model_score
        summary["best_val"] = {cfg.monitor: None if score is None else float(score)}
        if hist:
            best_row = max(hist.values(), key=lambda h: h.get(cfg.monitor, -math.inf))
            summary["best_val"] = best_row
        sd = {k[len("model."):]: v for k, v in state["state_dict"].items() if k.startswith("model.")}
        summary["weights"] = str(_export(model, sd, out, summary))
    tmp = out / ".summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    os.replace(tmp, out / "summary.json")
    return summary


def _export(model: Any, state: dict[str, torch.Tensor], out: Path, summary: dict[str, Any]) -> Path:
    """Best weights in a loadable file: mini-refer's decoder format, else safetensors of the
    trained tensors."""
    if hasattr(model, "decoder") and getattr(model, "name", "") == "mini-refer":
        from rsvl.models.mini.refer import ReferDecoder, save_decoder

        dec = ReferDecoder(model.decoder.config)
        dec.load_state_dict({k[len("decoder."):]: v for k, v in state.items() if k.startswith("decoder.")})
        meta = {"best_val": summary.get("best_val"), "data": summary["data"]}
        return save_decoder(dec, out / "decoder.safetensors", metadata=meta)
    from safetensors.torch import save_file

    path = out / "model.safetensors"
    tmp = out / ".model.safetensors.tmp"
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))
    os.replace(tmp, path)
    return path
