"""FarSLIP's training losses (pure functions on tensors) and the forward pass it trains with.

* **global_itc**: symmetric InfoNCE over the L2-normalised global image and text embeddings
  (:func:`clip_infonce`).
* **distill** (stage 1, ``roi2pooled``): the student's dense patch map of the global view is
  ``roi_align``-ed over each crop box and compared with the crop's own mean dense token
  (:func:`roi_distill_loss`); the dense map is the ViT with its last block replaced by
  ``out_proj(A·v)`` (:func:`encode_image_and_dense`, FarSLIP's ``VisionTransformer.forward_v2``).
* **region_itc** (stage 2, ``--mpcl-loss``): multi-positive contrastive loss keyed on the
  region's category id (:func:`multi_positive_contrastive`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import roi_align

from rsvl.errors import UnknownModelError
from rsvl.models.clip.dense import vit_dense_head, vit_global, vit_trunk

# --------------------------------------------------------------------------------------------
# losses
# --------------------------------------------------------------------------------------------


def clip_infonce(image_emb: torch.Tensor, text_emb: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """Symmetric CLIP InfoNCE: ``(CE(s·I·Tᵀ, arange) + CE(s·T·Iᵀ, arange)) / 2`` on
    L2-normalised rows; ``scale`` is the exponentiated logit scale."""
    img = F.normalize(image_emb.float(), dim=-1)
    txt = F.normalize(text_emb.float(), dim=-1)
    logits = scale * img @ txt.t()
    target = torch.arange(img.shape[0], device=img.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2


def roi_pool_patches(dense: torch.Tensor, boxes: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """RoI-pool a dense patch map over normalised boxes.

    ``dense`` (B, D, gh, gw); ``boxes`` (B, K, 4) xyxy in [0, 1] of the global view;
    ``valid`` (B, K) bool. Each valid box is scaled to grid units and ``roi_align``-ed with
    ``output_size=(gh, gw)``, ``spatial_scale=1``, ``sampling_ratio=-1``, ``aligned=True``;
    the output cells are averaged and L2-normalised. Returns (M, D), M = ``valid.sum()``,
    in row-major (image, box) order.
    """
    gh, gw = dense.shape[-2:]
    b_idx, k_idx = valid.nonzero(as_tuple=True)
    sel = boxes[b_idx, k_idx].float()
    scale = torch.tensor([gw, gh, gw, gh], dtype=sel.dtype, device=sel.device)
    rois = torch.cat([b_idx.to(sel.dtype).unsqueeze(1), sel * scale], dim=1)
    pooled = roi_align(
        dense.float(), rois, output_size=(int(gh), int(gw)), spatial_scale=1.0,
        sampling_ratio=-1, aligned=True,
    )
    return F.normalize(pooled.mean(dim=(-2, -1)), dim=-1)


def roi_distill_loss(
    dense: torch.Tensor, boxes: torch.Tensor, valid: torch.Tensor, target: torch.Tensor
) -> torch.Tensor:
    """FarSLIP ``roi2pooled`` distillation: ``1 - mean cos(roi_pool(dense, box), target)``.

    ``target`` (M, D): one embedding per valid box (same order as :func:`roi_pool_patches`),
    normalised here. With no valid box the loss is a differentiable zero.
    """
    if not bool(valid.any()):
        return dense.sum() * 0.0
    pooled = roi_pool_patches(dense, boxes, valid)
    tgt = F.normalize(target.float(), dim=-1)
    return 1.0 - (pooled * tgt).sum(dim=-1).mean()


def multi_positive_contrastive(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    labels: torch.Tensor,
    scale: torch.Tensor | float,
) -> torch.Tensor:
    """Multi-positive image-text contrastive loss keyed on category id (FarSLIP ``--mpcl-loss``).

    Rows with ``labels < 0`` are dropped. ``p[i, j] = [labels[i] == labels[j]] / #positives(i)``;
    loss = ``(H(p, softmax(s·I·Tᵀ)) + H(p, softmax(s·T·Iᵀ))) / 2`` with ``H`` the soft-target
    cross-entropy averaged over rows. No valid row: a differentiable zero.
    """
    keep = labels >= 0
    if not bool(keep.any()):
        return (image_emb.sum() + text_emb.sum()) * 0.0
    img = F.normalize(image_emb[keep].float(), dim=-1)
    txt = F.normalize(text_emb[keep].float(), dim=-1)
    lab = labels[keep]
    pos = (lab.view(-1, 1) == lab.view(1, -1)).float()
    p = pos / pos.sum(dim=1, keepdim=True)
    logits_i = scale * img @ txt.t()
    logits_t = scale * txt @ img.t()
    loss_i = -(p * F.log_softmax(logits_i, dim=-1)).sum(dim=-1).mean()
    loss_t = -(p * F.log_softmax(logits_t, dim=-1)).sum(dim=-1).mean()
    return (loss_i + loss_t) / 2

# --------------------------------------------------------------------------------------------
# the forward pass FarSLIP trains with (its VisionTransformer.forward_v2)
# --------------------------------------------------------------------------------------------


def check_vit(model: nn.Module) -> Any:
    """The ViT image tower of ``model``, pooled by its class token, or a clear error."""
    v = model.visual
    if not hasattr(v, "class_embedding") or not hasattr(v, "transformer"):
        raise UnknownModelError(
            "Stage 1 (patch-to-crop distillation) needs a ViT image tower; this model has "
            f"{type(v).__name__}.",
            hint="Use a ViT architecture (ViT-B-16, ViT-B-32, ...), or stage 2.",
        )
    if (
        getattr(v, "attn_pool", None) is not None
        or getattr(v, "final_ln_after_pool", False)
        or getattr(v, "pool_type", "tok") != "tok"
    ):
        raise UnknownModelError(
            "Stage 1 needs a CLIP ViT pooled by its class token (no attention pool).",
            hint="Use an OpenAI-style open_clip ViT (ViT-B-16, ViT-B-32, ...).",
        )
    return v


def encode_image_and_dense(
    model: nn.Module,
    images: torch.Tensor,
    *,
    attn: str = "segearth",
    with_global: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """One ViT pass giving the global embedding and the dense patch map (not normalised).

    Blocks ``0..L-2`` are shared. Global = CLS of the unmodified last block -> ``ln_post`` ->
    ``proj`` (equals ``model.encode_image``). Dense = last block replaced by
    ``out_proj(A·v)`` on ``ln_1(x)`` (no residual, no MLP) -> ``ln_post`` -> ``proj``, patch
    tokens reshaped to (B, D, gh, gw). With ``with_global=False`` the global part is skipped.
    """
    v = check_vit(model)
    h, (gh, gw) = vit_trunk(v, images)
    glob = vit_global(v, h) if with_global else None
    tokens = vit_dense_head(v, h, attn)[:, 1:]
    dense = tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], gh, gw)
    return glob, dense


__all__ = [
    "check_vit",
    "clip_infonce",
    "encode_image_and_dense",
    "multi_positive_contrastive",
    "roi_distill_loss",
    "roi_pool_patches",
]
