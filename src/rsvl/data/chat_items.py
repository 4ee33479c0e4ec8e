"""Chat instruction items from the real annotations: the tasks, their phrasings and answers.

:func:`generate_items` reads UC Merced (captions, scene classes), RSIVQA (its visual
questions on the UCM images), NWPU VHR-10 (instance boxes) and AID (scene classes) and
returns every single-turn question/answer item with its split; :mod:`rsvl.data.chat` caps,
shuffles and writes them. No torch here.

Tasks (the ``task`` of an item and the NAME of its eval file; source first, so that no name
is one of RSEvalKit's own task keys or file names, which ``rsvl eval chat`` maps to
upstream's benchmark files):

========================  =====================================================  ========  ====
task                      question -> answer                                      scorer    tag
========================  =====================================================  ========  ====
``ucm_describe``          "Describe this image." -> one of its human captions     none      it
``ucm_cls``, ``aid_cls``  "Classify the image within one of the given classes:    cls       cls
                          a, b, ... Answer with only the class name." -> class
``rsivqa_presence``       RSIVQA "Does this picture contain ...?" -> yes / no     presence  vqa
``rsivqa_counting``       RSIVQA "How many cars in the picture?" -> "three"       vqa       vqa
``rsivqa_location``       RSIVQA "What is the location of ...?" -> "top left ..."  vqa       vqa
``rsivqa_theme``          RSIVQA "What is the theme of this picture?" -> "harbor"  vqa       vqa
``nwpu_presence``         "Is there a ship in this image?" -> "Yes." / "No."      presence  idk
``nwpu_counting``         "How many ships are there in this image?" -> "3"        counting  it
``nwpu_vg``               "Where is the bridge? Give its bounding box."           bbox      vg
                          -> "[[x1, y1, x2, y2]]" (integers in 0-1000)
``nwpu_relpos``           "Is the ship to the left or to the right of the         vqa       idk
                          harbor?" -> "Left." / "Right." (also above / below)
========================  =====================================================  ========  ====

Honesty: ``nwpu_presence`` asks, per image, about as many absent classes ("No.") as present
ones ("Yes."), and ``nwpu_counting`` asks about one absent class per image ("0"); every
answer comes from the instance labels. Grounding and relative position are asked only about
classes with exactly one instance in the image (grounding also with up to
:data:`MAX_BOXES` instances in train, answered with all their boxes, left to right).
Relative position is asked about a class with one instance against another class (one or
more instances: "the ships"), only when every box centre of the other class lies on the
same side, at least :data:`RELPOS_MARGIN` of the image side away. Questions take a seeded
phrasing among a few in train and the first (canonical) one in val.

Boxes follow VHM: the training answer is ``[[x1, y1, x2, y2]]`` with integers in 0-1000
relative to the image width and height; the ground truth of the ``nwpu_vg`` eval file is the
same list in absolute pixels (what RSEvalKit's bbox scorer compares with the prediction
scaled by w/1000 and h/1000).

Splits are by image: UCM and RSIVQA use the split given in their files; NWPU uses
:func:`rsvl.data.refgen.split_images` (the split of mini-refer and mini-instances, so the
val images are unseen by every built-in model); AID gets a seeded split per class.

Run through ``rsvl data chat`` (:func:`rsvl.data.chat.build_chat_data`).
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rsvl.data.refgen import class_phrase, load_coco, split_images
from rsvl.data.scenes import SceneFolderDataset, UCMJsonDataset
from rsvl.errors import DatasetError, InputNotFoundError

__all__ = [
    "CAPTIONS_PER_IMAGE",
    "IMAGE_TOKEN",
    "MAX_BOXES",
    "RELPOS_MARGIN",
    "TASKS",
    "ChatItem",
    "ChatTask",
    "aid_class_name",
    "box_to_vhm",
    "clean_caption",
    "generate_items",
    "rsivqa_kind",
    "ucm_class_name",
]

#: relative position: the box centres differ by at least this fraction of the image side
RELPOS_MARGIN = 0.1
#: grounding in train: classes with up to this many instances, answered with all their boxes
#: (one box is about 20 SmolLM2 tokens; mini-chat's trainer keeps 48 answer tokens)
MAX_BOXES = 2
#: train captions per UCM image (distinct ones; val gets one)
CAPTIONS_PER_IMAGE = 3
#: the prompt of an image turn, as in LLaVA / VHM
IMAGE_TOKEN = "<image>"


@dataclass(frozen=True)
class ChatTask:
    """A task: the scorer ``rsvl eval chat`` uses and VHM's tag kind for the question."""

    scorer: str
    tag: str
    source: str


