"""MNIST as a LightningDataModule.

Yields ``(x, y)`` with ``x`` float32 in [0, 1] of shape (B, 1, 28, 28) and ``y`` int64 labels.
Models do their own preprocessing (binarization, scaling to [-1, 1], quantization), so the data
module is the same for every family.

Files are read from ``<data_dir>/MNIST/raw/*-ubyte`` (torchvision's layout). ``data_dir`` defaults
to the environment variable ``LIGHTNING_GEN_DATA``, else ``./data``. Missing files are downloaded
with torchvision; gzipped copies (``*-ubyte.gz``) lying in the raw folder are extracted first.

``IdxImageDataModule`` is MNIST's reader for any data set in its files (Fashion-MNIST,
``datamodules.torchvision_sets``); the loaders are those of every image data module
(``datamodules.images.InMemoryImageDataModule``).
"""

from __future__ import annotations

import gzip
import shutil
import zlib
from pathlib import Path

import torch

from datamodules.images import (  # noqa: F401  (images_to_batch: benchmarks import it from here)
    DataFilesError, ImageTensorDataset, InMemoryImageDataModule, default_data_dir, images_to_batch,
)

MNIST_FILES = {
    # name: (idx magic number, expected shape)
    "train-images-idx3-ubyte": (2051, (60000, 28, 28)),
    "train-labels-idx1-ubyte": (2049, (60000,)),
    "t10k-images-idx3-ubyte": (2051, (10000, 28, 28)),
    "t10k-labels-idx1-ubyte": (2049, (10000,)),
}


class MNISTDataError(DataFilesError):
    """MNIST files are missing, truncated or corrupt."""


def _missing_files_message(raw_dir: Path, missing: list[str], reason: str, title: str = "MNIST",
                           folder: str = "MNIST") -> str:
    names = "\n".join(f"  {raw_dir / name}" for name in missing)
    return (
        f"{title} files not found ({reason}). Expected, in torchvision's layout:\n{names}\n"
        "Provide them in one of these ways:\n"
        "  - run once with a network connection (the files are downloaded automatically), or\n"
        f"  - copy the four original files (*-ubyte or *-ubyte.gz) into {raw_dir}, or\n"
        "  - set data_dir (or the environment variable LIGHTNING_GEN_DATA) to a folder that "
        f"holds {folder}/raw/."
    )


def read_idx_file(path: Path, magic: int, shape: tuple[int | None, ...], title: str = "MNIST",
                  error: type[DataFilesError] = MNISTDataError) -> torch.Tensor:
    """Read one uint8 IDX file (LeCun's MNIST format), checking its header and size. A leading
    ``None`` in ``shape`` accepts any number of examples (the header's), still checked against
    the file's size."""
    data = path.read_bytes()
    num_dims = len(shape)
    header_size = 4 * (1 + num_dims)
    found_magic = int.from_bytes(data[:4], "big") if len(data) >= 4 else None
    found_shape = tuple(
        int.from_bytes(data[4 * (i + 1) : 4 * (i + 2)], "big") for i in range(num_dims)
    ) if len(data) >= header_size else None
    if shape[0] is None and found_shape is not None:
        shape = (found_shape[0], *shape[1:])
    expected_size = header_size + int(torch.tensor(shape).prod()) if None not in shape else None
    if found_magic != magic or found_shape != shape or len(data) != expected_size:
        raise error(
            f"{title} file {path} is corrupt or truncated: expected magic {magic}, shape {shape} and "
            f"{expected_size} bytes; found magic {found_magic}, shape {found_shape} and {len(data)} "
            "bytes. Delete it and download it again (or copy a good copy there)."
        )
    return torch.frombuffer(bytearray(data), dtype=torch.uint8, offset=header_size).view(*shape)


