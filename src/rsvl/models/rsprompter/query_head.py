"""The Mask2Former-style query head (RSPrompter-query's prompter, SAM-seg's mask2former head)
and its instance post-processing."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rsvl.models.rsprompter.pixel_decoder import FFN, MSDeformAttnPixelDecoder
from rsvl.models.rsprompter.prompts import sincos_prompts, sine_positional_encoding
from rsvl.models.rsprompter.transforms import Batch, mask_boxes, masks_to_original


class _MHA(nn.Module):
    """Residual multi-head attention with positions added to q and k (MMCV names: attn.*)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, dropout=0.0, batch_first=True)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, k_pos: Tensor, mask: Tensor | None = None) -> Tensor:
        return q + self.attn(q + q_pos, k + k_pos, v, attn_mask=mask, need_weights=False)[0]


class _DecoderLayer(nn.Module):
    """Mask2Former decoder layer: masked cross-attention, self-attention, FFN (post-norm)."""

    def __init__(self, dim: int, heads: int, ffn: int) -> None:
        super().__init__()
        self.cross_attn = _MHA(dim, heads)
        self.self_attn = _MHA(dim, heads)
        self.ffn = FFN(dim, ffn)
        self.norms = nn.ModuleList([nn.LayerNorm(dim) for _ in range(3)])

    def forward(self, q: Tensor, mem: Tensor, q_pos: Tensor, mem_pos: Tensor, mask: Tensor | None) -> Tensor:
        q = self.norms[0](self.cross_attn(q, mem, mem, q_pos, mem_pos, mask))
        q = self.norms[1](self.self_attn(q, q, q, q_pos, q_pos))
        return self.norms[2](self.ffn(q))