TASKS: dict[str, ChatTask] = {
    "ucm_describe": ChatTask("none", "it", "ucm"),
    "ucm_cls": ChatTask("cls", "cls", "ucm"),
    "aid_cls": ChatTask("cls", "cls", "aid"),
    "rsivqa_presence": ChatTask("presence", "vqa", "rsivqa"),
    "rsivqa_counting": ChatTask("vqa", "vqa", "rsivqa"),
    "rsivqa_location": ChatTask("vqa", "vqa", "rsivqa"),
    "rsivqa_theme": ChatTask("vqa", "vqa", "rsivqa"),
    "nwpu_presence": ChatTask("presence", "idk", "nwpu"),
    "nwpu_counting": ChatTask("counting", "it", "nwpu"),
    "nwpu_vg": ChatTask("bbox", "vg", "nwpu"),
    "nwpu_relpos": ChatTask("vqa", "idk", "nwpu"),
}

_DESCRIBE = ("Describe this image.", "Describe the image briefly.",
             "What does this image show?", "Give a short description of this image.")
_CLS = ("Classify the image within one of the given classes: {classes}. "
        "Answer with only the class name.",
        "Which of these classes does this scene belong to: {classes}? "
        "Answer with only the class name.",
        "What type of scene is this? Choose one of: {classes}. "
        "Answer with only the class name.")
_PRESENCE = ("Is there {a} in this image?", "Does this image contain {a}?",
             "Can you see {a} in this image?", "Are there any {plural} in this image?")
_COUNTING = ("How many {plural} are there in this image?", "Count the {plural} in this image.",
             "How many {plural} can you see in this image?",
             "What is the number of {plural} in this image?")
_VG_ONE = ("Where is the {name}? Give its bounding box.",
           "Locate the {name} in this image. Answer with its bounding box.",
           "Give the bounding box of the {name}.")
_VG_MANY = ("Where are the {plural}? Give their bounding boxes.",
            "Locate every {name} in this image. Answer with their bounding boxes.",
            "Give the bounding boxes of the {plural}.")
_RELPOS_H = ("Is the {a} to the left or to the right of the {b}?",
             "Is the {a} to the right or to the left of the {b}?",
             "Is the {a} on the left or on the right of the {b}?")
_RELPOS_V = ("Is the {a} above or below the {b}?", "Is the {a} below or above the {b}?")

_UCM_WORDS = {
    "baseballdiamond": "baseball diamond", "mediumresidential": "medium residential",
    "mobilehomepark": "mobile home park", "parkinglot": "parking lot",
    "sparseresidential": "sparse residential", "storagetanks": "storage tanks",
    "tenniscourt": "tennis court", "denseresidential": "dense residential",
    "golfcourse": "golf course",
}


def ucm_class_name(label: str) -> str:
    """UCM folder label -> readable words: ``mobilehomepark`` -> "mobile home park"."""
    return _UCM_WORDS.get(label, label.replace("_", " ").lower())


def aid_class_name(label: str) -> str:
    """AID folder label -> readable words: ``RailwayStation`` -> "railway station"."""
    return re.sub(r"(?<=[a-z])(?=[A-Z])", " ", label).replace("_", " ").lower()


def _article(phrase: str) -> str:
    return ("an " if phrase[:1] in "aeiou" else "a ") + phrase


def box_to_vhm(bbox: Sequence[float], width: float, height: float) -> list[int]:
    """COCO box ``(x, y, w, h)`` in pixels -> VHM's ``[x1, y1, x2, y2]`` integers in 0-1000."""
    x, y, w, h = (float(v) for v in bbox)
    vals = (x / width, y / height, (x + w) / width, (y + h) / height)
    return [min(1000, max(0, round(v * 1000))) for v in vals]


def _box_pixels(bbox: Sequence[float]) -> list[int]:
    x, y, w, h = (float(v) for v in bbox)
    return [round(x), round(y), round(x + w), round(y + h)]


def _boxes_text(boxes: Sequence[Sequence[int]]) -> str:
    return "[" + ", ".join("[" + ", ".join(str(v) for v in b) + "]" for b in boxes) + "]"


def clean_caption(text: str) -> str:
    """UCM-Captions' "There is a piece of farmland ." -> "There is a piece of farmland."."""
    t = " ".join(text.split())
    t = re.sub(r"\s+([.,;:!?])", r"\1", t)
    if t and t[-1] not in ".!?":
        t += "."
    return t[:1].upper() + t[1:]


