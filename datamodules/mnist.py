"""MNIST as a LightningDataModule.

Yields ``(x, y)`` with ``x`` float32 in [0, 1] of shape (B, 1, 28, 28) and ``y`` int64 labels.
Models do their own preprocessing (binarization, scaling to [-1, 1], quantization), so the data
module is the same for every family.

Files are read from ``<data_dir>/MNIST/raw/*-ubyte`` (torchvision's layout). ``data_dir`` defaults
to the environment variable ``LIGHTNING_GEN_DATA``, else ``./data``. Missing files are downloaded
with torchvision; gzipped copies (``*-ubyte.gz``) lying in the raw folder are extracted first.
"""

from __future__ import annotations

import gzip
import os
import shutil
import zlib
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from datamodules.device import DeviceBatches, trainer_placement
from datamodules.loaders import PredictBatches, ResumableLoader, fit_progress

MNIST_FILES = {
    # name: (idx magic number, expected shape)
    "train-images-idx3-ubyte": (2051, (60000, 28, 28)),
    "train-labels-idx1-ubyte": (2049, (60000,)),
    "t10k-images-idx3-ubyte": (2051, (10000, 28, 28)),
    "t10k-labels-idx1-ubyte": (2049, (10000,)),
}


def default_data_dir() -> Path:
    return Path(os.environ.get("LIGHTNING_GEN_DATA", "./data"))


class MNISTDataError(RuntimeError):
    """MNIST files are missing, truncated or corrupt."""


def _missing_files_message(raw_dir: Path, missing: list[str], reason: str) -> str:
    names = "\n".join(f"  {raw_dir / name}" for name in missing)
    return (
        f"MNIST files not found ({reason}). Expected, in torchvision's layout:\n{names}\n"
        "Provide them in one of these ways:\n"
        "  - run once with a network connection (the files are downloaded automatically), or\n"
        f"  - copy the four original files (*-ubyte or *-ubyte.gz) into {raw_dir}, or\n"
        "  - set data_dir (or the environment variable LIGHTNING_GEN_DATA) to a folder that "
        "holds MNIST/raw/."
    )