class _TransformerDecoder(nn.Module):
    def __init__(self, dim: int, heads: int, ffn: int, num_layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(_DecoderLayer(dim, heads, ffn) for _ in range(num_layers))
        self.post_norm = nn.LayerNorm(dim)


#: SAM decoding callback of the query head: (sparse (B*Q, K, C), plus-mask logits or None,
#: image embeddings (B, C, h, w)) -> SAM mask logits (B*Q, 1, l, l)
SamDecodeFn = Callable[[Tensor, Tensor | None, Tensor], Tensor]


@dataclass
class StageOut:
    cls: Tensor  # (B, Q, C+1)
    masks: Tensor  # (B, Q, l, l) final masks (SAM's, or the plain head's)
    plus: Tensor | None  # (B, Q, l', l') mask_embed . pixel features (RSPrompter only)


class QueryHead(nn.Module):
    """Mask2Former-style head. With ``num_points`` it is RSPrompter's: every stage also
    regresses K_p sin-cos prompts per query and SAM's decoder makes the masks."""

    def __init__(
        self, num_classes: int, num_queries: int, in_channels: int, *, feat_channels: int = 128,
        out_channels: int = 256, num_points: int | None = 5, prompt_dim: int = 256, num_layers: int = 6,
        num_heads: int = 8, ffn_channels: int = 512, encoder_layers: int = 3, groups: int = 32,
    ) -> None:
        super().__init__()
        f = feat_channels
        self.num_classes, self.num_queries, self.num_heads = num_classes, num_queries, num_heads
        self.num_points = num_points
        self.num_levels = 3
        self.pixel_decoder = MSDeformAttnPixelDecoder(
            [in_channels] * 5, f, out_channels, encoder_layers, num_heads, ffn_channels, 3, groups
        )
        self.transformer_decoder = _TransformerDecoder(f, num_heads, ffn_channels, num_layers)
        self.query_embed = nn.Embedding(num_queries, f)
        self.query_feat = nn.Embedding(num_queries, f)
        self.level_embed = nn.Embedding(self.num_levels, f)
        self.mask_embed = nn.Sequential(
            nn.Linear(f, f), nn.ReLU(inplace=True), nn.Linear(f, f), nn.ReLU(inplace=True), nn.Linear(f, out_channels)
        )
        if num_points:
            self.cls_embed: nn.Module = nn.Sequential(nn.Linear(f, f), nn.ReLU(inplace=True), nn.Linear(f, num_classes + 1))
            self.point_emb = nn.Sequential(
                nn.Linear(f, f // 2), nn.ReLU(inplace=True), nn.Linear(f // 2, f // 2), nn.ReLU(inplace=True),
                nn.Linear(f // 2, prompt_dim * 2 * num_points),
            )
        else:
            self.cls_embed = nn.Linear(f, num_classes + 1)

    def _stage(
        self, q: Tensor, mask_feat: Tensor, target: tuple[int, int], sam_decode: SamDecodeFn | None,
        image_embeddings: Tensor | None,
    ) -> tuple[StageOut, Tensor]:
        b, nq, _ = q.shape
        out = self.transformer_decoder.post_norm(q)
        cls = self.cls_embed(out)
        plus = torch.einsum("bqc,bchw->bqhw", self.mask_embed(out), mask_feat)
        if self.num_points and sam_decode is not None:
            assert image_embeddings is not None
            sparse = sincos_prompts(self.point_emb(out), self.num_points).flatten(0, 1)
            masks = sam_decode(sparse, plus.detach().flatten(0, 1)[:, None], image_embeddings)
            masks = masks.reshape(b, nq, *masks.shape[-2:])
            stage = StageOut(cls, masks, plus)
        else:
            stage = StageOut(cls, plus, None)
        attn = F.interpolate(plus, target, mode="bilinear", align_corners=False)
        attn = attn.flatten(2)[:, None].expand(-1, self.num_heads, -1, -1).flatten(0, 1)
        attn = (attn.sigmoid() < 0.5).detach()
        return stage, attn

    def forward(
        self, feats: Sequence[Tensor], sam_decode: SamDecodeFn | None = None, image_embeddings: Tensor | None = None
    ) -> list[StageOut]:
        b = feats[0].shape[0]
        mask_feat, mem = self.pixel_decoder(feats)
        inputs, poss = [], []
        for i in range(self.num_levels):
            x = mem[i].flatten(2).transpose(1, 2) + self.level_embed.weight[i].view(1, 1, -1)
            h, w = mem[i].shape[-2:]
            pos = sine_positional_encoding(h, w, x.shape[-1] // 2, device=x.device, dtype=x.dtype)
            inputs.append(x)
            poss.append(pos.flatten(2).transpose(1, 2).expand(b, -1, -1))
        q = self.query_feat.weight[None].expand(b, -1, -1)
        q_pos = self.query_embed.weight[None].expand(b, -1, -1)
        stage, attn = self._stage(q, mask_feat, mem[0].shape[-2:], sam_decode, image_embeddings)
        stages = [stage]
        for i, layer in enumerate(self.transformer_decoder.layers):
            lvl = i % self.num_levels
            attn = attn & (attn.sum(-1) != attn.shape[-1])[..., None]  # all-masked rows: attend all
            q = layer(q, inputs[lvl], q_pos, poss[lvl], attn)
            nxt = mem[(i + 1) % self.num_levels].shape[-2:]
            stage, attn = self._stage(q, mask_feat, nxt, sam_decode, image_embeddings)
            stages.append(stage)
        return stages

def instance_postprocess(cls: Tensor, masks: Tensor, max_per_image: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """MaskFormer instance post-processing: top-k over queries x classes (no background),
    score x mean foreground probability. Returns (query idx, labels 1-based, scores, masks)."""
    q, c1 = cls.shape
    c = c1 - 1
    scores = cls.float().softmax(-1)[:, :-1].flatten()
    k = min(max_per_image, scores.numel())
    top, idx = scores.topk(k, sorted=True)
    query = torch.div(idx, c, rounding_mode="floor")
    labels = idx % c + 1
    m = masks[query].float()
    fg = (m > 0).float()
    mscore = (m.sigmoid() * fg).flatten(1).sum(1) / (fg.flatten(1).sum(1) + 1e-6)
    return query, labels, top * mscore, m

def query_predictions(st: StageOut, batch: Batch, size: int, max_per_image: int) -> list[dict[str, Tensor]]:
    out = []
    for j, (rs, orig) in enumerate(zip(batch.sizes, batch.original, strict=True)):
        _, labels, scores, m = instance_postprocess(st.cls[j], st.masks[j], max_per_image)
        probs = masks_to_original(m[:, None], size, rs, orig)
        boxes = mask_boxes(probs[:, 0] > 0.5)
        out.append({"boxes": boxes, "labels": labels, "scores": scores, "masks": probs})
    return out
