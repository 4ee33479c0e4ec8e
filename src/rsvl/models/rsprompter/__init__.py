"""RSPrompter (anchor, query) and its SAM baselines (SAM-seg, SAM-det) on rsvl's SAM:
instance segmentation with learned SAM prompts, all in torchvision's detection convention::

    model.train(); losses = model(images, targets)   # dict[str, Tensor], already weighted
    model.eval();  preds = model(images)             # list[dict(boxes, labels, scores, masks)]

``images``: list of float (3, H, W) tensors in 0-1 (any size: each is resized so that its
longest side is SAM's input size, normalised and zero-padded, as RSPrompter's test pipeline
does). ``targets``: list of dict(boxes=float (N, 4) xyxy pixels, labels=int64 (N,) 1-based,
masks=uint8 (N, H, W)). Predictions are in the original pixel frame; ``masks`` are float
(N, 1, H, W) probabilities.

* ``rsprompter-anchor`` (:mod:`.anchor`): SAM ViT (frozen) -> feature aggregator over every
  other ViT layer (:mod:`.aggregator`) -> simple FPN (:mod:`.fpn`) -> torchvision RPN + RoI
  heads; a RoI prompter (:mod:`.prompts`) turns each 14x14 RoI feature into K_p sin-cos prompt
  tokens that drive SAM's mask decoder; the mask loss is BCE between the decoder's masks
  upsampled to the padded input and the full-image ground-truth masks.
* ``rsprompter-query`` (:mod:`.query`): the same features -> multi-scale deformable-attention
  pixel decoder (:mod:`.pixel_decoder`) -> Mask2Former-style queries (:mod:`.query_head`);
  every stage predicts classes, K_p prompt tokens and a coarse "plus" mask whose detached
  logits go through SAM's mask embedding as the dense prompt; SAM's decoder gives the final
  masks. Hungarian matching (scipy) on the plus masks, deep supervision with CE / BCE / dice
  on both mask sets (:mod:`.losses`).
* ``sam-seg`` (:mod:`.sam_seg`): frozen SAM ViT + aggregator + FPN + a standard Mask R-CNN head
  (torchvision), or a plain Mask2Former head (``head="mask2former"``).
* ``sam-det`` (:mod:`.sam_det`): a torchvision Faster R-CNN trained alone; at test time its
  boxes prompt a frozen SAM (single-mask output).

The SAM ViT is frozen unless ``lora=True`` (:mod:`.lora`: peft LoRA r=16, alpha 32, dropout
0.05 on ``qkv``). RSPrompter's configs leave the mask decoder trainable; so does rsvl.
Checkpoints are MMDetection's ``{'state_dict', 'meta'}`` layout with RSPrompter's key names
(:mod:`.convert`). :mod:`.build` has ``build(name, **overrides)`` and ``load(card, weights)``.
"""

from __future__ import annotations

from rsvl.models.lazy import lazy_names
from rsvl.models.rsprompter.cards import CARDS

#: the family's names and the module of each: they import torchvision's detection models,
#: so they are imported on first use (rsvl.models.lazy)
__getattr__ = lazy_names(__name__, {"INSTANCE_MODELS": "build", "build": "build", "card_name": "build",
                                    "load": "build"})

__all__ = ["CARDS", "INSTANCE_MODELS", "build", "card_name", "load"]
