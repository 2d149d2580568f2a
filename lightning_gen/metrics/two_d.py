"""Distances between two sets of vectors (2-D samples and held-out data): MMD and sliced Wasserstein.

- ``mmd``: squared maximum mean discrepancy (Gretton et al. 2012, eq. 5, the biased V-statistic)
  with a Gaussian kernel k(a, b) = exp(-|a - b|^2 / (2 h^2)), averaged over bandwidths h:
  MMD^2 = mean k(x, x') + mean k(y, y') - 2 mean k(x, y). It is 0 for identical sets and > 0
  otherwise (the kernel is characteristic). Fixed bandwidths (not the median heuristic) keep the
  numbers of successive epochs and different models comparable.
- ``sliced_wasserstein``: SW_2 (Bonneel et al. 2015): the 1-D Wasserstein-2 distance of the sets
  projected on random unit directions, root-mean-squared over directions. In 1-D, W_2 compares
  quantiles, so sets of different sizes are compared at common quantile levels. A shift s of one
  set gives SW_2 = |s| / sqrt(D) in expectation over directions (E[(theta.s)^2] = |s|^2 / D).

Both also exist as torchmetrics ``Metric``s (``MMD``, ``SlicedWasserstein``) whose states are
concatenated across DDP ranks at compute, for the validation callback.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

DEFAULT_BANDWIDTHS = (0.1, 0.3, 1.0, 3.0)


def _check_sets(x: Tensor, y: Tensor) -> None:
    if x.dim() != 2 or y.dim() != 2 or x.shape[1] != y.shape[1] or len(x) < 1 or len(y) < 1:
        raise ValueError(f"expected two non-empty sets of vectors (N, D) and (M, D), got "
                         f"{tuple(x.shape)} and {tuple(y.shape)}")


def _check_bandwidths(bandwidths: Sequence[float]) -> tuple[float, ...]:
    bandwidths = tuple(float(h) for h in bandwidths)
    if not bandwidths or any(h <= 0 for h in bandwidths):
        raise ValueError(f"bandwidths must be a non-empty list of positive floats, got {bandwidths}")
    return bandwidths


def gaussian_kernel(x: Tensor, y: Tensor, bandwidths: Sequence[float] = DEFAULT_BANDWIDTHS) -> Tensor:
    """Mean over bandwidths h of exp(-|x_i - y_j|^2 / (2 h^2)): (N, M)."""
    squared_distance = torch.cdist(x, y).square()  # (N, M)
    return torch.stack([torch.exp(-squared_distance / (2 * h * h)) for h in bandwidths]).mean(0)


def mmd(x: Tensor, y: Tensor, bandwidths: Sequence[float] = DEFAULT_BANDWIDTHS) -> Tensor:
    """Squared MMD (biased, >= 0) between sets x (N, D) and y (M, D) with a Gaussian kernel."""
    _check_sets(x, y)
    bandwidths = _check_bandwidths(bandwidths)
    x, y = x.double(), y.double()  # the three means nearly cancel: keep the difference accurate
    value = (gaussian_kernel(x, x, bandwidths).mean() + gaussian_kernel(y, y, bandwidths).mean()
             - 2 * gaussian_kernel(x, y, bandwidths).mean())
    return value.clamp_min(0).float()


def random_directions(num_projections: int, dim: int, seed: int = 0) -> Tensor:
    """``num_projections`` unit vectors uniform on the sphere in R^dim, from their own generator."""
    if num_projections < 1:
        raise ValueError(f"num_projections must be >= 1, got {num_projections}")
    generator = torch.Generator().manual_seed(seed)
    theta = torch.randn(num_projections, dim, generator=generator, dtype=torch.float64)
    return theta / theta.norm(dim=1, keepdim=True)  # (P, D)


def sliced_wasserstein(x: Tensor, y: Tensor, num_projections: int = 256, seed: int = 0) -> Tensor:
    """Sliced Wasserstein-2 distance between sets x (N, D) and y (M, D).

    Directions come from a generator seeded with ``seed`` (the global random state is untouched),
    so the value is deterministic.
    """
    _check_sets(x, y)
    theta = random_directions(num_projections, x.shape[1], seed).to(x.device)  # (P, D)
    x_projected = x.double() @ theta.T  # (N, P)
    y_projected = y.double() @ theta.T  # (M, P)
    if len(x) == len(y):
        # Equal sizes: the optimal 1-D coupling pairs the sorted values.
        x_sorted, y_sorted = x_projected.sort(dim=0).values, y_projected.sort(dim=0).values
    else:
        levels = (torch.arange(max(len(x), len(y)), dtype=torch.float64, device=x.device) + 0.5)
        levels = levels / len(levels)  # (K,) quantile levels at the midpoints of the larger set
        x_sorted = torch.quantile(x_projected, levels, dim=0)  # (K, P)
        y_sorted = torch.quantile(y_projected, levels, dim=0)  # (K, P)
    return (x_sorted - y_sorted).square().mean().sqrt().float()


class _TwoSetMetric(Metric):
    """Collects a real and a generated set of vectors; their states concatenate across ranks."""

    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("real", default=[], dist_reduce_fx="cat")
        self.add_state("fake", default=[], dist_reduce_fx="cat")

    def update(self, x: Tensor, real: bool) -> None:
        if x.dim() != 2:
            raise ValueError(f"expected vectors (B, D), got shape {tuple(x.shape)}")
        (self.real if real else self.fake).append(x.detach().float())

    def _sets(self) -> tuple[Tensor, Tensor]:
        if not self.real or not self.fake:
            raise RuntimeError("update the metric with real and generated vectors before compute()")
        return dim_zero_cat(self.real), dim_zero_cat(self.fake)


class MMD(_TwoSetMetric):
    """Squared MMD with a Gaussian kernel (see ``mmd``) between all real and generated vectors."""

    def __init__(self, bandwidths: Sequence[float] = DEFAULT_BANDWIDTHS, **kwargs) -> None:
        super().__init__(**kwargs)
        self.bandwidths = _check_bandwidths(bandwidths)

    def compute(self) -> Tensor:
        return mmd(*self._sets(), self.bandwidths)


class SlicedWasserstein(_TwoSetMetric):
    """Sliced Wasserstein-2 distance (see ``sliced_wasserstein``) between real and generated sets."""

    def __init__(self, num_projections: int = 256, seed: int = 0, **kwargs) -> None:
        super().__init__(**kwargs)
        if num_projections < 1:
            raise ValueError(f"num_projections must be >= 1, got {num_projections}")
        self.num_projections = num_projections
        self.seed = seed

    def compute(self) -> Tensor:
        return sliced_wasserstein(*self._sets(), self.num_projections, self.seed)
