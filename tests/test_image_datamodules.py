"""Image data modules beyond MNIST: a folder of images, CIFAR-10 and Fashion-MNIST.

Nothing is downloaded: each test writes a few images in the data set's own on-disk format and
reads them back through the data module, checking pixel values and labels, not only shapes."""

from __future__ import annotations

import gzip
import io
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import CONFIGS, QUICK, run_cli, write_cifar10
from PIL import Image

from datamodules import CIFAR10DataModule, FashionMNISTDataModule, ImageFolderDataModule, image_folder
from datamodules.image_folder import ImageFolderError
from datamodules.torchvision_sets import (
    CIFAR10_FILES, FASHION_MNIST_FILES, CIFAR10DataError, FashionMNISTDataError,
)

SIZE = 16
# Mixed sizes and modes, each image one solid colour (unique, so an example identifies its file).
# (mode, size, file suffix); RGBA has alpha 128 and P a transparent index, which are dropped.
KINDS = [("RGB", (40, 30), ".png"), ("L", (20, 50), ".png"), ("RGBA", (33, 33), ".png"),
         ("P", (25, 40), ".png"), ("RGB", (64, 48), ".jpg"), ("L", (17, 16), ".JPEG")]


def solid_image(mode: str, size: tuple[int, int], colour: tuple[int, int, int]) -> Image.Image:
    if mode == "L":
        return Image.new("L", size, colour[0])
    if mode == "RGBA":
        return Image.new("RGBA", size, (*colour, 128))
    if mode == "P":
        image = Image.new("RGB", size, colour).quantize(colors=2)
        image.info["transparency"] = 1  # an unused index: the colour itself stays opaque
        return image
    return Image.new("RGB", size, colour)


def expected_rgb(mode: str, colour: tuple[int, int, int]) -> tuple[int, int, int]:
    return (colour[0],) * 3 if mode == "L" else colour


def write_folder(root: Path, classes=("cat", "dog"), per_class: int = 6, start: int = 0) -> dict:
    """Class sub-folders of mixed images; returns {expected RGB colour: label}."""
    colours = {}
    for label, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            mode, size, suffix = KINDS[i % len(KINDS)]
            n = start + label * per_class + i
            colour = ((20 + 9 * n) % 250, (240 - 7 * n) % 250, (60 + 37 * n) % 250)
            image = solid_image(mode, size, colour)
            image.save(root / name / f"{i:02d}{suffix}", **({"transparency": 1} if mode == "P" else {}))
            colours[expected_rgb(mode, colour)] = label
    return colours


def identify(images: torch.Tensor, colours: dict) -> list[tuple[int, int, int]]:
    """The expected colour each decoded uint8 image (N, 3, S, S) matches (JPEG: within 4)."""
    found = []
    for image in images:
        assert (image.amax((1, 2)).int() - image.amin((1, 2)).int()).max() <= 4  # still solid
        rgb = image[:, SIZE // 2, SIZE // 2].int()
        match = [c for c in colours if (rgb - torch.tensor(c)).abs().max() <= 4]
        assert len(match) == 1, f"decoded colour {rgb.tolist()} matches {match}"
        found.append(match[0])
    return found


def all_images(data) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(s.images, s.labels) for s in (data.train_set, data.val_set, data.test_set)]


@pytest.fixture
def folder(tmp_path) -> tuple[Path, dict]:
    root = tmp_path / "images"
    return root, write_folder(root)


# ------------------------------------------------------------------------------- image folder
def test_folder_shapes_ranges_labels_and_content(folder):
    root, colours = folder
    data = ImageFolderDataModule(str(root), SIZE, batch_size=4, val_fraction=0.25, test_fraction=0.25)
    assert data.data_shape == (3, SIZE, SIZE) and data.num_classes == 2 and data.classes == ["cat", "dog"]
    data.setup("fit")
    assert (len(data.train_set), len(data.val_set), len(data.test_set)) == (6, 3, 3)
    x, y = next(iter(data.train_dataloader()))
    assert x.shape == (4, 3, SIZE, SIZE) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert 0 <= x.min() and x.max() <= 1
    seen = []
    for images, labels in all_images(data):
        assert images.dtype == torch.uint8 and images.shape[1:] == (3, SIZE, SIZE)
        found = identify(images, colours)
        assert [colours[c] for c in found] == labels.tolist()  # each image keeps its class's label
        seen += found
    assert sorted(seen) == sorted(colours)  # the splits are disjoint and cover every image
    # x is the uint8 image / 255, exactly
    x, _ = data.val_set[0]
    assert torch.equal(x, data.val_set.images[0].float() / 255)


