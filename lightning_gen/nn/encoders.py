"""Encoders and decoders shared by the Autoencoder and the VAE (plain nn.Modules).

Read bottom-up: the MLP pair flattens; the conv pair halves the resolution twice (28 -> 14 -> 7
for MNIST) and mirrors it with transposed convolutions. ``build_encoder`` / ``build_decoder`` pick
one by name and check that the data shape suits it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import Tensor, nn

from lightning_gen.nn.mlp import MLP

NETWORKS = ("mlp", "conv")


class MLPEncoder(nn.Module):
    """(B, *data_shape) -> (B, out_features)."""

    def __init__(self, data_shape: Sequence[int], hidden_dims: Sequence[int], out_features: int) -> None:
        super().__init__()
        self.mlp = MLP(math.prod(data_shape), hidden_dims, out_features)

    def forward(self, x: Tensor) -> Tensor:
        return self.mlp(x.flatten(1))


class MLPDecoder(nn.Module):
    """(B, latent_dim) -> (B, outputs_per_dim, *data_shape)."""

    def __init__(self, latent_dim: int, hidden_dims: Sequence[int], data_shape: Sequence[int],
                 outputs_per_dim: int) -> None:
        super().__init__()
        self.out_shape = (outputs_per_dim, *data_shape)
        self.mlp = MLP(latent_dim, list(reversed(hidden_dims)), math.prod(self.out_shape))

    def forward(self, z: Tensor) -> Tensor:
        return self.mlp(z).view(len(z), *self.out_shape)


class ConvEncoder(nn.Module):
    """(B, C, H, W) -> (B, out_features): two stride-2 convolutions, then two linear layers."""

    def __init__(self, data_shape: Sequence[int], base_channels: int, hidden_dim: int,
                 out_features: int) -> None:
        super().__init__()
        channels, height, width = data_shape
        self.features = nn.Sequential(
            nn.Conv2d(channels, base_channels, 4, stride=2, padding=1), nn.SiLU(),  # (B, c, H/2, W/2)
            nn.Conv2d(base_channels, 2 * base_channels, 4, stride=2, padding=1), nn.SiLU(),  # H/4
        )
        self.head = MLP(2 * base_channels * (height // 4) * (width // 4), [hidden_dim], out_features)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x).flatten(1))


class ConvDecoder(nn.Module):
    """(B, latent_dim) -> (B, outputs_per_dim, C, H, W): the mirror of ConvEncoder."""

    def __init__(self, latent_dim: int, base_channels: int, hidden_dim: int,
                 data_shape: Sequence[int], outputs_per_dim: int) -> None:
        super().__init__()
        channels, height, width = data_shape
        self.out_shape = (outputs_per_dim, *data_shape)
        self.low_shape = (2 * base_channels, height // 4, width // 4)
        self.head = nn.Sequential(MLP(latent_dim, [hidden_dim], math.prod(self.low_shape)), nn.SiLU())
        self.upsample = nn.Sequential(
            nn.ConvTranspose2d(2 * base_channels, base_channels, 4, stride=2, padding=1), nn.SiLU(),
            nn.ConvTranspose2d(base_channels, outputs_per_dim * channels, 4, stride=2, padding=1),
        )

    def forward(self, z: Tensor) -> Tensor:
        return self.upsample(self.head(z).view(len(z), *self.low_shape)).view(len(z), *self.out_shape)


def _check_network(network: str, data_shape: Sequence[int]) -> None:
    if network not in NETWORKS:
        raise ValueError(f"network must be one of {NETWORKS}, got {network!r}")
    if network == "conv":
        if len(data_shape) != 3:
            raise ValueError(f"network='conv' needs image data (C, H, W), got data_shape {tuple(data_shape)}; "
                             "use network='mlp' for vectors")
        if data_shape[1] % 4 or data_shape[2] % 4:
            raise ValueError(f"network='conv' needs H and W divisible by 4, got {tuple(data_shape)}")


def build_encoder(network: str, data_shape: Sequence[int], out_features: int,
                  hidden_dims: Sequence[int], base_channels: int) -> nn.Module:
    _check_network(network, data_shape)
    if network == "mlp":
        return MLPEncoder(data_shape, hidden_dims, out_features)
    return ConvEncoder(data_shape, base_channels, hidden_dims[0], out_features)


def build_decoder(network: str, latent_dim: int, data_shape: Sequence[int], outputs_per_dim: int,
                  hidden_dims: Sequence[int], base_channels: int) -> nn.Module:
    """A decoder returning (B, outputs_per_dim, *data_shape): e.g. 2 for a Gaussian's mean and
    log-variance per dimension."""
    _check_network(network, data_shape)
    if network == "mlp":
        return MLPDecoder(latent_dim, hidden_dims, data_shape, outputs_per_dim)
    return ConvDecoder(latent_dim, base_channels, hidden_dims[0], data_shape, outputs_per_dim)
