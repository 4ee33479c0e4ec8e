"""Pixel-labelled training data of mini-clip's dense head (LSeg-style), and its training.

Every pixel label of the shared data becomes 256 px crops whose tower maps are cached once:

* NWPU VHR-10 instance masks (train images of the image split every NWPU-trained rsvl model
  uses, ``split_images(ids, 0.15, 0)``): each object class against the rest ("other");
  crops centred on objects and random ones, at native scale and at half scale;
* WHU building, LoveDA, Potsdam and Vaihingen train crops of ``rsvl data semseg-split``:
  their named classes; LoveDA's "background" and ISPRS's "clutter" are "other";
* mosaics of UCM and AID train scenes (the scene class of each piece), as before.

Each source has its own vocabulary: the classes its labels name exhaustively. A crop is
scored only against the classes of its own vocabulary plus a learned "other" cosine
(``MiniClipHeads.other_cos``, the same at every location): a pixel whose cosine with every
listed class is below it belongs to "other" instead of being forced into the nearest name.
A threshold rather than a learned "other" embedding: NWPU's "other" pixels are forests,
fields and roads, and an embedding would learn that those look like "other" (it did: a
forest scene came out 74 % "other"), where a threshold only learns how sure a name must be. Named classes are dropped from a crop's list
at random during training, and their pixels become "other": so "other" learns to mean
"none of the classes asked for", which is what it means at inference, where the user's
class names replace the vocabulary (new names work through the frozen text head).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from rsvl.data.refgen import split_images
from rsvl.data.segmentation import segmentation_preset
from rsvl.errors import DatasetError
from rsvl.io import atomic_path, read_rgb, write_text
from rsvl.models.checkpoint import read_file
from rsvl.models.mini.clip import (
    TEMPLATES,
    MiniClip,
    MiniClipHeads,
    image_tower_for_clip,
    load_heads,
    save_heads,
)
from rsvl.models.mini.towers import MiniLMTower
from rsvl.train.mini_clip import dihedral, evaluate_semseg
from rsvl.train.mini_clip_data import (
    UcmData,
    aid_readable,
    cache_text_features,
    default_cache_dir,
    load_aid,
    load_ucm,
    make_mosaic,
    progress,
    read_ucm_image,
    to_input,
)

#: label of "other" (none of the source's named classes) and of ignored pixels
OTHER, IGNORE = -1, -100
#: side of the crops and stride of the stored labels (the dense head works at stride 8;
#: labels are kept at stride 4 and the logits upsampled to them)
CROP, LABEL_STRIDE = 256, 4
PIXEL_CACHE_VERSION = "1"

#: the named pixel classes: key -> prompts (synonyms; a random one is used per step)
PIXEL_CLASSES: dict[str, tuple[str, ...]] = {
    "airplane": ("airplane", "plane", "aircraft"),
    "ship": ("ship", "boat"),
    "storage tank": ("storage tank", "oil tank"),
    "baseball diamond": ("baseball diamond", "baseball field"),
    "tennis court": ("tennis court",),
    "basketball court": ("basketball court",),
    "ground track field": ("ground track field", "running track"),
    "harbor": ("harbor", "dock"),
    "bridge": ("bridge",),
    "vehicle": ("vehicle", "car"),
    "building": ("building", "house", "roof"),
    "road": ("road", "street"),
    "water": ("water", "lake"),
    "barren": ("barren land", "bare soil"),
    "forest": ("forest", "trees"),
    "farmland": ("farmland", "cropland", "agricultural land"),
    "impervious surface": ("impervious surface", "pavement", "road"),
    "low vegetation": ("low vegetation", "grass"),
    "tree": ("tree", "trees"),
}
NWPU_CLASSES = {"airplane": "airplane", "ship": "ship", "storage_tank": "storage tank",
                "baseball_diamond": "baseball diamond", "tennis_court": "tennis court",
                "basketball_court": "basketball court", "ground_track_field": "ground track field",
                "harbor": "harbor", "bridge": "bridge", "vehicle": "vehicle"}
#: semseg-split sources: preset -> label value -> class key (None: "other"); unlisted values are ignored
SEMSEG_VOCAB: dict[str, dict[int, str | None]] = {
    "loveda": {1: None, 2: "building", 3: "road", 4: "water", 5: "barren", 6: "forest", 7: "farmland"},
    "potsdam": {1: "impervious surface", 2: "building", 3: "low vegetation", 4: "tree", 5: "vehicle", 6: None},
    "vaihingen": {1: "impervious surface", 2: "building", 3: "low vegetation", 4: "tree", 5: "vehicle", 6: None},
    "whu_building": {0: None, 1: "building"},
}
#: the semseg sources trained on: Vaihingen is IR-R-G (vegetation is red), so it is scored
#: (``rsvl eval ovss``) but not trained on, which would teach that red means vegetation in RGB
TRAIN_SEMSEG = ("loveda", "potsdam", "whu_building")


@dataclass
class PixelBank:
    """The joint class list of the dense training: class keys, prompts and, per source, the
    keys its labels name (its vocabulary)."""
    keys: list[str]
    prompts: list[tuple[str, ...]]
    vocab: dict[str, list[int]]

    def index(self, key: str) -> int:
        return self.keys.index(key)


def make_bank(scene_keys: Sequence[str], scene_prompt: Callable[[str], str]) -> PixelBank:
    """The bank: the named pixel classes, then one class per scene key (mosaics)."""
    keys = list(PIXEL_CLASSES) + [f"scene:{k}" for k in scene_keys]
    prompts = list(PIXEL_CLASSES.values()) + [(scene_prompt(k),) for k in scene_keys]
    idx = {k: i for i, k in enumerate(keys)}
    vocab = {"nwpu": [idx[v] for v in NWPU_CLASSES.values()],
             "scenes": [idx[f"scene:{k}"] for k in scene_keys]}
    for name, m in SEMSEG_VOCAB.items():
        vocab[name] = sorted({idx[v] for v in m.values() if v is not None})
    return PixelBank(keys, prompts, vocab)


# --------------------------------------------------------------------------------------
# crops
# --------------------------------------------------------------------------------------


def _resize(img: np.ndarray, lab: np.ndarray, f: float) -> tuple[np.ndarray, np.ndarray]:
    h, w = lab.shape
    size = (max(1, round(w * f)), max(1, round(h * f)))
    img = np.asarray(Image.fromarray(img).resize(size, Image.BILINEAR))
    lab = np.asarray(Image.fromarray(lab.astype(np.int32)).resize(size, Image.NEAREST)).astype(np.int16)
    return img, lab


def _pad(img: np.ndarray, lab: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    h, w = lab.shape
    if h >= CROP and w >= CROP:
        return img, lab
    ph, pw = max(0, CROP - h), max(0, CROP - w)
    img = np.pad(img, ((0, ph), (0, pw), (0, 0)))
    lab = np.pad(lab, ((0, ph), (0, pw)), constant_values=IGNORE)
    return img, lab


def _crop_at(img: np.ndarray, lab: np.ndarray, cy: int, cx: int) -> tuple[np.ndarray, np.ndarray]:
    img, lab = _pad(img, lab)
    h, w = lab.shape
    y0 = int(np.clip(cy - CROP // 2, 0, h - CROP))
    x0 = int(np.clip(cx - CROP // 2, 0, w - CROP))
    return img[y0 : y0 + CROP, x0 : x0 + CROP], lab[y0 : y0 + CROP, x0 : x0 + CROP]


def _tiles(img: np.ndarray, lab: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """Non-overlapping CROP tiles covering the image (the last row/column shifted inside)."""
    img, lab = _pad(img, lab)
    h, w = lab.shape
    ys = sorted({min(y, h - CROP) for y in range(0, h, CROP)})
    xs = sorted({min(x, w - CROP) for x in range(0, w, CROP)})
    return [(img[y : y + CROP, x : x + CROP], lab[y : y + CROP, x : x + CROP]) for y in ys for x in xs]


def nwpu_crops(coco_json: str | Path, bank: PixelBank, split: str, seed: int = 0,
               images: str | Path | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """Crops of NWPU VHR-10 ``split`` images (``split_images(ids, 0.15, 0)``): per train image
    two crops centred on random objects, one random crop and one at half scale (val: one
    object-centred and one random crop); labels: class key index, OTHER elsewhere."""
    from pycocotools import (
        mask as mask_utils,  # lazy: pycocotools only for NWPU pixel data (training)
    )

    coco_json = Path(coco_json)
    doc = json.loads(coco_json.read_text())
    img_dir = Path(images) if images else coco_json.parent / "images"
    cats = {c["id"]: c["name"] for c in doc["categories"]}
    anns: dict[int, list[dict[str, Any]]] = {}
    for a in doc["annotations"]:
        anns.setdefault(a["image_id"], []).append(a)
    which = split_images([im["id"] for im in doc["images"]], 0.15, 0)
    rng = np.random.default_rng([seed, 7])
    out = []
    for im in sorted(doc["images"], key=lambda d: d["id"]):
        if which[im["id"]] != split:
            continue
        img = read_rgb(img_dir / im["file_name"])
        h, w = img.shape[:2]
        lab = np.full((h, w), OTHER, np.int16)
        # larger objects first, so smaller ones lying on them stay visible
        objs = sorted(anns.get(im["id"], []), key=lambda a: -a.get("area", 0))
        for a in objs:
            seg = a["segmentation"]
            rle = mask_utils.merge(mask_utils.frPyObjects(seg, h, w)) if isinstance(seg, list) else seg
            lab[mask_utils.decode(rle).astype(bool)] = bank.index(NWPU_CLASSES[cats[a["category_id"]]])
        centres = [(int(a["bbox"][1] + a["bbox"][3] / 2), int(a["bbox"][0] + a["bbox"][2] / 2)) for a in objs]
        picks: list[tuple[float, int, int]] = []
        n_obj = 2 if split == "train" else 1
        for _ in range(n_obj):
            if centres:
                cy, cx = centres[int(rng.integers(len(centres)))]
                picks.append((1.0, cy + int(rng.integers(-64, 65)), cx + int(rng.integers(-64, 65))))
        picks.append((1.0, int(rng.integers(h)), int(rng.integers(w))))
        if split == "train":
            picks.append((0.5, int(rng.integers(h)) // 2, int(rng.integers(w)) // 2))
        for f, cy, cx in picks:
            i2, l2 = (img, lab) if f == 1.0 else _resize(img, lab, f)
            out.append(_crop_at(i2, l2, cy, cx))
    return out


def semseg_crops(folder: str | Path, name: str, bank: PixelBank, scales: Sequence[float] = (1.0, 0.5)
                 ) -> list[tuple[np.ndarray, np.ndarray]]:
    """Tiles of every crop of a ``rsvl data semseg-split`` folder, at each of ``scales``."""
    ds = segmentation_preset(name, folder)
    table = np.full(256, IGNORE, np.int16)
    for v, key in SEMSEG_VOCAB[name].items():
        table[v] = OTHER if key is None else bank.index(key)
    out = []
    for s in ds.samples:
        img = ds.read_image(s)
        with Image.open(s.label) as im:
            raw = np.asarray(im)
        lab = table[(raw > 0).astype(np.uint8) if name == "whu_building" else raw]
        for f in scales:
            i2, l2 = (img, lab) if f == 1.0 else _resize(img, lab, f)
            if min(l2.shape) < CROP // 2:
                continue
            out += _tiles(i2, l2)
    return out


def scene_mosaics(datas: Sequence[UcmData], split: str, n: int, seed: int, bank: PixelBank
                  ) -> list[tuple[np.ndarray, np.ndarray]]:
    """Mosaics of ``split`` scenes of ``datas`` (UCM, AID), labelled with their scene class."""
    pool: dict[int, list[tuple[UcmData, int]]] = {}
    for d in datas:
        for i in d.split(split):
            pool.setdefault(bank.index("scene:" + d.samples[i]["label"]), []).append((d, i))
    classes = sorted(pool)
    cache: dict[tuple[int, int], np.ndarray] = {}

    def pick(rng: np.random.Generator, excluded: set[int]) -> tuple[np.ndarray, int, int]:
        c = int(rng.choice([k for k in classes if k not in excluded] or classes))
        d, s = pool[c][int(rng.integers(len(pool[c])))]
        key = (id(d), s)
        if key not in cache:
            cache[key] = read_ucm_image(d.root / d.samples[s]["image"])
        return cache[key], c, s

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        img, cls, _src = make_mosaic(rng, pick, CROP)
        out.append((img, cls.astype(np.int16)))
    return out


@torch.inference_mode()
def cache_crops(crops: Sequence[tuple[np.ndarray, np.ndarray]], source: str, vocab: str, cache: Path,
                tower: Any, key: str, batch_size: int = 8, quiet: bool = False) -> dict[str, Any] | None:
    """Tower maps (fp16) of the crops, their labels at stride 4 and their vocabulary name
    (None when there are no crops)."""
    f = cache / f"pixels-{source}-{key}-v{PIXEL_CACHE_VERSION}.pt"
    if f.is_file():
        return read_file(f, "Feature cache")
    if not crops:
        return None
    out: dict[str, list[torch.Tensor]] = {k: [] for k in ("f8", "f16", "f32", "label")}
    t0 = time.time()
    off = LABEL_STRIDE // 2
    for b in range(0, len(crops), batch_size):
        chunk = crops[b : b + batch_size]
        f8, f16, f32 = tower(to_input([c[0] for c in chunk]))
        out["f8"].append(f8.half())
        out["f16"].append(f16.half())
        out["f32"].append(f32.half())
        out["label"].append(torch.from_numpy(np.stack([c[1][off::LABEL_STRIDE, off::LABEL_STRIDE] for c in chunk])))
        if (b // batch_size) % 25 == 0:
            progress(f"  pixels [{source}] {b}/{len(crops)}", quiet)
    res: dict[str, Any] = {k: torch.cat(v) for k, v in out.items()}
    res["vocab"] = vocab
    with atomic_path(f) as tmp:
        torch.save(res, tmp)
    progress(f"  pixels [{source}]: {len(crops)} crops, {len(crops) / max(time.time() - t0, 1e-9):.1f}/s", quiet)
    return res


def crops_key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------


@dataclass
class PixelTrainConfig:
    epochs: int = 8
    batch: int = 32
    lr: float = 2e-3
    weight_decay: float = 0.05
    #: probability that a named class present in a crop is left out of its list (its pixels
    #: become "other")
    drop_class: float = 0.2
    #: weight of "other" pixels in the cross-entropy
    other_weight: float = 0.5
    #: how often the small real-scene sources are repeated per epoch (a few dozen crops next to
    #: thousands of mosaics and NWPU crops)
    repeat: dict[str, int] = field(default_factory=lambda: {"loveda": 20, "potsdam": 20, "whu_building": 20})
    seed: int = 0


def pixel_logits(heads: Any, d: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """(B, K + 1, h, w): scaled cosine of every location with the K queries, then the learned
    "other" cosine (the same at every location)."""
    cos = torch.einsum("bdhw,kd->bkhw", d, queries)
    other = heads.other_threshold().to(cos.dtype).expand(cos.shape[0], 1, *cos.shape[2:])
    scale = heads.dense_log_scale.exp().clamp(max=100)
    return scale * torch.cat([cos, other], 1)


def train_pixels(heads: Any, sources: Sequence[dict[str, Any]], bank: PixelBank, prompt_emb: list[torch.Tensor],
                 cfg: PixelTrainConfig, log: Callable[[int, float], None] | None = None) -> list[float]:
    """Train the dense head and the "other" embedding on the cached crops of ``sources``.

    ``prompt_emb[k]`` (P_k, D): the frozen text embeddings of class k's prompts."""
    g = torch.Generator().manual_seed(cfg.seed + 11)
    repeat = cfg.repeat
    index = []  # (source, row)
    for si, src in enumerate(sources):
        index += [(si, r) for r in range(src["f8"].shape[0])] * max(1, repeat.get(src["vocab"], 1))
    params = list(heads.dense_head.parameters()) + [heads.dense_log_scale, heads.other_cos]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = math.ceil(len(index) / cfg.batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=max(steps * cfg.epochs, 1), pct_start=0.1)
    K = len(bank.keys)
    vocab_mask = {name: torch.zeros(K + 1, dtype=torch.bool) for name in bank.vocab}
    for name, ids in bank.vocab.items():
        vocab_mask[name][ids] = True
        vocab_mask[name][K] = True
    losses = []
    heads.dense_head.train()
    for ep in range(cfg.epochs):
        perm = torch.randperm(len(index), generator=g)
        tot = 0.0
        for s in range(steps):
            rows = [index[int(i)] for i in perm[s * cfg.batch : (s + 1) * cfg.batch]]
            k = int(torch.randint(4, (1,), generator=g))
            flip = bool(torch.randint(2, (1,), generator=g))
            f8, f16, f32, lab = (torch.stack([sources[si][name][r] for si, r in rows]).float() if name != "label"
                                 else torch.stack([sources[si][name][r] for si, r in rows]).long()
                                 for name in ("f8", "f16", "f32", "label"))
            f8, f16, f32, lab = (dihedral(t, k, flip) for t in (f8, f16, f32, lab))
            # one random prompt per class for this step
            q = torch.stack([e[int(torch.randint(e.shape[0], (1,), generator=g))] for e in prompt_emb])
            d = heads.dense(f8, f16, f32)
            logits = pixel_logits(heads, d, q)
            logits = F.interpolate(logits, size=lab.shape[-2:], mode="bilinear", align_corners=False)
            mask = torch.stack([vocab_mask[sources[si]["vocab"]] for si, _ in rows]).clone()
            target = lab.clone()
            target[target == OTHER] = K
            for b in range(len(rows)):
                present = [int(c) for c in torch.unique(target[b]) if 0 <= int(c) < K]
                for c in present:
                    if float(torch.rand((1,), generator=g)) < cfg.drop_class and len(present) > 1:
                        mask[b, c] = False
                        target[b][target[b] == c] = K
            logits = logits.masked_fill(~mask[:, :, None, None], -1e4)
            weight = torch.ones(K + 1)
            weight[K] = cfg.other_weight
            loss = F.cross_entropy(logits, target, weight=weight, ignore_index=IGNORE)
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