def test_folder_split_is_fixed_by_seed(folder):
    root, _ = folder

    def split(seed):
        data = ImageFolderDataModule(str(root), SIZE, channels=3, split_seed=seed, val_fraction=0.25)
        data.setup()
        return data

    first, second, other = split(0), split(0), split(1)
    assert torch.equal(first.val_set.images, second.val_set.images)
    assert torch.equal(first.test_set.images, second.test_set.images)
    assert not torch.equal(first.val_set.images, other.val_set.images)


def test_folder_test_subfolder_is_the_test_split_not_a_class(folder):
    root, colours = folder
    test_colours = write_folder(root / "test", per_class=2, start=50)
    data = ImageFolderDataModule(str(root), SIZE, val_fraction=0.25)
    assert data.classes == ["cat", "dog"] and data.num_classes == 2
    data.setup()
    assert len(data.test_set) == 4 and len(data.train_set) + len(data.val_set) == 12
    found = identify(data.test_set.images, test_colours)
    assert [test_colours[c] for c in found] == data.test_set.labels.tolist()
    assert set(identify(torch.cat([data.train_set.images, data.val_set.images]), colours)) == set(colours)


def test_folder_test_subfolder_with_unknown_class_is_refused(folder):
    root, _ = folder
    write_folder(root / "test", classes=("cow",), per_class=1)
    with pytest.raises(ImageFolderError, match="test class folder .*cow is not a class"):
        ImageFolderDataModule(str(root), SIZE)


def test_flat_folder_is_one_class_and_grey_images_give_one_channel(tmp_path):
    for i in range(5):
        Image.new("L", (20 + i, 18), 40 * i).save(tmp_path / f"{i}.png")
    data = ImageFolderDataModule(str(tmp_path), SIZE, batch_size=2)
    assert data.data_shape == (1, SIZE, SIZE) and data.num_classes == 1
    data.setup()
    assert all((labels == 0).all() for _, labels in all_images(data))
    values = sorted(int(images[i, 0, 0, 0]) for images, _ in all_images(data) for i in range(len(images)))
    assert values == [0, 40, 80, 120, 160]
    x, _ = next(iter(data.train_dataloader()))
    assert x.shape == (2, 1, SIZE, SIZE)
    # one colour image makes the folder RGB, unless channels says otherwise
    Image.new("RGB", (20, 20), (255, 0, 0)).save(tmp_path / "red.png")
    assert ImageFolderDataModule(str(tmp_path), SIZE).data_shape == (3, SIZE, SIZE)
    assert ImageFolderDataModule(str(tmp_path), SIZE, channels=1).data_shape == (1, SIZE, SIZE)


def test_resize_keeps_the_centre(tmp_path):
    # A 48 x 16 image: left third black, middle white, right third black -> after resizing the
    # shorter side to 16 and centre-cropping, only the white middle is left.
    array = np.zeros((16, 48), np.uint8)
    array[:, 16:32] = 255
    for i in range(4):
        Image.fromarray(array).save(tmp_path / f"{i}.png")
    data = ImageFolderDataModule(str(tmp_path), SIZE, val_fraction=0.25, test_fraction=0.25)
    data.setup()
    assert (data.train_set.images == 255).all()


def test_cache_is_written_reused_and_invalidated(folder, tmp_path, monkeypatch):
    root, colours = folder
    cache = tmp_path / "cache"
    first = ImageFolderDataModule(str(root), SIZE, cache_dir=str(cache))
    first.prepare_data()
    first.setup()
    files = list(cache.iterdir())
    assert len(files) == 1 and files[0].suffix == ".pt"

    calls = []
    decode = image_folder.decode_image

    def counting(*args):
        calls.append(args[0])
        return decode(*args)

    def refuse(*args):
        raise AssertionError("decoded although the cache holds the images")

    monkeypatch.setattr(image_folder, "decode_image", refuse)
    second = ImageFolderDataModule(str(root), SIZE, cache_dir=str(cache))
    second.setup()
    for (a, la), (b, lb) in zip(all_images(first), all_images(second)):
        assert torch.equal(a, b) and torch.equal(la, lb)

    # Rewriting one file (new content, size and mtime) gives a new key: everything is decoded again.
    monkeypatch.setattr(image_folder, "decode_image", counting)
    changed = root / "cat" / "00.png"
    Image.new("RGB", (40, 30), (1, 2, 3)).save(changed)
    os.utime(changed, ns=(10**18, 10**18))
    third = ImageFolderDataModule(str(root), SIZE, cache_dir=str(cache))
    third.setup()
    assert len(calls) == 12 and len(list(cache.iterdir())) == 2
    assert (1, 2, 3) in identify(torch.cat([images for images, _ in all_images(third)]),
                                 {**colours, (1, 2, 3): 0})
    # image_size is part of the key too
    ImageFolderDataModule(str(root), 8, cache_dir=str(cache)).setup()
    assert len(list(cache.iterdir())) == 3


