"""RSPrompter's feature aggregator over SAM ViT hidden states."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn


class FeatureAggregator(nn.Module):
    """RSPrompter's aggregator: every other ViT hidden state -> one (B, out, h, w) map.

    Each selected (B, h, w, C) state goes through Conv1x1(C->hidden)+BN+ReLU+Conv3x3+BN+ReLU;
    the results are fused recurrently (h = x_prev + h_i; x = h + Conv3x3BNReLU(h)), then
    Conv1x1(hidden->out)+BN+ReLU+Conv3x3+BN+ReLU+Conv3x3.
    """

    def __init__(
        self,
        in_channels: int,
        num_hidden_states: int,
        hidden_channels: int = 32,
        out_channels: int = 256,
        select_layers: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        self.num_hidden_states = num_hidden_states
        # hidden state 0 is the embedding output, i the output of block i-1: 1, 3, 5, ...
        self.select_layers = tuple(select_layers if select_layers is not None else range(1, num_hidden_states, 2))
        if not self.select_layers or max(self.select_layers) >= num_hidden_states:
            raise ValueError(f"select_layers {self.select_layers} outside 0..{num_hidden_states - 1}")

        def cbr(cin: int, cout: int, k: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, k, padding=k // 2), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        self.downconvs = nn.ModuleList(
            nn.Sequential(*cbr(in_channels, hidden_channels, 1), *cbr(hidden_channels, hidden_channels, 3))
            for _ in self.select_layers
        )
        self.hidden_convs = nn.ModuleList(
            nn.Sequential(*cbr(hidden_channels, hidden_channels, 3)) for _ in self.select_layers
        )
        self.fusion_conv = nn.Sequential(
            *cbr(hidden_channels, out_channels, 1),
            *cbr(out_channels, out_channels, 3),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )

    def forward(self, hidden_states: Sequence[Tensor]) -> Tensor:
        if len(hidden_states) != self.num_hidden_states:
            raise ValueError(f"expected {self.num_hidden_states} hidden states, got {len(hidden_states)}")
        x: Tensor | None = None
        for down, hidden_conv, idx in zip(self.downconvs, self.hidden_convs, self.select_layers, strict=True):
            h = down(hidden_states[idx].permute(0, 3, 1, 2))
            if x is not None:
                h = x + h
            x = h + hidden_conv(h)
        assert x is not None
        return self.fusion_conv(x)
