"""Callbacks: sample pictures reach every kind of logger; latent pictures; the prediction writer."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger

from datamodules import MNISTDataModule, ToyDataModule
from lightning_gen import VAE
from lightning_gen.callbacks import LatentInterpolation, SampleLogger, interpolate, write_samples


def _fit(model, data, logger, callbacks, root):
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=2, limit_val_batches=2,
                        num_sanity_val_steps=0, logger=logger, callbacks=callbacks,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=str(root))
    trainer.fit(model, datamodule=data)
    return trainer


def _tiny_vae(shape, latent_dim=2):
    return VAE(shape, network="mlp", latent_dim=latent_dim, hidden_dims=(16,), val_importance_samples=2)


def test_csv_logger_gets_png_files_for_samples_interpolation_and_latent_map(tmp_path, mnist_root):
    data = MNISTDataModule(data_dir=str(mnist_root), batch_size=16, download=False)
    logger = CSVLogger(str(tmp_path), name="csv")
    _fit(_tiny_vae(data.data_shape), data, logger,
         [SampleLogger(num_samples=9), LatentInterpolation(num_pairs=3, num_steps=4)], tmp_path)
    media = sorted(path.name for path in (Path(logger.log_dir) / "media").iterdir())
    assert media == ["val_interpolation_step0000002.png", "val_latent_space_step0000002.png",
                     "val_samples_step0000002.png"]


def test_tensorboard_logger_gets_images(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data = ToyDataModule("moons", num_train=64, num_val=32, num_test=32, batch_size=16)
    logger = TensorBoardLogger(str(tmp_path), name="tb")
    _fit(_tiny_vae(data.data_shape), data, logger, [SampleLogger(num_samples=50)], tmp_path)
    events = EventAccumulator(logger.log_dir)
    events.Reload()
    assert "val/samples" in events.Tags()["images"]
    assert "val/loss" in events.Tags()["scalars"]


def test_wandb_offline_run_has_metrics_and_media(tmp_path, monkeypatch, mnist_root):
    monkeypatch.setenv("WANDB_MODE", "offline")
    data = MNISTDataModule(data_dir=str(mnist_root), batch_size=16, download=False)
    logger = WandbLogger(project="lightning-gen-test", save_dir=str(tmp_path))
    _fit(_tiny_vae(data.data_shape), data, logger, [SampleLogger(num_samples=4)], tmp_path)
    import wandb

    wandb.finish()
    run_dirs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(run_dirs) == 1
    images = list((run_dirs[0] / "files" / "media" / "images").rglob("*.png"))
    assert any("samples" in str(path) for path in images), images


def test_interpolation_ends_at_the_reconstructions():
    torch.manual_seed(0)
    model = _tiny_vae((1, 28, 28), latent_dim=3).eval()
    x = torch.rand(4, 1, 28, 28)
    rows = interpolate(model, x[:2], x[2:], num_steps=5)
    assert rows.shape == (2, 5, 1, 28, 28)
    torch.testing.assert_close(rows[:, 0], model.decode(model.encode(x[:2])))
    torch.testing.assert_close(rows[:, -1], model.decode(model.encode(x[2:])))
    with pytest.raises(ValueError, match="num_steps"):
        interpolate(model, x[:2], x[2:], num_steps=1)


def test_write_samples_images_and_vectors(tmp_path):
    images = torch.rand(3, 1, 8, 8)
    write_samples(images, tmp_path / "images")
    saved = torch.load(tmp_path / "images" / "samples.pt")
    assert saved.dtype == torch.uint8 and saved.shape == (3, 1, 8, 8)
    torch.testing.assert_close(saved, (images * 255).round().to(torch.uint8))
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == [
        "000000.png", "000001.png", "000002.png", "grid.png", "samples.pt"]
    write_samples(torch.randn(10, 2), tmp_path / "points")
    assert sorted(p.name for p in (tmp_path / "points").iterdir()) == ["samples.pt", "scatter.png"]
    with pytest.raises(ValueError, match="expected images"):
        write_samples(torch.rand(2, 3, 4), tmp_path / "bad")


def test_sample_logger_rejects_bad_arguments():
    with pytest.raises(ValueError, match="num_samples"):
        SampleLogger(num_samples=0)
    with pytest.raises(ValueError, match="every_n_epochs"):
        SampleLogger(every_n_epochs=-1)
