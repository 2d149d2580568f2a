"""A plain multilayer perceptron, the building block of every family's vector networks."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn


class MLP(nn.Module):
    """in_features -> hidden_dims... -> out_features, with an activation between layers.

    Args:
        in_features: input width.
        hidden_dims: widths of the hidden layers (may be empty: one linear layer).
        out_features: output width.
        activation: module class used between layers.
    """

    def __init__(self, in_features: int, hidden_dims: Sequence[int], out_features: int,
                 activation: type[nn.Module] = nn.SiLU) -> None:
        super().__init__()
        widths = [in_features, *hidden_dims, out_features]
        layers: list[nn.Module] = []
        for index, (width_in, width_out) in enumerate(zip(widths[:-1], widths[1:])):
            layers.append(nn.Linear(width_in, width_out))
            if index < len(widths) - 2:
                layers.append(activation())
        self.layers = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:  # (B, in_features) -> (B, out_features)
        return self.layers(x)
