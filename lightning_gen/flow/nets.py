"""RealNVP networks (plain nn.Modules, no Lightning): the s/t networks of the coupling layers, then
the two flows built from them and the layers of ``layers.py``.

Read bottom-up: MLP and ResNet conditioners (each ends in a zero-initialized layer, so every
coupling starts as the identity, as in Glow, Kingma & Dhariwal 2018, Sec. 3.3), then
``VectorRealNVP`` (alternating or random masks on (B, D)), then ``MultiScaleRealNVP`` (Dinh et al.
2017, Sec. 3.6: checkerboard couplings, squeeze, channel-wise couplings, factor out half).

Both flows map ``forward(x) -> (z, log_det)`` and ``inverse(z) -> (x, log_det)`` with z flat,
(B, D); log_det float32 (B,).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from lightning_gen.flow.layers import (
    ActNorm,
    AffineCoupling,
    FlowSequence,
    Squeeze,
    alternating_mask,
    channel_mask,
    checkerboard_mask,
    random_mask,
)
from lightning_gen.nn.mlp import MLP

VECTOR_MASKS = ("alternating", "random")

# ------------------------------------------------------------------------------- s/t networks


class MLPConditioner(nn.Module):
    """(B, D) -> (B, 2D): the raw log-scale and the translation of a vector coupling layer."""

    def __init__(self, num_features: int, hidden_dims: Sequence[int]) -> None:
        super().__init__()
        self.mlp = MLP(num_features, hidden_dims, 2 * num_features)
        last = self.mlp.layers[-1]
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.mlp(x)


class ResidualBlock(nn.Module):
    """x + conv3x3(SiLU(conv3x3(SiLU(x)))) at constant width (pre-activation, He et al. 2016)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1),
            nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1),
        )

    def forward(self, x: Tensor) -> Tensor:  # (B, C, H, W) -> (B, C, H, W)
        return x + self.layers(x)


class ResNetConditioner(nn.Module):
    """(B, C, H, W) -> (B, 2C, H, W): the s/t network of an image coupling layer (Dinh et al.
    2017, Sec. 4.1 use deep ResNets): conv in, ``num_blocks`` residual blocks, conv out."""

    def __init__(self, channels: int, hidden_channels: int, num_blocks: int) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(channels, hidden_channels, 3, padding=1)
        self.blocks = nn.Sequential(*[ResidualBlock(hidden_channels) for _ in range(num_blocks)])
        self.conv_out = nn.Sequential(nn.SiLU(), nn.Conv2d(hidden_channels, 2 * channels, 3, padding=1))
        nn.init.zeros_(self.conv_out[1].weight)
        nn.init.zeros_(self.conv_out[1].bias)

    def forward(self, x: Tensor) -> Tensor:
        h = self.blocks(self.conv_in(x))  # (B, hidden, H, W)
        return self.conv_out(h)  # (B, 2C, H, W)


# -------------------------------------------------------------------------------------- flows


class VectorRealNVP(nn.Module):
    """RealNVP on vectors (B, D): ``num_layers`` affine couplings with MLP s/t networks, each
    optionally preceded by ActNorm.

    Args:
        num_features: D (at least 2: a coupling layer needs a part to condition on).
        num_layers: coupling layers.
        hidden_dims: widths of each s/t MLP.
        mask: ``"alternating"`` (even / odd dims in turn, Dinh et al. 2017, sec. 3.4) or ``"random"``
            (a random half of the dims per layer, drawn once from ``mask_seed`` and saved).
        actnorm: put an ActNorm before each coupling.
        mask_seed: seed of the random masks.
    """

    def __init__(self, num_features: int, num_layers: int = 8, hidden_dims: Sequence[int] = (128, 128),
                 mask: str = "alternating", actnorm: bool = True, mask_seed: int = 0) -> None:
        super().__init__()
        if num_features < 2:
            raise ValueError(f"a coupling flow needs at least 2 dimensions, got {num_features}")
        if mask not in VECTOR_MASKS:
            raise ValueError(f"mask must be one of {VECTOR_MASKS}, got {mask!r}")
        generator = torch.Generator().manual_seed(mask_seed)
        layers: list[nn.Module] = []
        for index in range(num_layers):
            if actnorm:
                layers.append(ActNorm(num_features, image=False))
            b = (alternating_mask(num_features, index % 2) if mask == "alternating"
                 else random_mask(num_features, generator))
            layers.append(AffineCoupling(b, MLPConditioner(num_features, hidden_dims), num_features))
        self.flow = FlowSequence(layers)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:  # (B, D) -> (B, D), (B,)
        return self.flow(x)

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:  # (B, D) -> (B, D), (B,)
        return self.flow.inverse(z)


