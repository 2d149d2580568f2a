"""Invertible layers of RealNVP (Dinh et al. 2017), each returning ``(output, log_det)`` both ways.

Every layer maps ``forward(x) -> (y, log_det)`` and ``inverse(y) -> (x, log_det)``, where
``log_det`` is log|det dy/dx| (forward) or log|det dx/dy| (inverse), a float32 tensor of shape
(B,), summed over every dimension of one example (as bayesiains/nflows' transforms do). Log-dets
are accumulated in float32 even when the networks inside run under bf16 autocast.

Read bottom-up: masks, then the affine coupling layer (the heart of RealNVP), ActNorm, squeeze,
the data preprocessing (dequantization + logit), and the composition of layers.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# ------------------------------------------------------------------------------------------ masks
# A mask b holds 1 where a coupling layer leaves the input unchanged (and conditions on it) and 0
# where it transforms it. Alternating parities make every dimension transformed by some layer.


def alternating_mask(num_features: int, parity: int) -> Tensor:
    """Vector mask (D,): 1 on even indices when parity is 0, on odd indices when parity is 1.

    For D = 4: parity 0 -> [1, 0, 1, 0], parity 1 -> [0, 1, 0, 1].
    """
    return ((torch.arange(num_features) + parity) % 2 == 0).float()


def random_mask(num_features: int, generator: torch.Generator) -> Tensor:
    """Vector mask (D,) with floor(D / 2) ones at random positions."""
    mask = torch.zeros(num_features)
    mask[torch.randperm(num_features, generator=generator)[: num_features // 2]] = 1.0
    return mask


def checkerboard_mask(height: int, width: int, parity: int) -> Tensor:
    """Spatial mask (1, H, W) of Dinh et al. 2017, Fig. 3 (left); parity 0 puts a 1 at (0, 0)::

        parity 0      parity 1
        1 0 1 0       0 1 0 1
        0 1 0 1       1 0 1 0
        1 0 1 0       0 1 0 1
    """
    rows = torch.arange(height)[:, None]
    columns = torch.arange(width)[None, :]
    return ((rows + columns + parity) % 2 == 0).float().unsqueeze(0)


def channel_mask(num_channels: int, parity: int) -> Tensor:
    """Channel-wise mask (C, 1, 1) of Dinh et al. 2017, Fig. 3 (right): the first half of the
    channels are 1 for parity 0, the second half for parity 1."""
    first_half = (torch.arange(num_channels) < num_channels // 2).float()
    mask = first_half if parity == 0 else 1.0 - first_half
    return mask.view(num_channels, 1, 1)


def sum_per_example(x: Tensor) -> Tensor:
    """Sum over every dimension but the batch one, in float32: (B, ...) -> (B,)."""
    return x.float().flatten(1).sum(1)


# ---------------------------------------------------------------------------------- coupling layer
class AffineCoupling(nn.Module):
    """The affine coupling layer (Dinh et al. 2017, eq. 9 with masks):

        y = b * x + (1 - b) * (x * exp(s(b * x)) + t(b * x)),
        log|det dy/dx| = sum((1 - b) * s(b * x))                       (eq. 10),

    with the inverse x = b * y + (1 - b) * (y - t(b * y)) * exp(-s(b * y)) (eq. 8), since b * y =
    b * x. The scale is bounded for stability, s = scale * tanh(raw) with a learned per-feature
    ``scale`` (Dinh et al. 2017, Sec. 4.1), so one layer can stretch by at most exp(scale).

    Args:
        mask: b, broadcastable to one example: (D,) for vectors, (1, H, W) or (C, 1, 1) for images.
        conditioner: a network mapping b * x (B, *shape) to 2 * num_features outputs (dim 1):
            the raw log-scale and the translation, concatenated.
        num_features: D for vectors, C (channels) for images: the size of dim 1 of x.
    """

    def __init__(self, mask: Tensor, conditioner: nn.Module, num_features: int) -> None:
        super().__init__()
        self.register_buffer("mask", mask)
        self.conditioner = conditioner
        # One learned bound per feature / channel, initialized to 1 (|s| < 1 at first).
        self.scale = nn.Parameter(torch.ones(num_features, *([1] * (mask.dim() - 1))))

    def scale_and_shift(self, x_masked: Tensor) -> tuple[Tensor, Tensor]:
        """s and t of the conditioner on b * x, in float32 (the networks may run in bf16)."""
        raw_scale, shift = self.conditioner(x_masked).float().chunk(2, dim=1)
        transformed = 1.0 - self.mask
        s = self.scale * torch.tanh(raw_scale) * transformed  # zero where b = 1
        return s, shift * transformed

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        s, t = self.scale_and_shift(x * self.mask)
        y = x * self.mask + (1.0 - self.mask) * (x * torch.exp(s) + t)
        return y, sum_per_example(s)

    def inverse(self, y: Tensor) -> tuple[Tensor, Tensor]:
        s, t = self.scale_and_shift(y * self.mask)
        x = y * self.mask + (1.0 - self.mask) * ((y - t) * torch.exp(-s))
        return x, -sum_per_example(s)


# ---------------------------------------------------------------------------------------- ActNorm
class ActNorm(nn.Module):
    """Per-feature (vectors) or per-channel (images) affine map y = (x - bias) * exp(log_scale)
    (Kingma & Dhariwal 2018, Sec. 3.1), initialized from the first training batch so that y has
    zero mean and unit variance per feature; then trained as ordinary parameters.

    log|det dy/dx| = sum(log_scale) * (H * W for images, 1 for vectors).

    The statistics of the initializing batch are averaged over processes under DDP, so every
    rank starts from the same parameters.
    """

    def __init__(self, num_features: int, image: bool) -> None:
        super().__init__()
        shape = (num_features, 1, 1) if image else (num_features,)
        self.bias = nn.Parameter(torch.zeros(shape))
        self.log_scale = nn.Parameter(torch.zeros(shape))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        # A host-side copy of ``initialized`` so that training steps do not sync with the device
        # once the layer is initialized; reset whenever a state dict is loaded.
        self._known_initialized = False

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._known_initialized = False

    def needs_initialization(self) -> bool:
        if not self._known_initialized:
            self._known_initialized = bool(self.initialized)
        return not self._known_initialized

    @torch.no_grad()
    def initialize(self, x: Tensor) -> None:
        dims = [0] if x.dim() == 2 else [0, 2, 3]
        mean = x.float().mean(dims)
        mean_square = x.float().pow(2).mean(dims)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            moments = torch.stack([mean, mean_square])
            torch.distributed.all_reduce(moments)
            mean, mean_square = moments / torch.distributed.get_world_size()
        std = (mean_square - mean.pow(2)).clamp_min(0).sqrt()
        self.bias.copy_(mean.view_as(self.bias))
        self.log_scale.copy_(-torch.log(std + 1e-6).view_as(self.log_scale))
        self.initialized.fill_(True)
        self._known_initialized = True

    def log_det(self, x: Tensor) -> Tensor:
        spatial = x[0, 0].numel() if x.dim() == 4 else 1
        return (self.log_scale.float().sum() * spatial).expand(len(x))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if self.training and self.needs_initialization():
            self.initialize(x)
        return (x - self.bias) * torch.exp(self.log_scale), self.log_det(x)

    def inverse(self, y: Tensor) -> tuple[Tensor, Tensor]:
        return y * torch.exp(-self.log_scale) + self.bias, -self.log_det(y)


# ---------------------------------------------------------------------------------------- squeeze
class Squeeze(nn.Module):
    """(B, C, H, W) -> (B, 4C, H/2, W/2): each 2x2 block of pixels becomes 4 channels (Dinh et al.
    2017, Fig. 3). A permutation, so log_det = 0."""

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return F.pixel_unshuffle(x, 2), x.new_zeros(len(x), dtype=torch.float32)

    def inverse(self, y: Tensor) -> tuple[Tensor, Tensor]:
        return F.pixel_shuffle(y, 2), y.new_zeros(len(y), dtype=torch.float32)


# ---------------------------------------------------------------------------------- preprocessing
class DequantizeLogit(nn.Module):
    """8-bit images in [0, 1] -> logit space, with the log-det of the discrete data's density.

    The data module yields x = k / 255 with 8-bit levels k in {0, ..., 255}. Uniform dequantization
    (Theis et al. 2016; Dinh et al. 2017, Sec. 4.1) draws v = k + eps, eps ~ U[0, 1), a point of
    [0, 256)^D; for any density p on it, log P(k) >= E_eps[log p(k + eps)], so the continuous
    log-density of v (one draw of eps) is the literature's estimate of the discrete log-likelihood,
    and -log p(v) / (D ln 2) its bits/dim. Then

        u = v / 256 in [0, 1),   y = logit(alpha + (1 - 2 alpha) u)   (Dinh et al. 2017, Sec. 4.1),

    where alpha keeps y finite at u = 0 and 1. The log-det is that of y with respect to v:

        log|dy/dv| = sum( log(1 - 2 alpha) - log(p) - log(1 - p) - log 256 ),  p = alpha + (1 - 2 alpha) u.

    The logit maps [0, 1) onto the bounded interval [logit(alpha), logit(1 - alpha)), so the mass
    the flow puts outside it is lost: the density on [0, 256)^D integrates to at most 1 and the
    reported bits/dim is conservative (an upper bound), as in Dinh et al. 2017.

    ``forward(x, dequantize=False)`` skips the rounding and the noise and uses u = x itself (x is
    read as a continuous point of [0, 1], log-det still with respect to v = 256 u), which makes
    ``inverse(forward(x))`` return x exactly; ``inverse`` returns u, the continuous image in
    [0, 1], and ``quantize`` maps it to the nearest-below 8-bit level k / 255.
    """

    levels = 256

    def __init__(self, alpha: float = 0.05) -> None:
        super().__init__()
        if not 0.0 < alpha < 0.5:
            raise ValueError(f"logit alpha must be in (0, 0.5), got {alpha}")
        self.alpha = alpha

    def dequantize(self, x: Tensor) -> Tensor:
        """x = k / 255 -> u = (k + eps) / 256, eps ~ U[0, 1) (one draw per pixel)."""
        levels = torch.round(x * (self.levels - 1))  # k
        return (levels + torch.rand_like(levels)) / self.levels

    def quantize(self, u: Tensor) -> Tensor:
        """u in [0, 1] -> k / 255 with k = floor(256 u) clamped to 255: the cell u falls in."""
        return torch.floor(u * self.levels).clamp(0, self.levels - 1) / (self.levels - 1)

    def log_det_per_pixel(self, p: Tensor) -> Tensor:
        return (math.log(1 - 2 * self.alpha) - torch.log(p) - torch.log1p(-p)
                - math.log(self.levels))

    def forward(self, x: Tensor, dequantize: bool = True) -> tuple[Tensor, Tensor]:
        u = self.dequantize(x.float()) if dequantize else x.float()
        p = self.alpha + (1 - 2 * self.alpha) * u
        y = torch.log(p) - torch.log1p(-p)
        return y, sum_per_example(self.log_det_per_pixel(p))

    def inverse(self, y: Tensor) -> tuple[Tensor, Tensor]:
        p = torch.sigmoid(y.float())
        u = (p - self.alpha) / (1 - 2 * self.alpha)
        return u, -sum_per_example(self.log_det_per_pixel(p))


# ------------------------------------------------------------------------------------ composition
class FlowSequence(nn.Module):
    """Layers applied in order (inverse: in reverse order); log-dets add up."""

    def __init__(self, layers: list[nn.Module]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        log_det = x.new_zeros(len(x), dtype=torch.float32)
        for layer in self.layers:
            x, layer_log_det = layer(x)
            log_det = log_det + layer_log_det
        return x, log_det

    def inverse(self, y: Tensor) -> tuple[Tensor, Tensor]:
        log_det = y.new_zeros(len(y), dtype=torch.float32)
        for layer in reversed(self.layers):
            y, layer_log_det = layer.inverse(y)
            log_det = log_det + layer_log_det
        return y, log_det
