"""Data modules: shapes, ranges, split sizes, determinism, and clear errors for bad data."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import pytest
import torch

from datamodules import MNISTDataModule, ToyDataModule, sample_toy
from datamodules.mnist import MNIST_FILES, MNISTDataError
from datamodules.toy import EIGHT_GAUSSIANS_RADIUS, EIGHT_GAUSSIANS_STD, TOY_DISTRIBUTIONS


# ------------------------------------------------------------------------------------ MNIST
def test_mnist_shapes_ranges_and_splits(mnist_root):
    data = MNISTDataModule(data_dir=str(mnist_root), batch_size=32, val_size=5000, download=False)
    data.prepare_data()
    data.setup("fit")
    data.setup("test")
    assert (len(data.train_set), len(data.val_set), len(data.test_set)) == (55000, 5000, 10000)
    x, y = next(iter(data.train_dataloader()))
    assert x.shape == (32, 1, 28, 28) and x.dtype == torch.float32
    assert y.shape == (32,) and y.dtype == torch.int64
    assert 0 <= x.min() and x.max() <= 1 and x.max() > 0.99  # full [0, 1] range, not [0, 1/255]
    assert set(data.test_set.labels.unique().tolist()) == set(range(10))


def test_mnist_split_is_fixed_by_seed_and_disjoint(mnist_root):
    def split(seed):
        data = MNISTDataModule(data_dir=str(mnist_root), split_seed=seed, download=False)
        data.setup("fit")
        return data

    first, second, other = split(0), split(0), split(1)
    assert torch.equal(first.val_set.images, second.val_set.images)
    assert not torch.equal(first.val_set.images, other.val_set.images)
    # Train and val come from disjoint index sets of the 60k: together they are all 60k images.
    total = first.train_set.images.float().sum() + first.val_set.images.float().sum()
    full = MNISTDataModule(data_dir=str(mnist_root), download=False)._load(train=True)
    assert torch.isclose(total, full.images.float().sum())


def test_mnist_predict_loader_yields_test_prefix(mnist_root):
    data = MNISTDataModule(data_dir=str(mnist_root), batch_size=5, num_predict_samples=12, download=False)
    data.setup("predict")
    batches = list(data.predict_dataloader())
    assert [len(x) for x, _, _ in batches] == [5, 5, 2]
    index = torch.cat([index for _, _, index in batches])
    assert torch.equal(index, torch.arange(12))  # the global indices of the test prefix
    x, y, _ = batches[1]
    assert torch.equal(y, data.test_set.labels[5:10]) and x.dtype == torch.float32 and x.max() <= 1
    too_many = MNISTDataModule(data_dir=str(mnist_root), num_predict_samples=20000, download=False)
    too_many.setup("predict")
    with pytest.raises(ValueError, match="num_predict_samples must be <= 10000"):
        too_many.predict_dataloader()


def test_mnist_missing_files_error_names_folder_and_files(tmp_path):
    data = MNISTDataModule(data_dir=str(tmp_path), download=False)
    with pytest.raises(MNISTDataError) as error:
        data.prepare_data()
    message = str(error.value)
    assert str(tmp_path / "MNIST" / "raw") in message
    for name in MNIST_FILES:
        assert name in message
    assert "LIGHTNING_GEN_DATA" in message


def test_mnist_download_failure_is_explained(tmp_path, monkeypatch):
    import torchvision.datasets

    def offline(*args, **kwargs):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz: no network")

    # The download is replaced by a failing stand-in, so this runs offline: it checks the message
    # a user without a network gets, not torchvision's download.
    monkeypatch.setattr(torchvision.datasets, "MNIST", offline)
    with pytest.raises(MNISTDataError, match="download failed.*no network"):
        MNISTDataModule(data_dir=str(tmp_path), download=True).prepare_data()


def _copy_raw(mnist_root, target):
    raw = target / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in MNIST_FILES:  # the fastest level: the default 9 made this test take 25 s in CI
        shutil.copy(mnist_root / "MNIST" / "raw" / name, raw / name)
    return raw


def test_mnist_truncated_file_gives_clear_error(mnist_root, tmp_path):
    raw = _copy_raw(mnist_root, tmp_path)
    path = raw / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:100000])
    data = MNISTDataModule(data_dir=str(tmp_path), download=False)
    with pytest.raises(MNISTDataError, match="t10k-images-idx3-ubyte is corrupt or truncated"):
        data.setup("test")


def test_mnist_wrong_header_gives_clear_error(mnist_root, tmp_path):
    raw = _copy_raw(mnist_root, tmp_path)
    path = raw / "train-labels-idx1-ubyte"
    content = bytearray(path.read_bytes())
    content[3] = 0x03  # magic 2049 -> 2051
    path.write_bytes(bytes(content))
    with pytest.raises(MNISTDataError, match="expected magic 2049"):
        MNISTDataModule(data_dir=str(tmp_path), download=False).setup("fit")


def test_mnist_gzipped_files_are_extracted(mnist_root, tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in MNIST_FILES:
        with open(mnist_root / "MNIST" / "raw" / name, "rb") as src, gzip.open(raw / f"{name}.gz", "wb", compresslevel=1) as dst:
            shutil.copyfileobj(src, dst)
    data = MNISTDataModule(data_dir=str(tmp_path), download=False)
    data.prepare_data()
    data.setup("test")
    assert len(data.test_set) == 10000


def test_mnist_corrupt_gzip_gives_clear_error(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    (raw / "train-images-idx3-ubyte.gz").write_bytes(b"not a gzip file")
    with pytest.raises(MNISTDataError, match="is corrupt .* Delete it"):
        MNISTDataModule(data_dir=str(tmp_path), download=False).prepare_data()


def test_mnist_unwritable_folder_is_not_called_corrupt(mnist_root, tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    name = "train-images-idx3-ubyte"
    with open(mnist_root / "MNIST" / "raw" / name, "rb") as src, gzip.open(raw / f"{name}.gz", "wb", compresslevel=1) as dst:
        shutil.copyfileobj(src, dst)
    good = (raw / f"{name}.gz").read_bytes()
    # The extraction target cannot be created (a folder stands in its way): as a read-only folder
    # would refuse it, but also for root, who ignores permission bits.
    (raw / f"{name}.partial").mkdir()
    with pytest.raises(MNISTDataError) as error:
        MNISTDataModule(data_dir=str(tmp_path), download=False).prepare_data()
    message = str(error.value)
    assert "cannot be written" in message and "Delete" not in message and "corrupt" not in message
    assert (raw / f"{name}.gz").read_bytes() == good


def test_mnist_failed_download_leaves_no_empty_folders(tmp_path, monkeypatch):
    import torchvision.datasets

    def offline(root, *args, **kwargs):  # as torchvision does: the folders first, then the fetch
        (Path(root) / "MNIST" / "raw").mkdir(parents=True, exist_ok=True)
        raise RuntimeError("no network")

    monkeypatch.setattr(torchvision.datasets, "MNIST", offline)
    nowhere = tmp_path / "nowhere"
    with pytest.raises(MNISTDataError, match="download failed"):
        MNISTDataModule(data_dir=str(nowhere), download=True).prepare_data()
    assert not nowhere.exists()


def test_mnist_val_size_leaving_less_than_a_batch_fails_before_training(mnist_root):
    data = MNISTDataModule(data_dir=str(mnist_root), val_size=59999, batch_size=128, download=False)
    data.setup("fit")
    with pytest.raises(ValueError, match="less than one batch"):
        data.train_dataloader()


def test_mnist_data_dir_defaults_to_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("LIGHTNING_GEN_DATA", str(tmp_path))
    assert MNISTDataModule().data_dir == tmp_path


@pytest.mark.parametrize("kwargs", [dict(batch_size=0), dict(num_workers=-1), dict(val_size=0),
                                    dict(val_size=60000), dict(num_predict_samples=0)])
def test_mnist_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        MNISTDataModule(**kwargs)


# -------------------------------------------------------------------------------------- toy
@pytest.mark.parametrize("name", sorted(TOY_DISTRIBUTIONS))
def test_toy_shapes_splits_and_determinism(name):
    data = ToyDataModule(name, num_train=300, num_val=100, num_test=200, batch_size=50, seed=3)
    data.setup("fit")
    assert [len(s) for s in (data.train_set, data.val_set, data.test_set)] == [300, 100, 200]
    x, y = next(iter(data.train_dataloader()))
    assert x.shape == (50, 2) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.isfinite(x).all()
    assert 0 <= y.min() and y.max() < data.num_classes
    again = ToyDataModule(name, num_train=300, num_val=100, num_test=200, seed=3)
    again.setup("fit")
    assert torch.equal(data.test_set.tensors[0], again.test_set.tensors[0])
    # The three splits are different draws.
    assert not torch.equal(data.val_set.tensors[0][:100], data.test_set.tensors[0][:100])
    # The points spread over the plane (not a degenerate cloud).
    assert (data.train_set.tensors[0].std(0) > 0.3).all()


def test_toy_unknown_name_lists_valid_ones():
    with pytest.raises(ValueError) as error:
        ToyDataModule("spiral")
    for name in TOY_DISTRIBUTIONS:
        assert name in str(error.value)


def test_eight_gaussians_matches_its_definition():
    x, y = sample_toy("8gaussians", 40000, seed=0)
    angle = y.float() * torch.pi / 4
    centers = EIGHT_GAUSSIANS_RADIUS * torch.stack([angle.cos(), angle.sin()], 1)
    residual = x - centers
    assert residual.mean(0).abs().max() < 0.01
    assert torch.allclose(residual.std(0), torch.full((2,), EIGHT_GAUSSIANS_STD), rtol=0.02)
    assert torch.bincount(y, minlength=8).min() > 4500  # all eight modes, about equally


def test_checkerboard_is_uniform_on_dark_squares():
    x, square = sample_toy("checkerboard", 40000, seed=0)
    assert x.abs().max() <= 4
    column = torch.floor(x[:, 0] / 2) + 2
    row = torch.floor(x[:, 1] / 2) + 2
    assert ((column + row) % 2 == 0).all()  # only the squares of one colour are ever hit
    assert torch.bincount(square, minlength=8).min() > 4500


def test_predict_batches_deal_whole_batches_to_ranks():
    from datamodules.loaders import PredictBatches

    points = torch.arange(11.0)[:, None]
    ranks = [list(PredictBatches((points,), 4, rank=rank, world_size=2)) for rank in range(2)]
    assert [index.tolist() for _, index in ranks[0]] == [[0, 1, 2, 3], [8, 9, 10]]
    assert [index.tolist() for _, index in ranks[1]] == [[4, 5, 6, 7]]
    # a rank without a batch of the grid yields one empty batch, so it still joins the gathering
    alone = list(PredictBatches((points,), 16, rank=1, world_size=2))
    assert len(alone) == 1 and len(alone[0][0]) == 0


def test_resumable_loader_continues_an_epoch_where_it_stopped():
    from torch.utils.data import TensorDataset

    from datamodules.loaders import ResumableLoader

    data = TensorDataset(torch.arange(40))
    done = {"batches": 0}
    loader = ResumableLoader(data, batch_size=4, seed=3, progress=lambda: done["batches"])
    loader.sampler.set_epoch(2)
    whole = [batch[0].tolist() for batch in loader]
    done["batches"] = 3
    state = loader.state_dict()
    assert state == {"epoch": 2, "batches_done": 3}
    resumed = ResumableLoader(data, batch_size=4, seed=3)
    resumed.load_state_dict(state)
    resumed.sampler.set_epoch(2)
    assert [batch[0].tolist() for batch in resumed] == whole[3:]
    assert [batch[0].tolist() for batch in resumed] == whole  # the next pass is whole again
    before = torch.get_rng_state()
    iter(resumed)
    assert torch.equal(torch.get_rng_state(), before)  # starting an epoch draws nothing global
