"""Autoencoder: the Gaussian fitted to training codes, and generation from it."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from datamodules import ToyDataModule
from lightning_gen import Autoencoder


def test_fitted_gaussian_matches_the_codes_statistics():
    torch.manual_seed(0)
    model = Autoencoder(data_shape=(2,), latent_dim=3, hidden_dims=(8,), reconstruction_loss="mse")
    mixing = torch.tensor([[1.0, 0.0, 0.0], [0.5, 2.0, 0.0], [-1.0, 0.3, 0.5]])
    codes = torch.randn(5000, 3) @ mixing.T + torch.tensor([1.0, -2.0, 0.5])
    for chunk in codes.split(700):
        model._accumulate_codes(chunk)
    model.fit_latent_gaussian(model._code_count, model._code_sum, model._code_outer_sum)
    torch.testing.assert_close(model.latent_mean, codes.mean(0), atol=1e-5, rtol=1e-5)
    covariance = model.latent_scale_tril @ model.latent_scale_tril.T
    torch.testing.assert_close(covariance, torch.cov(codes.T), atol=1e-4, rtol=1e-4)


def test_training_fits_the_latent_gaussian_and_checkpoint_keeps_it(tmp_path):
    torch.manual_seed(0)
    data = ToyDataModule("moons", num_train=256, num_val=64, num_test=64, batch_size=64)
    model = Autoencoder(data_shape=(2,), latent_dim=2, hidden_dims=(16,), reconstruction_loss="mse")
    trainer = L.Trainer(accelerator="cpu", max_epochs=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, datamodule=data)
    assert not torch.equal(model.latent_scale_tril, torch.eye(2))  # fitted, not the initial identity
    # The fitted Gaussian is that of the last epoch's codes: check against fresh codes of the data.
    with torch.no_grad():
        codes = model.encode(data.train_set.tensors[0])
    assert (model.latent_mean - codes.mean(0)).abs().max() < 0.5 * codes.std(0).max()
    path = tmp_path / "ae.ckpt"
    trainer.save_checkpoint(path)
    reloaded = Autoencoder.load_from_checkpoint(path)
    torch.testing.assert_close(reloaded.latent_mean, model.latent_mean)
    torch.testing.assert_close(reloaded.latent_scale_tril, model.latent_scale_tril)


def test_samples_follow_the_fitted_gaussian():
    model = Autoencoder(data_shape=(2,), latent_dim=2, hidden_dims=(4,), reconstruction_loss="mse")
    model.latent_mean.fill_(3.0)
    model.latent_scale_tril.copy_(torch.tensor([[2.0, 0.0], [1.0, 0.5]]))
    captured = {}
    model.decode = lambda z: captured.setdefault("z", z)  # look at the codes sample() decodes
    torch.manual_seed(0)
    model.sample(20000)
    z = captured["z"]
    torch.testing.assert_close(z.mean(0), torch.full((2,), 3.0), atol=0.05, rtol=0)
    torch.testing.assert_close(torch.cov(z.T), torch.tensor([[4.0, 2.0], [2.0, 1.25]]), atol=0.1, rtol=0)


def test_bce_needs_images():
    with pytest.raises(ValueError, match="use 'mse' for vectors"):
        Autoencoder(data_shape=(2,), reconstruction_loss="bce")
    with pytest.raises(ValueError, match="reconstruction_loss must be one of"):
        Autoencoder(reconstruction_loss="l1")
