"""Fashion-MNIST and CIFAR-10 as LightningDataModules, with MNIST's contract.

Both yield ``(x, y)`` with ``x`` float32 in [0, 1] of shape (B, C, H, W) and ``y`` int64 labels in
0..9, split train/val with a fixed seed, and read files in torchvision's layout under
``data_dir`` (default: the environment variable ``LIGHTNING_GEN_DATA``, else ``./data``), which
torchvision's dataset classes download when ``download=True`` and files are missing:

- Fashion-MNIST (1, 28, 28): ``<data_dir>/FashionMNIST/raw/*-ubyte`` (or ``*-ubyte.gz``), the same
  IDX files and names as MNIST's, read by MNIST's reader (``IdxImageDataModule``).
- CIFAR-10 (3, 32, 32): ``<data_dir>/cifar-10-batches-py/`` with ``data_batch_1`` ..
  ``data_batch_5``, ``test_batch`` and ``batches.meta`` (the "python version"), or the archive
  ``<data_dir>/cifar-10-python.tar.gz``, from which those files are extracted.

The files are read here rather than through torchvision's classes, which check every file's MD5
(so any other copy, e.g. a subset, is refused as "corrupt") and unpickle the CIFAR batches with
Python's full unpickler, which runs whatever code a file carries; here the batches are checked for
their documented content instead (a dict whose ``data`` is uint8 (N, 3072) and whose ``labels``
are N ints in 0..9), unpickled allowing nothing but numpy arrays. Both readers accept any number
of examples (the training set minus ``val_size`` must keep at least one), so a subset in the same
format works too.
"""

from __future__ import annotations

import pickle
import tarfile
from pathlib import Path

import numpy as np
import torch

from datamodules.images import DataFilesError, ImageTensorDataset, InMemoryImageDataModule, default_data_dir
from datamodules.mnist import IdxImageDataModule

# ----------------------------------------------------------------------------- Fashion-MNIST
FASHION_MNIST_FILES = {
    # name: (idx magic number, expected shape); None: any number of examples, as the header says
    "train-images-idx3-ubyte": (2051, (None, 28, 28)),
    "train-labels-idx1-ubyte": (2049, (None,)),
    "t10k-images-idx3-ubyte": (2051, (None, 28, 28)),
    "t10k-labels-idx1-ubyte": (2049, (None,)),
}
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                         "Sneaker", "Bag", "Ankle boot"]


class FashionMNISTDataError(DataFilesError):
    """Fashion-MNIST files are missing, truncated or corrupt."""


class FashionMNISTDataModule(IdxImageDataModule):
    """Fashion-MNIST (Zalando's clothing images) in [0, 1]: (1, 28, 28), 10 classes
    (``FASHION_MNIST_CLASSES``); train/val split of the training files (60k), test = the test
    files (10k). The files and their names are MNIST's, in ``<data_dir>/FashionMNIST/raw/``.

    Args:
        data_dir: folder holding ``FashionMNIST/raw/``; default: env ``LIGHTNING_GEN_DATA`` or
            ``./data``.
        batch_size: batch size for every split.
        num_workers: DataLoader worker processes.
        val_size: images held out from the training files for validation.
        split_seed: seed of the train/val split (fixed, so every run validates on the same images).
        download: download missing files with torchvision.
        num_predict_samples: how many samples ``predict`` generates (one per test image, whose label
            conditional models use).
        device_resident: hold the train/val/test images on the Trainer's device and cut batches
            there (``DeviceBatches``), as MNISTDataModule does.
    """

    folder = "FashionMNIST"
    title = "Fashion-MNIST"
    files = FASHION_MNIST_FILES
    error = FashionMNISTDataError
    classes = FASHION_MNIST_CLASSES


# ---------------------------------------------------------------------------------- CIFAR-10
CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_ARCHIVE = "cifar-10-python.tar.gz"
CIFAR10_TRAIN_FILES = [f"data_batch_{i}" for i in range(1, 6)]
CIFAR10_TEST_FILES = ["test_batch"]
CIFAR10_META_FILE = "batches.meta"
CIFAR10_FILES = [*CIFAR10_TRAIN_FILES, *CIFAR10_TEST_FILES, CIFAR10_META_FILE]
CIFAR10_SHAPE = (3, 32, 32)

# What a CIFAR-10 pickle may refer to: numpy arrays (under numpy 1's and 2's module names) and,
# in pickles written by Python 3 with protocol 2, the codec that rebuilds bytes.
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
}


class CIFAR10DataError(DataFilesError):
    """CIFAR-10 files are missing, truncated or corrupt."""


