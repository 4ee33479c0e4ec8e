"""The SAM model: image encoder + prompt encoder + mask decoder, with SAM's
pre/post-processing (pixel mean/std, bottom-right padding, masks back to the original size)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rsvl.errors import PromptError
from rsvl.models.sam.config import SamConfig
from rsvl.models.sam.image_encoder import ImageEncoderViT
from rsvl.models.sam.mask_decoder import MaskDecoder
from rsvl.models.sam.prompt_encoder import PromptEncoder

#: SAM's input normalisation (ImageNet mean/std on the 0-255 scale), RGB order.
SAM_PIXEL_MEAN: tuple[float, float, float] = (123.675, 116.28, 103.53)
SAM_PIXEL_STD: tuple[float, float, float] = (58.395, 57.12, 57.375)


class Sam(nn.Module):
    """SAM: image encoder + prompt encoder + mask decoder (segment-anything attribute names)."""

    mask_threshold: float = 0.0

    def __init__(self, cfg: SamConfig) -> None:
        super().__init__()
        self.config = cfg
        self.image_encoder = ImageEncoderViT(cfg)
        self.prompt_encoder = PromptEncoder(cfg)
        self.mask_decoder = MaskDecoder(cfg)
        self.register_buffer("pixel_mean", torch.tensor(SAM_PIXEL_MEAN).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(SAM_PIXEL_STD).view(-1, 1, 1), False)

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    @property
    def img_size(self) -> int:
        return self.config.image_size

    def preprocess(self, x: Tensor) -> Tensor:
        """(B, 3, h, w) 0-255 RGB, already resized (longest side = image_size) -> normalised
        and zero-padded at the bottom/right to (B, 3, image_size, image_size)."""
        x = (x.to(self.pixel_mean.dtype) - self.pixel_mean) / self.pixel_std
        h, w = x.shape[-2:]
        return F.pad(x, (0, self.img_size - w, 0, self.img_size - h))

    def encode_image(self, pixel_values: Tensor) -> Tensor:
        """Normalised padded (B, 3, S, S) -> image embeddings (B, C, S/16, S/16)."""
        out = self.image_encoder(pixel_values)
        assert isinstance(out, Tensor)
        return out

    def forward(self, pixel_values: Tensor) -> Tensor:
        return self.encode_image(pixel_values)

    def decode(
        self,
        image_embeddings: Tensor,
        point_coords: Tensor | None = None,
        point_labels: Tensor | None = None,
        boxes: Tensor | None = None,
        mask_input: Tensor | None = None,
        multimask_output: bool = True,
    ) -> tuple[Tensor, Tensor]:
        """Prompts in the padded input frame (pixels of the resized image) -> low-res logits
        (B, M, 4h, 4w) and IoU predictions (B, M). Shapes: points (B, N, 2), labels (B, N),
        boxes (B, 4), mask_input (B, 1, 4h, 4w); image_embeddings (1 or B, C, h, w)."""
        points = None
        if point_coords is not None:
            if point_labels is None:
                raise PromptError("Point prompts need labels (1 foreground, 0 background).")
            points = (point_coords, point_labels)
        sparse, dense = self.prompt_encoder(points=points, boxes=boxes, masks=mask_input)
        if sparse.shape[0] == 1 and image_embeddings.shape[0] > 1:
            sparse = sparse.expand(image_embeddings.shape[0], -1, -1)
            dense = dense.expand(image_embeddings.shape[0], -1, -1, -1)
        return self.mask_decoder(
            image_embeddings,
            self.prompt_encoder.get_dense_pe(),
            sparse,
            dense,
            multimask_output,
        )

    def postprocess_masks(
        self, masks: Tensor, input_size: tuple[int, int], original_size: tuple[int, int]
    ) -> Tensor:
        """Low-res logits (B, M, 4h, 4w) -> logits at the original (H, W): upscale to the padded
        input, crop the padding (``input_size`` = resized image size), resize to the original."""
        s = self.img_size
        masks = F.interpolate(masks.float(), (s, s), mode="bilinear", align_corners=False)
        masks = masks[..., : input_size[0], : input_size[1]]
        return F.interpolate(masks, tuple(original_size), mode="bilinear", align_corners=False)