def _clean_question(text: str) -> str:
    t = " ".join(text.split())
    return t[:1].upper() + t[1:]


# --------------------------------------------------------------------------------------
# Items
# --------------------------------------------------------------------------------------

@dataclass
class ChatItem:
    """One question and its answer about one image."""

    task: str
    source: str
    image: Path
    split: str
    question: str
    answer: str
    key: str
    #: the answer of the eval file when it differs from the training answer (boxes in pixels)
    eval_answer: str | None = None
    #: False: kept in val.json but not written to the eval file (e.g. several boxes)
    evaluable: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        """VHM's training layout."""
        return {
            "id": self.key,
            "image": str(self.image),
            "source_dataset": self.source,
            "task": self.task,
            "conversations": [
                {"from": "human", "value": f"{IMAGE_TOKEN}\n{self.question}"},
                {"from": "gpt", "value": self.answer},
            ],
        }

    def eval_record(self, size: tuple[int, int], folder: str) -> dict[str, Any]:
        """The VHM_Eval layout: ``folder`` holds the image (``image_path``, relative to the
        eval folder or absolute, joined with the file name as RSEvalKit does); ``size`` is
        (h, w) of the image."""
        answer = self.answer if self.eval_answer is None else self.eval_answer
        return {
            "id": self.key,
            "image": self.image.name,
            "image_path": folder,
            "conversations": [
                {"from": "human", "value": f"{IMAGE_TOKEN}\n{self.question}"},
                {"from": "gpt", "value": answer},
            ],
            "size": [int(size[0]), int(size[1])],
        } | self.extra


def _pick(options: Sequence[str], rng: random.Random, split: str) -> str:
    """A seeded phrasing in train; the first (canonical) one in val, so scores compare."""
    return options[0] if split == "val" else options[rng.randrange(len(options))]


def _ucm_items(ucm: Path, seed: int) -> list[ChatItem]:
    data = UCMJsonDataset(ucm)
    classes = ", ".join(ucm_class_name(c) for c in data.classes)
    items: list[ChatItem] = []
    for s in data.samples:
        if s.split not in ("train", "val"):
            continue
        image = s.image.resolve()
        rng = random.Random(f"chat-ucm:{seed}:{image.name}")
        stem = f"ucm/{s.image.parent.name}/{s.image.stem}"
        captions = list(dict.fromkeys(clean_caption(c) for c in s.captions if c.strip()))
        if captions:
            n = 1 if s.split == "val" else min(CAPTIONS_PER_IMAGE, len(captions))
            chosen = rng.sample(captions, n)
            for k, cap in enumerate(chosen):
                extra = {"captions": captions} if s.split == "val" else {}
                items.append(ChatItem("ucm_describe", "ucm", image, s.split,
                                      _pick(_DESCRIBE, rng, s.split), cap,
                                      f"ucm_describe/{stem}/{k}", extra=extra))
        question = _pick(_CLS, rng, s.split).format(classes=classes)
        items.append(ChatItem("ucm_cls", "ucm", image, s.split, question,
                              ucm_class_name(s.class_name), f"ucm_cls/{stem}/0"))
    return items


_RSIVQA_FORMS = (
    ("rsivqa_presence", re.compile(r"^(does|do|is|are) (this|the|there)\b", re.I)),
    ("rsivqa_counting", re.compile(r"^how many\b", re.I)),
    ("rsivqa_location", re.compile(r"^(what is the location|where)\b", re.I)),
    ("rsivqa_theme", re.compile(r"^what is the theme\b", re.I)),
)
_EMPTY_COUNT = re.compile(r"^how many\s+(in|are|is|on)\b", re.I)


def rsivqa_kind(question: str) -> str | None:
    """The task of an RSIVQA question from its form, or None when it is noise to drop
    (an unknown form, or "How many  in the picture?" without an object)."""
    q = " ".join(question.split())
    if _EMPTY_COUNT.match(q):
        return None
    for task, pattern in _RSIVQA_FORMS:
        if pattern.match(q):
            return task
    return None