class _ArraysOnlyUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays; refuses any other global (a pickle naming one
    is not a CIFAR-10 batch, and loading it could run code)."""

    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"it refers to {module}.{name}, which a CIFAR-10 batch never does")
        return super().find_class(module, name)


def _read_pickle(path: Path) -> dict[str, object]:
    """A CIFAR-10 python-version file: a dict, its keys made str (Python 2 pickled them as bytes)."""
    try:
        with open(path, "rb") as handle:
            content = _ArraysOnlyUnpickler(handle, encoding="bytes").load()
    except OSError as error:
        raise CIFAR10DataError(f"CIFAR-10 file {path} cannot be read ({error.strerror or error}); "
                               "check its permissions") from error
    except Exception as error:  # an unpickler fails in many ways on bad bytes
        raise CIFAR10DataError(f"CIFAR-10 file {path} is corrupt, truncated or not CIFAR-10's python "
                               f"version ({type(error).__name__}: {error}). Delete it and download it "
                               "again (or copy a good copy there).") from error
    if not isinstance(content, dict):
        raise CIFAR10DataError(f"CIFAR-10 file {path} holds a {type(content).__name__}, not a dict: it "
                               "is not CIFAR-10's python version. Delete it and download it again.")
    return {key.decode("latin1") if isinstance(key, bytes) else key: value for key, value in content.items()}


def read_cifar10_batch(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """One CIFAR-10 batch file -> uint8 images (N, 3, 32, 32) and int64 labels (N,).

    The file is a pickled dict: ``data``, uint8 (N, 3072), each row an image's red, green and
    blue planes of 32 x 32 in row-major order; ``labels``, N ints in 0..9."""
    batch = _read_pickle(path)
    data, labels = batch.get("data"), batch.get("labels")
    size = int(np.prod(CIFAR10_SHAPE))
    if (not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2
            or data.shape[1] != size):
        found = (f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__)
        raise CIFAR10DataError(f"CIFAR-10 file {path} is corrupt: its 'data' must be uint8 (N, {size}), "
                               f"found {found}. Delete it and download it again.")
    try:
        label_tensor = torch.as_tensor(np.asarray(labels, dtype=np.int64))
    except (TypeError, ValueError) as error:
        raise CIFAR10DataError(f"CIFAR-10 file {path} is corrupt: its 'labels' must be a list of ints "
                               f"({error}). Delete it and download it again.") from error
    in_range = len(data) == 0 or 0 <= int(label_tensor.min()) <= int(label_tensor.max()) < 10
    if label_tensor.shape != (len(data),) or not in_range:
        raise CIFAR10DataError(f"CIFAR-10 file {path} is corrupt: it needs {len(data)} labels in 0..9, "
                               f"found shape {tuple(label_tensor.shape)}. Delete it and download it again.")
    images = torch.from_numpy(np.ascontiguousarray(data).reshape(-1, *CIFAR10_SHAPE))
    return images, label_tensor


def _missing_cifar10_message(data_dir: Path, missing: list[str], reason: str) -> str:
    folder = data_dir / CIFAR10_FOLDER
    names = "\n".join(f"  {folder / name}" for name in missing)
    return (
        f"CIFAR-10 files not found ({reason}). Expected, in torchvision's layout:\n{names}\n"
        "Provide them in one of these ways:\n"
        "  - run once with a network connection (the files are downloaded automatically), or\n"
        f"  - copy {CIFAR10_ARCHIVE} (the python version, from https://www.cs.toronto.edu/~kriz/"
        f"cifar.html) into {data_dir}, or its extracted {CIFAR10_FOLDER}/ folder, or\n"
        "  - set data_dir (or the environment variable LIGHTNING_GEN_DATA) to a folder that "
        f"holds {CIFAR10_FOLDER}/."
    )


class CIFAR10DataModule(InMemoryImageDataModule):
    """CIFAR-10 in [0, 1]: (3, 32, 32), 10 classes (``classes``: airplane .. truck, read from
    ``batches.meta``); train/val split of the 50k training images, test = the 10k test images.

    Args:
        data_dir: folder holding ``cifar-10-batches-py/`` (or ``cifar-10-python.tar.gz``);
            default: env ``LIGHTNING_GEN_DATA`` or ``./data``.
        batch_size: batch size for every split.
        num_workers: DataLoader worker processes.
        val_size: images held out from the training images for validation.
        split_seed: seed of the train/val split (fixed, so every run validates on the same images).
        download: download missing files with torchvision (the archive, then extracted).
        num_predict_samples: how many samples ``predict`` generates (one per test image, whose label
            conditional models use).
        device_resident: hold the train/val/test images on the Trainer's device and cut batches
            there (``DeviceBatches``), as MNISTDataModule does (CIFAR-10 is 184 MB as uint8).
    """

    data_shape = CIFAR10_SHAPE
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
        if val_size < 1:
            raise ValueError(f"val_size must be >= 1, got {val_size}")
        self.save_hyperparameters()
        self.data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
        self.val_size = val_size
        self.download = download
        self.classes: list[str] | None = None  # read from batches.meta in setup

    @property
    def batches_dir(self) -> Path:
        return self.data_dir / CIFAR10_FOLDER

    def _missing(self) -> list[str]:
        return [name for name in CIFAR10_FILES if not (self.batches_dir / name).is_file()]

    def _extract_archive(self) -> None:
        """Extract the missing batch files from ``cifar-10-python.tar.gz`` lying in data_dir. Only
        the expected members are written, each through a ``.partial`` file renamed when complete
        (so an interrupted extraction leaves no truncated batch)."""
        archive = self.data_dir / CIFAR10_ARCHIVE
        missing = self._missing()
        if not missing or not archive.is_file():
            return
        try:
            with tarfile.open(archive, "r:gz") as tar:
                self.batches_dir.mkdir(parents=True, exist_ok=True)
                for name in missing:
                    member = tar.extractfile(f"{CIFAR10_FOLDER}/{name}")
                    if member is None:
                        raise KeyError(f"{CIFAR10_FOLDER}/{name} is not a file")
                    partial = self.batches_dir / f"{name}.partial"
                    with member, open(partial, "wb") as destination:
                        destination.write(member.read())
                    partial.replace(self.batches_dir / name)
        except (tarfile.TarError, EOFError, KeyError) as error:
            raise CIFAR10DataError(f"CIFAR-10 archive {archive} is corrupt or incomplete ({error}). "
                                   "Delete it and download it again (or copy a good copy there).") from error
        except OSError as error:
            raise CIFAR10DataError(f"could not extract {archive} into {self.batches_dir} ({error}); "
                                   "check the disk and permissions, or extract it yourself "
                                   f"(tar -xzf {archive} -C {self.data_dir}).") from error

    def prepare_data(self) -> None:
        """Extract or download the batch files (called on one process per node)."""
        self._extract_archive()
        missing = self._missing()
        if not missing:
            return
        if not self.download:
            raise CIFAR10DataError(_missing_cifar10_message(self.data_dir, missing, "download=False"))
        # Looked up when called (not imported by name), so that tests can stand in for it.
        import torchvision.datasets

        folders = [self.data_dir, self.batches_dir]
        created = [folder for folder in folders if not folder.exists()]
        try:
            # The archive holds both splits; torchvision downloads, checks and extracts it.
            torchvision.datasets.CIFAR10(str(self.data_dir), train=False, download=True)
        except Exception as error:  # torchvision raises several kinds when offline
            missing = self._missing()
            for folder in reversed(created):  # leave no empty folders behind
                if folder.is_dir() and not any(folder.iterdir()):
                    folder.rmdir()
            raise CIFAR10DataError(
                _missing_cifar10_message(self.data_dir, missing, f"download failed: {error}")
            ) from error

    def _load(self, names: list[str]) -> ImageTensorDataset:
        missing = self._missing()
        if missing:
            raise CIFAR10DataError(_missing_cifar10_message(self.data_dir, missing, "call prepare_data"))
        if self.classes is None:
            label_names = _read_pickle(self.batches_dir / CIFAR10_META_FILE).get("label_names")
            if not isinstance(label_names, list) or len(label_names) != self.num_classes:
                raise CIFAR10DataError(f"CIFAR-10 file {self.batches_dir / CIFAR10_META_FILE} is corrupt: "
                                       "its 'label_names' must list 10 names. Delete it and download it "
                                       "again.")
            self.classes = [name.decode("latin1") if isinstance(name, bytes) else str(name)
                            for name in label_names]
        parts = [read_cifar10_batch(self.batches_dir / name) for name in names]
        return ImageTensorDataset(torch.cat([images for images, _ in parts]),
                                  torch.cat([labels for _, labels in parts]))

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit", "validate") and self.train_set is None:
            full = self._load(CIFAR10_TRAIN_FILES)
            if self.val_size >= len(full):
                raise ValueError(f"val_size={self.val_size} leaves no training images of the "
                                 f"{len(full)} in {self.batches_dir}: lower val_size")
            self.split_train_val(full, self.val_size)
        if stage in (None, "test", "predict") and self.test_set is None:
            self.test_set = self._load(CIFAR10_TEST_FILES)
