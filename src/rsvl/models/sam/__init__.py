"""Segment Anything: one implementation for every family that builds on SAM, loading Meta's
and Hugging Face's checkpoint layouts.

Modules, one component each (segment-anything's ``modeling/`` layout): :mod:`.config`
(:class:`SamConfig`), :mod:`.common`, :mod:`.image_encoder`, :mod:`.prompt_encoder`,
:mod:`.transformer`, :mod:`.mask_decoder`, :mod:`.sam` (the model), :mod:`.transforms`,
:mod:`.predictor`, :mod:`.convert` (checkpoint layouts) and :mod:`.build` (builders, ``build``,
``load``).
"""

from __future__ import annotations

from rsvl.models.sam.build import build, build_sam, load, load_sam
from rsvl.models.sam.cards import CARDS
from rsvl.models.sam.config import SamConfig
from rsvl.models.sam.predictor import SamPredictor
from rsvl.models.sam.sam import Sam

__all__ = ["CARDS", "Sam", "SamConfig", "SamPredictor", "build", "build_sam", "load", "load_sam"]
