"""Two-dimensional synthetic distributions as a LightningDataModule.

The distributions follow the toy sets of FFJORD (Grathwohl et al. 2019), so numbers compare with
the literature. ``y`` is the component a point was drawn from (the moon, circle, Gaussian, square,
arm or spiral), or 0 where the distribution has no components (swissroll).

Definitions (all coordinates after scaling):
- moons: two interleaved half circles of radius 1 (sklearn's make_moons), noise std 0.1, then
  scaled by 2 and shifted by (-1, -0.2).
- circles: circles of radius 3 and 1.5, noise std 0.24 (make_circles(factor=0.5, noise=0.08) * 3).
- 8gaussians: eight isotropic Gaussians, std 0.5/sqrt(2) ~ 0.354, centred on a circle of radius
  4/sqrt(2) ~ 2.83 at angles k*pi/4. Entropy ~ log 8 + log(2*pi*e*sigma^2) = 2.838 nats (the
  modes are 6 std apart, so the overlap is negligible).
- checkerboard: uniform on the 8 dark squares (side 2) of a 4x4 board covering [-4, 4]^2;
  density 1/32, entropy log 32 = 3.466 nats exactly.
- pinwheel: five arms, radial std 0.3, tangential std 0.1, rate 0.25, times 2.
- 2spirals: two interleaved spirals, noise std 0.1.
- swissroll: sklearn's make_swiss_roll(noise=1.0) projected to (x, z), divided by 5.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from datamodules.device import DeviceBatches, trainer_placement
from datamodules.loaders import PredictBatches, ResumableLoader, fit_progress

Sampler = Callable[[int, torch.Generator], tuple[torch.Tensor, torch.Tensor]]

EIGHT_GAUSSIANS_STD = 0.5 / math.sqrt(2.0)
EIGHT_GAUSSIANS_RADIUS = 4.0 / math.sqrt(2.0)


def _randn(n: int, generator: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(n, *shape, generator=generator)


def _rand(n: int, generator: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.rand(n, *shape, generator=generator)


def _component(n: int, num_components: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randint(num_components, (n,), generator=generator)


def moons(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    y = _component(n, 2, generator)
    angle = math.pi * _rand(n, generator)
    outer = torch.stack([torch.cos(angle), torch.sin(angle)], dim=1)
    inner = torch.stack([1.0 - torch.cos(angle), 0.5 - torch.sin(angle)], dim=1)
    x = torch.where(y[:, None] == 0, outer, inner) + 0.1 * _randn(n, generator, 2)
    return x * 2.0 + torch.tensor([-1.0, -0.2]), y


def circles(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    y = _component(n, 2, generator)
    angle = 2 * math.pi * _rand(n, generator)
    radius = torch.where(y == 0, 1.0, 0.5)
    x = radius[:, None] * torch.stack([torch.cos(angle), torch.sin(angle)], dim=1)
    return 3.0 * (x + 0.08 * _randn(n, generator, 2)), y


def eight_gaussians(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    y = _component(n, 8, generator)
    angle = y.float() * (math.pi / 4)
    centers = EIGHT_GAUSSIANS_RADIUS * torch.stack([torch.cos(angle), torch.sin(angle)], dim=1)
    return centers + EIGHT_GAUSSIANS_STD * _randn(n, generator, 2), y


def checkerboard(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    x1 = _rand(n, generator) * 4 - 2
    row = _component(n, 2, generator)
    x2 = _rand(n, generator) - 2 * row + torch.floor(x1).remainder(2)
    column = torch.floor(x1).long() + 2  # 0..3
    square = column * 2 + row  # which of the 8 dark squares
    return torch.stack([x1, x2], dim=1) * 2, square


def pinwheel(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    num_arms, radial_std, tangential_std, rate = 5, 0.3, 0.1, 0.25
    y = _component(n, num_arms, generator)
    features = _randn(n, generator, 2) * torch.tensor([radial_std, tangential_std])
    features[:, 0] += 1.0
    angle = y.float() * (2 * math.pi / num_arms) + rate * torch.exp(features[:, 0])
    cos, sin = torch.cos(angle), torch.sin(angle)
    rotation = torch.stack([torch.stack([cos, -sin], 1), torch.stack([sin, cos], 1)], 1)
    x = torch.einsum("nd,nde->ne", features, rotation)
    return 2.0 * x, y


def two_spirals(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    y = _component(n, 2, generator)
    turn = torch.sqrt(_rand(n, generator)) * 540 * (2 * math.pi) / 360
    x = torch.stack([-torch.cos(turn) * turn, torch.sin(turn) * turn], dim=1)
    x = x + _rand(n, generator, 2) * 0.5
    x = torch.where(y[:, None] == 0, x, -x) / 3
    return x + 0.1 * _randn(n, generator, 2), y


def swissroll(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    t = 1.5 * math.pi * (1 + 2 * _rand(n, generator))
    x = torch.stack([t * torch.cos(t), t * torch.sin(t)], dim=1) + _randn(n, generator, 2)
    return x / 5.0, torch.zeros(n, dtype=torch.long)


TOY_DISTRIBUTIONS: dict[str, Sampler] = {
    "moons": moons,
    "circles": circles,
    "8gaussians": eight_gaussians,
    "checkerboard": checkerboard,
    "pinwheel": pinwheel,
    "2spirals": two_spirals,
    "swissroll": swissroll,
}

# Differential entropy in nats where it is known in closed form (or to within 1e-3).
TOY_ENTROPY = {
    "8gaussians": math.log(8) + math.log(2 * math.pi * math.e * EIGHT_GAUSSIANS_STD**2),
    "checkerboard": math.log(32.0),
}

TOY_NUM_COMPONENTS = {
    "moons": 2, "circles": 2, "8gaussians": 8, "checkerboard": 8, "pinwheel": 5,
    "2spirals": 2, "swissroll": 1,
}


def sample_toy(name: str, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw ``n`` points of distribution ``name``: (float32 (n, 2), int64 (n,))."""
    if name not in TOY_DISTRIBUTIONS:
        raise ValueError(f"unknown toy distribution {name!r}; choose one of {sorted(TOY_DISTRIBUTIONS)}")
    if n < 1:
        raise ValueError(f"number of points must be >= 1, got {n}")
    generator = torch.Generator().manual_seed(seed)
    x, y = TOY_DISTRIBUTIONS[name](n, generator)
    return x.float().contiguous(), y.long()


