"""Train the heads of mini-clip (rsvl's built-in image-text model) on UCM-Captions.

    rsvl train mini-clip --data ../shared/data/ucm \
        --out src/rsvl/assets/mini-clip/heads.safetensors --semseg ../shared/data/semseg

Only the ``train`` split of ``ucm.json`` is trained on; ``val`` is used for the reported
numbers and the choice of settings. The frozen towers' outputs are cached on disk
(``~/.cache/rsvl/mini-clip`` or ``--cache``), so retraining the heads takes seconds:

* image features: global average and global max of the stride-8/16/32 maps of every image
  under 3 views (identity, horizontal flip, vertical flip);
* text features: MiniLM mean-pooled embeddings of every caption and class prompt;
* dense features: the stride-8/16/32 maps of synthetic 256x256 mosaics built from train
  images (val mosaics from val images), whose per-pixel class is known.

Stage 1 trains the image and text heads (multi-positive InfoNCE over captions, where equal
caption strings count as positives, plus class-prompt alignment). Stage 2 trains the dense
head against the frozen text head (pixel-to-class-text cross-entropy on the mosaics, plus a
region-level multiple-instance loss on concepts the source images' captions mention).

After training, the val numbers (zero-shot top-1, image-text retrieval with one text per
caption row and with equal strings merged, dense mIoU on val mosaics) and, with
``--semseg``, ``rsvl eval ovss``'s mIoU on the real crops next to the majority-class guess
go into ``card.json``. ``--seeds N`` also trains the global heads with N - 1 further seeds
and reports the spread of the val numbers (the first seed's heads are saved).
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from rsvl.data.classes import load_classes
from rsvl.data.segmentation import SEG_PRESETS
from rsvl.eval import open_segmentation_dataset, ovss_protocol, run_ovss
from rsvl.io import write_text
from rsvl.metrics import (
    ConfusionMatrix,
    retrieval_ground_truth,
    retrieval_recall,
    segmentation_report,
    topk_accuracy,
)
from rsvl.models import registry
from rsvl.models.mini.clip import (
    TEMPLATES,
    MiniClip,
    image_tower_for_clip,
    pooled_dim,
    save_heads,
)
from rsvl.models.mini.towers import MiniLMTower
from rsvl.train.mini_clip_data import (
    CAPTION_CONCEPTS,
    UcmData,
    aid_readable,
    cache_image_features,
    cache_mosaic_features,
    cache_text_features,
    default_cache_dir,
    load_aid,
    load_ucm,
    progress,
)

# --------------------------------------------------------------------------------------
# metrics (rsvl.metrics when present)
# --------------------------------------------------------------------------------------


def _topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, ks: Sequence[int]) -> dict[int, float]:
    """Top-k accuracy in % (``rsvl.metrics.topk_accuracy``)."""

    res = topk_accuracy(scores.float().cpu().numpy(), labels.cpu().numpy(), ks)
    return {k: 100.0 * res[f"top{k}"] for k in ks}


def _retrieval(sim: torch.Tensor, text_to_image: torch.Tensor, ks: Sequence[int] = (1, 5, 10),
               texts: Sequence[str] | None = None) -> dict[str, float]:
    """Recall@k in % (``rsvl.metrics.retrieval_recall``): sim (n_images, n_texts); an
    image is a hit if any of its captions ranks in the top k. With ``texts``, also the
    deduplicated protocol (equal caption strings merged, FarSLIP/SkyScript), as ``dedup_*``."""

    s = sim.float().cpu().numpy()
    owner = text_to_image.cpu().numpy()
    res = retrieval_recall(s, owner, ks)
    out = {k.replace("img2text", "i2t").replace("text2img", "t2i"): 100.0 * v
           for k, v in res.items() if not k.startswith("n_")}
    if texts is not None:
        _, uniq, pi, pt = retrieval_ground_truth(list(owner), list(texts))
        first = {t: j for j, t in reversed(list(enumerate(texts)))}
        cols = [first[t] for t in uniq]
        dd = retrieval_recall(s[:, cols], pairs=(pi, pt), ks=ks)
        out["dedup_mean_recall"] = 100.0 * dd["mean_recall"]
    return out


def confusion_miou(pred: np.ndarray, gt: np.ndarray, n: int, ignore: int | None = None) -> tuple[float, float]:
    """(mIoU over classes present in gt or pred, pixel accuracy), both in %."""
    m = np.ones_like(gt, bool) if ignore is None else gt != ignore
    p, g = pred[m].astype(np.int64), gt[m].astype(np.int64)
    cm = np.bincount(g * n + p, minlength=n * n).reshape(n, n)
    inter = np.diag(cm)
    union = cm.sum(0) + cm.sum(1) - inter
    valid = cm.sum(1) > 0
    iou = inter[valid] / np.maximum(union[valid], 1)
    return 100.0 * float(iou.mean()), 100.0 * float(inter.sum() / max(cm.sum(), 1))


# --------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    seed: int = 0
    epochs: int = 12
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.05
    class_weight: float = 0.5
    dense_epochs: int = 5
    dense_batch: int = 32
    dense_lr: float = 2e-3
    n_mosaics: int = 1600
    n_val_mosaics: int = 200
    concept_weight: float = 0.5
    #: image-head input ("mean+max": global average and max of the three maps)
    pooling: str = "mean+max"
    image_hidden: int = 512
    #: global heads trained with seeds seed .. seed + n_seeds - 1 to report the spread of
    #: the val numbers; the heads of ``seed`` are the ones saved
    n_seeds: int = 1
    #: AID train images per trained class used in stage 1 (with ``--aid``; at most 192 exist
    #: in the train split of :func:`rsvl.train.mini_clip_data.load_aid`)
    aid_per_class: int = 192
    extra: dict[str, Any] = field(default_factory=dict)


def multi_positive_nce(img: torch.Tensor, txt: torch.Tensor, pos: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """InfoNCE with several positives: ``pos[i, j]`` marks text j as a positive of image i."""
    logits = scale * img @ txt.t()
    pos = pos.float()
    i2t = -(torch.log_softmax(logits, 1) * pos / pos.sum(1, keepdim=True)).sum(1).mean()
    has = pos.sum(0) > 0
    t2i = -(torch.log_softmax(logits.t()[has], 1) * (pos.t()[has] / pos.t()[has].sum(1, keepdim=True))).sum(1).mean()
    return 0.5 * (i2t + t2i)


def fit_standardize(module: Any, feats: torch.Tensor) -> None:
    dims = [0] + list(range(2, feats.dim()))
    module.mean.copy_(feats.float().mean(dims))
    module.std.copy_(feats.float().std(dims).clamp_min(1e-3))


def _one_cycle(opt: torch.optim.Optimizer, total: int) -> torch.optim.lr_scheduler.LRScheduler:
    return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[g["lr"] for g in opt.param_groups],
                                               total_steps=max(total, 1), pct_start=0.1)


def train_global(heads: Any, img_feats: torch.Tensor, labels: torch.Tensor, cap_feats: torch.Tensor,
                 cap_owner: torch.Tensor, cap_string: torch.Tensor, cls_feats: torch.Tensor,
                 cfg: TrainConfig, log: Callable[[int, float], None] | None = None) -> list[float]:
    """Stage 1: image and text heads.

    img_feats (V, N, P) pooled features per view; labels (N,); cap_feats (C, 384) with
    cap_owner (C,) image index and cap_string (C,) id of the caption string; cls_feats
    (K, T, 384) class prompts.
    """
    g = torch.Generator().manual_seed(cfg.seed)
    params = [p for n, p in heads.named_parameters() if not n.startswith(("dense_head", "dense_log"))]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    n = img_feats.shape[1]
    steps = math.ceil(n / cfg.batch_size)
    sched = _one_cycle(opt, steps * cfg.epochs)
    caps_of: list[list[int]] = [[] for _ in range(n)]
    for c, o in enumerate(cap_owner.tolist()):
        caps_of[o].append(c)
    losses = []
    heads.train()
    for ep in range(cfg.epochs):
        perm = torch.randperm(n, generator=g)
        tot = 0.0
        for s in range(steps):
            b = perm[s * cfg.batch_size : (s + 1) * cfg.batch_size]
            view = torch.randint(img_feats.shape[0], (len(b),), generator=g)
            x = img_feats[view, b]
            # one random caption per image; all captions with the same string are positives
            ci = torch.tensor([caps_of[i][int(torch.randint(len(caps_of[i]), (1,), generator=g))]
                               for i in b.tolist()])
            img = heads.image(x)
            txt = heads.text(cap_feats[ci])
            strings = cap_string[ci]
            own = torch.stack([torch.isin(strings, cap_string[torch.tensor(caps_of[i])]) for i in b.tolist()])
            scale = heads.log_scale.exp().clamp(max=100)
            loss = multi_positive_nce(img, txt, own, scale)
            if cfg.class_weight > 0:
                t = int(torch.randint(cls_feats.shape[1], (1,), generator=g))
                cls_emb = heads.text(cls_feats[:, t])
                loss = loss + cfg.class_weight * F.cross_entropy(scale * img @ cls_emb.t(), labels[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            tot += loss.item()
        losses.append(tot / steps)
        if log:
            log(ep, losses[-1])
    heads.eval()
    return losses


def dihedral(t: torch.Tensor, k: int, flip: bool) -> torch.Tensor:
    """``t`` rotated by k quarter turns over its last two axes, then flipped horizontally."""
    t = torch.rot90(t, k, (-2, -1))
    return t.flip(-1) if flip else t


def train_dense(heads: Any, mos: dict[str, torch.Tensor], cls_emb: torch.Tensor, cfg: TrainConfig,
                log: Callable[[int, float], None] | None = None, concept_emb: torch.Tensor | None = None,
                presence: torch.Tensor | None = None) -> list[float]:
    """Stage 2: the dense head, pixel-to-class-text cross-entropy against frozen class embeddings.

    With ``concept_emb`` (C, D) and ``presence`` (n_samples, C) (which concepts the captions of
    each source image mention), adds a multiple-instance loss: each mosaic region's mean
    embedding must score the concepts its captions mention above those they do not.
    """
    g = torch.Generator().manual_seed(cfg.seed + 1)
    use_mil = concept_emb is not None and presence is not None and cfg.concept_weight > 0
    mil_bias = torch.nn.Parameter(torch.zeros(concept_emb.shape[0] if use_mil else 1))
    params = list(heads.dense_head.parameters()) + [heads.dense_log_scale, mil_bias]
    opt = torch.optim.AdamW(params, lr=cfg.dense_lr, weight_decay=cfg.weight_decay)
    n = mos["f8"].shape[0]
    steps = math.ceil(n / cfg.dense_batch)
    sched = _one_cycle(opt, steps * cfg.dense_epochs)
    cls_emb = cls_emb.detach()
    losses = []
    heads.dense_head.train()
    for ep in range(cfg.dense_epochs):
        perm = torch.randperm(n, generator=g)
        tot = 0.0
        for s in range(steps):
            b = perm[s * cfg.dense_batch : (s + 1) * cfg.dense_batch]
            f8, f16, f32 = (mos[k][b].float() for k in ("f8", "f16", "f32"))
            # random dihedral augmentation applied to all maps (and labels) alike
            k = int(torch.randint(4, (1,), generator=g))
            flip = bool(torch.randint(2, (1,), generator=g))
            d = heads.dense(dihedral(f8, k, flip), dihedral(f16, k, flip), dihedral(f32, k, flip))
            lab = dihedral(mos["label"][b], k, flip)
            scale = heads.dense_log_scale.exp().clamp(max=100)
            logits = scale * torch.einsum("bdhw,kd->bkhw", d, cls_emb)
            loss = F.cross_entropy(logits, lab)
            if use_mil:
                src = dihedral(mos["source"][b], k, flip).flatten()
                uniq, inv = torch.unique(src, return_inverse=True)
                onehot = F.one_hot(inv, len(uniq)).float()  # (B*h*w, U)
                flat = d.permute(0, 2, 3, 1).reshape(-1, d.shape[1])
                region = F.normalize(onehot.t() @ flat / onehot.sum(0)[:, None], dim=-1)
                mil_logits = 10.0 * region @ concept_emb.t() + mil_bias
                loss = loss + cfg.concept_weight * F.binary_cross_entropy_with_logits(
                    mil_logits, presence[uniq].float())
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            tot += loss.item()
        losses.append(tot / steps)
        if log:
            log(ep, losses[-1])
    heads.dense_head.eval()
    return losses


# --------------------------------------------------------------------------------------
# evaluation on val
# --------------------------------------------------------------------------------------


@torch.inference_mode()
def evaluate_global(heads: Any, img_feats: torch.Tensor, labels: torch.Tensor, cap_feats: torch.Tensor,
                    cap_owner: torch.Tensor, cls_feats: torch.Tensor, tta: bool = True,
                    texts: Sequence[str] | None = None) -> dict[str, float]:
    """img_feats (V, n, P) of the val images; cap_owner indexes 0..n-1."""
    heads.eval()
    if tta:
        img = F.normalize(torch.stack([heads.image(v) for v in img_feats]).mean(0), dim=-1)
    else:
        img = heads.image(img_feats[0])
    cls = F.normalize(torch.stack([heads.text(cls_feats[:, t]) for t in range(cls_feats.shape[1])]).mean(0), dim=-1)
    acc = _topk_accuracy(img @ cls.t(), labels, (1, 5))
    res = {"zero_shot_top1": acc[1], "zero_shot_top5": acc[5]}
    res.update(_retrieval(img @ heads.text(cap_feats).t(), cap_owner, texts=texts))
    return res


@torch.inference_mode()
def evaluate_dense(heads: Any, mos: dict[str, torch.Tensor], cls_emb: torch.Tensor, n_classes: int) -> dict[str, float]:
    heads.eval()
    preds = []
    for b in range(0, mos["f8"].shape[0], 32):
        d = heads.dense(*(mos[k][b : b + 32].float() for k in ("f8", "f16", "f32")))
        preds.append(torch.einsum("bdhw,kd->bkhw", d, cls_emb).argmax(1))
    pred = torch.cat(preds).numpy()
    miou, acc = confusion_miou(pred, mos["label"].numpy(), n_classes)
    return {"mosaic_miou": miou, "mosaic_pixel_acc": acc}


# --------------------------------------------------------------------------------------
# dense quality on real segmentation crops (evaluation only, never trained on)
# --------------------------------------------------------------------------------------

#: the semseg folders measured after training (their rsvl presets: label encoding, class file)
SEMSEG_DATASETS: tuple[str, ...] = ("loveda", "potsdam", "vaihingen")
#: OVSS protocols of ``rsvl eval ovss`` reported for each dataset
SEMSEG_PROTOCOLS: tuple[str, ...] = ("rsvl", "farslip")


def majority_miou(semseg_dir: str | Path, preset: str) -> dict[str, float]:
    """mIoU / pixel accuracy of predicting each image's own majority class (an oracle baseline:
    it knows the labels), scored like ``rsvl eval ovss`` (same reader, ignore index, metric)."""

    ds = open_segmentation_dataset(semseg_dir, preset, "val")
    n = len(ds.classes)
    conf = ConfusionMatrix(n, ignore_index=ds.ignore_index)
    for s in ds.samples:
        gt = ds.read_label(s)
        valid = gt[gt != ds.ignore_index] if ds.ignore_index is not None else gt.ravel()
        conf.update(np.full_like(gt, np.bincount(valid, minlength=n).argmax()), gt)
    r = segmentation_report(conf, list(ds.classes))
    return {"miou": 100.0 * float(r["mIoU"]), "pixel_acc": 100.0 * float(r["aAcc"])}


def evaluate_semseg(model: Any, semseg_root: str | Path, datasets: Sequence[str] = SEMSEG_DATASETS,
                    protocols: Sequence[str] = SEMSEG_PROTOCOLS) -> dict[str, Any]:
    """Dense quality on the real segmentation crops (evaluation only, never trained on), exactly
    as ``rsvl eval ovss ROOT/<name> --preset <name> --protocol <p>`` scores it, next to the
    majority-class guess. Returns ``{name: {"miou", "pixel_acc", "majority_miou",
    "majority_pixel_acc", "images", "by_protocol": {p: {...}}}}`` with the first protocol's
    numbers at the top level."""

    root = Path(semseg_root)
    res: dict[str, Any] = {}
    for name in datasets:
        folder = root / name
        if not (folder / "images").is_dir() or name not in SEG_PRESETS:
            continue
        specs = load_classes(file=SEG_PRESETS[name].class_file)
        base = majority_miou(folder, name)
        entry: dict[str, Any] = {"majority_miou": base["miou"], "majority_pixel_acc": base["pixel_acc"],
                                 "by_protocol": {}}
        for proto in protocols:
            r = run_ovss(model, folder, specs, preset=name, protocol=ovss_protocol(proto, name))
            entry["by_protocol"][proto] = {
                "miou": 100.0 * float(r.metrics["mIoU"]), "pixel_acc": 100.0 * float(r.metrics["aAcc"]),
                "iou": {k: 100.0 * float(v) for k, v in r.metrics["IoU"].items()},
                "command": f"rsvl eval ovss {folder} --preset {name} --protocol {proto}",
            }
            entry["images"] = int(r.settings["n_samples"])
        first = entry["by_protocol"][protocols[0]]
        entry["miou"], entry["pixel_acc"] = first["miou"], first["pixel_acc"]
        res[name] = entry
    return res


# --------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------


def _class_prompts(classes: Sequence[str], raw: bool = False) -> list[str]:

    return [t.format(c if raw else aid_readable(c)) for c in classes for t in TEMPLATES]


def _caption_table(data: UcmData) -> tuple[list[str], list[int]]:
    caps, owner = [], []
    for i, s in enumerate(data.samples):
        caps += list(s["captions"])
        owner += [i] * len(s["captions"])
    return caps, owner


def prepare_aid_features(aid_root: str | Path, cache: Path, tower: Any, text: Any, quiet: bool = False
                         ) -> dict[str, Any]:
    """AID's tower outputs (:func:`rsvl.train.mini_clip_data.load_aid`): pooled image features
    under the training views, templated captions, and the prompts of every AID class key."""
    aid = load_aid(aid_root)
    caps, owner = _caption_table(aid)
    strings = {c: k for k, c in enumerate(dict.fromkeys(caps))}
    keys = sorted({s["label"] for s in aid.samples})
    cls = cache_text_features(_class_prompts(keys), cache, text, "aid-classes").view(len(keys), len(TEMPLATES), -1)
    return {"data": aid, "img": cache_image_features(aid, cache, tower, quiet=quiet),
            "cap_feats": cache_text_features(caps, cache, text, "aid-captions"), "cap_owner": torch.tensor(owner),
            "cap_string": torch.tensor([strings[c] for c in caps]), "keys": keys, "cls_feats": cls}


@torch.inference_mode()
def evaluate_aid(heads: Any, aid: dict[str, Any]) -> dict[str, float]:
    """Zero-shot top-1 (%) on AID with the class prompts of its 15 classes (view-averaged image
    embeddings): ``aid_val_top1`` on the val images of the trained classes, ``aid_heldout_top1``
    on the classes never trained on (among all 15), ``aid_heldout_top1_among_heldout`` (among
    the held-out classes only)."""
    heads.eval()
    data: UcmData = aid["data"]
    img = F.normalize(torch.stack([heads.image(v) for v in aid["img"][..., : pooled_dim(heads.config.pooling)]]).mean(0),
                      dim=-1)
    cf = aid["cls_feats"]
    cls = F.normalize(torch.stack([heads.text(cf[:, t]) for t in range(cf.shape[1])]).mean(0), dim=-1)
    keys = aid["keys"]
    labels = torch.tensor([keys.index(s["label"]) for s in data.samples])
    scores = img @ cls.t()
    out: dict[str, float] = {}
    for name, split in (("aid_val_top1", "val"), ("aid_heldout_top1", "heldout")):
        idx = torch.tensor(data.split(split), dtype=torch.long)
        if len(idx):
            out[name] = _topk_accuracy(scores[idx], labels[idx], (1,))[1]
    held = data.split("heldout")
    if held:
        hk = sorted({int(labels[i]) for i in held})
        remap = {k: j for j, k in enumerate(hk)}
        idx = torch.tensor(held)
        out["aid_heldout_top1_among_heldout"] = _topk_accuracy(
            scores[idx][:, hk], torch.tensor([remap[int(labels[i])] for i in held]), (1,))[1]
    return out


def prepare_features(data_root: str | Path, cache_dir: str | Path | None = None, n_mosaics: int = 1600,
                     n_val_mosaics: int = 200, seed: int = 0, quiet: bool = False,
                     aid_root: str | Path | None = None) -> dict[str, Any]:
    """Compute (or load from the cache) every tower output the heads are trained on (with
    ``aid_root``, AID's too: :func:`prepare_aid_features`)."""

    data = load_ucm(data_root)
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    tower = image_tower_for_clip().fuse_for_inference()  # frozen: same features, faster
    text = MiniLMTower()
    t0 = time.time()
    img = cache_image_features(data, cache, tower, quiet=quiet)
    t_img = time.time() - t0
    caps, owner = [], []
    for i, s in enumerate(data.samples):
        caps += list(s["captions"])
        owner += [i] * len(s["captions"])
    cap_feats = cache_text_features(caps, cache, text, "captions")
    cls_feats = cache_text_features(_class_prompts(data.classes), cache, text, "classes")
    cls_feats = cls_feats.view(len(data.classes), len(TEMPLATES), -1)
    mos_train = cache_mosaic_features(data, "train", n_mosaics, seed, cache, tower, quiet=quiet)
    mos_val = cache_mosaic_features(data, "val", n_val_mosaics, seed + 1000, cache, tower, quiet=quiet)
    strings = {c: k for k, c in enumerate(dict.fromkeys(caps))}
    concepts = list(CAPTION_CONCEPTS)
    con_feats = cache_text_features(_class_prompts(concepts, raw=True), cache, text, "concepts")
    con_feats = con_feats.view(len(concepts), len(TEMPLATES), -1)
    presence = torch.zeros(len(data.samples), len(concepts), dtype=torch.bool)
    for i, smp in enumerate(data.samples):
        words = set(re.findall(r"[a-z]+", " ".join(smp["captions"]).lower()))
        for j, c in enumerate(concepts):
            presence[i, j] = bool(words & set(CAPTION_CONCEPTS[c]))
    aid = prepare_aid_features(aid_root, cache, tower, text, quiet) if aid_root is not None else None
    return {
        "aid": aid,
        "con_feats": con_feats, "presence": presence,
        "data": data, "img": img, "cap_feats": cap_feats, "cap_owner": torch.tensor(owner),
        "cap_string": torch.tensor([strings[c] for c in caps]), "cls_feats": cls_feats,
        "mos_train": mos_train, "mos_val": mos_val, "image_feature_seconds": t_img,
    }


def _seed_summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-seed val numbers of the global heads, with their mean and standard deviation."""
    keys = ("zero_shot_top1", "mean_recall", "dedup_mean_recall")
    out: dict[str, Any] = {"runs": runs}
    for k in keys:
        vals = [r[k] for r in runs if k in r]
        if vals:
            out[k] = {"mean": float(np.mean(vals)), "std": float(np.std(vals))}
    return out


def train_mini_clip(data_root: str | Path, out_path: str | Path | None, config: TrainConfig | None = None,
                    cache_dir: str | Path | None = None, quiet: bool = False,
                    features: dict[str, Any] | None = None, aid_root: str | Path | None = None) -> dict[str, Any]:
    """Train the mini-clip heads on the UCM train split (and, with ``aid_root``, the AID train
    images of the trained AID classes); report val numbers; save to ``out_path``.

    Returns a dict with the val metrics, the losses and the config.
    """

    cfg = config or TrainConfig()
    torch.manual_seed(cfg.seed)
    feats = features or prepare_features(data_root, cache_dir, cfg.n_mosaics, cfg.n_val_mosaics, cfg.seed, quiet,
                                         aid_root=aid_root)
    data: UcmData = feats["data"]
    cidx = {c: i for i, c in enumerate(data.classes)}
    labels = torch.tensor([cidx[s["label"]] for s in data.samples])
    tr, va = torch.tensor(data.split("train")), torch.tensor(data.split("val"))
    owner = feats["cap_owner"]

    def caps_of(split_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        remap = torch.full((len(data.samples),), -1, dtype=torch.long)
        remap[split_idx] = torch.arange(len(split_idx))
        keep = remap[owner] >= 0
        return keep, remap[owner[keep]]

    keep_tr, own_tr = caps_of(tr)
    keep_va, own_va = caps_of(va)
    # the shipped model averages the training views (identity and flips) in encode_image,
    # which is what "val" measures; "val_without_tta" is one view
    head_cfg = {"pooling": cfg.pooling, "image_hidden": cfg.image_hidden, "views": "flips",
                **cfg.extra.get("heads", {})}
    img_feats = feats["img"][..., : pooled_dim(head_cfg["pooling"])]
    val_texts = [c for i in va.tolist() for c in data.samples[i]["captions"]]
    # what stage 1 trains on: the UCM train images, then the AID train images
    tr_img, tr_labels = img_feats[:, tr], labels[tr]
    tr_caps, tr_own, tr_string = feats["cap_feats"][keep_tr], own_tr, feats["cap_string"][keep_tr]
    tr_cls = feats["cls_feats"]
    aid = feats.get("aid")
    if aid is not None:
        adata: UcmData = aid["data"]
        per: dict[str, int] = {}
        atr_list = []
        for i in adata.split("train"):
            lab = adata.samples[i]["folder"]
            if per.get(lab, 0) < cfg.aid_per_class:
                per[lab] = per.get(lab, 0) + 1
                atr_list.append(i)
        atr = torch.tensor(atr_list)
        new_keys = sorted({adata.samples[i]["label"] for i in atr.tolist()} - set(data.classes))
        joint = {c: i for i, c in enumerate(list(data.classes) + new_keys)}
        tr_cls = torch.cat([tr_cls, aid["cls_feats"][[aid["keys"].index(k) for k in new_keys]]])
        remap = torch.full((len(adata.samples),), -1, dtype=torch.long)
        remap[atr] = torch.arange(len(atr))
        keep_a = remap[aid["cap_owner"]] >= 0
        tr_img = torch.cat([tr_img, aid["img"][..., : pooled_dim(head_cfg["pooling"])][:, atr]], dim=1)
        tr_labels = torch.cat([tr_labels, torch.tensor([joint[adata.samples[i]["label"]] for i in atr.tolist()])])
        tr_caps = torch.cat([tr_caps, aid["cap_feats"][keep_a]])
        tr_own = torch.cat([tr_own, remap[aid["cap_owner"][keep_a]] + len(tr)])
        tr_string = torch.cat([tr_string, aid["cap_string"][keep_a] + int(feats["cap_string"].max()) + 1])

    def fit_global(seed: int, log: Callable[[int, float], None] | None) -> tuple[Any, list[float]]:
        torch.manual_seed(seed)
        h = registry.build("mini-clip", **head_cfg)
        fit_standardize(h.image_head.norm, tr_img.flatten(0, 1))
        fit_standardize(h.text_head.norm, torch.cat([tr_caps, tr_cls.flatten(0, 1)]))
        losses = train_global(h, tr_img, tr_labels, tr_caps, tr_own, tr_string, tr_cls, replace(cfg, seed=seed), log=log)
        return h, losses

    def val_of(h: Any, tta: bool = True) -> dict[str, float]:
        return evaluate_global(h, img_feats[:, va], labels[va], feats["cap_feats"][keep_va], own_va,
                               feats["cls_feats"], tta=tta, texts=val_texts)

    t0 = time.time()
    heads, g_losses = fit_global(cfg.seed, None if quiet else
                                 lambda e, v: progress(f"  global epoch {e}: loss {v:.4f}", quiet))
    val = val_of(heads)
    if aid is not None:
        val.update(evaluate_aid(heads, aid))
    val_no_tta = val_of(heads, tta=False)
    seed_runs = [{"seed": cfg.seed, **val}]
    for k in range(1, cfg.n_seeds):
        progress(f"  global heads, seed {cfg.seed + k} (reported only)", quiet)
        h = fit_global(cfg.seed + k, None)[0]
        seed_runs.append({"seed": cfg.seed + k, **val_of(h), **(evaluate_aid(h, aid) if aid is not None else {})})
    t_global = time.time() - t0
    mt = feats["mos_train"]
    fit_standardize(heads.dense_head.n8, mt["f8"][:256].float())
    fit_standardize(heads.dense_head.n16, mt["f16"][:256].float())
    fit_standardize(heads.dense_head.n32, mt["f32"][:256].float())
    with torch.no_grad():
        cls_emb = F.normalize(torch.stack([heads.text(feats["cls_feats"][:, t])
                                           for t in range(feats["cls_feats"].shape[1])]).mean(0), dim=-1)
    t0 = time.time()
    with torch.no_grad():
        con_emb = F.normalize(torch.stack([heads.text(feats["con_feats"][:, t])
                                           for t in range(feats["con_feats"].shape[1])]).mean(0), dim=-1)
    d_losses = train_dense(heads, mt, cls_emb, cfg,
                           log=None if quiet else lambda e, v: progress(f"  dense epoch {e}: loss {v:.4f}", quiet),
                           concept_emb=con_emb, presence=feats["presence"])
    t_dense = time.time() - t0
    val.update(evaluate_dense(heads, feats["mos_val"], cls_emb, len(data.classes)))
    result = {
        "val": val, "val_without_tta": val_no_tta, "global_losses": g_losses, "dense_losses": d_losses,
        "val_seeds": _seed_summary(seed_runs),
        "config": asdict(cfg), "seconds": {"global_heads": t_global, "dense_head": t_dense},
        "data": {"root": str(data_root), "ucm_json_sha256_16": data.digest,
                 "train_images": len(tr), "val_images": len(va)},
    }
    if aid is not None:
        adata = aid["data"]
        result["data"]["aid"] = {"root": str(aid_root), "split_sha256_16": adata.digest,
                                 "trained_images": len(atr),
                                 **{f"{k}_images": len(adata.split(k)) for k in ("train", "val", "heldout")},
                                 "heldout_classes": sorted({s["folder"] for s in adata.samples if s["split"] == "heldout"})}
    if out_path is not None:
        save_heads(heads, out_path, metadata={"train_config": asdict(cfg), "val": val})
    result["heads"] = heads
    return result


#: option order of the recorded command (``rsvl train mini-clip``)
_COMMAND_OPTIONS = ("data", "aid", "aid_per_class", "out", "semseg", "cache", "card", "seed", "seeds", "epochs",
                    "dense_epochs",
                    "mosaics", "val_mosaics", "threads")


def format_command(options: dict[str, Any]) -> str:
    """The ``rsvl train mini-clip ...`` command line of these options (None = not given)."""
    parts = ["rsvl", "train", "mini-clip"]
    for key in _COMMAND_OPTIONS:
        value = options.get(key)
        if value is not None:
            parts += ["--" + key.replace("_", "-"), str(value)]
    return " ".join(parts)


def run_training(data_root: str | Path, out_path: str | Path, config: TrainConfig | None = None, *,
                 cache_dir: str | Path | None = None, semseg: str | Path | None = None,
                 card: str | Path | None = None, threads: int | None = None, quiet: bool = False,
                 command: str | None = None, aid: str | Path | None = None) -> dict[str, Any]:
    """What ``rsvl train mini-clip`` does: train, save the heads to ``out_path``, optionally
    measure dense quality on ``semseg``, and write ``card.json`` (next to the heads unless
    ``card`` is given) with the val numbers, the settings and ``command``."""
    cfg = config or TrainConfig()
    if aid is not None:
        load_aid(aid)  # a bad --aid fails here, not after minutes of UCM feature caching
    if threads:
        torch.set_num_threads(threads)
    t0 = time.time()
    res = train_mini_clip(data_root, out_path, cfg, cache_dir=cache_dir, quiet=quiet, aid_root=aid)
    heads = res.pop("heads")
    if semseg:

        progress("  dense quality on the semseg crops (evaluation only)", quiet)
        res["semseg"] = evaluate_semseg(MiniClip(heads), semseg)
    res["total_seconds"] = time.time() - t0
    res["command"] = command or format_command(
        {"data": data_root, "out": out_path, "semseg": semseg, "cache": cache_dir, "card": card,
         "seed": cfg.seed, "epochs": cfg.epochs, "dense_epochs": cfg.dense_epochs, "threads": threads})
    card_path = Path(card) if card else Path(out_path).with_name("card.json")
    card_data = json.loads(card_path.read_text()) if card_path.is_file() else {}
    card_data["training"] = {k: v for k, v in res.items()}
    card_data["val"] = res["val"]
    if "semseg" in res:
        card_data["semseg"] = {k: {m: v[m] for m in ("miou", "majority_miou")} for k, v in res["semseg"].items()}
    card_path.parent.mkdir(parents=True, exist_ok=True)
    write_text(card_path, json.dumps(card_data, indent=2, default=str))
    res["card_path"] = str(card_path)
    return res
