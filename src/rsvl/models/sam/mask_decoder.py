"""SAM's mask decoder: two-way transformer, upscaling, hypernetwork MLPs and the IoU head
(segment-anything's ``modeling/mask_decoder.py``)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from rsvl.models.sam.common import MLP, LayerNorm2d
from rsvl.models.sam.config import SamConfig
from rsvl.models.sam.transformer import TwoWayTransformer


class MaskDecoder(nn.Module):
    """Two-way transformer + upscaling + hypernetwork MLPs + IoU head."""

    def __init__(self, cfg: SamConfig) -> None:
        super().__init__()
        dim = cfg.prompt_embed_dim
        self.num_multimask_outputs = cfg.num_multimask_outputs
        self.num_mask_tokens = cfg.num_multimask_outputs + 1
        self.transformer = TwoWayTransformer(cfg)
        self.iou_token = nn.Embedding(1, dim)
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, dim)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(dim, dim // 4, kernel_size=2, stride=2),
            LayerNorm2d(dim // 4),
            nn.GELU(),
            nn.ConvTranspose2d(dim // 4, dim // 8, kernel_size=2, stride=2),
            nn.GELU(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList(
            MLP(dim, dim, dim // 8, 3) for _ in range(self.num_mask_tokens)
        )
        self.iou_prediction_head = MLP(
            dim, cfg.iou_head_hidden_dim, self.num_mask_tokens, cfg.iou_head_depth
        )

    def forward(
        self,
        image_embeddings: Tensor,
        image_pe: Tensor,
        sparse_prompt_embeddings: Tensor,
        dense_prompt_embeddings: Tensor,
        multimask_output: bool,
    ) -> tuple[Tensor, Tensor]:
        """Predict masks for B prompt sets.

        image_embeddings: (1, C, h, w) shared by every prompt set, or (B, C, h, w) one per set;
        image_pe: (1, C, h, w); sparse (B, T, C); dense (B, C, h, w).
        Returns low-res mask logits (B, M, 4h, 4w) and IoU predictions (B, M), with M = 3
        (multimask) or 1.
        """
        nb = sparse_prompt_embeddings.shape[0]
        out_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        tokens = torch.cat(
            [out_tokens[None].expand(nb, -1, -1), sparse_prompt_embeddings.to(out_tokens.dtype)],
            dim=1,
        )
        src = image_embeddings
        if src.shape[0] != nb:
            if src.shape[0] != 1:
                raise ValueError(
                    f"{src.shape[0]} image embeddings for {nb} prompt sets: give one, or one per set"
                )
            src = src.expand(nb, -1, -1, -1)
        src = src + dense_prompt_embeddings
        pos = image_pe.expand(nb, -1, -1, -1)
        b, c, h, w = src.shape
        hs, img = self.transformer(src, pos, tokens)
        iou_out = hs[:, 0]
        mask_out = hs[:, 1 : 1 + self.num_mask_tokens]
        up = self.output_upscaling(img.transpose(1, 2).reshape(b, c, h, w))
        hyper = torch.stack(
            [mlp(mask_out[:, i]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], dim=1
        )
        bu, cu, hu, wu = up.shape
        masks = (hyper @ up.reshape(bu, cu, hu * wu)).reshape(bu, -1, hu, wu)
        iou = self.iou_prediction_head(iou_out)
        sl = slice(1, None) if multimask_output else slice(0, 1)
        return masks[:, sl], iou[:, sl]