@torch.inference_mode()
def evaluate_pixels(heads: Any, src: dict[str, Any], bank: PixelBank, prompt_emb: list[torch.Tensor]) -> dict[str, Any]:
    """mIoU / pixel accuracy on cached val crops: their vocabulary plus "other", prompts averaged."""
    heads.eval()
    ids = bank.vocab[src["vocab"]]
    q = torch.stack([F.normalize(prompt_emb[i].mean(0), dim=-1) for i in ids])
    n = len(ids) + 1
    remap = torch.full((len(bank.keys) + 1,), -1, dtype=torch.long)
    remap[torch.tensor(ids)] = torch.arange(len(ids))
    remap[len(bank.keys)] = len(ids)
    cm = torch.zeros(n, n, dtype=torch.long)
    for b in range(0, src["f8"].shape[0], 32):
        d = heads.dense(*(src[k][b : b + 32].float() for k in ("f8", "f16", "f32")))
        logits = pixel_logits(heads, d, q)
        lab = src["label"][b : b + 32].long()
        logits = F.interpolate(logits, size=lab.shape[-2:], mode="bilinear", align_corners=False)
        pred = logits.argmax(1)
        gt = lab.clone()
        gt[gt == OTHER] = len(bank.keys)
        valid = gt != IGNORE
        g2 = remap[gt[valid]]
        cm += torch.bincount(g2 * n + pred[valid], minlength=n * n).view(n, n)
    inter = cm.diag().float()
    union = cm.sum(0) + cm.sum(1) - cm.diag()
    present = cm.sum(1) > 0
    iou = inter / union.clamp_min(1)
    names = [bank.keys[i] for i in ids] + ["other"]
    return {"miou": 100.0 * float(iou[present].mean()), "pixel_acc": 100.0 * float(inter.sum() / cm.sum().clamp_min(1)),
            "iou": {names[i]: 100.0 * float(iou[i]) for i in range(n) if present[i]}}


