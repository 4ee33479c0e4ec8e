"""FIANet's image backbone: Swin stages that each fuse the three BERT passes
(:class:`MMBasicLayer`), the per-stage norms and TMEM (:class:`MultiModalSwinTransformer`)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rsvl.models.fianet.config import FianetConfig
from rsvl.models.fianet.fusion import OPAB, PWAM, tanh_gate
from rsvl.models.fianet.swin import PatchEmbed, PatchMerging, SwinTransformerBlock, shift_mask
from rsvl.models.fianet.text import TextFeatures
from rsvl.models.fianet.tmem import TMEM


class MMBasicLayer(nn.Module):
    """One Swin stage followed by FIANet's language fusion (upstream ``MMBasicLayer``)."""

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        window: int,
        mlp_ratio: float,
        drop_path: Sequence[float],
        downsample: bool,
        l_in: int,
        fusion_heads: int,
        fusion_drop: float,
    ) -> None:
        super().__init__()
        self.window = window
        self.shift = window // 2
        self.blocks = nn.ModuleList(
            SwinTransformerBlock(
                dim, num_heads, window, 0 if i % 2 == 0 else window // 2, mlp_ratio, drop_path[i]
            )
            for i in range(depth)
        )
        reduced = dim // 8
        self.fc1 = nn.Linear(dim, reduced)
        self.fc2 = nn.Linear(reduced, dim)
        self.context_pixel_attn = PWAM(dim, l_in, fusion_heads, fusion_drop)
        self.context_tanh_gate = tanh_gate(dim)
        self.object_position_align_blk = OPAB(dim, l_in, fusion_heads)
        self.downsample = PatchMerging(dim) if downsample else None

    def forward(
        self, x: Tensor, hw: tuple[int, int], text: TextFeatures
    ) -> tuple[Tensor, Tensor, tuple[int, int]]:
        """Returns (PWAM output for the decoder, input of the next stage, its H, W)."""
        h, w = hw
        hp = math.ceil(h / self.window) * self.window
        wp = math.ceil(w / self.window) * self.window
        mask = shift_mask(hp, wp, self.window, self.shift, x.device) if len(self.blocks) > 1 else None
        for blk in self.blocks:
            x = blk(x, hw, mask)
        gate = torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean(dim=1)))))  # (B, C)
        x_res = self.context_pixel_attn(x, text.l, text.l_mask)
        ctx = self.context_tanh_gate(x_res) * x_res
        op = self.object_position_align_blk(x, hw, text.t, text.t_mask, text.p, text.p_mask)
        x = x + (ctx + op) * gate.unsqueeze(1)
        if self.downsample is not None:
            return x_res, self.downsample(x, hw), ((h + 1) // 2, (w + 1) // 2)
        return x_res, x, hw


class MultiModalSwinTransformer(nn.Module):
    def __init__(self, cfg: FianetConfig) -> None:
        super().__init__()
        self.num_features = list(cfg.num_features)
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.in_chans, cfg.embed_dim)
        total = sum(cfg.depths)  # stochastic depth rises linearly over all blocks
        dpr = [cfg.drop_path_rate * i / max(total - 1, 1) for i in range(total)]
        self.layers = nn.ModuleList()
        n = len(cfg.depths)
        for i in range(n):
            start = sum(cfg.depths[:i])
            self.layers.append(
                MMBasicLayer(
                    dim=self.num_features[i],
                    depth=cfg.depths[i],
                    num_heads=cfg.num_heads[i],
                    window=cfg.window_size,
                    mlp_ratio=cfg.mlp_ratio,
                    drop_path=dpr[start : start + cfg.depths[i]],
                    downsample=i < n - 1,
                    l_in=cfg.text_hidden_size,
                    fusion_heads=cfg.fusion_heads[i],
                    fusion_drop=cfg.fusion_drop,
                )
            )
        for i, c in enumerate(self.num_features):
            self.add_module(f"norm{i}", nn.LayerNorm(c))
        self.tmem = TMEM(self.num_features, cfg.num_tmem, cfg.text_hidden_size)

    def init_weights(self) -> None:
        """Upstream's ``init_weights()``: trunc-normal(0.02) linears with zero bias, unit LNs."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def stages(self, x: Tensor, text: TextFeatures) -> list[Tensor]:
        """Per-stage PWAM outputs after ``norm{i}``, as (B, C_i, H_i, W_i) maps."""
        x = self.patch_embed(x)
        hw = (x.shape[2], x.shape[3])
        x = x.flatten(2).transpose(1, 2)
        outs = []
        for i, layer in enumerate(self.layers):
            x_res, x, next_hw = layer(x, hw, text)
            y = getattr(self, f"norm{i}")(x_res)
            outs.append(y.reshape(-1, hw[0], hw[1], self.num_features[i]).permute(0, 3, 1, 2))
            hw = next_hw
        return outs

    def forward(self, x: Tensor, text: TextFeatures) -> list[Tensor]:
        return self.tmem(self.stages(x, text), text.l, text.l_mask)


__all__ = ["MMBasicLayer", "MultiModalSwinTransformer"]
