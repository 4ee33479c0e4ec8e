"""Metrics against independent computations: torchmetrics, brute-force loops, hand cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from rsvl.errors import DatasetError
from rsvl.metrics import (
    ConfusionMatrix,
    ReferringAccumulator,
    coco_evaluate,
    per_class_accuracy,
    reduce_zero_label,
    retrieval_ground_truth,
    retrieval_recall,
    segmentation_report,
    topk_accuracy,
    zeroshot_report,
)

try:  # the independent references; the hand-computed cases run without them
    import torch
    import torchmetrics as tm
except ImportError:  # pragma: no cover - both are in the dev extra
    torch = tm = None

needs_tm = pytest.mark.skipif(tm is None, reason="torch / torchmetrics not installed (dev extra)")


# ---------------------------------------------------------------------------------------
# classification
# ---------------------------------------------------------------------------------------


@needs_tm
def test_topk_matches_torchmetrics_and_loop():
    rng = np.random.default_rng(0)
    n, c = 300, 12
    scores = rng.normal(size=(n, c)).astype(np.float32)
    labels = rng.integers(0, c, size=n)
    got = topk_accuracy(scores, labels, ks=(1, 3, 5))
    for k in (1, 3, 5):
        ref = tm.functional.classification.multiclass_accuracy(
            torch.from_numpy(scores),
            torch.from_numpy(labels),
            num_classes=c,
            top_k=k,
            average="micro",
        ).item()
        loop = np.mean([labels[i] in np.argsort(-scores[i], kind="stable")[:k] for i in range(n)])
        assert got[f"top{k}"] == pytest.approx(ref, abs=1e-6)
        assert got[f"top{k}"] == pytest.approx(loop)


@needs_tm
def test_topk_accepts_tensors_and_breaks_ties_by_index():
    scores = torch.zeros(4, 3)  # a constant model must not score 100 %
    labels = torch.tensor([0, 1, 2, 0])
    r = topk_accuracy(scores, labels, ks=(1, 2, 5))
    assert r["top1"] == pytest.approx(0.5)  # only label 0 ranks first
    assert r["top2"] == pytest.approx(0.75)
    assert r["top5"] == 1.0  # k > C: everything is a hit


@needs_tm
def test_per_class_accuracy_matches_torchmetrics():
    rng = np.random.default_rng(1)
    n, c = 400, 7
    scores = rng.normal(size=(n, c))
    labels = rng.integers(0, c, size=n)
    got = per_class_accuracy(scores, labels)
    ref = tm.functional.classification.multiclass_accuracy(
        torch.from_numpy(scores), torch.from_numpy(labels), num_classes=c, average="none"
    ).numpy()
    np.testing.assert_allclose(got, ref, atol=1e-6)
    # predictions instead of scores give the same; an absent class is NaN
    got2 = per_class_accuracy(scores.argmax(1), labels, num_classes=c + 1)
    np.testing.assert_allclose(got2[:c], ref, atol=1e-6)
    assert math.isnan(got2[c])


def test_zeroshot_report_hand_case():
    # 4 samples, 3 classes; class 2 never appears
    scores = np.array([[0.9, 0.1, 0.0], [0.2, 0.7, 0.1], [0.6, 0.3, 0.1], [0.1, 0.2, 0.7]])
    labels = np.array([0, 1, 1, 0])
    r = zeroshot_report(scores, labels, ["a", "b", "c"])
    assert r["n"] == 4
    assert r["top1"] == pytest.approx(0.5)  # samples 0 and 1
    assert r["top5"] == 1.0
    assert r["per_class"]["a"] == pytest.approx(0.5)
    assert r["per_class"]["b"] == pytest.approx(0.5)
    assert math.isnan(r["per_class"]["c"])
    assert r["mean_per_class"] == pytest.approx(0.5)


# ---------------------------------------------------------------------------------------
# retrieval
# ---------------------------------------------------------------------------------------


def _brute_recall(sim, img2txt, txt2img, ks):
    """FarSLIP test_retrieval, written as loops: a hit if any GT item is in the top k."""
    out = {}
    for k in ks:
        hits = [bool(set(np.argsort(-sim[i], kind="stable")[:k]) & img2txt[i]) for i in img2txt]
        out[f"img2text_R@{k}"] = np.mean(hits)
        hits = [bool(set(np.argsort(-sim[:, t], kind="stable")[:k]) & txt2img[t]) for t in txt2img]
        out[f"text2img_R@{k}"] = np.mean(hits)
    return out


@needs_tm
def test_retrieval_one_image_per_text_matches_loop_and_torchmetrics():
    rng = np.random.default_rng(2)
    n_img, per = 40, 5
    text_to_image = np.repeat(np.arange(n_img), per)
    emb_i = rng.normal(size=(n_img, 16))
    emb_t = emb_i[text_to_image] + 1.5 * rng.normal(size=(n_img * per, 16))
    sim = (emb_i @ emb_t.T).astype(np.float32)
    ks = (1, 5, 10)
    got = retrieval_recall(sim, text_to_image, ks)
    img2txt = {i: set(np.flatnonzero(text_to_image == i)) for i in range(n_img)}
    txt2img = {t: {int(text_to_image[t])} for t in range(len(text_to_image))}
    ref = _brute_recall(sim, img2txt, txt2img, ks)
    for key, v in ref.items():
        assert got[key] == pytest.approx(v), key
    # torchmetrics: image->text "any caption in top k" is RetrievalHitRate; text->image
    # (one relevant image) is RetrievalRecall.
    target = text_to_image[None, :] == np.arange(n_img)[:, None]  # (n_img, n_txt)
    for k in ks:
        hr = tm.retrieval.RetrievalHitRate(top_k=k)
        i2t = hr(
            torch.from_numpy(sim).flatten(),
            torch.from_numpy(target).flatten(),
            indexes=torch.arange(n_img).repeat_interleave(sim.shape[1]),
        ).item()
        rr = tm.retrieval.RetrievalRecall(top_k=k)
        t2i = rr(
            torch.from_numpy(sim.T.copy()).flatten(),
            torch.from_numpy(target.T.copy()).flatten(),
            indexes=torch.arange(sim.shape[1]).repeat_interleave(n_img),
        ).item()
        assert got[f"img2text_R@{k}"] == pytest.approx(i2t, abs=1e-6)
        assert got[f"text2img_R@{k}"] == pytest.approx(t2i, abs=1e-6)
    six = [got[f"{d}_R@{k}"] for d in ("img2text", "text2img") for k in ks]
    assert got["mean_recall"] == pytest.approx(np.mean(six))
    assert got["img2text_mean"] == pytest.approx(np.mean(six[:3]))
    # chunking does not change anything
    assert retrieval_recall(sim, text_to_image, ks, chunk=3) == got


def test_retrieval_many_to_many_after_dedup():
    rng = np.random.default_rng(3)
    # 30 images, captions drawn from a small vocabulary so many are shared (as in UCM)
    vocab = [f"caption {j}" for j in range(25)]
    rows = [(f"img{i}.jpg", vocab[rng.integers(0, 25)]) for i in range(30) for _ in range(3)]
    images, texts, pi, pt = retrieval_ground_truth([r[0] for r in rows], [r[1] for r in rows])
    assert len(images) == 30 and len(texts) == len(set(r[1] for r in rows))
    sim = rng.normal(size=(len(images), len(texts)))
    got = retrieval_recall(sim, pairs=(pi, pt), ks=(1, 5, 10))
    img2txt = {i: set(pt[pi == i]) for i in range(len(images))}
    txt2img = {t: set(pi[pt == t]) for t in range(len(texts))}
    for key, v in _brute_recall(sim, img2txt, txt2img, (1, 5, 10)).items():
        assert got[key] == pytest.approx(v), key


def test_retrieval_hand_case():
    # 2 images, 3 texts; texts 0, 1 describe image 0, text 2 image 1
    sim = np.array([[0.1, 0.9, 0.5], [0.8, 0.2, 0.3]])
    r = retrieval_recall(sim, [0, 0, 1], ks=(1, 2))
    # image 0: top1 = text 1 (own) -> hit; image 1: top1 = text 0 (not own), top2 = {0, 2}
    assert r["img2text_R@1"] == 0.5 and r["img2text_R@2"] == 1.0
    # text 0 -> image 1 first (miss), text 1 -> image 0 (hit), text 2 -> image 0 (miss)
    assert r["text2img_R@1"] == pytest.approx(1 / 3) and r["text2img_R@2"] == 1.0
    # ties are broken by index: with a constant matrix text 0 / image 0 rank first
    rc = retrieval_recall(np.zeros((2, 3)), [0, 0, 1], ks=(1,))
    assert rc["img2text_R@1"] == 0.5 and rc["text2img_R@1"] == pytest.approx(2 / 3)
    # a distractor image with no caption counts only as a candidate
    sim3 = np.vstack([sim, [[1.0, 1.0, 1.0]]])
    r3 = retrieval_recall(sim3, [0, 0, 1], ks=(1, 2))
    assert r3["n_image_queries"] == 2 and r3["text2img_R@1"] == 0.0


# ---------------------------------------------------------------------------------------
# semantic segmentation
# ---------------------------------------------------------------------------------------


def _mmseg_brute(preds, gts, c, ignore=255, reduce=False):
    """mmseg intersect_and_union, re-written with np.histogram per image."""
    ti = np.zeros(c)
    tu = np.zeros(c)
    tp = np.zeros(c)
    tl = np.zeros(c)
    for p, g in zip(preds, gts, strict=True):
        g = g.astype(np.int64).copy()
        if reduce:
            g[g == 0] = 255
            g = g - 1
            g[g == 254] = 255
        m = g != ignore
        p, g = p[m], g[m]
        inter = p[p == g]
        bins = np.arange(c + 1) - 0.5
        ai = np.histogram(inter, bins=bins)[0]
        ap = np.histogram(p, bins=bins)[0]
        al = np.histogram(g, bins=bins)[0]
        ti += ai
        tp += ap
        tl += al
        tu += ap + al - ai
    return ti, tu, tp, tl


@needs_tm
def test_confusion_matrix_matches_torchmetrics_and_mmseg_loop():
    rng = np.random.default_rng(4)
    c = 6
    preds = [rng.integers(0, c, size=(17, 23)) for _ in range(4)]
    gts = [
        np.where(rng.random((17, 23)) < 0.1, 255, rng.integers(0, c, size=(17, 23)))
        for _ in range(4)
    ]
    cm = ConfusionMatrix(c)
    for p, g in zip(preds, gts, strict=True):
        cm.update(p, g)
    rep = segmentation_report(cm, [f"c{i}" for i in range(c)])
    P = torch.from_numpy(np.stack(preds))
    G = torch.from_numpy(np.stack(gts))
    ref_iou = tm.functional.classification.multiclass_jaccard_index(
        P, G, num_classes=c, ignore_index=255, average="none"
    ).numpy()
    np.testing.assert_allclose(list(rep["IoU"].values()), ref_iou, atol=1e-6)
    ref_miou = tm.functional.classification.multiclass_jaccard_index(
        P, G, num_classes=c, ignore_index=255, average="macro"
    ).item()
    assert rep["mIoU"] == pytest.approx(ref_miou, abs=1e-6)
    ref_aacc = tm.functional.classification.multiclass_accuracy(
        P, G, num_classes=c, ignore_index=255, average="micro"
    ).item()
    ref_macc = tm.functional.classification.multiclass_accuracy(
        P, G, num_classes=c, ignore_index=255, average="macro"
    ).item()
    assert rep["aAcc"] == pytest.approx(ref_aacc, abs=1e-6)
    assert rep["mAcc"] == pytest.approx(ref_macc, abs=1e-6)
    ti, tu, _, tl = _mmseg_brute(preds, gts, c)
    np.testing.assert_allclose(list(rep["IoU"].values()), ti / tu)
    np.testing.assert_allclose(list(rep["Acc"].values()), ti / tl)
    # the same from the (C, C) array, and from a merge of two halves
    rep2 = segmentation_report(cm.matrix)
    assert rep2["mIoU"] == pytest.approx(rep["mIoU"])
    a, b = ConfusionMatrix(c), ConfusionMatrix(c)
    a.update(np.stack(preds[:2]), np.stack(gts[:2]))
    b.update(np.stack(preds[2:]), np.stack(gts[2:]))
    np.testing.assert_array_equal(a.merge(b).matrix, cm.matrix)


def test_reduce_zero_label_and_out_of_range_values_like_mmseg():
    np.testing.assert_array_equal(
        reduce_zero_label(np.array([0, 1, 2, 7, 255], np.uint8)), [255, 0, 1, 6, 255]
    )
    rng = np.random.default_rng(5)
    c = 4
    # raw labels 0..5: 0 -> ignored, 1..4 -> classes 0..3, 5 -> 4 = out of range (counts
    # in area_pred but never in area_label, as mmseg's histc); predictions include 9 and -1
    gts = [rng.integers(0, 6, size=(9, 11)).astype(np.uint8) for _ in range(3)]
    preds = [rng.integers(-1, c + 1, size=(9, 11)) for _ in range(3)]
    preds[0][0, :] = 9
    cm = ConfusionMatrix(c, reduce_zero_label=True)
    for p, g in zip(preds, gts, strict=True):
        cm.update(p, g)
    ti, tu, _, tl = _mmseg_brute(preds, gts, c, reduce=True)
    rep = cm.report()
    np.testing.assert_allclose(list(rep["IoU"].values()), ti / tu)
    assert rep["aAcc"] == pytest.approx(ti.sum() / tl.sum())


def test_segmentation_report_hand_case_nan_for_absent_class():
    gt = np.array([[0, 0, 1, 1]])
    pred = np.array([[0, 1, 1, 1]])
    cm = ConfusionMatrix(3)
    cm.update(pred, gt)
    r = cm.report(["bg", "fg", "absent"])
    assert r["IoU"]["bg"] == pytest.approx(1 / 2)  # I=1, U=2
    assert r["IoU"]["fg"] == pytest.approx(2 / 3)  # I=2, U=3
    assert math.isnan(r["IoU"]["absent"])
    assert r["mIoU"] == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert r["aAcc"] == pytest.approx(3 / 4)
    assert r["mAcc"] == pytest.approx((1 / 2 + 1) / 2)
    assert r["Dice"]["fg"] == pytest.approx(4 / 5)


# ---------------------------------------------------------------------------------------
# referring segmentation
# ---------------------------------------------------------------------------------------


def test_referring_two_images_on_paper():
    # image A: gt 4 px, pred 4 px, 2 shared -> I=2, U=6, IoU=1/3
    ga = np.zeros((4, 4), bool)
    ga[0, :4] = True
    pa = np.zeros((4, 4), bool)
    pa[0, 2:] = True
    pa[1, :2] = True
    # image B: gt 5 px, pred = 4 of them -> I=4, U=5, IoU=0.8 exactly (Pr@0.8 uses >=)
    gb = np.zeros((4, 4), bool)
    gb[2, :4] = True
    gb[3, 0] = True
    pb = gb.copy()
    pb[3, 0] = False
    acc = ReferringAccumulator()
    assert acc.update(pa, ga) == pytest.approx(1 / 3)
    assert acc.update(
        *((torch.from_numpy(pb.astype(np.uint8)), torch.from_numpy(gb)) if torch else (pb, gb))
    ) == pytest.approx(0.8)
    r = acc.compute()
    assert r["n"] == 2
    assert r["mIoU"] == pytest.approx((1 / 3 + 0.8) / 2)
    assert r["oIoU"] == pytest.approx(6 / 11)
    assert r["Pr@0.5"] == 0.5 and r["Pr@0.7"] == 0.5
    assert r["Pr@0.8"] == 0.5  # IoU == threshold counts (LAVT: this_iou >= eval_seg_iou)
    assert r["Pr@0.9"] == 0.0
    # an empty prediction on an empty target: IoU 0 (LAVT), union 0 adds nothing to oIoU
    acc.update(np.zeros((4, 4)), np.zeros((4, 4)))
    r = acc.compute()
    assert r["mIoU"] == pytest.approx((1 / 3 + 0.8 + 0) / 3)
    assert r["oIoU"] == pytest.approx(6 / 11)


def test_referring_batch_and_merge_equal_loop():
    rng = np.random.default_rng(6)
    p = rng.random((6, 8, 8)) > 0.5
    g = rng.random((6, 8, 8)) > 0.5
    one = ReferringAccumulator()
    one.update_batch(p, g)
    a, b = ReferringAccumulator(), ReferringAccumulator()
    a.update_batch(p[:3], g[:3])
    b.update_batch(p[3:], g[3:])
    assert a.merge(b).compute() == one.compute()
    ious = [(p[i] & g[i]).sum() / (p[i] | g[i]).sum() for i in range(6)]
    assert one.compute()["mIoU"] == pytest.approx(np.mean(ious))


# ---------------------------------------------------------------------------------------
# COCO
# ---------------------------------------------------------------------------------------


def _rect_poly(x, y, w, h):
    return [[x, y, x + w, y, x + w, y + h, x, y + h]]


def _gt(two_classes=False):
    cats = [{"id": 1, "name": "airplane"}]
    if two_classes:
        cats.append({"id": 2, "name": "ship"})
    anns = [
        {
            "id": 1,
            "image_id": 1,
            "category_id": 1,
            "bbox": [10, 10, 100, 100],
            "area": 10000.0,
            "iscrowd": 0,
            "segmentation": _rect_poly(10, 10, 100, 100),
        },
        {
            "id": 2,
            "image_id": 2,
            "category_id": 1,
            "bbox": [20, 20, 100, 100],
            "area": 10000.0,
            "iscrowd": 0,
            "segmentation": _rect_poly(20, 20, 100, 100),
        },
    ]
    if two_classes:
        anns.append(
            {
                "id": 3,
                "image_id": 2,
                "category_id": 2,
                "bbox": [150, 150, 40, 40],
                "area": 1600.0,
                "iscrowd": 0,
                "segmentation": _rect_poly(150, 150, 40, 40),
            }
        )
    images = [
        {"id": 1, "file_name": "a.jpg", "width": 200, "height": 200},
        {"id": 2, "file_name": "b.jpg", "width": 200, "height": 200},
    ]
    return {"images": images, "annotations": anns, "categories": cats}


# one perfect detection (image 1) and one overlapping its box with IoU 0.52 (image 2):
# a TP at IoU 0.50, a FP at 0.55 .. 0.95. With the perfect one scored higher, precision is
# 1 up to recall 0.5 and 0 beyond: AP_t = 51/101 (101 recall points, 0 .. 0.50 reached).
PERFECT = {"image_id": 1, "category_id": 1, "bbox": [10, 10, 100, 100], "score": 0.9}
HALF = {"image_id": 2, "category_id": 1, "bbox": [20, 20, 52, 100], "score": 0.8}


def test_coco_bbox_hand_case():
    r = coco_evaluate(_gt(), [PERFECT, HALF], "bbox")
    assert r["AP50"] == pytest.approx(1.0)
    assert r["AP75"] == pytest.approx(51 / 101)
    assert r["AP"] == pytest.approx((1 + 9 * 51 / 101) / 10)
    assert r["APl"] == pytest.approx(r["AP"])  # both objects are large (area 10000 > 96²)
    assert math.isnan(r["APs"]) and math.isnan(r["APm"])  # no small / medium objects
    assert r["per_class"]["airplane"] == pytest.approx(r["AP"])
    # the half-overlapping one scored higher: a FP comes first, precision 0.5 up to recall 0.5
    r2 = coco_evaluate(_gt(), [dict(PERFECT, score=0.5), HALF], "bbox")
    assert r2["AP50"] == pytest.approx(1.0)
    assert r2["AP"] == pytest.approx((1 + 9 * 25.5 / 101) / 10)


def test_coco_per_class_segm_and_errors(tmp_path):
    gt = _gt(two_classes=True)
    r = coco_evaluate(gt, [PERFECT, HALF], "bbox")
    # the ship has ground truth but no detection: AP 0, and the mean is over both classes
    assert r["per_class"]["ship"] == 0.0
    assert r["AP"] == pytest.approx(r["per_class"]["airplane"] / 2)
    # segm with polygons and a binary-mask detection: the same ranking, IoU ~0.52 after
    # rasterisation, so the same AP as the boxes
    mask = np.zeros((200, 200), np.uint8)
    mask[20:120, 20:72] = 1
    dets = [
        dict(PERFECT, segmentation=_rect_poly(10, 10, 100, 100)),
        {"image_id": 2, "category_id": 1, "segmentation": mask, "score": 0.8},
    ]
    gt_path = tmp_path / "gt.json"
    import json

    gt_path.write_text(json.dumps(_gt()))
    rs = coco_evaluate(gt_path, dets, "segm")
    assert rs["AP50"] == pytest.approx(1.0)
    assert rs["AP"] == pytest.approx((1 + 9 * 51 / 101) / 10)
    # no detection at all: zeros, not a crash
    assert coco_evaluate(gt, [], "bbox")["AP"] == 0.0
    with pytest.raises(DatasetError, match="image_id 99"):
        coco_evaluate(gt, [dict(PERFECT, image_id=99)], "bbox")
    with pytest.raises(DatasetError, match="not found"):
        coco_evaluate(tmp_path / "missing.json", [PERFECT])
