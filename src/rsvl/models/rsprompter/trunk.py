"""The SAM-feature trunk shared by RSPrompter-anchor, -query and SAM-seg, and the RPN they use."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead

from rsvl.models.rsprompter.aggregator import FeatureAggregator
from rsvl.models.rsprompter.fpn import SimpleFPN
from rsvl.models.rsprompter.lora import apply_lora, freeze
from rsvl.models.sam.sam import Sam

#: strides of the five pyramid levels
FPN_STRIDES = (4, 8, 16, 32, 64)

class SamTrunk(nn.Module):
    """SAM (+ optional LoRA) -> aggregator -> simple FPN. Holds the whole SAM as ``self.sam``."""

    #: SAM prompt-encoder parts the model uses (the rest is frozen: upstream lacks them)
    _prompt_parts: tuple[str, ...] = ()
    _uses_decoder = True

    def __init__(
        self, sam: Sam, *, lora: bool, hidden_channels: int = 32, fpn_channels: int | None = None,
        select_layers: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        self.sam = sam
        cfg = sam.config
        c = fpn_channels or cfg.prompt_embed_dim
        self.fpn_channels = c
        self.aggregator = FeatureAggregator(
            cfg.encoder_embed_dim, cfg.encoder_depth + 1, hidden_channels, c, select_layers
        )
        self.fpn = SimpleFPN(c, c, 5)
        self.lora = lora
        freeze(sam)
        if lora:
            apply_lora(sam.image_encoder)
        pe = sam.prompt_encoder
        for part in self._prompt_parts:
            for p in getattr(pe, part).parameters():
                p.requires_grad = True
        if self._uses_decoder:
            for p in sam.mask_decoder.parameters():
                p.requires_grad = True

    def _encode(self, pixels: Tensor) -> tuple[Tensor, list[Tensor]]:
        enc = self.sam.image_encoder
        if self.lora:
            out = enc(pixels, return_hidden_states=True)
        else:
            with torch.no_grad():
                out = enc(pixels, return_hidden_states=True)
        emb, hidden = out  # type: ignore[misc]
        return emb, self.fpn(self.aggregator(hidden))

    def train(self, mode: bool = True) -> SamTrunk:
        super().train(mode)
        if not self.lora:  # a frozen ViT stays in eval mode (upstream's _set_grad_false)
            self.sam.image_encoder.eval()
        return self


def build_rpn(channels: int, sizes: Sequence[Sequence[int]], *, train_pre: int = 2000, test_pre: int = 1000,
         post: int = 1000) -> RegionProposalNetwork:
    ratios = ((0.5, 1.0, 2.0),) * len(sizes)
    gen = AnchorGenerator(tuple(tuple(s) for s in sizes), ratios)
    head = RPNHead(channels, gen.num_anchors_per_location()[0])
    return RegionProposalNetwork(
        gen, head, 0.7, 0.3, 256, 0.5,
        dict(training=train_pre, testing=test_pre), dict(training=post, testing=post), 0.7,
    )


def level_names(n: int) -> list[str]:
    return [str(i) for i in range(n)]
