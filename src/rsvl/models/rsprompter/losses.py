"""Mask2Former-style losses with Hungarian matching (scipy) on sampled points."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from rsvl.models.rsprompter.query_head import StageOut


def _point_sample(x: Tensor, points: Tensor) -> Tensor:
    """x (N, C, H, W), points (N, P, 2) in [0, 1] (x, y) -> (N, C, P)."""
    return F.grid_sample(x, 2 * points[:, :, None] - 1, mode="bilinear", align_corners=False)[..., 0]


def _uncertain_points(logits: Tensor, num_points: int, oversample: float, importance: float) -> Tensor:
    """Mask2Former's point sampling: mostly the most uncertain of oversampled random points."""
    n = logits.shape[0]
    sampled = int(num_points * oversample)
    coords = torch.rand(n, sampled, 2, device=logits.device)
    unc = -_point_sample(logits, coords)[:, 0].abs()
    k = int(importance * num_points)
    idx = unc.topk(k, dim=1)[1]
    picked = torch.gather(coords, 1, idx[..., None].expand(-1, -1, 2))
    if num_points - k > 0:
        picked = torch.cat([picked, torch.rand(n, num_points - k, 2, device=logits.device)], 1)
    return picked


def hungarian_match(cost: Tensor | np.ndarray) -> tuple[Tensor, Tensor]:
    """Minimum-cost assignment of a (num_preds, num_gts) cost matrix (scipy's
    ``linear_sum_assignment``): (pred indices, gt indices), sorted by pred index."""
    c = cost.detach().float().cpu().numpy() if isinstance(cost, Tensor) else np.asarray(cost, dtype=np.float64)
    c = np.nan_to_num(c, nan=1e8, posinf=1e8, neginf=-1e8)
    rows, cols = linear_sum_assignment(c)
    return torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)


def match_masks(
    cls_logits: Tensor, mask_logits: Tensor, gt_labels: Tensor, gt_masks: Tensor, *, num_points: int = 12544,
    class_weight: float = 2.0, mask_weight: float = 5.0, dice_weight: float = 5.0,
) -> tuple[Tensor, Tensor]:
    """Mask2Former's Hungarian matching of one image: classification cost (-p(class)),
    sigmoid BCE and dice (eps 1) costs on ``num_points`` shared random points.

    cls_logits (Q, C+1), mask_logits (Q, h, w), gt_labels (G,) 0-based, gt_masks (G, H, W).
    """
    if gt_labels.numel() == 0:
        e = torch.zeros(0, dtype=torch.int64)
        return e, e
    with torch.no_grad():
        pts = torch.rand(1, num_points, 2, device=mask_logits.device)
        pm = _point_sample(mask_logits[:, None].float(), pts.expand(mask_logits.shape[0], -1, -1))[:, 0]
        gm = _point_sample(gt_masks[:, None].float(), pts.expand(gt_masks.shape[0], -1, -1))[:, 0]
        cost_cls = -cls_logits.float().softmax(-1)[:, gt_labels]
        pos = F.binary_cross_entropy_with_logits(pm, torch.ones_like(pm), reduction="none")
        neg = F.binary_cross_entropy_with_logits(pm, torch.zeros_like(pm), reduction="none")
        cost_mask = (pos @ gm.T + neg @ (1 - gm).T) / num_points
        sig = pm.sigmoid()
        cost_dice = 1 - (2 * sig @ gm.T + 1) / (sig.sum(-1)[:, None] + gm.sum(-1)[None, :] + 1)
        cost = class_weight * cost_cls + mask_weight * cost_mask + dice_weight * cost_dice
    rows, cols = hungarian_match(cost)
    return rows.to(mask_logits.device), cols.to(mask_logits.device)


def _dice_loss(pred: Tensor, target: Tensor, avg: float) -> Tensor:
    p = pred.sigmoid()
    d = (2 * (p * target).sum(1) + 1) / (p.sum(1) + target.sum(1) + 1)
    return (1 - d).sum() / avg


class QueryLosses:
    """Deep-supervised Mask2Former losses (CE x2 with no-object 0.1, BCE x5, dice x5)."""

    def __init__(self, num_classes: int, num_points: int, oversample: float = 3.0, importance: float = 0.75) -> None:
        self.num_classes = num_classes
        self.num_points, self.oversample, self.importance = num_points, oversample, importance

    def __call__(self, stages: list[StageOut], targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        losses: dict[str, Tensor] = {}
        last = len(stages) - 1
        for i, st in enumerate(stages):
            prefix = "" if i == last else f"d{i}."
            for k, v in self._single(st, targets).items():
                losses[prefix + k] = v
        return losses

    def _single(self, st: StageOut, targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        b, q, _ = st.cls.shape
        match_on = st.plus if st.plus is not None else st.masks
        labels = torch.full((b, q), self.num_classes, dtype=torch.int64, device=st.cls.device)
        preds, plus, gts = [], [], []
        for j, t in enumerate(targets):
            gl = t["labels"] - 1
            rows, cols = match_masks(st.cls[j], match_on[j], gl, t["masks"], num_points=self.num_points)
            labels[j, rows] = gl[cols]
            preds.append(st.masks[j, rows])
            if st.plus is not None:
                plus.append(st.plus[j, rows])
            gts.append(t["masks"][cols])
        cw = st.cls.new_ones(self.num_classes + 1)
        cw[-1] = 0.1
        out = {"loss_cls": 2.0 * F.cross_entropy(st.cls.flatten(0, 1), labels.flatten(), weight=cw)}
        pred = torch.cat(preds)
        n = pred.shape[0]
        names = [("loss_mask", "loss_dice", pred)]
        if st.plus is not None:
            names.append(("loss_mask_plus", "loss_dice_plus", torch.cat(plus)))
        if n == 0:
            for lm, ld, p in names:
                out[lm] = p.sum() * 0.0 + st.masks.sum() * 0.0
                out[ld] = p.sum() * 0.0 + st.masks.sum() * 0.0
            return out
        gt = torch.cat(gts).float()
        with torch.no_grad():
            pts = _uncertain_points(pred[:, None].float(), self.num_points, self.oversample, self.importance)
            gt_pts = _point_sample(gt[:, None], pts)[:, 0]
        for lm, ld, p in names:
            pp = _point_sample(p[:, None].float(), pts)[:, 0]
            out[lm] = 5.0 * F.binary_cross_entropy_with_logits(pp, gt_pts)
            out[ld] = 5.0 * _dice_loss(pp, gt_pts, float(max(n, 1)))
        return out
