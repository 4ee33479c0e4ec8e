"""FIANet referring segmentation (Swin-B + BERT, LAVT decoder), in segment-anything's
``modeling/`` style: :mod:`~rsvl.models.fianet.config`, :mod:`~rsvl.models.fianet.swin`,
:mod:`~rsvl.models.fianet.text` (BERT), :mod:`~rsvl.models.fianet.fusion` (PWAM, gates,
OPAB), :mod:`~rsvl.models.fianet.tmem`, :mod:`~rsvl.models.fianet.backbone`,
:mod:`~rsvl.models.fianet.decoder` (LAVT), :mod:`~rsvl.models.fianet.model`
(:class:`FianetModel`), :mod:`~rsvl.models.fianet.convert` (checkpoints and pretrained
initialisation) and :mod:`~rsvl.models.fianet.build` (``build`` / ``load``)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from rsvl.models.cards import ModelCard
from rsvl.models.fianet.cards import CARDS
from rsvl.models.lazy import lazy_names

if TYPE_CHECKING:
    from rsvl.models.fianet.model import FianetModel

#: the family's names and the module of each, imported on first use (rsvl.models.lazy)
__getattr__ = lazy_names(__name__, {"build": "build", "load_fianet": "build", "FianetConfig": "config",
                                    "FianetModel": "model"})


def load(card: ModelCard | str, weights: str | Path | None = None, device: str = "cpu", **options: Any) -> FianetModel:
    """A FIANet checkpoint as upstream's ``train.py`` writes it (see :func:`load_fianet`)."""
    return __getattr__("load_fianet")(card, weights, device, **options)


__all__ = ["CARDS", "FianetConfig", "FianetModel", "build", "load"]