class ToyDataModule(L.LightningDataModule):
    """A 2-D synthetic distribution with fixed-seed train / val / test sets.

    Args:
        name: one of moons, circles, 8gaussians, checkerboard, pinwheel, 2spirals, swissroll.
        num_train / num_val / num_test: size of each split.
        batch_size: batch size for every split.
        seed: the splits are drawn with seeds ``seed``, ``seed + 1`` and ``seed + 2``.
        num_predict_samples: how many samples ``predict`` generates.
        device_resident: hold the train/val/test points on the Trainer's device and cut batches
            there (``DeviceBatches``): no per-step host-to-device copy; each DDP rank iterates its
            own shard, reshuffled every epoch from ``seed``.
    """

    data_shape = (2,)

    def __init__(
        self,
        name: str = "moons",
        num_train: int = 20000,
        num_val: int = 2000,
        num_test: int = 5000,
        batch_size: int = 256,
        seed: int = 0,
        num_predict_samples: int = 1000,
        device_resident: bool = False,
    ) -> None:
        super().__init__()
        if name not in TOY_DISTRIBUTIONS:
            raise ValueError(f"unknown toy distribution {name!r}; choose one of {sorted(TOY_DISTRIBUTIONS)}")
        for label, value in [("num_train", num_train), ("num_val", num_val), ("num_test", num_test),
                             ("batch_size", batch_size), ("num_predict_samples", num_predict_samples)]:
            if value < 1:
                raise ValueError(f"{label} must be >= 1, got {value}")
        self.save_hyperparameters()
        self.name = name
        self.num_train, self.num_val, self.num_test = num_train, num_val, num_test
        self.batch_size = batch_size
        self.seed = seed
        self.num_predict_samples = num_predict_samples
        self.device_resident = device_resident
        self.num_classes = TOY_NUM_COMPONENTS[name]
        self.train_set = self.val_set = self.test_set = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            self.train_set = TensorDataset(*sample_toy(self.name, self.num_train, self.seed))
            self.val_set = TensorDataset(*sample_toy(self.name, self.num_val, self.seed + 1))
            self.test_set = TensorDataset(*sample_toy(self.name, self.num_test, self.seed + 2))

    def _loader(self, dataset: TensorDataset, shuffle: bool) -> DataLoader | DeviceBatches:
        device, rank, world_size, epoch = trainer_placement(self)
        if self.device_resident:
            return DeviceBatches(dataset.tensors, self.batch_size, shuffle=shuffle, drop_last=shuffle,
                                 seed=self.seed, rank=rank, world_size=world_size, device=device,
                                 epoch=epoch, progress=fit_progress(self) if shuffle else None)
        if shuffle:
            return ResumableLoader(dataset, self.batch_size, seed=self.seed, rank=rank,
                                   num_replicas=world_size, progress=fit_progress(self))
        return DataLoader(dataset, batch_size=self.batch_size)

    def train_dataloader(self) -> DataLoader | DeviceBatches:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader | DeviceBatches:
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader | DeviceBatches:
        return self._loader(self.test_set, shuffle=False)

    def predict_dataloader(self) -> PredictBatches:
        # Conditional models take the labels of these points; others only count them.
        points = sample_toy(self.name, self.num_predict_samples, self.seed + 3)
        _, rank, world_size, _ = trainer_placement(self)
        return PredictBatches(points, self.batch_size, rank=rank, world_size=world_size)
