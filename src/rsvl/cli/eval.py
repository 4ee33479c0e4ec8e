"""``rsvl eval zeroshot|retrieval|ovss|refer|coco|chat|farmland``: benchmark protocols with full settings."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from rsvl.cli import eval_chat, preflight
from rsvl.cli.options import fast_option
from rsvl.console import emit_json, progress_bar
from rsvl.data.captions import FARSLIP_CAPTION_PREFIX
from rsvl.data.classes import load_classes
from rsvl.data.coco import open_coco, split_ids
from rsvl.data.segmentation import SEG_PRESETS
from rsvl.errors import PromptError

eval_app = typer.Typer(
    name="eval",
    help="Evaluate a model on a benchmark dataset (zero-shot, retrieval, OVSS) or score prediction files (refer, coco).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def register(app: typer.Typer) -> None:
    app.add_typer(eval_app, name="eval")


_MODEL = typer.Option("mini-clip", "--model", "-m", help="Model name (see `rsvl models`).")
_WEIGHTS = typer.Option(None, "--weights", help="Local checkpoint instead of the model card's file.")
_DEVICE = typer.Option("cpu", "--device")
_LIMIT = typer.Option(None, "--limit", min=1, help="Evaluate N evenly spaced samples only (quick checks).")
_JSON = typer.Option(False, "--json", help="Print one JSON document (metrics and settings) on stdout.")
_OUT = typer.Option(None, "--out", "-o", help="Also write the JSON document to this file.")


def _load_model(name: str, weights: Path | None, device: str, task: str, also: tuple[str, ...] = (),
                fast: bool = False) -> Any:
    """The model, after refusing one that does not serve ``task`` (or ``also``): loading
    takes seconds, the wrong model would fail only after it."""
    import rsvl  # lazy: see rsvl.cli

    preflight.model_for(task, name, weights, also=also)
    return rsvl.load(name, weights=weights, device=device, fast=fast)


def _finish(result: Any, as_json: bool, out: Path | None, table: Any) -> None:
    from rsvl.eval import write_result  # lazy: see rsvl.cli

    if out is not None:
        write_result(result, out)
    if as_json:
        emit_json(result.to_dict())
        return

    console = Console(highlight=False)
    console.print(table)
    s = result.settings
    console.print(
        f"{s.get('n_samples', '?')} samples, {s.get('seconds', 0):.1f} s, "
        f"model {s.get('model', '-')}, rsvl {s.get('rsvl_version')}",
        markup=False,
    )
    if out is not None:
        console.print(f"wrote {out}", markup=False)


def _pct(v: Any) -> str:
    return "-" if v is None or v != v else f"{100 * float(v):.2f}"


def _table(title: str, rows: list[tuple[str, Any]], value_header: str = "%") -> Any:

    t = Table(title=title, show_edge=False)
    t.add_column("metric")
    t.add_column(value_header, justify="right")
    for k, v in rows:
        t.add_row(k, v if isinstance(v, str) else _pct(v))
    return t


@eval_app.command("zeroshot")
def zeroshot(
    data: Path = typer.Argument(..., help="ucm.json (or its folder), a folder of class folders, or a SkyScript CSV."),
    split: str = typer.Option("val", "--split", help="Split of ucm.json, or sub-folder of a folder dataset."),
    classes_file: Path = typer.Option(None, "--classes-file", help="Class names, one per line (CSV: default classnames.txt next to it)."),
    model: str = _MODEL,
    weights: Path = _WEIGHTS,
    templates: str = typer.Option(None, "--templates", help="'farslip', 'imagenet', or one template with {} (default: the model's)."),
    batch_size: int = typer.Option(32, "--batch-size", min=1),
    limit: int = _LIMIT,
    device: str = _DEVICE,
    fast: bool = fast_option(),
    as_json: bool = _JSON,
    out: Path = _OUT,
) -> None:
    """Zero-shot scene classification: top-1, top-5, per-class accuracy and its mean."""
    from rsvl.eval import open_scene_dataset, run_zeroshot, subset_indices  # lazy: see rsvl.cli

    ds, _, _ = open_scene_dataset(data, split, classes_file)  # fail on the data before loading a model
    n = len(subset_indices(len(ds), limit))
    m = _load_model(model, weights, device, "classify", fast=fast)
    with progress_bar(n, "zeroshot") as advance:
        res = run_zeroshot(m, data, split=split, classes_file=classes_file, templates=templates,
                           batch_size=batch_size, limit=limit, model_name=model, weights=weights,
                           progress=advance)
    res.settings["fast"] = bool(getattr(getattr(m, "module", m), "fast", False))  # int8 path ran
    r = res.metrics
    rows = [("top-1", r["top1"]), ("top-5", r["top5"]), ("mean per-class", r["mean_per_class"])]
    rows += [(f"  {k}", v) for k, v in r["per_class"].items()]
    _finish(res, as_json, out, _table(f"zero-shot {Path(data).name} ({res.settings['split'] or 'all'})", rows))


@eval_app.command("retrieval")
def retrieval(
    data: Path = typer.Argument(..., help="ucm.json (captions), a Karpathy dataset_*.json, or a FarSLIP *_img_txt_pairs_*.csv."),
    split: str = typer.Option(None, "--split", help="Split (default: val for ucm.json, test for Karpathy JSON)."),
    caption_prefix: str = typer.Option("", "--caption-prefix", help="Text put before every caption ('farslip' = 'a satellite image. ')."),
    caption_key: str = typer.Option("title", "--caption-key", help="CSV caption column (SkyScript: title_multi_objects)."),
    no_dedup: bool = typer.Option(False, "--no-dedup", help="Keep every caption row as its own text (default: dedup by string, as FarSLIP)."),
    model: str = _MODEL,
    weights: Path = _WEIGHTS,
    batch_size: int = typer.Option(32, "--batch-size", min=1),
    limit: int = _LIMIT,
    device: str = _DEVICE,
    fast: bool = fast_option(),
    as_json: bool = _JSON,
    out: Path = _OUT,
) -> None:
    """Image-text retrieval: R@1/5/10 in both directions and mean recall."""
    from rsvl.eval import open_caption_dataset, run_retrieval, subset_indices  # lazy: see rsvl.cli

    prefix = FARSLIP_CAPTION_PREFIX if caption_prefix.strip().lower() == "farslip" else caption_prefix
    ds, _, _ = open_caption_dataset(data, split, caption_key)
    n = len(subset_indices(len(ds.samples), limit))
    m = _load_model(model, weights, device, "search", fast=fast)
    with progress_bar(n, "retrieval") as advance:
        res = run_retrieval(m, data, split=split, caption_prefix=prefix, caption_key=caption_key,
                            dedup_texts=not no_dedup, batch_size=batch_size, limit=limit, model_name=model,
                            weights=weights, progress=advance)
    res.settings["fast"] = bool(getattr(getattr(m, "module", m), "fast", False))  # int8 path ran
    r = res.metrics
    rows = [(f"{d} R@{k}", r[f"{d}_R@{k}"]) for d in ("img2text", "text2img") for k in (1, 5, 10)]
    rows += [("img2text mean", r["img2text_mean"]), ("text2img mean", r["text2img_mean"]),
             ("mean recall", r["mean_recall"]), ("images", str(r["n_images"])), ("texts", str(r["n_texts"]))]
    _finish(res, as_json, out, _table(f"retrieval {Path(data).name} ({res.settings['split'] or 'all'})", rows))


@eval_app.command("ovss")
def ovss(
    data: Path = typer.Argument(..., help="images/ + labels/ folder, or mmseg img_dir/ + ann_dir/."),
    classes_file: str = typer.Option(None, "--classes-file", help="Class file path or built-in name (loveda, potsdam, ...; default: the preset's)."),
    preset: str = typer.Option(None, "--preset", help="Dataset label encoding: loveda, potsdam, vaihingen, whu_building."),
    protocol: str = typer.Option("farslip", "--protocol", help="farslip (RS-OVSS), segearth (+ per-dataset prob_thd/bg_idx, CLS correction -0.3), or rsvl."),
    split: str = typer.Option("val", "--split", help="mmseg layout split."),
    resize: str = typer.Option(None, "--resize", help="mmseg keep-ratio scale 'N' or 'LONG,SHORT'; 0 = native (protocol default: 448; rsvl: native)."),
    crop: int = typer.Option(None, "--crop", help="Sliding-window size (protocol default: 224; rsvl: 256)."),
    stride: int = typer.Option(None, "--stride", help="Sliding-window stride (protocol default: 112; rsvl: 192)."),
    logit_scale: float = typer.Option(None, "--logit-scale", help="Logit scale before the softmax (protocol default: 50; rsvl: the model's)."),
    prob_thd: float = typer.Option(None, "--prob-thd", help="Pixels below this probability become --bg-idx (segearth: per dataset)."),
    bg_idx: int = typer.Option(None, "--bg-idx", help="Class index given to low-probability pixels."),
    cls_lambda: float = typer.Option(None, "--cls-lambda", help="CLS-token correction weight (segearth: -0.3; others: 0)."),
    templates: str = typer.Option(None, "--templates", help="'imagenet' (protocol default), 'farslip', 'none', or one template with {}."),
    reduce_zero_label: bool = typer.Option(False, "--reduce-zero-label", help="Without a preset: label 0 ignored, others -1."),
    other: bool = typer.Option(None, "--other/--no-other", help="The model's learned 'other' query joins the background class "
                               "(background, other or clutter); default: when the model has one."),
    model: str = _MODEL,
    weights: Path = _WEIGHTS,
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Windows per forward pass."),
    limit: int = _LIMIT,
    device: str = _DEVICE,
    fast: bool = fast_option(),
    as_json: bool = _JSON,
    out: Path = _OUT,
) -> None:
    """Open-vocabulary semantic segmentation: per-class IoU and mIoU (background counted, 255 ignored)."""
    from rsvl.eval import (  # lazy: see rsvl.cli
        open_segmentation_dataset,
        ovss_protocol,
        run_ovss,
        subset_indices,
    )

    source = classes_file
    if source is None:
        if preset is None or SEG_PRESETS.get(preset.lower()) is None or not SEG_PRESETS[preset.lower()].class_file:
            raise PromptError("No classes given.", hint="Pass --classes-file (a path or a built-in name such as loveda).")
        source = SEG_PRESETS[preset.lower()].class_file
    specs = load_classes(file=source)
    size: tuple[int, int] | None = None
    if resize is not None:
        try:
            parts = [int(v) for v in resize.replace(" ", "").split(",") if v]
        except ValueError:
            raise PromptError(f"--resize {resize!r} is not 'N' or 'LONG,SHORT'.", hint="Example: --resize 448") from None
        size = (parts[0], parts[-1]) if parts and parts[0] > 0 else (0, 0)
    proto = ovss_protocol(protocol, preset, resize=size, crop=crop, stride=stride, logit_scale=logit_scale,
                          prob_thd=prob_thd, bg_idx=bg_idx, templates=templates, cls_lambda=cls_lambda)
    ds = open_segmentation_dataset(data, preset, split, reduce_zero_label)
    n = len(subset_indices(len(ds), limit))
    m = _load_model(model, weights, device, "segment", fast=fast)
    with progress_bar(n, "ovss") as advance:
        res = run_ovss(m, data, specs, preset=preset, protocol=proto, split=split,
                       reduce_zero_label=reduce_zero_label, class_source=str(source), batch_size=batch_size,
                       limit=limit, model_name=model, weights=weights, progress=advance, other=other)
    res.settings["fast"] = bool(getattr(getattr(m, "module", m), "fast", False))  # int8 path ran
    r = res.metrics
    rows = [("mIoU", r["mIoU"]), ("mAcc", r["mAcc"]), ("aAcc", r["aAcc"])]
    rows += [(f"  IoU {k}", v) for k, v in r["IoU"].items()]
    title = f"OVSS {Path(data).name} ({proto.name}: resize {proto.resize}, crop {proto.crop}, stride {proto.stride})"
    _finish(res, as_json, out, _table(title, rows))


@eval_app.command("refer")
def refer(
    data: Path = typer.Argument(..., help="A REFER-format dataset root (RRSIS-D layout) with --model, or a folder of predicted masks."),
    ground_truth: Path = typer.Argument(None, help="Mask-folder mode: folder of ground-truth masks with the same file stems."),
    model: str = typer.Option(None, "--model", "-m", help="Run this referring model on DATA (e.g. mini-refer)."),
    weights: Path = _WEIGHTS,
    split: str = typer.Option("val", "--split", help="Dataset split (model mode)."),
    size: int = typer.Option(480, "--size", help="Compare at size x size after NEAREST resizing (LAVT: 480); 0 = original size."),
    batch_size: int = typer.Option(8, "--batch-size", min=1),
    limit: int = _LIMIT,
    device: str = _DEVICE,
    as_json: bool = _JSON,
    out: Path = _OUT,
) -> None:
    """Referring segmentation: mIoU, oIoU, Pr@0.5..0.9 (LAVT / FIANet), from a model or mask files."""
    from rsvl.eval import run_refer, run_refer_model  # lazy: see rsvl.cli

    if ground_truth is not None:
        if model is not None:
            raise PromptError("Give either --model (with a dataset) or two mask folders, not both.",
                              hint="rsvl eval refer DATA --model mini-refer, or rsvl eval refer PRED_DIR GT_DIR.")
        res = run_refer(data, ground_truth, size=size or None)
        title = f"referring {ground_truth.name}"
    else:
        if model is None:
            raise PromptError("Nothing to evaluate: no --model and no ground-truth folder.",
                              hint="rsvl eval refer DATA --model mini-refer, or rsvl eval refer PRED_DIR GT_DIR.")
        from rsvl.eval import open_refer_dataset, subset_indices  # lazy: see rsvl.cli

        ds = open_refer_dataset(data, split)  # fail on the data before loading a model
        n = len(subset_indices(len(ds), limit))
        m = _load_model(model, weights, device, "refer")
        with progress_bar(n, "refer") as advance:
            res = run_refer_model(m, data, split=split, size=size or None, batch_size=batch_size,
                                  limit=limit, model_name=model, weights=weights, progress=advance)
        where = f"{size} px" if size else "original size"
        title = f"referring {Path(data).name} ({split}, {where})"
    r = res.metrics
    rows = [("mIoU", r["mIoU"]), ("oIoU", r["oIoU"])] + [(k, v) for k, v in r.items() if k.startswith("Pr@")]
    if "missing_predictions" in r:
        rows.append(("missing predictions", str(r["missing_predictions"])))
    for kind, t in (r.get("by_type") or {}).items():
        rows.append((f"mIoU, {kind} ({t['n']})", t["mIoU"]))
    _finish(res, as_json, out, _table(title, rows))


@eval_app.command("coco")
def coco(
    ground_truth: Path = typer.Argument(..., help="COCO instances JSON (images, annotations, categories)."),
    detections: Path = typer.Argument(None, help="COCO results JSON: a list of detections (or use --model)."),
    iou_type: str = typer.Option("bbox", "--iou-type", help="bbox or segm (detections-file mode; --model reports both)."),
    max_dets: int = typer.Option(100, "--max-dets"),
    model: str = typer.Option(None, "--model", "-m", help="Run this instance model (e.g. mini-instances) on the split's images."),
    weights: Path = _WEIGHTS,
    images: Path = typer.Option(None, "--images", help="Image folder (default: images/ or imgs/ next to the JSON)."),
    split: str = typer.Option("val", "--split", help="Model mode: val or train of the seeded split `rsvl train instances` uses, or all."),
    val_fraction: float = typer.Option(0.15, "--val-fraction", help="Model mode: the split's validation fraction."),
    seed: int = typer.Option(0, "--seed", help="Model mode: the split's seed."),
    save_detections: Path = typer.Option(None, "--save-detections", help="Model mode: also write the detections (COCO results JSON)."),
    limit: int = _LIMIT,
    device: str = _DEVICE,
    fast: bool = fast_option(),
    as_json: bool = _JSON,
    out: Path = _OUT,
) -> None:
    """COCO AP, AP50, AP75, APs/m/l and per-class AP of a detections file, or of a model run
    over the images of the validation split (bbox and segm)."""
    from rsvl.eval import run_coco  # lazy: see rsvl.cli

    if (detections is None) == (model is None):
        raise PromptError("Give either a detections file or --model, not both or neither.",
                          hint="rsvl eval coco GT.json DETS.json, or rsvl eval coco GT.json --model mini-instances.")
    if model is not None:
        from rsvl.eval import run_coco_model  # lazy: see rsvl.cli

        ds = open_coco(ground_truth, images)  # fail on the data before loading a model
        tr, va = split_ids(ds.image_ids, val_fraction, seed)
        n = len({"val": va, "train": tr}.get(split, ds.image_ids))
        n = min(n, limit) if limit else n
        m = _load_model(model, weights, device, "instances", fast=fast)
        with progress_bar(n, "coco") as advance:
            res = run_coco_model(m, ground_truth, images=images, split=split, val_fraction=val_fraction,
                                 seed=seed, limit=limit, max_dets=max_dets, model_name=model, weights=weights,
                                 detections_out=save_detections, progress=advance)
        res.settings["fast"] = bool(getattr(getattr(m, "module", m), "fast", False))  # int8 path ran
        rows = []
        for kind in ("bbox", "segm"):
            r = res.metrics[kind]
            rows += [(f"{kind} {k}", r[k]) for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")]
        rows += [(f"  segm AP {k}", v) for k, v in res.metrics["segm"]["per_class"].items()]
        _finish(res, as_json, out, _table(f"COCO {Path(ground_truth).name} ({split}, {model})", rows))
        return
    if iou_type not in ("bbox", "segm"):
        raise PromptError(f"--iou-type {iou_type!r} is not bbox or segm.")
    res = run_coco(ground_truth, detections, iou_type=iou_type, max_dets=max_dets)
    r = res.metrics
    rows = [(k, r[k]) for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")]
    rows += [(f"  AP {k}", v) for k, v in r["per_class"].items()]
    _finish(res, as_json, out, _table(f"COCO {iou_type} {detections.name}", rows))


@eval_app.command("farmland")
def farmland(
    data: Path = typer.Argument(..., help="A FarmSeg-VL / FIT-layout folder ({train,val,test}/{img,lbl,json}; e.g. written by rsvl data farmland)."),
    model: str = typer.Option("mini-fsvlm", "--model", "-m", help="A language-guided segmentation model (mini-fsvlm, fsvlm-7b, lisa-7b-v1), or an open-vocabulary CLIP (mini-clip) for the class-probability baseline."),
    weights: Path = _WEIGHTS,
    split: str = typer.Option("test", "--split", help="train, val or test."),
    question: str = typer.Option("test", "--question", help="test: FSVLM's fixed test request; description: the image's description + the farmland question. A label json's 'question' always wins."),
    force_seg: bool = typer.Option(False, "--force-seg", help="Teacher-force [SEG] (LISA's validation) instead of generating the answer."),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens", min=1),
    threshold: float = typer.Option(0.5, "--threshold", help="CLIP baseline only: the target's class probability above which a pixel is the target."),
    limit: int = _LIMIT,
    device: str = _DEVICE,
    as_json: bool = _JSON,
    out: Path = _OUT,
) -> None:
    """Language-guided segmentation: FSVLM's Acc, Acc_class, mIoU, FWIoU, dice, precision and
    LISA's gIoU / cIoU, by source, on a FIT-layout folder."""
    from rsvl.data.farmseg import read_split  # lazy: see rsvl.cli
    from rsvl.eval import subset_indices  # lazy: see rsvl.cli
    from rsvl.eval.farmland import ClassProbabilityBaseline, run_farmland  # lazy: see rsvl.cli

    n = len(subset_indices(len(read_split(data, split)), limit))  # fail on the data before loading a model
    m = _load_model(model, weights, device, "farmland", ("segment",))
    name = model
    if "farmland" not in m.card.tasks:
        if "segment" not in m.card.tasks:
            raise PromptError(f"{model} neither answers segmentation requests nor segments by class name.",
                              hint="Use mini-fsvlm (or fsvlm-7b, lisa-7b-v1), or mini-clip for the baseline.")
        m = ClassProbabilityBaseline(m.module, threshold=threshold, name=f"{model} (class probability > {threshold:g})")
        name = m.name
    with progress_bar(n, "farmland") as advance:
        res = run_farmland(m, data, split=split, question=question, force_seg=force_seg, max_new_tokens=max_new_tokens,
                           limit=limit, model_name=name, weights=weights, progress=advance)
    r = res.metrics
    rows = [(k, r[k]) for k in ("miou", "giou", "ciou", "acc", "acc_class", "fwiou", "dice", "precision", "seg_rate")]
    for src, v in r["per_source"].items():
        rows.append((f"{src}: gIoU / cIoU / n", f"{100 * v['giou']:.2f} / {100 * v['ciou']:.2f} / {v['n']}"))
    _finish(res, as_json, out, _table(f"farmland {Path(data).name} ({split})", rows))


eval_app.command("chat")(eval_chat.chat)
