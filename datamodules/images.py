"""What the image data modules share: uint8 images held in memory, made float per batch.

Every image data module (MNIST, Fashion-MNIST, CIFAR-10, a folder of images) decodes its files
once into a uint8 tensor, (N, H, W) for a single channel stored without its axis (MNIST's files)
or (N, C, H, W), and int64 labels (N,). ``x`` is made float32 in [0, 1] only when a batch is cut
(``images_to_batch``) or an example is indexed (``ImageTensorDataset``): a quarter of the memory of
float storage, so even device-resident data sets stay small.

``InMemoryImageDataModule`` holds the loaders every such module uses: the training loader is a
``ResumableLoader`` (or ``DeviceBatches`` with ``device_resident``), evaluation loaders keep the
order, and ``predict`` yields ``(x, y, index)`` batches of the test set's first examples
(``PredictBatches``), whose labels conditional models draw.
"""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from datamodules.device import DeviceBatches, trainer_placement
from datamodules.loaders import PredictBatches, ResumableLoader, fit_progress


class DataFilesError(RuntimeError):
    """A data set's files are missing, unreadable, truncated or corrupt (the message names them
    and says what to do)."""


def default_data_dir() -> Path:
    """The environment variable ``LIGHTNING_GEN_DATA``, else ``./data``."""
    return Path(os.environ.get("LIGHTNING_GEN_DATA", "./data"))


def uint8_to_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 in 0..255 -> float32 in [0, 1] (a new tensor; 255 maps to exactly 1)."""
    return images.float().div_(255.0)


class ImageTensorDataset(Dataset):
    """uint8 images (N, H, W) or (N, C, H, W) and labels (N,) -> examples
    (float32 (C, H, W) in [0, 1], int64); a single channel stored as (N, H, W) gets C = 1."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        if images.dim() not in (3, 4) or len(images) != len(labels):
            raise ValueError(f"need images (N, H, W) or (N, C, H, W) and labels (N,), got "
                             f"{tuple(images.shape)} and {tuple(labels.shape)}")
        self.images = images
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.images[index]
        if self.images.dim() == 3:
            image = image.unsqueeze(0)  # (1, H, W)
        return uint8_to_unit(image), self.labels[index].long()


def images_to_batch(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images (B, H, W) or (B, C, H, W) and labels (B,) -> float32 (B, C, H, W) in [0, 1]
    (C = 1 for (B, H, W)) and int64 labels."""
    images, labels = batch
    if images.dim() == 3:
        images = images.unsqueeze(1)
    return uint8_to_unit(images), labels.long()


def split_off(count: int, total: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed random split of ``range(total)``: (``count`` held-out indices, the rest), both in
    the permutation's order, drawn from ``seed`` alone (so every run holds out the same examples)."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(total, generator=generator)
    return order[:count], order[count:]


class InMemoryImageDataModule(L.LightningDataModule):
    """Base of the image data modules: subclasses fill ``train_set``, ``val_set`` and ``test_set``
    (``ImageTensorDataset``) in ``setup`` and set ``data_shape`` (C, H, W) and ``num_classes`` by
    the end of ``__init__`` (the command line links ``data_shape`` to the model before ``setup``).

    Args:
        batch_size: batch size for every split.
        num_workers: DataLoader worker processes (unused with ``device_resident``).
        split_seed: seed of the train/val split and of the training order.
        num_predict_samples: how many samples ``predict`` generates (one per test image, whose
            label conditional models use).
        device_resident: hold the train/val/test images on the Trainer's device and cut batches
            there (``DeviceBatches``): no DataLoader workers, no per-step host-to-device copy;
            each DDP rank iterates its own shard, reshuffled every epoch from ``split_seed``.
    """

    data_shape: tuple[int, ...]
    num_classes: int | None
    #: The feature network FID/KID use for this data by default (``callbacks.ImageQualityMetrics``):
    #: ``"inception"`` (torchmetrics' Inception-v3), or ``"mnist"`` (the project's MNIST classifier).
    fid_feature_network: str = "inception"

    def __init__(self, batch_size: int, num_workers: int, split_seed: int, num_predict_samples: int,
                 device_resident: bool) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if num_predict_samples < 1:
            raise ValueError(f"num_predict_samples must be >= 1, got {num_predict_samples}")
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.split_seed = split_seed
        self.num_predict_samples = num_predict_samples
        self.device_resident = device_resident
        self.train_set = self.val_set = self.test_set = None

    def split_train_val(self, full: ImageTensorDataset, val_count: int) -> None:
        """Set ``train_set`` and ``val_set``: ``val_count`` examples of ``full`` drawn with
        ``split_seed``, and the rest."""
        val_index, train_index = split_off(val_count, len(full), self.split_seed)
        self.train_set = ImageTensorDataset(full.images[train_index], full.labels[train_index])
        self.val_set = ImageTensorDataset(full.images[val_index], full.labels[val_index])

    def _loader(self, dataset: ImageTensorDataset, shuffle: bool) -> DataLoader | DeviceBatches:
        device, rank, world_size, epoch = trainer_placement(self)
        if self.device_resident:
            return DeviceBatches(
                (dataset.images, dataset.labels), self.batch_size, shuffle=shuffle, drop_last=shuffle,
                seed=self.split_seed, rank=rank, world_size=world_size, device=device,
                transform=images_to_batch, epoch=epoch, progress=fit_progress(self) if shuffle else None,
            )
        if shuffle:
            return ResumableLoader(dataset, self.batch_size, seed=self.split_seed, rank=rank,
                                   num_replicas=world_size, progress=fit_progress(self),
                                   num_workers=self.num_workers,
                                   persistent_workers=self.num_workers > 0)
        return DataLoader(dataset, batch_size=self.batch_size, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader | DeviceBatches:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader | DeviceBatches:
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader | DeviceBatches:
        return self._loader(self.test_set, shuffle=False)

    def predict_dataloader(self) -> PredictBatches:
        count = self.num_predict_samples
        if count > len(self.test_set):
            raise ValueError(
                f"num_predict_samples must be <= {len(self.test_set)} (the test set), got {count}"
            )
        # Prediction reads only the batch size and the labels (which conditional models draw).
        _, rank, world_size, _ = trainer_placement(self)
        return PredictBatches((self.test_set.images[:count], self.test_set.labels[:count]),
                              self.batch_size, rank=rank, world_size=world_size,
                              transform=images_to_batch)