def prompt_embeddings(heads: Any, text_feats: torch.Tensor, bank: PixelBank) -> list[torch.Tensor]:
    """Per class, (P_k, D) template-averaged joint embeddings of its prompts; ``text_feats`` are
    the text tower's outputs of ``bank_prompts(bank)`` in order."""
    out, i = [], 0
    with torch.no_grad():
        for prompts in bank.prompts:
            n = len(prompts) * len(TEMPLATES)
            e = heads.text(text_feats[i : i + n]).view(len(prompts), len(TEMPLATES), -1).mean(1)
            out.append(F.normalize(e, dim=-1))
            i += n
    return out


def bank_prompts(bank: PixelBank) -> list[str]:
    return [t.format(p) for prompts in bank.prompts for p in prompts for t in TEMPLATES]


def prepare_pixel_sources(bank: PixelBank, cache: Path, tower: Any, *, scenes: Sequence[UcmData],
                          nwpu: str | Path | None = None, pixels: str | Path | None = None,
                          n_mosaics: int = 1600, n_val_mosaics: int = 200, seed: int = 0,
                          quiet: bool = False) -> dict[str, list[dict[str, Any]]]:
    """Cached crops of every source: ``{"train": [...], "val": [...]}``, each a dict of maps,
    labels and its vocabulary name. ``pixels``: a ``rsvl data semseg-split`` folder (its
    ``train/`` crops are trained on, its ``val/`` crops are for ``rsvl eval ovss``)."""
    out: dict[str, list[dict[str, Any]]] = {"train": [], "val": []}
    scene_id = [d.digest for d in scenes]
    for split, n, s in (("train", n_mosaics, seed), ("val", n_val_mosaics, seed + 1000)):
        if n > 0:
            key = crops_key("scenes", scene_id, split, n, s, bank.keys)
            f = cache / f"pixels-scenes-{split}-{key}-v{PIXEL_CACHE_VERSION}.pt"
            crops = [] if f.is_file() else scene_mosaics(scenes, split, n, s, bank)
            out[split].append(cache_crops(crops, f"scenes-{split}", "scenes", cache, tower, key, quiet=quiet))
    out = {k: [x for x in v if x is not None] for k, v in out.items()}
    if nwpu is not None:
        for split in ("train", "val"):
            key = crops_key("nwpu", str(Path(nwpu).resolve()), Path(nwpu).stat().st_size, split, seed, bank.keys)
            f = cache / f"pixels-nwpu-{split}-{key}-v{PIXEL_CACHE_VERSION}.pt"
            crops = [] if f.is_file() else nwpu_crops(nwpu, bank, split, seed)
            res = cache_crops(crops, f"nwpu-{split}", "nwpu", cache, tower, key, quiet=quiet)
            if res is not None:
                out[split].append(res)
    if pixels is not None:
        root = Path(pixels) / "train"
        for name in TRAIN_SEMSEG:
            folder = root / name
            if not (folder / "images").is_dir():
                continue
            files = sorted(p.name for p in (folder / "images").iterdir())
            key = crops_key("semseg", str(folder.resolve()), files, bank.keys)
            f = cache / f"pixels-{name}-{key}-v{PIXEL_CACHE_VERSION}.pt"
            crops = [] if f.is_file() else semseg_crops(folder, name, bank)
            res = cache_crops(crops, name, name, cache, tower, key, quiet=quiet)
            if res is not None:
                out["train"].append(res)
    if not out["train"]:
        raise DatasetError("no pixel-labelled crops to train on.",
                           hint="Pass --mosaics > 0, --nwpu or --pixels with train crops.")
    return out


