"""SAM's prompt encoder: points, boxes and dense mask prompts -> sparse tokens and a dense
embedding (segment-anything's ``modeling/prompt_encoder.py``)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from rsvl.models.sam.common import LayerNorm2d
from rsvl.models.sam.config import SamConfig


class PositionEmbeddingRandom(nn.Module):
    """Random-Fourier position encoding: [sin, cos](2 pi (2c - 1) G), G ~ N(0, 1) (2, C/2)."""

    def __init__(self, num_pos_feats: int) -> None:
        super().__init__()
        self.register_buffer("positional_encoding_gaussian_matrix", torch.randn(2, num_pos_feats))

    def encode(self, coords: Tensor) -> Tensor:
        """Coordinates in [0, 1]^2, shape (..., 2) -> (..., C)."""
        g: Tensor = self.positional_encoding_gaussian_matrix
        proj = 2 * math.pi * ((2 * coords.to(g.dtype) - 1) @ g)
        return torch.cat([proj.sin(), proj.cos()], dim=-1)

    def dense(self, h: int, w: int) -> Tensor:
        """(C, h, w) encoding of the centres of an h x w grid."""
        g: Tensor = self.positional_encoding_gaussian_matrix
        ys = (torch.arange(h, device=g.device, dtype=g.dtype) + 0.5) / h
        xs = (torch.arange(w, device=g.device, dtype=g.dtype) + 0.5) / w
        grid = torch.stack(
            [xs[None, :].expand(h, w), ys[:, None].expand(h, w)], dim=-1
        )  # (h, w, 2) as (x, y)
        return self.encode(grid).permute(2, 0, 1)

    def encode_pixels(self, coords: Tensor, image_size: tuple[int, int]) -> Tensor:
        """Pixel coordinates (x, y) in the padded input frame -> (..., C)."""
        scale = torch.tensor(
            [1.0 / image_size[1], 1.0 / image_size[0]], device=coords.device, dtype=torch.float32
        )
        return self.encode(coords.float() * scale)


class PromptEncoder(nn.Module):
    """Points, boxes and dense mask prompts -> sparse tokens and a dense embedding."""

    def __init__(self, cfg: SamConfig) -> None:
        super().__init__()
        dim = cfg.prompt_embed_dim
        self.embed_dim = dim
        self.input_image_size = (cfg.image_size, cfg.image_size)
        self.image_embedding_size = (cfg.embedding_size, cfg.embedding_size)
        self.pe_layer = PositionEmbeddingRandom(dim // 2)
        # 0: negative point, 1: positive point, 2: box top-left, 3: box bottom-right
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, dim) for _ in range(4))
        self.not_a_point_embed = nn.Embedding(1, dim)
        self.mask_input_size = (4 * cfg.embedding_size, 4 * cfg.embedding_size)
        c = cfg.mask_in_chans
        self.mask_downscaling = nn.Sequential(
            nn.Conv2d(1, c // 4, kernel_size=2, stride=2),
            LayerNorm2d(c // 4),
            nn.GELU(),
            nn.Conv2d(c // 4, c, kernel_size=2, stride=2),
            LayerNorm2d(c),
            nn.GELU(),
            nn.Conv2d(c, dim, kernel_size=1),
        )
        self.no_mask_embed = nn.Embedding(1, dim)

    def get_dense_pe(self) -> Tensor:
        """(1, C, h, w) positional encoding of the image-embedding grid."""
        return self.pe_layer.dense(*self.image_embedding_size)[None]

    def embed_points(self, points: Tensor, labels: Tensor, pad: bool) -> Tensor:
        """(B, N, 2) pixel coords, (B, N) labels in {1, 0, -1 (not a point), -10 (padding)}."""
        points = points.float() + 0.5  # centre of the pixel
        if pad:
            points = torch.cat([points, points.new_zeros(points.shape[0], 1, 2)], dim=1)
            labels = torch.cat([labels, labels.new_full((labels.shape[0], 1), -1)], dim=1)
        emb = self.pe_layer.encode_pixels(points, self.input_image_size)
        lab = labels[..., None]
        emb = torch.where(lab == -1, self.not_a_point_embed.weight, emb)
        emb = torch.where(lab == -10, torch.zeros_like(emb), emb)
        emb = emb + (lab == 0) * self.point_embeddings[0].weight
        emb = emb + (lab == 1) * self.point_embeddings[1].weight
        return emb

    def embed_boxes(self, boxes: Tensor) -> Tensor:
        """(B, 4) xyxy pixel boxes -> (B, 2, C) corner tokens."""
        corners = boxes.float().reshape(-1, 2, 2) + 0.5
        emb = self.pe_layer.encode_pixels(corners, self.input_image_size)
        return torch.stack(
            [emb[:, 0] + self.point_embeddings[2].weight[0], emb[:, 1] + self.point_embeddings[3].weight[0]],
            dim=1,
        )

    def embed_masks(self, masks: Tensor) -> Tensor:
        """(B, 1, 4h, 4w) low-res mask logits -> (B, C, h, w)."""
        return self.mask_downscaling(masks)

    def forward(
        self,
        points: tuple[Tensor, Tensor] | None = None,
        boxes: Tensor | None = None,
        masks: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Returns sparse (B, T, C) and dense (B, C, h, w) embeddings."""
        if points is not None:
            bs = points[0].shape[0]
        elif boxes is not None:
            bs = boxes.shape[0]
        elif masks is not None:
            bs = masks.shape[0]
        else:
            bs = 1
        w = self.no_mask_embed.weight
        sparse = torch.empty((bs, 0, self.embed_dim), device=w.device, dtype=w.dtype)
        if points is not None:
            sparse = torch.cat([sparse, self.embed_points(*points, pad=boxes is None)], dim=1)
        if boxes is not None:
            sparse = torch.cat([sparse, self.embed_boxes(boxes)], dim=1)
        if masks is not None:
            dense = self.embed_masks(masks)
        else:
            dense = w.reshape(1, -1, 1, 1).expand(bs, -1, *self.image_embedding_size)
        return sparse, dense