class IdxImageDataModule(InMemoryImageDataModule):
    """A data set in MNIST's files (``<data_dir>/<folder>/raw/*-ubyte``, torchvision's layout):
    the train/val split of the training files, test = the test files. Subclasses name the folder
    (which is also the torchvision class that downloads it) and the files' expected shapes.
    Arguments: as MNISTDataModule's."""

    folder = "MNIST"  # <data_dir>/<folder>/raw, and torchvision.datasets.<folder> downloads it
    title = "MNIST"  # the data set's name in messages
    files = MNIST_FILES  # name: (magic, shape); a shape starting with None: any number of examples
    error: type[DataFilesError] = MNISTDataError
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
        super().__init__(batch_size=batch_size, num_workers=num_workers, split_seed=split_seed,
                         num_predict_samples=num_predict_samples, device_resident=device_resident)
        self.save_hyperparameters()
        train_count = self.files["train-images-idx3-ubyte"][1][0]
        if train_count is not None and not 0 < val_size < train_count:
            raise ValueError(f"val_size must be in 1..{train_count - 1}, got {val_size}")
        if val_size < 1:
            raise ValueError(f"val_size must be >= 1, got {val_size}")
        self.data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
        self.val_size = val_size
        self.download = download

    @property
    def raw_dir(self) -> Path:
        return self.data_dir / self.folder / "raw"

    def _missing(self) -> list[str]:
        return [name for name in self.files if not (self.raw_dir / name).is_file()]

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
                raise self.error(
                    f"cannot extract {packed}: {partial} cannot be written ({error.strerror or error}); "
                    "the .gz file was not changed. Make the folder writable, extract the file "
                    f"there yourself (gunzip -k {packed}), or set data_dir (or LIGHTNING_GEN_DATA) "
                    f"to a writable folder holding {self.folder}/raw/."
                ) from error
            try:
                with destination, gzip.open(packed, "rb") as source:
                    shutil.copyfileobj(source, destination)
            except (gzip.BadGzipFile, EOFError, zlib.error) as error:
                partial.unlink(missing_ok=True)
                raise self.error(
                    f"{self.title} file {packed} is corrupt ({error}). Delete it and download it again "
                    "(or copy a good copy there)."
                ) from error
            except OSError as error:
                partial.unlink(missing_ok=True)
                raise self.error(
                    f"could not extract {packed} into {self.raw_dir} ({error}); the .gz file was not "
                    "shown to be corrupt, keep it. Check the disk and permissions, then run again."
                ) from error
            partial.replace(self.raw_dir / name)

    def _missing_message(self, missing: list[str], reason: str) -> str:
        return _missing_files_message(self.raw_dir, missing, reason, self.title, self.folder)

    def prepare_data(self) -> None:
        """Extract or download the raw files (called on one process per node)."""
        self._extract_gzipped()
        missing = self._missing()
        if not missing:
            return
        if not self.download:
            raise self.error(self._missing_message(missing, "download=False"))
        # Looked up when called (not imported by name), so that tests can stand in for it.
        import torchvision.datasets

        dataset_class = getattr(torchvision.datasets, self.folder)
        folders = [self.data_dir, self.data_dir / self.folder, self.raw_dir]
        created = [folder for folder in folders if not folder.exists()]
        try:
            dataset_class(str(self.data_dir), train=True, download=True)
            dataset_class(str(self.data_dir), train=False, download=True)
        except Exception as error:  # torchvision raises several kinds when offline
            missing = self._missing()
            for folder in reversed(created):  # leave no empty folders behind
                if folder.is_dir() and not any(folder.iterdir()):
                    folder.rmdir()
            raise self.error(self._missing_message(missing, f"download failed: {error}")) from error

    def _load(self, train: bool) -> ImageTensorDataset:
        prefix = "train" if train else "t10k"
        missing = self._missing()
        if missing:
            raise self.error(self._missing_message(missing, "call prepare_data"))
        images_name, labels_name = f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"
        images = read_idx_file(self.raw_dir / images_name, *self.files[images_name], self.title, self.error)
        labels = read_idx_file(self.raw_dir / labels_name, *self.files[labels_name], self.title, self.error)
        if len(images) != len(labels):  # possible only where the files allow any count
            raise self.error(f"{self.title} files {self.raw_dir / images_name} and {labels_name} "
                             f"disagree: {len(images)} images but {len(labels)} labels. Replace "
                             "them with a matching pair.")
        return ImageTensorDataset(images, labels)

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit", "validate") and self.train_set is None:
            full = self._load(train=True)
            if self.val_size >= len(full):
                raise ValueError(f"val_size={self.val_size} leaves no training images of the "
                                 f"{len(full)} in {self.raw_dir}: lower val_size")
            self.split_train_val(full, self.val_size)
        if stage in (None, "test", "predict") and self.test_set is None:
            self.test_set = self._load(train=False)


class MNISTDataModule(IdxImageDataModule):
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

    fid_feature_network = "mnist"