# --------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------

#: the pixel-labelled datasets ``rsvl eval ovss`` scores on the val crops of ``semseg-split``
SEMSEG_VAL = ("loveda", "potsdam", "vaihingen", "whu_building")


def with_other(heads: Any) -> Any:
    """A copy of ``heads`` with a learned "other" query (``HeadsConfig.other``), every other
    weight kept; heads that have one are returned as they are."""
    if heads.config.other:
        return heads
    new = MiniClipHeads(replace(heads.config, other=True))
    missing, unexpected = new.load_state_dict(heads.state_dict(), strict=False)
    if unexpected or set(missing) != {"other_cos"}:  # pragma: no cover - the classes define both
        raise RuntimeError(f"unexpected heads layout: missing {missing}, unexpected {unexpected}")
    return new


def train_dense_other(heads_path: str | Path, out_path: str | Path, *, ucm: str | Path, aid: str | Path | None = None,
                      nwpu: str | Path | None = None, pixels: str | Path | None = None,
                      config: PixelTrainConfig | None = None, cache_dir: str | Path | None = None,
                      n_mosaics: int = 1600, n_val_mosaics: int = 200, card: str | Path | None = None,
                      command: str | None = None, threads: int | None = None, quiet: bool = False) -> dict[str, Any]:
    """What ``rsvl train mini-clip-dense`` does: start from the heads at ``heads_path`` (their
    image and text heads are kept as they are, so every scene-level number stays), train the
    dense head and a learned "other" query on every pixel label (module doc), measure it on the
    val crops of every source and, with ``pixels``, as ``rsvl eval ovss`` scores the
    ``semseg-split`` val crops next to the majority-class guess; save the heads to ``out_path``
    and the numbers to ``card.json`` (next to them unless ``card`` is given)."""
    cfg = config or PixelTrainConfig()
    if threads:
        torch.set_num_threads(threads)
    t0 = time.time()
    torch.manual_seed(cfg.seed)
    heads = with_other(load_heads(heads_path))
    # bad inputs fail here, before minutes of feature caching
    if nwpu is not None and not Path(nwpu).is_file():
        raise DatasetError(f"NWPU VHR-10 COCO file not found: {nwpu}.",
                           hint="Pass --nwpu ../shared/data/nwpu_vhr10/instances_train.json.")
    if pixels is not None and not (Path(pixels) / "train").is_dir():
        raise DatasetError(f"{pixels} has no train/ folder.",
                           hint="Pass a folder written by `rsvl data semseg-split ../shared/data/semseg -o OUT`.")
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    scenes = [load_ucm(ucm)] + ([load_aid(aid)] if aid is not None else [])
    scene_keys = sorted({d.samples[i]["label"] for d in scenes for i in d.split("train")})
    bank = make_bank(scene_keys, aid_readable)
    tower = image_tower_for_clip().fuse_for_inference()  # frozen: same features, faster
    text_feats = cache_text_features(bank_prompts(bank), cache, MiniLMTower(), "pixel-bank")
    prompt_emb = prompt_embeddings(heads, text_feats, bank)
    sources = prepare_pixel_sources(bank, cache, tower, scenes=scenes, nwpu=nwpu, pixels=pixels,
                                    n_mosaics=n_mosaics, n_val_mosaics=n_val_mosaics, seed=cfg.seed, quiet=quiet)
    t_cache = time.time() - t0
    before = {s["vocab"]: evaluate_pixels(heads, s, bank, prompt_emb) for s in sources["val"]}
    t1 = time.time()
    losses = train_pixels(heads, sources["train"], bank, prompt_emb, cfg,
                          log=None if quiet else lambda e, v: progress(f"  dense epoch {e}: loss {v:.4f}", quiet))
    t_train = time.time() - t1
    heads.eval()
    val = {s["vocab"]: evaluate_pixels(heads, s, bank, prompt_emb) for s in sources["val"]}
    res: dict[str, Any] = {
        "config": asdict(cfg), "losses": losses, "val_crops": val, "val_crops_before": before,
        "train_crops": {s["vocab"]: int(s["f8"].shape[0]) for s in sources["train"]},
        "val_crop_counts": {s["vocab"]: int(s["f8"].shape[0]) for s in sources["val"]},
        "classes": bank.keys, "seconds": {"cache": t_cache, "train": t_train},
        "init": str(heads_path),
    }
    if pixels is not None:
        progress("  rsvl eval ovss on the semseg-split val crops", quiet)
        res["semseg_val"] = evaluate_semseg(MiniClip(heads, image_tower=tower), Path(pixels) / "val",
                                            datasets=SEMSEG_VAL, protocols=("rsvl",))
    res["total_seconds"] = time.time() - t0
    res["command"] = command
    save_heads(heads, out_path, metadata={"dense_train_config": json.dumps(asdict(cfg))})
    card_path = Path(card) if card else Path(out_path).with_name("card.json")
    card_data = json.loads(card_path.read_text()) if card_path.is_file() else {}
    card_data["dense_training"] = res
    if "semseg_val" in res:
        card_data["semseg_val"] = {k: {m: v[m] for m in ("miou", "pixel_acc", "majority_miou", "majority_pixel_acc")}
                                   for k, v in res["semseg_val"].items()}
    write_text(card_path, json.dumps(card_data, indent=2, default=str))
    res["card_path"] = str(card_path)
    return res