def test_cache_folder_inside_root_is_not_a_class(folder):
    root, _ = folder
    data = ImageFolderDataModule(str(root), SIZE, cache_dir=str(root / "cache"))
    data.setup()
    again = ImageFolderDataModule(str(root), SIZE, cache_dir=str(root / "cache"))
    assert again.classes == ["cat", "dog"]


def test_unreadable_images_are_skipped_with_a_warning(folder):
    root, _ = folder
    good = (root / "cat" / "00.png").read_bytes()
    (root / "cat" / "truncated.png").write_bytes(good[: len(good) // 2])
    (root / "dog" / "notes.jpg").write_text("not an image")
    with pytest.warns(UserWarning, match=r"skipped 2 of 14 image files .*truncated\.png.*notes\.jpg"):
        data = ImageFolderDataModule(str(root), SIZE)
        data.setup()
    assert sum(len(images) for images, _ in all_images(data)) == 12


def test_folder_of_only_unreadable_images_is_an_error(tmp_path):
    (tmp_path / "a.png").write_bytes(b"\x89PNG broken")
    with pytest.warns(UserWarning, match="skipped 1 of 1"), \
            pytest.raises(ImageFolderError, match="none of the 1 image files .* could be decoded"):
        ImageFolderDataModule(str(tmp_path), SIZE, channels=3).setup()


def test_missing_and_empty_folders_are_named(tmp_path):
    with pytest.raises(ImageFolderError, match=f"{tmp_path / 'nowhere'} does not exist"):
        ImageFolderDataModule(str(tmp_path / "nowhere"), SIZE)
    (tmp_path / "readme.txt").write_text("no images here")
    with pytest.raises(ImageFolderError) as error:
        ImageFolderDataModule(str(tmp_path), SIZE)
    message = str(error.value)
    assert f"no images in {tmp_path}" in message and ".png" in message and ".jpg" in message
    assert "\n" not in message
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(ImageFolderError, match="class folder .*empty_class holds no images"):
        ImageFolderDataModule(str(tmp_path), SIZE)


def test_too_few_images_to_split_is_explained(tmp_path):
    for i in range(2):
        Image.new("L", (8, 8), i).save(tmp_path / f"{i}.png")
    with pytest.raises(ImageFolderError, match="2 decoded images .* leave none to train on"):
        ImageFolderDataModule(str(tmp_path), SIZE).setup()


@pytest.mark.parametrize("kwargs", [dict(image_size=0), dict(channels=2), dict(val_fraction=0),
                                    dict(val_fraction=0.6, test_fraction=0.4), dict(batch_size=0)])
def test_folder_rejects_bad_arguments(folder, kwargs):
    root, _ = folder
    with pytest.raises(ValueError):
        ImageFolderDataModule(str(root), **{"image_size": SIZE, **kwargs})


def test_device_resident_batches_equal_the_loaders(folder):
    root, _ = folder
    loaded = ImageFolderDataModule(str(root), SIZE, batch_size=2, val_fraction=0.25)
    resident = ImageFolderDataModule(str(root), SIZE, batch_size=2, val_fraction=0.25, device_resident=True)
    for data in (loaded, resident):
        data.setup()
    for a, b in zip(loaded.val_dataloader(), resident.val_dataloader(), strict=True):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and b[0].dtype == torch.float32
    # training: the same examples over an epoch, as float in [0, 1] of the right shape
    x, y = next(iter(resident.train_dataloader()))
    assert x.shape == (2, 3, SIZE, SIZE) and y.dtype == torch.int64 and x.max() <= 1


def test_folder_predict_batches_carry_test_labels_and_indices(folder):
    root, _ = folder
    write_folder(root / "test", per_class=2, start=50)
    data = ImageFolderDataModule(str(root), SIZE, batch_size=2, num_predict_samples=3)
    data.setup("predict")
    batches = list(data.predict_dataloader())
    assert [len(x) for x, _, _ in batches] == [2, 1]
    assert torch.equal(torch.cat([y for _, y, _ in batches]), data.test_set.labels[:3])
    assert torch.equal(torch.cat([index for _, _, index in batches]), torch.arange(3))
    data.num_predict_samples = 5
    with pytest.raises(ValueError, match="num_predict_samples must be <= 4"):
        data.predict_dataloader()


# ----------------------------------------------------------------------------------- CIFAR-10
def as_images(data: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(data.reshape(-1, 3, 32, 32))


def test_cifar10_round_trips_pixels_and_labels(tmp_path):
    written = write_cifar10(tmp_path)
    data = CIFAR10DataModule(data_dir=str(tmp_path), batch_size=2, val_size=5, download=False)
    assert data.data_shape == (3, 32, 32) and data.num_classes == 10
    data.prepare_data()
    data.setup()
    assert data.classes[0] == "airplane" and len(data.classes) == 10
    assert (len(data.train_set), len(data.val_set), len(data.test_set)) == (15, 5, 3)
    test_data, test_labels = written["test_batch"]
    assert torch.equal(data.test_set.images, as_images(test_data))
    assert data.test_set.labels.tolist() == test_labels
    # train + val are the 20 training images with their labels, in some split order
    train = {bytes(image.numpy()): int(label) for images, labels in all_images(data)[:2]
             for image, label in zip(images, labels)}
    expected = {bytes(as_images(d)[i].numpy()): l[i] for name, (d, l) in written.items()
                if name != "test_batch" for i in range(len(l))}
    assert train == expected
    x, y = next(iter(data.test_dataloader()))
    assert torch.equal(x, as_images(test_data[:2]).float() / 255) and y.tolist() == test_labels[:2]


def test_cifar10_archive_is_extracted(tmp_path):
    source = tmp_path / "source"
    written = write_cifar10(source)
    with tarfile.open(tmp_path / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(source / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    data = CIFAR10DataModule(data_dir=str(tmp_path), val_size=2, download=False)
    data.prepare_data()
    data.setup("test")
    assert torch.equal(data.test_set.images, as_images(written["test_batch"][0]))


def test_cifar10_missing_files_and_failed_download_are_explained(tmp_path, monkeypatch):
    import torchvision.datasets

    with pytest.raises(CIFAR10DataError) as error:
        CIFAR10DataModule(data_dir=str(tmp_path), download=False).prepare_data()
    message = str(error.value)
    for name in CIFAR10_FILES:
        assert str(tmp_path / "cifar-10-batches-py" / name) in message
    assert "cifar-10-python.tar.gz" in message and "LIGHTNING_GEN_DATA" in message

    def offline(root, *args, **kwargs):
        (Path(root) / "cifar-10-batches-py").mkdir(parents=True, exist_ok=True)
        raise RuntimeError("no network")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    nowhere = tmp_path / "nowhere"
    with pytest.raises(CIFAR10DataError, match="download failed: no network"):
        CIFAR10DataModule(data_dir=str(nowhere), download=True).prepare_data()
    assert not nowhere.exists()


def test_cifar10_bad_batches_are_refused_without_running_them(tmp_path):
    write_cifar10(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "test_batch"

    class Payload:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "ran"),))

    path.write_bytes(pickle.dumps({b"data": Payload()}))
    data = CIFAR10DataModule(data_dir=str(tmp_path), val_size=2, download=False)
    with pytest.raises(CIFAR10DataError, match="test_batch is corrupt.*refers to"):
        data.setup("test")
    assert not (tmp_path / "ran").exists()
    buffer = io.BytesIO()
    pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, buffer)
    path.write_bytes(buffer.getvalue())
    with pytest.raises(CIFAR10DataError, match=r"must be uint8 \(N, 3072\)"):
        data.setup("test")
    path.write_bytes(buffer.getvalue()[:20])
    with pytest.raises(CIFAR10DataError, match="truncated"):
        data.setup("test")


def test_cifar10_val_size_must_leave_training_images(tmp_path):
    write_cifar10(tmp_path)
    with pytest.raises(ValueError, match="val_size=5000 leaves no training images of the 20"):
        CIFAR10DataModule(data_dir=str(tmp_path), download=False).setup("fit")


# ------------------------------------------------------------------------------ Fashion-MNIST
def idx_bytes(array: np.ndarray, magic: int) -> bytes:
    header = magic.to_bytes(4, "big") + b"".join(size.to_bytes(4, "big") for size in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_fashion_mnist(data_dir: Path, train: int = 10, test: int = 4, gzipped: bool = True) -> dict:
    rng = np.random.default_rng(1)
    raw = data_dir / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    written = {}
    for prefix, count in [("train", train), ("t10k", test)]:
        images = rng.integers(0, 256, (count, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, count, dtype=np.uint8)
        for name, array, magic in [(f"{prefix}-images-idx3-ubyte", images, 2051),
                                   (f"{prefix}-labels-idx1-ubyte", labels, 2049)]:
            content = idx_bytes(array, magic)
            if gzipped:
                (raw / f"{name}.gz").write_bytes(gzip.compress(content))
            else:
                (raw / name).write_bytes(content)
        written[prefix] = (images, labels)
    return written


def test_fashion_mnist_round_trips_pixels_and_labels(tmp_path):
    written = write_fashion_mnist(tmp_path)
    data = FashionMNISTDataModule(data_dir=str(tmp_path), batch_size=3, val_size=2, download=False)
    assert data.data_shape == (1, 28, 28) and data.num_classes == 10
    data.prepare_data()  # extracts the .gz files
    data.setup()
    assert (len(data.train_set), len(data.val_set), len(data.test_set)) == (8, 2, 4)
    images, labels = written["t10k"]
    assert torch.equal(data.test_set.images, torch.from_numpy(images))
    assert data.test_set.labels.tolist() == labels.tolist()
    x, y = next(iter(data.test_dataloader()))
    assert x.shape == (3, 1, 28, 28) and torch.equal(x[:, 0], torch.from_numpy(images[:3]).float() / 255)
    assert y.tolist() == labels[:3].tolist()
    train_images, train_labels = written["train"]
    together = torch.cat([data.train_set.images, data.val_set.images]).float().sum()
    assert torch.isclose(together, torch.from_numpy(train_images).float().sum())
    together_labels = torch.cat([data.train_set.labels, data.val_set.labels]).tolist()
    assert sorted(together_labels) == sorted(train_labels.tolist())


def test_fashion_mnist_missing_and_mismatched_files_are_explained(tmp_path, monkeypatch):
    import torchvision.datasets

    with pytest.raises(FashionMNISTDataError) as error:
        FashionMNISTDataModule(data_dir=str(tmp_path), download=False).prepare_data()
    message = str(error.value)
    assert "Fashion-MNIST files not found" in message and str(tmp_path / "FashionMNIST" / "raw") in message
    assert all(name in message for name in FASHION_MNIST_FILES)

    def offline(*args, **kwargs):
        raise RuntimeError("no network")

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", offline)
    with pytest.raises(FashionMNISTDataError, match="download failed: no network"):
        FashionMNISTDataModule(data_dir=str(tmp_path), download=True).prepare_data()

    write_fashion_mnist(tmp_path / "cut", gzipped=False)
    path = tmp_path / "cut" / "FashionMNIST" / "raw" / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(FashionMNISTDataError, match="t10k-images-idx3-ubyte is corrupt or truncated"):
        FashionMNISTDataModule(data_dir=str(tmp_path / "cut"), download=False).setup("test")


# ------------------------------------------------------------------------------- command line
def test_cli_fits_and_predicts_a_vae_on_an_image_folder(run_dir, tmp_path):
    root = tmp_path / "images"
    write_folder(root)
    write_folder(root / "test", per_class=2, start=50)
    config = str(CONFIGS / "vae_mnist.yaml")
    # --data replaces the config's MNISTDataModule; its init_args that the new class accepts
    # (batch_size) are kept, so batch_size is set after the class.
    data = ["--data", "datamodules.ImageFolderDataModule", "--data.init_args.root", str(root),
            "--data.init_args.image_size", str(SIZE), "--data.init_args.batch_size", "4",
            "--data.init_args.num_predict_samples", "3"]
    cli = run_cli("fit", "--config", config, *QUICK, "--trainer.max_steps", "2",
                  "--trainer.limit_val_batches", "2", "--trainer.num_sanity_val_steps", "0", *data)
    assert cli.model.data_shape == (3, SIZE, SIZE)
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])
    checkpoint = run_dir / "model.ckpt"
    cli.trainer.save_checkpoint(checkpoint)
    output = run_dir / "predictions"
    run_cli("predict", "--config", config, *QUICK, "--trainer.callbacks", "[]", "--ckpt_path",
            str(checkpoint), "--prediction_writer.output_dir", str(output), *data)
    samples = torch.load(output / "samples.pt")
    assert samples.shape == (3, 3, SIZE, SIZE) and samples.dtype == torch.uint8
