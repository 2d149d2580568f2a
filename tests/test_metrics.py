"""Evaluation metrics: FID/KID through a feature network, MMD and sliced Wasserstein, bits/dim,
and the callbacks that log them (including a 2-process CPU DDP fit)."""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch

from cli_helpers import CONFIGS, QUICK, REPO, run_cli
from datamodules import MNISTDataModule
from lightning_gen.base import GenerativeModule
from lightning_gen.callbacks import ImageQualityMetrics
from lightning_gen.metrics import (
    MNISTClassifier, bits_per_dim, extract_features, fid_kid_from_features, load_feature_network,
    mmd, real_features, sliced_wasserstein,
)


def save_classifier_checkpoint(path: Path, seed: int = 0) -> Path:
    """A tiny, untrained MNISTClassifier saved in Lightning's checkpoint format (random conv
    features separate clean from noisy digits well enough to test FID; no 99% network needed)."""
    torch.manual_seed(seed)
    model = MNISTClassifier(base_channels=4, feature_dim=16)
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams),
                "pytorch-lightning_version": L.__version__}, path)
    return path


def mnist_test_images(count: int) -> torch.Tensor:
    data = MNISTDataModule()
    data.setup("test")
    return data.test_set.images[:count].unsqueeze(1).float() / 255.0  # (N, 1, 28, 28)


def read_last_metrics(path: Path) -> dict[str, float]:
    """The last non-empty value of every column of a CSVLogger metrics.csv."""
    values: dict[str, float] = {}
    with open(path) as file:
        for row in csv.DictReader(file):
            values.update({key: float(value) for key, value in row.items() if value not in ("", None)})
    return values


# ------------------------------------------------------------------------------------ likelihood
def test_bits_per_dim_of_uniform_8bit_images_is_8():
    # A uniform distribution over 256 levels per pixel: nll = D ln 256 nats = 8 bits per dimension.
    num_dims = 784
    nll = torch.full((3,), num_dims * math.log(256.0))
    assert torch.allclose(bits_per_dim(nll, num_dims), torch.full((3,), 8.0))
    assert bits_per_dim(2 * math.log(2.0), 2) == pytest.approx(1.0)  # a fair coin per dimension
    with pytest.raises(ValueError, match="num_dims"):
        bits_per_dim(1.0, 0)


# ------------------------------------------------------------------------------------ FID / KID
def test_fid_of_a_set_against_itself_is_zero_and_grows_with_noise(mnist_root, tmp_path):
    network = load_feature_network(str(save_classifier_checkpoint(tmp_path / "features.ckpt")))
    images = mnist_test_images(600)
    real = extract_features(network, images)
    generator = torch.Generator().manual_seed(0)
    fids, kids = [], []
    for noise_std in (0.0, 0.1, 0.3, 0.6):
        noisy = (images + noise_std * torch.randn(images.shape, generator=generator)).clamp(0, 1)
        fid, kid = fid_kid_from_features(real, extract_features(network, noisy), kid_subset_size=200,
                                         kid_subsets=20)
        fids.append(float(fid))
        kids.append(float(kid))
    assert abs(fids[0]) < 1e-3 * fids[1], fids
    assert fids[0] < fids[1] < fids[2] < fids[3], fids
    assert abs(kids[0]) < 0.1 * kids[1] and kids[1] < kids[2] < kids[3], kids