def _rsivqa_items(ucm: Path, dropped: Counter[str]) -> list[ChatItem]:
    path = ucm / "rsivqa.json" if ucm.is_dir() else ucm.parent / "rsivqa.json"
    if not path.is_file():
        dropped["rsivqa_file_missing"] += 1
        return []
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise DatasetError(f"cannot read RSIVQA file {path}: {exc}") from exc
    samples = data.get("samples") if isinstance(data, dict) else None
    if not isinstance(samples, list):
        raise DatasetError(f"{path} lacks a 'samples' list",
                           hint="Expected {'samples': [{image, split, question, answer}, ...]}.")
    root = path.parent
    seen: set[tuple[str, str, str]] = set()
    per_image: Counter[tuple[str, str]] = Counter()
    items: list[ChatItem] = []
    for k, rec in enumerate(samples):
        if not isinstance(rec, dict) or not all(key in rec for key in
                                                ("image", "split", "question", "answer")):
            raise DatasetError(f"sample {k} of {path} lacks image, split, question or answer")
        split = str(rec["split"])
        if split not in ("train", "val"):
            continue
        question = _clean_question(str(rec["question"]))
        answer = " ".join(str(rec["answer"]).split())
        task = rsivqa_kind(question)
        if task is None or not answer:
            dropped["rsivqa_noise"] += 1
            continue
        dedup = (str(rec["image"]), question.lower(), answer.lower())
        if dedup in seen:
            dropped["rsivqa_duplicate"] += 1
            continue
        seen.add(dedup)
        image = (root / str(rec["image"])).resolve()
        stem = f"rsivqa/{image.parent.name}/{image.stem}"
        n = per_image[(task, stem)]
        per_image[(task, stem)] += 1
        items.append(ChatItem(task, "rsivqa", image, split, question, answer,
                              f"{task}/{stem}/{n}"))
    return items


def aid_split(labels: dict[str, list[Path]], val_fraction: float, seed: int) -> dict[Path, str]:
    out: dict[Path, str] = {}
    for label in sorted(labels):
        files = sorted(labels[label])
        random.Random(f"chat-aid-split:{seed}:{label}").shuffle(files)
        n_val = int(round(len(files) * val_fraction))
        out.update({f: ("val" if k < n_val else "train") for k, f in enumerate(files)})
    return out


def _aid_items(aid: Path, val_fraction: float, seed: int) -> list[ChatItem]:
    data = SceneFolderDataset(aid)
    by_label: dict[str, list[Path]] = defaultdict(list)
    for s in data.samples:
        by_label[s.class_name].append(s.image.resolve())
    split = aid_split(by_label, val_fraction, seed)
    classes = ", ".join(aid_class_name(c) for c in data.classes)
    items: list[ChatItem] = []
    for s in data.samples:
        image = s.image.resolve()
        rng = random.Random(f"chat-aid:{seed}:{s.class_name}/{image.name}")
        sp = split[image]
        question = _pick(_CLS, rng, sp).format(classes=classes)
        items.append(ChatItem("aid_cls", "aid", image, sp, question, aid_class_name(s.class_name),
                              f"aid_cls/aid/{s.class_name}/{image.stem}/0"))
    return items