def read_idx_file(path: Path, magic: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Read one uint8 IDX file (LeCun's MNIST format), checking its header and size."""
    data = path.read_bytes()
    num_dims = len(shape)
    header_size = 4 * (1 + num_dims)
    expected_size = header_size + int(torch.tensor(shape).prod())
    found_magic = int.from_bytes(data[:4], "big") if len(data) >= 4 else None
    found_shape = tuple(
        int.from_bytes(data[4 * (i + 1) : 4 * (i + 2)], "big") for i in range(num_dims)
    ) if len(data) >= header_size else None
    if found_magic != magic or found_shape != shape or len(data) != expected_size:
        raise MNISTDataError(
            f"MNIST file {path} is corrupt or truncated: expected magic {magic}, shape {shape} and "
            f"{expected_size} bytes; found magic {found_magic}, shape {found_shape} and {len(data)} "
            "bytes. Delete it and download it again (or copy a good copy there)."
        )
    return torch.frombuffer(bytearray(data), dtype=torch.uint8, offset=header_size).view(*shape)


class ImageTensorDataset(Dataset):
    """uint8 images (N, H, W) and labels (N,) -> (float32 (1, H, W) in [0, 1], int64)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images = images
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.images[index].unsqueeze(0).float().div_(255.0)  # (1, 28, 28)
        return x, self.labels[index].long()


def images_to_batch(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images (B, H, W) and labels (B,) -> float32 (B, 1, H, W) in [0, 1] and int64."""
    images, labels = batch
    return images.unsqueeze(1).float().div_(255.0), labels.long()


class MNISTDataModule(L.LightningDataModule):
    """MNIST digits in [0, 1]; train/val split of the 60k training set, test = the 10k test set.

    Args:
        data_dir: folder holding ``MNIST/raw/``; default: env ``LIGHTNING_GEN_DATA`` or ``./data``.
        batch_size: batch size for every split.
        num_workers: DataLoader worker processes.
        val_size: images held out from the 60k training set for validation.
        split_seed: seed of the train/val split (fixed, so every run validates on the same images).
        download: download missing files with torchvision.
        num_predict_samples: how many samples ``predict`` generates (one per test image, whose label
            conditional models use).
        device_resident: hold the train/val/test images on the Trainer's device and cut batches
            there (``DeviceBatches``): no DataLoader workers, no per-step host-to-device copy;
            each DDP rank iterates its own shard, reshuffled every epoch from ``split_seed``.
    """

    data_shape = (1, 28, 28)
    num_classes = 10

    def __init__(
        self,
        data_dir: str | None = None,
        batch_size: int = 128,
        num_workers: int = 0,
        val_size: int = 5000,
        split_seed: int = 0,
        download: bool = True,
        num_predict_samples: int = 64,
        device_resident: bool = False,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if not 0 < val_size < 60000:
            raise ValueError(f"val_size must be in 1..59999, got {val_size}")
        if num_predict_samples < 1:
            raise ValueError(f"num_predict_samples must be >= 1, got {num_predict_samples}")
        self.save_hyperparameters()
        self.data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.val_size = val_size
        self.split_seed = split_seed
        self.download = download
        self.num_predict_samples = num_predict_samples
        self.device_resident = device_resident
        self.train_set = self.val_set = self.test_set = None

    @property
    def raw_dir(self) -> Path:
        return self.data_dir / "MNIST" / "raw"

    def _missing(self) -> list[str]:
        return [name for name in MNIST_FILES if not (self.raw_dir / name).is_file()]

    def _extract_gzipped(self) -> None:
        """Extract ``*-ubyte.gz`` files lying in the raw folder. A .gz is called corrupt (and only
        then is deleting it advised) when gzip itself finds it damaged; a folder that cannot be
        written, or a read that fails, is reported as such and leaves the file alone."""
        for name in self._missing():
            packed = self.raw_dir / f"{name}.gz"
            if not packed.is_file():
                continue
            partial = self.raw_dir / f"{name}.partial"
            try:
                destination = open(partial, "wb")
            except OSError as error:
                raise MNISTDataError(
                    f"cannot extract {packed}: {partial} cannot be written ({error.strerror or error}); "
                    "the .gz file was not changed. Make the folder writable, extract the file "
                    f"there yourself (gunzip -k {packed}), or set data_dir (or LIGHTNING_GEN_DATA) "
                    "to a writable folder holding MNIST/raw/."
                ) from error
            try:
                with destination, gzip.open(packed, "rb") as source:
                    shutil.copyfileobj(source, destination)
            except (gzip.BadGzipFile, EOFError, zlib.error) as error:
                partial.unlink(missing_ok=True)
                raise MNISTDataError(
                    f"MNIST file {packed} is corrupt ({error}). Delete it and download it again "
                    "(or copy a good copy there)."
                ) from error
            except OSError as error:
                partial.unlink(missing_ok=True)
                raise MNISTDataError(
                    f"could not extract {packed} into {self.raw_dir} ({error}); the .gz file was not "
                    "shown to be corrupt, keep it. Check the disk and permissions, then run again."
                ) from error
            partial.replace(self.raw_dir / name)

    def prepare_data(self) -> None:
        """Extract or download the raw files (called on one process per node)."""
        self._extract_gzipped()
        missing = self._missing()
        if not missing:
            return
        if not self.download:
            raise MNISTDataError(_missing_files_message(self.raw_dir, missing, "download=False"))
        from torchvision.datasets import MNIST

        folders = [self.data_dir, self.data_dir / "MNIST", self.raw_dir]
        created = [folder for folder in folders if not folder.exists()]
        try:
            MNIST(str(self.data_dir), train=True, download=True)
            MNIST(str(self.data_dir), train=False, download=True)
        except Exception as error:  # torchvision raises several kinds when offline
            missing = self._missing()
            for folder in reversed(created):  # leave no empty folders behind
                if folder.is_dir() and not any(folder.iterdir()):
                    folder.rmdir()
            raise MNISTDataError(
                _missing_files_message(self.raw_dir, missing, f"download failed: {error}")
            ) from error

    def _load(self, train: bool) -> ImageTensorDataset:
        prefix = "train" if train else "t10k"
        missing = self._missing()
        if missing:
            raise MNISTDataError(_missing_files_message(self.raw_dir, missing, "call prepare_data"))
        images_name, labels_name = f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"
        images = read_idx_file(self.raw_dir / images_name, *MNIST_FILES[images_name])
        labels = read_idx_file(self.raw_dir / labels_name, *MNIST_FILES[labels_name])
        return ImageTensorDataset(images, labels)

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit", "validate") and self.train_set is None:
            full = self._load(train=True)
            generator = torch.Generator().manual_seed(self.split_seed)
            order = torch.randperm(len(full), generator=generator)
            val_index, train_index = order[: self.val_size], order[self.val_size :]
            self.train_set = ImageTensorDataset(full.images[train_index], full.labels[train_index])
            self.val_set = ImageTensorDataset(full.images[val_index], full.labels[val_index])
        if stage in (None, "test", "predict") and self.test_set is None:
            self.test_set = self._load(train=False)

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