def test_real_features_are_cached_under_a_key_of_network_and_data(mnist_root, tmp_path):
    checkpoint = str(save_classifier_checkpoint(tmp_path / "a.ckpt", seed=0))
    network = load_feature_network(checkpoint)
    images = mnist_test_images(100)
    cache = tmp_path / "cache"
    first = real_features(network, checkpoint, images, cache)
    assert len(list(cache.iterdir())) == 1
    # Read back from disk, not recomputed: a different network object under the same checkpoint
    # path and bytes returns the cached values.
    other_network = load_feature_network(str(save_classifier_checkpoint(tmp_path / "b.ckpt", seed=1)))
    assert torch.equal(real_features(other_network, checkpoint, images, cache), first)
    assert len(list(cache.iterdir())) == 1
    real_features(network, checkpoint, images[:50], cache)  # other data: a new entry
    assert len(list(cache.iterdir())) == 2
    save_classifier_checkpoint(tmp_path / "a.ckpt", seed=2)  # the network changed: a new entry
    changed = real_features(load_feature_network(checkpoint), checkpoint, images, cache)
    assert len(list(cache.iterdir())) == 3 and not torch.equal(changed, first)
    real_features(network, checkpoint, images, cache, name="MNISTDataModule")  # named by its data set
    assert len(list(cache.glob("MNISTDataModule-*-100.pt"))) == 1


def test_feature_network_choice_is_checked(tmp_path):
    with pytest.raises(ValueError, match="inception"):
        load_feature_network(str(tmp_path / "missing.ckpt"))
    with pytest.raises(ValueError, match="inception"):
        load_feature_network("")
    # An explicit path that does not exist is a mistake, reported before any training.
    with pytest.raises(ValueError, match="no file at"):
        ImageQualityMetrics(feature_network=str(tmp_path / "missing.ckpt"))
    ImageQualityMetrics(feature_network="inception")  # option (a) is selectable; loaded on first use


def test_inception_without_its_weights_is_a_clear_error(monkeypatch):
    import urllib.error

    import torch_fidelity.feature_extractor_inceptionv3 as inception

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    # As on a machine without network access and without the weights in torch.hub's cache.
    monkeypatch.setattr(inception, "load_state_dict_from_url", offline)
    with pytest.raises(RuntimeError, match="inception.*configs/mnist_features.yaml"):
        load_feature_network("inception")


class SamplingImageModel(GenerativeModule):
    """An image model of the callbacks' contract whose sampling must not be reached."""

    def __init__(self) -> None:
        super().__init__((1, 28, 28), learning_rate=1e-3)

    def sample(self, num_samples: int) -> torch.Tensor:
        raise AssertionError("must not sample without a feature network")


def test_inception_without_torch_fidelity_names_the_extra(monkeypatch):
    import torchmetrics.image.fid as torchmetrics_fid

    monkeypatch.setattr(torchmetrics_fid, "_TORCH_FIDELITY_AVAILABLE", False)
    with pytest.raises(ModuleNotFoundError, match=r"lightning-gen\[inception\]"):
        load_feature_network("inception")


def test_image_callback_warns_and_skips_without_feature_network(monkeypatch, tmp_path):
    missing = str(tmp_path / "missing.ckpt")
    monkeypatch.setenv("LIGHTNING_GEN_FEATURE_NETWORK", missing)
    callback = ImageQualityMetrics()  # the default path: $LIGHTNING_GEN_FEATURE_NETWORK here
    trainer = SimpleNamespace(datamodule=MNISTDataModule(download=False))
    with pytest.warns(UserWarning, match="no feature network at .*missing.ckpt"):
        callback._run(trainer=trainer, pl_module=SamplingImageModel(), stage="val")  # returns before sampling


class HeldOutImages(L.LightningDataModule):
    """A data module of any image shape whose test split is ``images`` (labels 0)."""

    def __init__(self, images: torch.Tensor) -> None:
        super().__init__()
        self.images = images

    def test_dataloader(self):
        return torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(self.images, torch.zeros(len(self.images), dtype=torch.long)),
            batch_size=7)


