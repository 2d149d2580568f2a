"""A folder of images (PNG, JPEG, anything Pillow reads) as a LightningDataModule.

Yields ``(x, y)`` with ``x`` float32 in [0, 1] of shape (B, C, image_size, image_size) and ``y``
int64 labels, like every data module here, so any image model trains on your own images:

    python cli.py fit --config configs/vae_mnist.yaml --data datamodules.ImageFolderDataModule \\
        --data.root ~/pictures/cats --data.image_size 32

Layout (as torchvision's ImageFolder): ``root/<class>/**/<image>`` gives labels 0..K-1 to the
class sub-folders in sorted order; a root without sub-folders holds one class (label 0). A
sub-folder named ``test`` is never a class: it is the test split, with the same layout (its class
folders must be among root's). Hidden files and folders (``.name``) are ignored.

Each image is decoded once: EXIF orientation applied, converted to "L" (1 channel) or "RGB" (3;
an alpha channel is dropped, as torchvision's loader does; 16-bit images are scaled to 8 bits),
resized with bicubic filtering so that its shorter side is ``image_size``, and centre-cropped to
``image_size`` x ``image_size``. The result is a uint8 tensor (N, C, image_size, image_size), held
in memory and made float per batch.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from PIL import Image, ImageOps

from datamodules.images import DataFilesError, ImageTensorDataset, InMemoryImageDataModule, split_off

# torchvision's IMG_EXTENSIONS, and GIF (its first frame); compared in lower case.
IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp")
TEST_FOLDER = "test"
# Pillow modes without colour: with channels=None, a folder of only these trains on 1 channel.
GRAY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"})
# What a broken image file raises in Pillow: UnidentifiedImageError (an OSError) for what is no
# image, OSError "image file is truncated" for a cut file, others from the codecs' own checks.
IMAGE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)
# Bump when decoding changes, so that caches written by an older version are not read.
CACHE_VERSION = 1
SKIPPED_SHOWN = 3  # how many skipped files a warning names


class ImageFolderError(DataFilesError):
    """An image folder is missing, empty, or laid out in a way that gives no data set."""


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def _images_under(folder: Path, recursive: bool) -> list[Path]:
    """The image files in ``folder`` (and, if ``recursive``, its non-hidden sub-folders),
    sorted by path so that the order (hence the split) is the same on every machine."""
    if not recursive:
        return sorted(entry for entry in folder.iterdir() if entry.is_file() and _is_image(entry.name))
    found = []
    for current, folders, names in os.walk(folder, followlinks=True):
        folders[:] = [name for name in folders if not name.startswith(".")]
        found.extend(Path(current) / name for name in names if _is_image(name))
    return sorted(found)


def decode_image(path: Path, image_size: int, channels: int) -> np.ndarray:
    """One image file -> uint8 (channels, image_size, image_size): EXIF orientation applied,
    converted to L or RGB, shorter side resized to ``image_size`` (bicubic), centre-cropped.
    Raises one of ``IMAGE_ERRORS`` for a file Pillow cannot decode."""
    with Image.open(path) as opened:
        image = ImageOps.exif_transpose(opened)  # decodes the whole file: a cut one fails here
        if image.mode.startswith("I") or image.mode == "F":  # 16-bit (or float) grey: to 8 bits
            levels = np.clip(np.asarray(image, dtype=np.float64), 0, 65535) / 257.0
            image = Image.fromarray(np.round(levels).astype(np.uint8), "L")
        if image.mode == "P" and "transparency" in image.info:
            image = image.convert("RGBA")  # what Pillow asks for before dropping the alpha
        image = image.convert("RGB" if channels == 3 else "L")
        width, height = image.size
        scale = image_size / min(width, height)
        size = (max(image_size, round(width * scale)), max(image_size, round(height * scale)))
        if size != image.size:
            image = image.resize(size, Image.Resampling.BICUBIC)
        left, top = (size[0] - image_size) // 2, (size[1] - image_size) // 2
        image = image.crop((left, top, left + image_size, top + image_size))
        array = np.asarray(image, dtype=np.uint8)
    return array[None] if channels == 1 else array.transpose(2, 0, 1)


def guess_channels(paths: list[Path]) -> int:
    """3 if any of the images has colour (its Pillow mode, read from the header only, is not one
    of ``GRAY_MODES``: RGB, RGBA, P (palette), CMYK, YCbCr, ...), else 1. Stops at the first
    colour image, so a colour folder costs one header; a grey one costs every header."""
    for path in paths:
        try:
            with Image.open(path) as image:
                if image.mode not in GRAY_MODES:
                    return 3
        except IMAGE_ERRORS:
            continue  # decoding reports it (see ImageFolderDataModule's bad-image policy)
    return 1


class ImageFolderDataModule(InMemoryImageDataModule):
    """Images of a folder in [0, 1], (C, image_size, image_size); see the module docstring for
    the layout and the decoding.

    Splits: the images of root (outside ``test/``) are split with ``split_seed``: ``val_fraction``
    of them validate; when there is no ``test`` sub-folder, ``test_fraction`` of them (drawn
    first, so the test set does not move when val_fraction changes) are the test set. Each held-out
    split keeps at least one image, and at least one image must be left to train on.

    Labels: the class sub-folders in sorted order (``classes``), ``num_classes`` = their number.
    A folder of images without sub-folders is one class: every label is 0 and ``num_classes`` is
    1 (not None), so an unconditional model trains on it, and a conditional one too (it just
    learns one class). Images lying directly in a root that has class sub-folders are ignored, with
    a warning (as torchvision's ImageFolder ignores them).

    Unreadable images: a file with an image extension that Pillow cannot decode (truncated, not an
    image) is skipped; one warning gives how many were skipped and names the first few, repeated
    on every run (also when read from the cache). A folder whose images all fail is an error.
    Skipping rather than failing: one bad file in a scraped folder of thousands should not cost a
    run, and the warning says which to delete.

    Cache: decoding happens once per process (in ``prepare_data`` or ``setup``). With ``cache_dir``
    the decoded tensor is also saved there as ``imagefolder-<key>.pt`` (torch's format, read back
    memory-mapped), so that later runs (and the other processes of a DDP run, whose
    ``prepare_data`` runs on one process per node) do not decode again. The key is the SHA-256 of:
    the cache version, image_size, channels, and for every image file (root's and test's) its
    path relative to root, size in bytes and modification time (ns). Any file added, removed,
    renamed, rewritten or touched, or a change of size or channels, gives a new key and a new
    decode; old cache files are left for you to delete. The absolute path of root is not part of
    the key, so a copied or moved folder keeps its cache only if the copy keeps the mtimes.

    Args:
        root: the image folder.
        image_size: side of the square images, in pixels.
        channels: 1 (grey, "L") or 3 ("RGB"); None: 3 if any image has colour, else 1, read from
            the image headers at construction (``guess_channels``; it stops at the first colour
            image). Pass it to skip that scan on a large grey folder.
        batch_size: batch size for every split.
        num_workers: DataLoader worker processes.
        val_fraction: fraction of root's images held out for validation, in (0, 1).
        test_fraction: fraction of root's images held out for testing when root has no ``test``
            sub-folder, in (0, 1); val_fraction + test_fraction < 1.
        split_seed: seed of the splits and of the training order.
        cache_dir: folder for the decoded-image cache (created if needed); None: no file cache.
        decode_threads: threads decoding images (Pillow releases the GIL while decoding);
            None: the number of CPUs, at most 8.
        num_predict_samples: how many samples ``predict`` generates (one per test image, whose label
            conditional models use).
        device_resident: hold the train/val/test images on the Trainer's device and cut batches
            there (``DeviceBatches``), as MNISTDataModule does.
    """

    def __init__(
        self,
        root: str,
        image_size: int,
        channels: int | None = None,
        batch_size: int = 128,
        num_workers: int = 0,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        split_seed: int = 0,
        cache_dir: str | None = None,
        decode_threads: int | None = None,
        num_predict_samples: int = 64,
        device_resident: bool = False,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, split_seed=split_seed,
                         num_predict_samples=num_predict_samples, device_resident=device_resident)
        if image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {image_size}")
        if channels not in (None, 1, 3):
            raise ValueError(f"channels must be 1 (grey), 3 (RGB) or None (from the images), got {channels}")
        if not 0 < val_fraction < 1 or not 0 < test_fraction < 1 or val_fraction + test_fraction >= 1:
            raise ValueError(f"val_fraction and test_fraction must be in (0, 1) with a sum below 1, got "
                             f"{val_fraction} and {test_fraction}")
        if decode_threads is not None and decode_threads < 1:
            raise ValueError(f"decode_threads must be >= 1 or None, got {decode_threads}")
        self.save_hyperparameters()
        self.root = Path(root).expanduser()
        self.image_size = image_size
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else None
        self.decode_threads = decode_threads or min(os.cpu_count() or 1, 8)
        # Listed now (names only, no decoding) so that num_classes is known and a wrong root fails
        # before the Trainer starts.
        self.classes, self.files, self.test_files = self._list()
        self.num_classes = len(self.classes)
        self.channels = channels if channels is not None else guess_channels(
            [path for path, _ in self.files + self.test_files])
        # Known before setup: the command line links it to the model when it instantiates both.
        self.data_shape = (self.channels, image_size, image_size)
        self._decoded: dict[str, object] | None = None

    # -------------------------------------------------------------------------------- listing
    def _list(self) -> tuple[list[str], list[tuple[Path, int]], list[tuple[Path, int]]]:
        """(class names, root's (image, label) pairs, test folder's pairs)."""
        root = self.root
        looked_for = f"looked for files ending in {', '.join(IMAGE_EXTENSIONS)} (any case)"
        if not root.is_dir():
            raise ImageFolderError(f"image folder {root} does not exist or is not a folder: set root "
                                   "to a folder of images (in class sub-folders, or directly in it)")
        cache = self.cache_dir.resolve() if self.cache_dir is not None else None
        folders = sorted(entry for entry in root.iterdir() if entry.is_dir()
                         and not entry.name.startswith(".") and entry.resolve() != cache)
        class_folders = [folder for folder in folders if folder.name != TEST_FOLDER]
        test_folder = root / TEST_FOLDER if any(f.name == TEST_FOLDER for f in folders) else None
        if class_folders:
            classes = [folder.name for folder in class_folders]
            files = []
            for label, folder in enumerate(class_folders):
                found = _images_under(folder, recursive=True)
                if not found:
                    raise ImageFolderError(f"class folder {folder} holds no images ({looked_for}): "
                                           "add images or remove the folder")
                files.extend((path, label) for path in found)
            loose = _images_under(root, recursive=False)
            if loose:
                rank_zero_warn(f"ImageFolderDataModule: {len(loose)} images directly in {root} are "
                               f"ignored (it has class sub-folders {classes}); move them into one")
        else:
            classes = [root.resolve().name]  # a flat folder: one class, label 0
            files = [(path, 0) for path in _images_under(root, recursive=False)]
        if not files:
            raise ImageFolderError(f"no images in {root} ({looked_for}, directly in it or in class "
                                   "sub-folders): set root to a folder of images")
        test_files = []
        if test_folder is not None:
            test_files = self._list_test(test_folder, classes, flat=not class_folders, looked_for=looked_for)
        return classes, files, test_files

    @staticmethod
    def _list_test(folder: Path, classes: list[str], flat: bool, looked_for: str) -> list[tuple[Path, int]]:
        if flat:
            files = [(path, 0) for path in _images_under(folder, recursive=False)]
        else:
            files = []
            subs = sorted(entry for entry in folder.iterdir()
                          if entry.is_dir() and not entry.name.startswith("."))
            for sub in subs:
                if sub.name not in classes:
                    raise ImageFolderError(f"test class folder {sub} is not a class of the training "
                                           f"images (classes: {classes}): rename or remove it")
                files.extend((path, classes.index(sub.name)) for path in _images_under(sub, recursive=True))
        if not files:
            layout = "directly in it" if flat else "in class sub-folders named as root's"
            raise ImageFolderError(f"test folder {folder} holds no images ({looked_for}, {layout}): "
                                   "add images or remove it (then test_fraction of root is the test set)")
        return files

    # ------------------------------------------------------------------------- decoding, cache
    def cache_key(self) -> str:
        """SHA-256 (hex) of what the decoded images depend on; see the class docstring."""
        entries = []
        for path, _ in self.files + self.test_files:
            stat = path.stat()
            entries.append([path.relative_to(self.root).as_posix(), stat.st_size, stat.st_mtime_ns])
        content = {"version": CACHE_VERSION, "image_size": self.image_size, "channels": self.channels,
                   "files": entries}
        return hashlib.sha256(json.dumps(content, separators=(",", ":")).encode()).hexdigest()

    def cache_path(self, key: str) -> Path | None:
        return self.cache_dir / f"imagefolder-{key[:32]}.pt" if self.cache_dir is not None else None

    def _decode_all(self) -> dict[str, object]:
        """Decode every listed image: {"images" uint8 (N, C, S, S), "labels" int64 (N,),
        "in_test" bool (N,), "paths" (relative), "skipped" [(relative path, reason)]}."""
        listed = [(path, label, False) for path, label in self.files] + \
                 [(path, label, True) for path, label in self.test_files]

        def decode(path: Path) -> np.ndarray | str:
            try:
                return decode_image(path, self.image_size, self.channels)
            except IMAGE_ERRORS as error:
                return f"{type(error).__name__}: {error}"

        with ThreadPoolExecutor(max_workers=self.decode_threads) as pool:
            results = list(pool.map(decode, [path for path, _, _ in listed]))
        kept = [i for i, result in enumerate(results) if not isinstance(result, str)]
        images = (torch.from_numpy(np.stack([results[i] for i in kept])) if kept
                  else torch.empty((0, *self.data_shape), dtype=torch.uint8))
        return {
            "version": CACHE_VERSION,
            "images": images,
            "labels": torch.tensor([listed[i][1] for i in kept], dtype=torch.int64),
            "in_test": torch.tensor([listed[i][2] for i in kept], dtype=torch.bool),
            "paths": [listed[i][0].relative_to(self.root).as_posix() for i in kept],
            "skipped": [[listed[i][0].relative_to(self.root).as_posix(), result]
                        for i, result in enumerate(results) if isinstance(result, str)],
        }

    def _read_cache(self, path: Path, key: str) -> dict[str, object] | None:
        try:
            cached = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as error:  # a cut or foreign file: decode again and replace it
            rank_zero_warn(f"ImageFolderDataModule: cache {path} is unreadable ({type(error).__name__}); "
                           "decoding the images again")
            return None
        if not isinstance(cached, dict) or cached.get("key") != key:
            return None
        return cached

    def _write_cache(self, path: Path, key: str, decoded: dict[str, object]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Written beside and renamed: a reader (another rank, another run) never sees half a file.
        partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
        try:
            torch.save({**decoded, "key": key}, partial)
            partial.replace(path)
        except OSError as error:
            partial.unlink(missing_ok=True)
            rank_zero_warn(f"ImageFolderDataModule: cannot write the cache {path} "
                           f"({error.strerror or error}); continuing without it (set cache_dir to a "
                           "writable folder)")

    def decoded(self) -> dict[str, object]:
        """The decoded images (see ``_decode_all``): from memory, else the cache file, else decoded
        now (and saved to the cache file when cache_dir is set). Warns about skipped files and
        fails when a split would be empty."""
        if self._decoded is None:
            key = self.cache_key()
            cache = self.cache_path(key)
            decoded = self._read_cache(cache, key) if cache is not None and cache.is_file() else None
            if decoded is None:
                decoded = self._decode_all()
                if cache is not None:
                    self._write_cache(cache, key, decoded)
            self._check(decoded)
            self._decoded = decoded
        return self._decoded

    def _check(self, decoded: dict[str, object]) -> None:
        skipped = decoded["skipped"]
        if skipped:
            shown = "; ".join(f"{path} ({reason})" for path, reason in skipped[:SKIPPED_SHOWN])
            more = f"; and {len(skipped) - SKIPPED_SHOWN} more" if len(skipped) > SKIPPED_SHOWN else ""
            rank_zero_warn(f"ImageFolderDataModule: skipped {len(skipped)} of "
                           f"{len(self.files) + len(self.test_files)} image files in {self.root} that "
                           f"could not be decoded: {shown}{more}. Delete or replace them.")
        in_test = decoded["in_test"]
        for name, count, total in [("root", int((~in_test).sum()), len(self.files)),
                                   ("test folder", int(in_test.sum()), len(self.test_files))]:
            if count == 0 and total > 0:
                folder = self.root if name == "root" else self.root / TEST_FOLDER
                raise ImageFolderError(f"none of the {total} image files in {folder} could be decoded "
                                       f"(first: {skipped[0][0]}: {skipped[0][1]}): check the files")

    # --------------------------------------------------------------------------------- splits
    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        decoded = self.decoded()
        images, labels, in_test = decoded["images"], decoded["labels"], decoded["in_test"]
        has_test_folder = bool(in_test.any())
        own = (~in_test).nonzero().squeeze(1)  # root's images, outside test/
        total = len(own)
        test_count = 0 if has_test_folder else max(1, round(self.test_fraction * total))
        val_count = max(1, round(self.val_fraction * total))
        if test_count + val_count >= total:
            fractions = f"val_fraction={self.val_fraction}"
            if not has_test_folder:
                fractions += f" and test_fraction={self.test_fraction}"
            raise ImageFolderError(
                f"{total} decoded images in {self.root} leave none to train on with {fractions}: add "
                "images" + ("" if has_test_folder else f" (or a {TEST_FOLDER}/ sub-folder to test on)"))
        held_out, train_index = split_off(test_count + val_count, total, self.split_seed)
        test_index, val_index = held_out[:test_count], held_out[test_count:]

        def subset(index: torch.Tensor) -> ImageTensorDataset:
            # Indexing copies out of the (memory-mapped) decoded tensor, which is then let go.
            return ImageTensorDataset(images[index], labels[index])

        self.train_set, self.val_set = subset(own[train_index]), subset(own[val_index])
        self.test_set = subset(in_test.nonzero().squeeze(1) if has_test_folder else own[test_index])
        self._decoded = None  # the splits hold copies; keeping the whole set too would double memory

    def prepare_data(self) -> None:
        """Decode the images, or read them from the cache (called on one process per node, so with
        cache_dir the other processes read what this one wrote)."""
        self.decoded()
