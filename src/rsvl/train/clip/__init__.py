"""Fine-tune an open_clip CLIP the way FarSLIP does (both stages), with Lightning.

Losses (FarSLIP ``open_clip_train``; weights ``--w-g 1 / --w-d 0.1 / --w-l 1``):

* **global_itc** (always): symmetric InfoNCE over the L2-normalised global image embedding
  (CLS of the unmodified last block) and text embedding, scale ``logit_scale.exp()``;
  features are all-gathered (with gradients) across DDP ranks, as open_clip's ``ClipLoss``.
* **distill** (stage 1, ``roi2pooled``): the student's dense patch map of the global view -
  blocks ``0..L-2``, then the last block replaced by ``out_proj(A·v)`` on ``ln_1(x)`` with
  SegEarth attention ``A = softmax(qqᵀs)+softmax(kkᵀs)+softmax(vvᵀs)`` (no residual, no MLP),
  ``ln_post``, ``proj`` - is ``roi_align``-ed over each random crop box in grid units
  (``output_size`` = the grid, ``spatial_scale=1``, ``sampling_ratio=-1``, ``aligned=True``),
  averaged over the output cells and L2-normalised. The target is the mean of the crop's own
  dense patch tokens (crop resized to the input size), L2-normalised. ``loss = 1 - mean cos``.
  ``distill_type="active"`` (FarSLIP's default) computes the target with the student itself,
  gradients flowing through both sides; ``"ema"`` (momentum 0.99) and ``"frozen"`` use a
  teacher copy without gradients.
* **region_itc** (stage 2, ``cls`` align + ``--mpcl-loss``): crop CLS embedding of each object
  region vs its text (``cap`` or ``"a satellite image of {category}"``) with a multi-positive
  soft-target cross-entropy: the target of row ``i`` is the row-normalised indicator
  ``category_id[i] == category_id[j]``; both directions (image->text, text->image) are
  averaged. Regions with category id -1 (free-text ``cap`` regions, padding) are dropped.

Optimisation as FarSLIP: AdamW (betas 0.9/0.98, eps 1e-6), no weight decay on parameters with
``ndim < 2`` or named ``bn``/``ln``/``bias``/``logit_scale``, linear warmup then cosine per
step, ``logit_scale`` clamped to ``[0, ln 100]`` after each step; in a Long-CLIP text tower the
first positional table is frozen (only ``positional_embedding_res`` trains).

Modules: :mod:`~rsvl.train.clip.config` (settings), :mod:`~rsvl.train.clip.losses` (the loss
terms and the training forward pass), :mod:`~rsvl.train.clip.data` (index readers and views),
:mod:`~rsvl.train.clip.module` (the Lightning module), :mod:`~rsvl.train.clip.run` (a run and
its outputs). The network comes from the CLIP family's ``build`` (:func:`rsvl.models.clip.build`).
"""

from __future__ import annotations

from rsvl.train.clip.config import (
    DISTILL_TYPES,
    LOSS_NAMES,
    MAX_LOGIT_SCALE,
    PRECISIONS,
    ClipTrainConfig,
    resolve_precision,
)
from rsvl.train.clip.data import ClipTrainData, TrainItem, open_train_items
from rsvl.train.clip.losses import (
    clip_infonce,
    encode_image_and_dense,
    multi_positive_contrastive,
    roi_distill_loss,
    roi_pool_patches,
)
from rsvl.train.clip.module import ClipFineTuner
from rsvl.train.clip.run import TrainResult, save_farslip_checkpoint, train_clip, training_card

__all__ = [
    "DISTILL_TYPES",
    "LOSS_NAMES",
    "MAX_LOGIT_SCALE",
    "PRECISIONS",
    "ClipFineTuner",
    "ClipTrainConfig",
    "ClipTrainData",
    "TrainItem",
    "TrainResult",
    "clip_infonce",
    "encode_image_and_dense",
    "multi_positive_contrastive",
    "open_train_items",
    "resolve_precision",
    "roi_distill_loss",
    "roi_pool_patches",
    "save_farslip_checkpoint",
    "train_clip",
    "training_card",
]