class MultiScaleRealNVP(nn.Module):
    """The multi-scale architecture of Dinh et al. 2017 (Sec. 3.6, Fig. 4) on images (B, C, H, W).

    Each scale but the last: ``couplings_per_scale`` checkerboard couplings, a squeeze
    (C, H, W) -> (4C, H/2, W/2), ``couplings_per_scale`` channel-wise couplings, then half of the
    channels are factored out as latents (eq. 15) and the rest go on to the next scale. The last
    scale: ``couplings_per_scale + 1`` checkerboard couplings. Masks alternate parity. For MNIST
    with 3 scales: 1x28x28 -> squeeze 4x14x14 -> factor out 2x14x14 -> squeeze 8x7x7 -> factor
    out 4x7x7 -> last scale on 4x7x7; with 2 scales the last scale runs on 2x14x14.

    z is the concatenation of every factored-out latent and the last scale's output, flattened in
    that order: (B, C * H * W). Every part has the prior N(0, I).

    Args:
        data_shape: (C, H, W); H and W divisible by 2^(num_scales - 1).
        num_scales: scales (1: couplings on the full resolution only).
        couplings_per_scale: coupling layers per mask type and scale (3 in the paper).
        hidden_channels: width of the ResNet s/t networks.
        num_blocks: residual blocks per s/t network.
        actnorm: put an ActNorm before each coupling (Glow's data-initialized normalization; the
            paper used batch normalization).
    """

    def __init__(self, data_shape: Sequence[int], num_scales: int = 2, couplings_per_scale: int = 3,
                 hidden_channels: int = 64, num_blocks: int = 4, actnorm: bool = True) -> None:
        super().__init__()
        channels, height, width = data_shape
        factor = 2 ** (num_scales - 1)
        if num_scales < 1:
            raise ValueError(f"num_scales must be >= 1, got {num_scales}")
        if height % factor or width % factor:
            raise ValueError(f"num_scales={num_scales} squeezes {num_scales - 1} times, so H and W must be "
                             f"divisible by {factor}; got data_shape {tuple(data_shape)}")
        if couplings_per_scale < 1 or hidden_channels < 1 or num_blocks < 0:
            raise ValueError("couplings_per_scale and hidden_channels must be >= 1, num_blocks >= 0; got "
                             f"{couplings_per_scale}, {hidden_channels}, {num_blocks}")

        def coupling(mask: Tensor, num_channels: int) -> list[nn.Module]:
            layers: list[nn.Module] = [ActNorm(num_channels, image=True)] if actnorm else []
            conditioner = ResNetConditioner(num_channels, hidden_channels, num_blocks)
            return layers + [AffineCoupling(mask, conditioner, num_channels)]

        self.scales = nn.ModuleList()
        self.latent_shapes: list[tuple[int, int, int]] = []
        for _ in range(num_scales - 1):
            layers: list[nn.Module] = []
            for index in range(couplings_per_scale):
                layers += coupling(checkerboard_mask(height, width, index % 2), channels)
            layers.append(Squeeze())
            channels, height, width = 4 * channels, height // 2, width // 2
            for index in range(couplings_per_scale):
                layers += coupling(channel_mask(channels, index % 2), channels)
            self.scales.append(FlowSequence(layers))
            factored = channels // 2
            self.latent_shapes.append((factored, height, width))
            channels -= factored
        last: list[nn.Module] = []
        for index in range(couplings_per_scale + 1):
            last += coupling(checkerboard_mask(height, width, index % 2), channels)
        self.scales.append(FlowSequence(last))
        self.latent_shapes.append((channels, height, width))
        self.latent_sizes = [math.prod(shape) for shape in self.latent_shapes]

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:  # (B, C, H, W) -> (B, D), (B,)
        h = x
        log_det = x.new_zeros(len(x), dtype=torch.float32)
        latents = []
        for scale, (factored, _, _) in zip(self.scales[:-1], self.latent_shapes[:-1]):
            h, scale_log_det = scale(h)
            log_det = log_det + scale_log_det
            latents.append(h[:, :factored].flatten(1))  # factor out (Dinh et al. 2017, eq. 15)
            h = h[:, factored:]
        h, scale_log_det = self.scales[-1](h)
        latents.append(h.flatten(1))
        return torch.cat(latents, dim=1), log_det + scale_log_det

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:  # (B, D) -> (B, C, H, W), (B,)
        parts = z.split(self.latent_sizes, dim=1)
        h = parts[-1].view(len(z), *self.latent_shapes[-1])
        h, log_det = self.scales[-1].inverse(h)
        for scale, part, shape in zip(reversed(self.scales[:-1]), reversed(parts[:-1]),
                                      reversed(self.latent_shapes[:-1])):
            h = torch.cat([part.view(len(z), *shape), h], dim=1)
            h, scale_log_det = scale.inverse(h)
            log_det = log_det + scale_log_det
        return h, log_det