def _nwpu_items(coco_path: Path, image_dir: Path, val_fraction: float,
                seed: int) -> list[ChatItem]:
    coco = load_coco(coco_path)
    names = {int(c["id"]): str(c["name"]) for c in coco["categories"]}
    classes = [names[i] for i in sorted(names)]
    by_image: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for a in coco["annotations"]:
        if a.get("iscrowd", 0):
            continue
        by_image[int(a["image_id"])].append(a)
    images = {int(im["id"]): im for im in coco["images"]}
    split = split_images(images, val_fraction, seed)
    items: list[ChatItem] = []
    for image_id in sorted(images):
        im = images[image_id]
        image = (image_dir / str(im["file_name"])).resolve()
        width, height = float(im["width"]), float(im["height"])
        sp = split[image_id]
        stem = f"nwpu/{Path(str(im['file_name'])).stem}"
        rng = random.Random(f"chat-nwpu:{seed}:{image_id}")
        anns: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for a in sorted(by_image.get(image_id, []), key=lambda a: int(a["id"])):
            anns[names[int(a["category_id"])]].append(a)
        present = [c for c in classes if anns.get(c)]
        absent = [c for c in classes if not anns.get(c)]

        per_task: Counter[str] = Counter()

        def add(task: str, question: str, answer: str, eval_answer: str | None = None,
                evaluable: bool = True, *, image: Path = image, sp: str = sp,
                stem: str = stem, per_task: Counter[str] = per_task) -> None:
            items.append(ChatItem(task, "nwpu", image, sp, question, answer,
                                  f"{task}/{stem}/{per_task[task]}", eval_answer=eval_answer,
                                  evaluable=evaluable))
            per_task[task] += 1

        # presence: every present class, as many absent ones (at least one)
        n_no = min(len(absent), max(1, len(present)))
        for name, answer in ([(c, "Yes.") for c in present]
                             + [(c, "No.") for c in rng.sample(absent, n_no)]):
            phrase = class_phrase(name)
            q = _pick(_PRESENCE, rng, sp).format(a=_article(phrase),
                                                 plural=class_phrase(name, plural=True))
            add("nwpu_presence", q, answer, eval_answer=answer.rstrip(".").lower())
        # counting: every present class and one absent class
        for name in present + rng.sample(absent, min(1, len(absent))):
            q = _pick(_COUNTING, rng, sp).format(plural=class_phrase(name, plural=True))
            n = len(anns.get(name, []))
            add("nwpu_counting", q, str(n), evaluable=n > 0)
        # grounding: one instance (train and eval), up to MAX_BOXES (train only)
        for name in present:
            group = sorted(anns[name], key=lambda a: (float(a["bbox"][0]), float(a["bbox"][1])))
            if len(group) > MAX_BOXES or (len(group) > 1 and sp == "val"):
                continue
            boxes = [box_to_vhm(a["bbox"], width, height) for a in group]
            pixels = [_box_pixels(a["bbox"]) for a in group]
            templates = _VG_ONE if len(group) == 1 else _VG_MANY
            q = _pick(templates, rng, sp).format(name=class_phrase(name),
                                                 plural=class_phrase(name, plural=True))
            add("nwpu_vg", q, _boxes_text(boxes), eval_answer=_boxes_text(pixels))
        # relative position: a single instance against one or several of another class,
        # asked only when every instance of the other class is clearly on the same side
        for i, a_name in enumerate(present):
            for b_name in present[i + 1:]:
                if len(anns[a_name]) == 1 and len(anns[b_name]) == 1:
                    first, second = (a_name, b_name) if rng.random() < 0.5 else (b_name, a_name)
                elif len(anns[a_name]) == 1 or len(anns[b_name]) == 1:
                    first, second = (a_name, b_name) if len(anns[a_name]) == 1 else (b_name,
                                                                                      a_name)
                else:
                    continue
                ax, ay = _centre(anns[first][0]["bbox"])
                refs = [_centre(a["bbox"]) for a in anns[second]]
                pair = {"a": class_phrase(first),
                        "b": class_phrase(second, plural=len(refs) > 1)}
                side = _side([ax - bx for bx, _ in refs], RELPOS_MARGIN * width)
                if side:
                    q = _pick(_RELPOS_H, rng, sp).format(**pair)
                    add("nwpu_relpos", q, "Left." if side < 0 else "Right.")
                side = _side([ay - by for _, by in refs], RELPOS_MARGIN * height)
                if side:
                    q = _pick(_RELPOS_V, rng, sp).format(**pair)
                    add("nwpu_relpos", q, "Above." if side < 0 else "Below.")
    return items


def _side(deltas: Sequence[float], margin: float) -> int:
    """-1 / +1 when every delta is below -margin / above +margin, else 0 (ambiguous)."""
    if all(d <= -margin for d in deltas):
        return -1
    if all(d >= margin for d in deltas):
        return 1
    return 0


def _centre(bbox: Sequence[float]) -> tuple[float, float]:
    x, y, w, h = (float(v) for v in bbox)
    return x + w / 2.0, y + h / 2.0


def generate_items(*, ucm: str | Path | None = None, nwpu: str | Path | None = None,
                   aid: str | Path | None = None, nwpu_images: str | Path | None = None,
                   val_fraction: float = 0.15, seed: int = 0,
                   dropped: Counter[str] | None = None) -> list[ChatItem]:
    """Every item the sources give (before the caps), in a deterministic order."""
    if not 0.0 <= val_fraction < 1.0:
        raise DatasetError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if ucm is None and nwpu is None and aid is None:
        raise InputNotFoundError("no source given.",
                                 hint="Pass at least one of --ucm, --nwpu, --aid.")
    drops: Counter[str] = Counter() if dropped is None else dropped
    items: list[ChatItem] = []
    if ucm is not None:
        items += _ucm_items(Path(ucm), seed)
        items += _rsivqa_items(Path(ucm), drops)
    if nwpu is not None:
        npath = Path(nwpu)
        image_dir = Path(nwpu_images) if nwpu_images is not None else npath.parent / "images"
        items += _nwpu_items(npath, image_dir, val_fraction, seed)
    if aid is not None:
        items += _aid_items(Path(aid), val_fraction, seed)
    missing = sorted({str(it.image) for it in items if not it.image.is_file()})
    if missing:
        raise InputNotFoundError(f"{len(missing)} image(s) of the annotations are missing, "
                                 f"e.g. {missing[0]}",
                                 hint="Check the dataset folders (images beside the labels).")
    return items
