"""RSPrompter-query: Mask2Former-style queries regress SAM prompts and a dense mask prompt."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch.nn.functional as F
from torch import Tensor

from rsvl.models.rsprompter.losses import QueryLosses
from rsvl.models.rsprompter.query_head import QueryHead, query_predictions
from rsvl.models.rsprompter.transforms import model_batch
from rsvl.models.rsprompter.trunk import SamTrunk
from rsvl.models.sam.sam import Sam


class RSPrompterQuery(SamTrunk):
    """RSPrompter-query: Mask2Former-style queries regress SAM prompts (+ a dense mask prompt)."""

    _prompt_parts = ("mask_downscaling",)

    def __init__(
        self, sam: Sam, num_classes: int, *, num_queries: int = 70, num_points: int = 5, lora: bool = False,
        hidden_channels: int = 32, fpn_channels: int | None = None, feat_channels: int = 128,
        num_decoder_layers: int = 6, num_heads: int = 8, ffn_channels: int = 512, encoder_layers: int = 3,
        groups: int = 32, loss_points: int = 12544, max_per_image: int = 100,
        select_layers: Sequence[int] | None = None,
    ) -> None:
        super().__init__(sam, lora=lora, hidden_channels=hidden_channels, fpn_channels=fpn_channels,
                         select_layers=select_layers)
        self.num_classes, self.num_queries, self.num_points = num_classes, num_queries, num_points
        self.max_per_image = max_per_image
        prompt_dim = sam.config.prompt_embed_dim
        self.head = QueryHead(
            num_classes, num_queries, self.fpn_channels, feat_channels=feat_channels, out_channels=prompt_dim,
            num_points=num_points, prompt_dim=prompt_dim, num_layers=num_decoder_layers, num_heads=num_heads,
            ffn_channels=ffn_channels, encoder_layers=encoder_layers, groups=groups,
        )
        self.losses = QueryLosses(num_classes, loss_points)

    def _sam_decode(self, sparse: Tensor, plus: Tensor | None, image_embeddings: Tensor) -> Tensor:
        pe = self.sam.prompt_encoder
        n = sparse.shape[0]
        reps = n // image_embeddings.shape[0]
        img = image_embeddings.repeat_interleave(reps, dim=0)
        assert plus is not None
        if plus.shape[-2:] != pe.mask_input_size:
            plus = F.interpolate(plus, pe.mask_input_size, mode="bilinear", align_corners=False)
        dense = pe.embed_masks(plus)
        masks, _ = self.sam.mask_decoder(img, pe.get_dense_pe(), sparse, dense, multimask_output=False)
        return masks

    def forward(
        self, images: Sequence[Tensor], targets: Sequence[Mapping[str, Tensor]] | None = None
    ) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        batch = model_batch(self.sam, images, targets, self.training)
        emb, feats = self._encode(batch.pixels)
        stages = self.head(feats, self._sam_decode, emb)
        if self.training:
            assert batch.targets is not None
            return self.losses(stages, batch.targets)
        return query_predictions(stages[-1], batch, self.sam.img_size, self.max_per_image)
