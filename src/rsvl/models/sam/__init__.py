"""Segment Anything: one implementation for every family that builds on SAM, loading Meta's
and Hugging Face's checkpoint layouts.

Modules, one component each (segment-anything's ``modeling/`` layout): :mod:`.config`
(:class:`SamConfig`), :mod:`.common`, :mod:`.image_encoder`, :mod:`.prompt_encoder`,
:mod:`.transformer`, :mod:`.mask_decoder`, :mod:`.sam` (the model), :mod:`.transforms`,
:mod:`.predictor`, :mod:`.convert` (checkpoint layouts) and :mod:`.build` (builders, ``build``,
``load``).
"""

from __future__ import annotations

from rsvl.models.lazy import lazy_names
from rsvl.models.sam.cards import CARDS

#: the family's names and the module of each, imported on first use (rsvl.models.lazy)
__getattr__ = lazy_names(__name__, {"build": "build", "build_sam": "build", "load": "build", "load_sam": "build",
                                    "SamConfig": "config", "SamPredictor": "predictor", "Sam": "sam"})

__all__ = ["CARDS", "Sam", "SamConfig", "SamPredictor", "build", "build_sam", "load", "load_sam"]
