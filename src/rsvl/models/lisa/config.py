"""A LISA / FSVLM ``config.json``, read as plain JSON.

The file says ``model_type: "llava"`` and ``architectures: ["LISAForCausalLM"]``; handing it
to transformers would build its own (different) ``LlavaConfig``, so rsvl reads the fields it
needs itself:

* the LLaMA shape (``hidden_size``, ``num_hidden_layers`` ...), through the LLaVA family's
  :func:`~rsvl.models.llava.config.text_config`;
* ``mm_vision_select_layer`` (one CLIP layer, -2 in every LISA / FSVLM release) and
  ``mm_vision_select_feature`` (LISA forces ``patch``: CLS dropped);
* ``mm_projector_type`` (absent = ``linear``, LLaVA-v1's single Linear; ``mlp2x_gelu`` also
  loads), ``mm_use_im_start_end`` (markers around the image), ``out_dim`` (SAM's prompt width,
  256) and ``vision_tower`` / ``mm_vision_tower`` (the CLIP repository, informative only).

Shapes the checkpoint fixes (vocabulary rows, projector widths, ``out_dim``, SAM's size) are
taken from the tensors, so a folder whose config lacks LISA's fields (the base LLaVA's
config next to an unmerged training file) still loads.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from rsvl.errors import CheckpointMismatchError

PROJECTORS: tuple[str, ...] = ("linear", "mlp2x_gelu")


@dataclass(frozen=True)
class LisaFields:
    """The multimodal fields of a LISA config.json."""

    select_layer: int = -2
    projector: str = "linear"
    use_im_start_end: bool = True
    out_dim: int = 256
    vision_tower: str = "openai/clip-vit-large-patch14"


def lisa_fields(cfg: Mapping[str, Any]) -> LisaFields:
    """:class:`LisaFields` of a config.json dict; refuses what rsvl does not implement."""
    layer = cfg.get("mm_vision_select_layer", -2)
    if isinstance(layer, (list, tuple)):
        raise CheckpointMismatchError(
            f"config.json has mm_vision_select_layer={layer!r} (several CLIP layers): that is a "
            "VHM-style LLaVA, not LISA / FSVLM.",
            hint="Load it with --model vhm-7b; LISA folders select one layer (-2).",
        )
    feature = cfg.get("mm_vision_select_feature", "patch")
    if feature != "patch":
        raise CheckpointMismatchError(
            f"config.json has mm_vision_select_feature={feature!r}; LISA uses 'patch' (CLS dropped).",
            hint="Check that the folder is a LISA / FSVLM model.",
        )
    projector = str(cfg.get("mm_projector_type") or "linear")
    if projector not in PROJECTORS:
        raise CheckpointMismatchError(
            f"config.json has mm_projector_type={projector!r}; rsvl loads {', '.join(PROJECTORS)}.",
            hint="LISA and FSVLM use LLaVA-v1's linear projector.",
        )
    tower = cfg.get("vision_tower") or cfg.get("mm_vision_tower") or LisaFields.vision_tower
    return LisaFields(
        select_layer=int(layer),
        projector=projector,
        use_im_start_end=bool(cfg.get("mm_use_im_start_end", True)),
        out_dim=int(cfg.get("out_dim", 256)),
        vision_tower=str(tower),
    )


__all__ = ["PROJECTORS", "LisaFields", "lisa_fields"]
