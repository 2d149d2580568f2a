"""Generator and discriminator networks of the GAN family (plain nn.Modules, no Lightning).

Read bottom-up: a label-projection head, then the MLP pair (a 100 -> 784 generator with a tanh
output and its discriminator, or a small pair for 2-D toy data), then the DCGAN-style conv pair for
28x28 images (Radford et al. 2016), then ``build_networks`` that picks a pair by name and checks
that it suits the data shape.

Conventions shared by every pair:
- ``generator(z, y=None) -> x``: z (B, latent_dim), optional labels y (B,) -> (B, *data_shape):
  tanh output in [-1, 1] for images, unbounded data coordinates for vectors.
- ``discriminator(x, y=None) -> logits``: (B, *data_shape) -> (B,) one unnormalized score per
  example (a logit for the BCE loss, a critic value for WGAN).
- Class-conditional networks (``num_classes`` set): the generator concatenates a learned label
  embedding to z; the discriminator is a projection discriminator (Miyato & Koyama 2018, eq. 3):
  D(x, y) = psi(phi(x)) + <embed(y), phi(x)>.
- The discriminators have no batch normalization: it couples the examples of a batch, which breaks
  the per-example input gradients of the WGAN-GP and R1 penalties (Gulrajani et al. 2017, sec. 4).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from lightning_gen.nn.mlp import MLP

NETWORKS = ("dcgan", "mlp")
LEAKY_SLOPE = 0.2  # Radford et al. 2016, sec. 3: LeakyReLU(0.2) in the discriminator


def _check_labels(y: Tensor | None, embedding: nn.Embedding | None, batch_size: int) -> None:
    if embedding is None and y is not None:
        raise ValueError("labels y were given to an unconditional network (num_classes is None)")
    if embedding is not None:
        if y is None:
            raise ValueError("this network is class-conditional: pass labels y of shape (B,)")
        if y.shape != (batch_size,):
            raise ValueError(f"labels y must have shape ({batch_size},), got {tuple(y.shape)}")


class ProjectionHead(nn.Module):
    """Features phi(x) (B, F) -> score (B,): psi(phi) + <embed(y), phi> (Miyato & Koyama 2018)."""

    def __init__(self, num_features: int, num_classes: int | None) -> None:
        super().__init__()
        self.linear = nn.Linear(num_features, 1)
        self.embedding = nn.Embedding(num_classes, num_features) if num_classes else None

    def forward(self, h: Tensor, y: Tensor | None = None) -> Tensor:
        _check_labels(y, self.embedding, len(h))
        score = self.linear(h).squeeze(1)  # (B,)
        if self.embedding is not None:
            score = score + (self.embedding(y) * h).sum(1)  # the projection term, (B,)
        return score


class LabelConcat(nn.Module):
    """z (B, latent_dim) -> [z, embed(y)] (B, latent_dim + embedding_dim), or z unchanged."""

    def __init__(self, num_classes: int | None, embedding_dim: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(num_classes, embedding_dim) if num_classes else None
        self.out_features_extra = embedding_dim if num_classes else 0

    def forward(self, z: Tensor, y: Tensor | None = None) -> Tensor:
        _check_labels(y, self.embedding, len(z))
        if self.embedding is None:
            return z
        return torch.cat([z, self.embedding(y).to(z.dtype)], dim=1)


# ------------------------------------------------------------------------------------ MLP pair
class MLPGenerator(nn.Module):
    """z (B, latent_dim) -> (B, *data_shape): an MLP generator (100 -> 256 -> 512 -> 1024 ->
    784, LeakyReLU, tanh) for images; the same MLP with a linear output for vectors."""

    def __init__(self, latent_dim: int, hidden_dims: Sequence[int], data_shape: Sequence[int],
                 num_classes: int | None = None, bounded: bool = True) -> None:
        super().__init__()
        self.data_shape = tuple(data_shape)
        self.labels = LabelConcat(num_classes, latent_dim)
        activation = functools.partial(nn.LeakyReLU, LEAKY_SLOPE)
        self.mlp = MLP(latent_dim + self.labels.out_features_extra, hidden_dims,
                       math.prod(self.data_shape), activation=activation)
        self.output = nn.Tanh() if bounded else nn.Identity()

    def forward(self, z: Tensor, y: Tensor | None = None) -> Tensor:
        h = self.mlp(self.labels(z, y))  # (B, prod(data_shape))
        return self.output(h).view(len(z), *self.data_shape)


class MLPDiscriminator(nn.Module):
    """(B, *data_shape) -> (B,): flatten, LeakyReLU MLP (784 -> 1024 -> 512 -> 256 -> 1)."""

    def __init__(self, data_shape: Sequence[int], hidden_dims: Sequence[int],
                 num_classes: int | None = None) -> None:
        super().__init__()
        activation = functools.partial(nn.LeakyReLU, LEAKY_SLOPE)
        *body, last = hidden_dims
        self.features = nn.Sequential(
            MLP(math.prod(data_shape), body, last, activation=activation), activation())
        self.head = ProjectionHead(last, num_classes)

    def forward(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        return self.head(self.features(x.flatten(1)), y)  # (B,)


# ---------------------------------------------------------------------------------- DCGAN pair
class DCGANGenerator(nn.Module):
    """z (B, latent_dim) -> (B, C, H, W) in [-1, 1] (Radford et al. 2016, fig. 1, for 28x28):
    a linear layer to (2c, H/4, W/4), then two stride-2 transposed convolutions, batch norm and
    ReLU between them, tanh at the end. ``extra_layers`` > 0 adds that many 3x3 convolutions
    (each with batch norm and ReLU) at H/4 and again at H/2, before each transposed convolution:
    more depth at the same resolutions (0 gives the layers, and state-dict names, of the
    original pair)."""

    def __init__(self, latent_dim: int, base_channels: int, data_shape: Sequence[int],
                 num_classes: int | None = None, extra_layers: int = 0) -> None:
        super().__init__()
        channels, height, width = data_shape
        self.low_shape = (2 * base_channels, height // 4, width // 4)
        self.labels = LabelConcat(num_classes, latent_dim)
        self.project = nn.Sequential(
            nn.Linear(latent_dim + self.labels.out_features_extra, math.prod(self.low_shape), bias=False),
        )

        def refine(width: int) -> list[nn.Module]:
            layers = []
            for _ in range(extra_layers):
                layers += [nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                           nn.ReLU()]
            return layers

        self.upsample = nn.Sequential(
            nn.BatchNorm2d(2 * base_channels), nn.ReLU(), *refine(2 * base_channels),
            nn.ConvTranspose2d(2 * base_channels, base_channels, 4, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(base_channels), nn.ReLU(), *refine(base_channels),  # (B, c, H/2, W/2)
            nn.ConvTranspose2d(base_channels, channels, 4, stride=2, padding=1),  # (B, C, H, W)
            nn.Tanh(),
        )

    def forward(self, z: Tensor, y: Tensor | None = None) -> Tensor:
        h = self.project(self.labels(z, y)).view(len(z), *self.low_shape)  # (B, 2c, H/4, W/4)
        return self.upsample(h)


class DCGANDiscriminator(nn.Module):
    """(B, C, H, W) -> (B,): two stride-2 convolutions with LeakyReLU(0.2) (no batch norm, see
    the module docstring), then a linear (or projection) head on the flattened features.
    ``extra_layers`` > 0 adds that many 3x3 convolutions (each with LeakyReLU) after each strided
    one, at H/2 and at H/4: the generator's ``extra_layers`` mirrored (0 gives the original
    layers and state-dict names)."""

    def __init__(self, data_shape: Sequence[int], base_channels: int,
                 num_classes: int | None = None, extra_layers: int = 0) -> None:
        super().__init__()
        channels, height, width = data_shape

        def refine(width: int) -> list[nn.Module]:
            layers = []
            for _ in range(extra_layers):
                layers += [nn.Conv2d(width, width, 3, padding=1), nn.LeakyReLU(LEAKY_SLOPE)]
            return layers

        self.features = nn.Sequential(
            nn.Conv2d(channels, base_channels, 4, stride=2, padding=1),
            nn.LeakyReLU(LEAKY_SLOPE), *refine(base_channels),  # (B, c, H/2, W/2)
            nn.Conv2d(base_channels, 2 * base_channels, 4, stride=2, padding=1),
            nn.LeakyReLU(LEAKY_SLOPE), *refine(2 * base_channels),  # (B, 2c, H/4, W/4)
        )
        self.head = ProjectionHead(2 * base_channels * (height // 4) * (width // 4), num_classes)

    def forward(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        return self.head(self.features(x).flatten(1), y)  # (B,)


# ------------------------------------------------------------------------------------ building
def add_spectral_norm(network: nn.Module) -> nn.Module:
    """Spectral normalization (Miyato et al. 2018) of every linear, conv and embedding weight."""
    for module in list(network.modules()):
        if isinstance(module, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d, nn.Embedding)):
            nn.utils.parametrizations.spectral_norm(module)
    return network


def check_network(network: str, data_shape: Sequence[int]) -> None:
    if network not in NETWORKS:
        raise ValueError(f"network must be one of {NETWORKS}, got {network!r}")
    if network == "dcgan":
        if len(data_shape) != 3:
            raise ValueError(f"network='dcgan' needs image data (C, H, W), got data_shape "
                             f"{tuple(data_shape)}; use network='mlp' for vectors")
        if data_shape[1] % 4 or data_shape[2] % 4:
            raise ValueError(f"network='dcgan' needs H and W divisible by 4, got {tuple(data_shape)}")


def build_networks(
    network: str,
    data_shape: Sequence[int],
    latent_dim: int,
    generator_hidden_dims: Sequence[int],
    discriminator_hidden_dims: Sequence[int],
    base_channels: int,
    num_classes: int | None = None,
    spectral_norm: bool = False,
    generator_extra_layers: int = 0,
    discriminator_extra_layers: int = 0,
) -> tuple[nn.Module, nn.Module]:
    """(generator, discriminator) of the named pair; image generators end in tanh."""
    check_network(network, data_shape)
    is_image = len(data_shape) == 3
    if network == "mlp":
        generator = MLPGenerator(latent_dim, generator_hidden_dims, data_shape, num_classes,
                                 bounded=is_image)
        discriminator = MLPDiscriminator(data_shape, discriminator_hidden_dims, num_classes)
    else:
        generator = DCGANGenerator(latent_dim, base_channels, data_shape, num_classes,
                                   generator_extra_layers)
        discriminator = DCGANDiscriminator(data_shape, base_channels, num_classes,
                                           discriminator_extra_layers)
    if spectral_norm:
        add_spectral_norm(discriminator)
    return generator, discriminator
