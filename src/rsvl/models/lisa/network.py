"""The LISA network with the published key names: ``LisaNet`` (LLaMA + ``mm_projector`` +
SAM + ``text_hidden_fcs`` + ``lm_head``).

Upstream's ``LISAForCausalLM`` keeps everything but the head under ``model``::

    model.embed_tokens / model.layers.N.* / model.norm         LLaMA (transformers' LlamaModel)
    model.mm_projector.{weight,bias}                            linear (or .0 / .2 for mlp2x_gelu)
    model.visual_model.{image_encoder,prompt_encoder,mask_decoder}.*   SAM (rsvl's Sam)
    model.text_hidden_fcs.0.{0,2}.{weight,bias}                Linear(H,H)-ReLU-Linear(H,256)-Dropout(0)
    lm_head.weight

``LisaNet`` is built the same way (the three extra parts are registered on the ``LlamaModel``),
so a merged checkpoint loads with its own key names and nothing is renamed. The CLIP tower
is not part of it: upstream's merge saves everything except ``vision_tower`` keys and the
tower is read from its own repository (:mod:`rsvl.models.lisa.build`).
"""

from __future__ import annotations

from torch import nn
from transformers import LlamaConfig, LlamaModel

from rsvl.models.sam.config import SamConfig
from rsvl.models.sam.sam import Sam


def text_hidden_fcs(hidden: int, out_dim: int) -> nn.ModuleList:
    """LISA's ``text_hidden_fcs``: one Linear(H, H) - ReLU - Linear(H, out_dim) - Dropout(0)."""
    return nn.ModuleList(
        [nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, out_dim), nn.Dropout(0.0))]
    )


def mm_projector(kind: str, vision_width: int, hidden: int) -> nn.Module:
    """LLaVA's projector: ``linear`` (LLaVA-v1, LISA) or ``mlp2x_gelu``."""
    if kind == "linear":
        return nn.Linear(vision_width, hidden)
    return nn.Sequential(nn.Linear(vision_width, hidden), nn.GELU(), nn.Linear(hidden, hidden))


class LisaNet(nn.Module):
    """LLaMA + projector + SAM + ``text_hidden_fcs`` + ``lm_head`` (see the module doc)."""

    def __init__(
        self,
        text: LlamaConfig,
        sam: SamConfig,
        *,
        vision_width: int,
        projector: str = "linear",
        out_dim: int = 256,
    ) -> None:
        super().__init__()
        hidden = int(text.hidden_size)
        self.model = LlamaModel(text)
        self.model.mm_projector = mm_projector(projector, vision_width, hidden)
        self.model.visual_model = Sam(sam)
        self.model.text_hidden_fcs = text_hidden_fcs(hidden, out_dim)
        self.lm_head = nn.Linear(hidden, int(text.vocab_size), bias=False)

    @property
    def llm(self) -> LlamaModel:
        return self.model

    @property
    def projector(self) -> nn.Module:
        return self.model.mm_projector

    @property
    def sam(self) -> Sam:
        return self.model.visual_model

    @property
    def seg_fc(self) -> nn.Module:
        """``text_hidden_fcs[0]``: the [SEG] state -> SAM prompt."""
        return self.model.text_hidden_fcs[0]


__all__ = ["LisaNet", "mm_projector", "text_hidden_fcs"]
