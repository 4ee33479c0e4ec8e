"""The Python API: ``rsvl.load(name)`` gives a model with its tasks as methods.

    import rsvl
    model = rsvl.load("mini-clip")                          # built in, offline
    model = rsvl.load("farslip2-vit-b16", weights="FarSLIP2_ViT-B-16.pt")

    model.classify("scene.png", "farmland|cropland, forest, river, residential")
    model.classify([rgb_array, other_array], ["farmland", "forest"], top_k=3)
    model.segment("ortho.tif", "forest|trees, water, buildings", out="out/ortho")
    rsvl.load("mini-chat").chat("scene.png", "How many airplanes are there?").answer
    model.encode_text(["a stadium next to a river"])        # the network's own methods

The object returned is a :class:`Model`: the family's network (``model.module``) plus the
task methods its card serves (``model.card.tasks``). Attribute access falls through to the
network, so ``encode_image``, ``dense_features``, ``to`` and ``eval`` work as on the module.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rsvl.data.classes import ClassSpec, parse_class_list
from rsvl.errors import PromptError, UnknownModelError
from rsvl.io import read_rgb
from rsvl.models import registry

# Each method imports its task module on first use. Importing them all here
# (geopandas, pandas, scipy, FAISS...) added 1.2-1.3 s to every rsvl.load() on this machine
# (bench/load_time.py), and a chip classification needs none of them.

DEFAULT_MODEL = "mini-clip"

ClassesLike = Any  # "a|b, c" | ["a|b", "c"] | [ClassSpec, ...]


def _classes(classes: ClassesLike) -> list[Any]:
    """Class-list syntax everywhere the same: inline text, a list of names, or ClassSpecs."""

    if isinstance(classes, str):
        return parse_class_list(classes)
    items = list(classes) if classes is not None else []
    if not items:
        raise PromptError("no classes given.", hint='Pass e.g. "farmland|cropland, forest, river".')
    if all(isinstance(c, ClassSpec) for c in items):
        return items
    if all(isinstance(c, str) for c in items):
        if any("," in c for c in items):
            raise PromptError(f"class {next(c for c in items if ',' in c)!r} contains a comma.",
                              hint='In a list, give one class per item and join synonyms with "|".')
        return parse_class_list(", ".join(items))
    raise PromptError("classes must be a string, a list of strings, or a list of ClassSpec.")


class Model:
    """A loaded model: the network plus the tasks its card serves."""

    def __init__(self, module: Any, card: Any) -> None:
        object.__setattr__(self, "module", module)
        object.__setattr__(self, "card", card)

    # -- the network's own attributes -------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        return getattr(object.__getattribute__(self, "module"), name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self.module, name, value)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    def __dir__(self) -> list[str]:
        return sorted(set(super().__dir__()) | set(dir(self.module)))

    def __repr__(self) -> str:
        return f"rsvl.Model({self.card.name!r}, family={self.card.family!r}, tasks={list(self.card.tasks)})"

    def _require(self, task: str) -> None:

        if task not in self.card.tasks:
            serving = ", ".join(c.name for c in _cards_for(task)) or "none yet"
            raise UnknownModelError(
                f"model {self.card.name} does not serve {task!r} (it serves {', '.join(self.card.tasks)}).",
                hint=f"Models for {task}: {serving}.",
            )

    # -- tasks ------------------------------------------------------------------------------
    def classify(
        self,
        images: str | os.PathLike[str] | Any | Sequence[Any],
        classes: ClassesLike,
        *,
        templates: str | Sequence[str] | None = None,
        top_k: int = 5,
        **kwargs: Any,
    ) -> Any:
        """Zero-shot classification (:class:`rsvl.tasks.classify.ClassifyResult`).

        ``images``: a path (image, folder of images, or raster: its tiles are classified, see
        :func:`rsvl.tasks.classify.classify` for ``tile``, ``out``...), or in-memory uint8
        arrays (H, W, 3) / PIL images, one or a list. ``classes``: ``"farmland|cropland,
        forest"``, ``["farmland|cropland", "forest"]`` or ClassSpecs; synonyms are max-pooled.
        """

        self._require("classify")
        from rsvl.tasks import classify as task  # lazy: 1.2 s of task imports (note at top)
        specs = _classes(classes)
        if isinstance(images, (str, os.PathLike)):
            return task.classify(self.module, images, specs, templates=templates, top_k=top_k, **kwargs)

        one = not isinstance(images, (list, tuple)) and np.asarray(images).ndim in (2, 3)
        batch = [images] if one else list(images)
        return task.classify_arrays(self.module, batch, specs, templates=templates, top_k=top_k, **kwargs)

    def segment(self, source: str | os.PathLike[str], classes: ClassesLike, out: str | os.PathLike[str],
                **kwargs: Any) -> Any:
        """Open-vocabulary segmentation of a raster or image into ``classes``; writes
        ``OUT_classes.tif``, ``OUT_confidence.tif``, polygons and an overlay
        (:func:`rsvl.tasks.segment.segment` lists the options: ``cls_lambda``, ``threshold``,
        ``gsd``, ``tile``, ``probabilities``...). With a language-guided model (mini-fsvlm,
        fsvlm-7b...) ``classes`` is the request, "Please segment the farmland."
        (:func:`rsvl.tasks.farmland.segment_request`)."""

        if "farmland" in self.card.tasks and "segment" not in self.card.tasks:
            # a language-guided model (FSVLM, LISA, mini-fsvlm): ``classes`` is the request
            from rsvl.tasks.farmland import segment_request  # lazy: task imports (note at top)

            kwargs.setdefault("model_name", self.card.name)
            return segment_request(self.module, source, str(classes), out, **kwargs)
        self._require("segment")
        from rsvl.tasks.segment import segment  # lazy: 1.2 s of task imports (note at top)
        kwargs.setdefault("model_name", self.card.name)
        return segment(self.module, source, _classes(classes), out, **kwargs)

    def seg_chat(self, image: str | os.PathLike[str] | Any, request: str, **kwargs: Any) -> Any:
        """Ask a language-guided segmentation model (FSVLM, LISA, mini-fsvlm) ``request``
        about one image (a path or an (H, W, 3) uint8 array): a
        :class:`rsvl.models.segchat.SegAnswer` with the text and the mask logits."""

        self._require("farmland")
        if isinstance(image, (str, os.PathLike)):
            image = read_rgb(image)
        return self.module.seg_chat(image, request, **kwargs)

    def build_index(self, sources: Sequence[str | os.PathLike[str]], out: str | os.PathLike[str],
                    **kwargs: Any) -> Any:
        """Embed images, folders and every tile of rasters into an index at ``out``
        (:func:`rsvl.tasks.search.build`: ``tile``, ``gsd``, ``overwrite``...)."""

        self._require("search")
        from rsvl.tasks.search import build  # lazy: 1.2 s of task imports (note at top)

        return build(self.module, sources, out, **kwargs)

    def search(self, index: str | os.PathLike[str], text: str | None = None, *,
               image: str | os.PathLike[str] | None = None, k: int = 10, **kwargs: Any) -> Any:
        """The ``k`` entries of an index built with this model closest to ``text`` or to an
        ``image`` file (:func:`rsvl.tasks.search.search`)."""

        self._require("search")
        from rsvl.tasks.search import search  # lazy: 1.2 s of task imports (note at top)

        return search(index, text, image=image, k=k, model=self.module, **kwargs)


    def refer(self, source: str | os.PathLike[str], expression: str, out: str | os.PathLike[str],
              **kwargs: Any) -> Any:
        """Referring segmentation: the object ``expression`` describes in an image or raster;
        writes its mask, polygon and overlay (:func:`rsvl.tasks.refer.refer`)."""

        self._require("refer")
        from rsvl.tasks.refer import refer  # lazy: 1.2 s of task imports (note at top)
        kwargs.setdefault("model_name", self.card.name)
        return refer(self.module, source, expression, out, **kwargs)


    def instances(self, source: str | os.PathLike[str], out: str | os.PathLike[str] | None = None,
                  **kwargs: Any) -> Any:
        """Instance segmentation of an image, folder or raster: every object as a polygon with
        class and score (:func:`rsvl.tasks.instances.instances`: ``classes``, ``score``,
        ``tile``, ``instance_tif``...)."""

        self._require("instances")
        from rsvl.tasks.instances import instances  # lazy: 1.2 s of task imports (note at top)
        kwargs.setdefault("model_name", self.card.name)
        return instances(self.module, source, out, **kwargs)

    def chat(self, image: str | os.PathLike[str] | Any, question: str,
             history: Sequence[tuple[str, str]] | None = None, **kwargs: Any) -> Any:
        """Ask ``question`` about an image (a path or an (H, W, 3) uint8 array) or a raster
        (asked window by window, the answers combined by the kind of question); ``history``:
        earlier (question, answer) turns. Returns a :class:`rsvl.tasks.chat.ChatResult`
        (:func:`rsvl.tasks.chat.chat`: ``out``, ``gsd``, ``tile``, ``max_new_tokens``,
        ``temperature``...)."""

        self._require("chat")
        from rsvl.tasks.chat import chat  # lazy: 1.2 s of task imports (note at top)
        kwargs.setdefault("model_name", self.card.name)
        return chat(self.module, image, question, history=history or (), **kwargs)


def _cards_for(task: str) -> list[Any]:

    return registry.list_cards(task=task)


def load(name: str = DEFAULT_MODEL, *, weights: str | Path | None = None, device: str = "cpu", **kwargs: Any) -> Model:
    """Load a registered model by name (``rsvl models`` lists them) as a :class:`Model`.

    ``weights`` is a local checkpoint to use instead of the card's file (nothing is
    downloaded then); with ``weights``, ``name`` may also be a bare open_clip architecture
    (``"ViT-S-32"``, ``"ViT-B-16-quickgelu"``). Unknown names raise :class:`rsvl.errors.UnknownModelError` with close
    matches; missing weights raise :class:`rsvl.errors.WeightsNotFoundError` saying which
    file to place where.
    """
    card = registry.resolve_card(name, weights)
    net = registry.load(card, weights=weights, device=device, **kwargs)
    return Model(net, card)