def test_image_callback_compares_with_the_data_modules_own_test_images(mnist_root, tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTNING_GEN_FEATURE_NETWORK", str(tmp_path / "missing.ckpt"))
    images = torch.rand(20, 3, 8, 8)
    trainer = SimpleNamespace(datamodule=HeldOutImages(images))
    assert torch.equal(ImageQualityMetrics(num_real=16)._real_images(trainer), images[:16])
    # Data other than MNIST is scored with Inception's features unless told otherwise...
    callback = ImageQualityMetrics()
    model = SamplingImageModel()
    model.data_shape = (3, 8, 8)
    assert callback._skip(trainer, model) is False and callback.feature_network == "inception"
    # ...and an MNIST feature network refuses images of another shape in one line.
    network = tmp_path / "features.ckpt"
    network.write_bytes(b"not read before the shape check")
    with pytest.raises(ValueError, match="set --image_quality.feature_network inception"):
        ImageQualityMetrics(feature_network=str(network))._skip(trainer, model)
    # MNIST keeps its own feature network as the default.
    mnist = SimpleNamespace(datamodule=MNISTDataModule(data_dir=str(mnist_root), download=False))
    missing = ImageQualityMetrics()
    with pytest.warns(UserWarning, match="no feature network"):
        assert missing._skip(mnist, SamplingImageModel()) is True
    assert missing.feature_network is None


def test_cli_test_reports_fid_and_kid_with_the_default_feature_network(run_dir, mnist_root, monkeypatch, capfd):
    checkpoint = save_classifier_checkpoint(run_dir / "features.ckpt")
    monkeypatch.setenv("LIGHTNING_GEN_FEATURE_NETWORK", str(checkpoint))
    monkeypatch.setenv("LIGHTNING_GEN_CACHE", str(run_dir / "cache"))
    common = [*QUICK, "--trainer.callbacks", "[]", "--trainer.limit_test_batches", "2",
              "--data.init_args.batch_size", "16"]
    cli = run_cli("fit", "--config", str(CONFIGS / "vae_mnist.yaml"), *common, "--trainer.max_steps", "1",
                  "--trainer.limit_val_batches", "2", "--trainer.num_sanity_val_steps", "0",
                  "--model.init_args.test_importance_samples", "2")
    assert "val/fid" not in cli.trainer.callback_metrics  # quality metrics: after test only, by default
    cli.trainer.save_checkpoint(run_dir / "vae.ckpt")
    # No FID option on the command line: small N only to keep the test fast.
    tested = run_cli("test", "--config", str(CONFIGS / "vae_mnist.yaml"), *common,
                     "--ckpt_path", str(run_dir / "vae.ckpt"), "--image_quality.num_samples", "40",
                     "--image_quality.num_real", "200", "--image_quality.batch_size", "20",
                     "--trainer.enable_progress_bar", "true")
    assert "test/fid: sampling" in capfd.readouterr().err  # sampling shows its progress
    metrics = tested.trainer.callback_metrics
    assert {"test/nll", "test/bpd", "test/fid", "test/kid"} <= set(metrics), set(metrics)
    assert math.isfinite(float(metrics["test/fid"])) and float(metrics["test/fid"]) > 0
    assert "test/mmd" not in metrics  # the 2-D metrics do not apply to images

    # The classifier has its own command (cli.py features); it draws no samples, so no FID.
    classifier = run_cli("features", "test", "--config", str(CONFIGS / "mnist_features.yaml"), *common,
                         "--model.init_args.base_channels", "4", "--model.init_args.feature_dim", "16")
    assert "test/accuracy" in classifier.trainer.callback_metrics
    assert "test/fid" not in classifier.trainer.callback_metrics


def test_cli_test_reports_distances_on_two_d_data(run_dir):
    common = [*QUICK, "--trainer.callbacks", "[]", "--trainer.limit_test_batches", "2"]
    cli = run_cli("fit", "--config", str(CONFIGS / "realnvp_moons.yaml"), *common,
                  "--trainer.max_steps", "2", "--trainer.limit_val_batches", "2",
                  "--trainer.num_sanity_val_steps", "0")
    cli.trainer.save_checkpoint(run_dir / "flow.ckpt")
    tested = run_cli("test", "--config", str(CONFIGS / "realnvp_moons.yaml"), *common,
                     "--ckpt_path", str(run_dir / "flow.ckpt"))
    metrics = tested.trainer.callback_metrics
    assert {"test/nll", "test/mmd", "test/sliced_wasserstein"} <= set(metrics), set(metrics)
    assert "test/fid" not in metrics
    assert float(metrics["test/mmd"]) > 0 and float(metrics["test/sliced_wasserstein"]) > 0


# ------------------------------------------------------------------------------------ 2-D distances
def test_mmd_and_sliced_wasserstein_are_zero_on_identical_sets_and_grow_with_shift():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(600, 2, generator=generator)
    assert mmd(x, x) == 0 and sliced_wasserstein(x, x) == 0
    shifts = [0.25, 0.5, 1.0, 2.0]
    direction = torch.tensor([0.6, 0.8])  # unit vector
    mmds = [float(mmd(x, x + s * direction)) for s in shifts]
    distances = [float(sliced_wasserstein(x, x + s * direction, num_projections=1024)) for s in shifts]
    assert 0 < mmds[0] < mmds[1] < mmds[2] < mmds[3], mmds
    assert 0 < distances[0] < distances[1] < distances[2] < distances[3], distances
    for shift, distance in zip(shifts, distances):  # E[(theta.s)^2] = |s|^2 / D for D = 2
        assert distance == pytest.approx(shift / math.sqrt(2.0), rel=0.03)
    # Sets of different sizes from the same distribution are close; a shifted one is not.
    y = torch.randn(400, 2, generator=generator)
    assert float(sliced_wasserstein(x, y)) < 0.3 * distances[2]
    assert float(mmd(x, y)) < 0.2 * mmds[2]
    with pytest.raises(ValueError, match="bandwidths"):
        mmd(x, y, bandwidths=[0.0])
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        sliced_wasserstein(x, torch.randn(5, 3))


def test_two_d_callback_logs_mmd_and_sliced_wasserstein(run_dir):
    cli = run_cli("fit", "--config", str(CONFIGS / "vae_8gaussians.yaml"), *QUICK,
                  "--trainer.callbacks", "[]", "--trainer.max_steps", "2", "--trainer.limit_train_batches", "2",
                  "--trainer.limit_val_batches", "2", "--trainer.num_sanity_val_steps", "0",
                  "--sample_distance.every_n_epochs", "1", "--sample_distance.num_samples", "300")
    metrics = cli.trainer.callback_metrics
    assert float(metrics["val/mmd"]) > 0 and float(metrics["val/sliced_wasserstein"]) > 0


# ------------------------------------------------------------------------------------ DDP
@pytest.mark.slow
def test_fid_callback_in_a_two_process_ddp_fit(run_dir, mnist_root):
    checkpoint = save_classifier_checkpoint(run_dir / "features.ckpt")
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "offline"}
    args = [
        "fit", "--config", str(CONFIGS / "vae_mnist.yaml"),
        "--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir", "logs",
        "--trainer.enable_progress_bar", "false", "--trainer.accelerator", "cpu",
        "--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.max_steps", "2",
        "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "2",
        "--trainer.num_sanity_val_steps", "0", "--data.batch_size", "16",
        "--model.base_channels", "4", "--model.hidden_dims", "[16]", "--model.latent_dim", "4",
        "--model.val_importance_samples", "2", "--sample_logger.every_n_epochs", "0",
        "--image_quality.every_n_epochs", "1", "--image_quality.feature_network", str(checkpoint),
        "--image_quality.num_samples", "41",  # odd: the ranks draw 21 and 20
        "--image_quality.num_real", "300", "--image_quality.batch_size", "16",
        "--image_quality.cache_dir", str(run_dir / "cache"),
    ]
    result = subprocess.run([sys.executable, str(REPO / "cli.py"), *args], cwd=run_dir, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (metrics_file,) = (run_dir / "logs").glob("*/version_0/metrics.csv")
    metrics = read_last_metrics(metrics_file)
    assert math.isfinite(metrics["val/fid"]) and metrics["val/fid"] > 0, metrics
    assert math.isfinite(metrics["val/kid"]), metrics
    assert len(list((run_dir / "cache").iterdir())) == 1  # rank zero cached the real features once
