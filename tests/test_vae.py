"""VAE: the closed-form KL, the importance-weighted bound, and training on a small batch."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_gen import VAE
from lightning_gen.vae.module import diagonal_gaussian_log_density, gaussian_kl_to_standard_normal


def test_closed_form_kl_equals_monte_carlo_estimate():
    torch.manual_seed(0)
    mu = torch.randn(3, 4)
    logvar = torch.randn(3, 4) * 0.5
    z = mu + torch.exp(0.5 * logvar) * torch.randn(200_000, 3, 4)  # (S, 3, 4) draws from q
    log_ratio = diagonal_gaussian_log_density(z, mu, logvar) - diagonal_gaussian_log_density(
        z, torch.zeros_like(z), torch.zeros_like(z))  # (S, 3)
    estimate = log_ratio.mean(0)
    standard_error = log_ratio.std(0) / math.sqrt(len(z))
    exact = gaussian_kl_to_standard_normal(mu, logvar)
    assert ((estimate - exact).abs() < 5 * standard_error).all(), (estimate, exact, standard_error)
    assert (exact > 0).all()


def test_kl_is_zero_for_the_prior():
    assert torch.allclose(gaussian_kl_to_standard_normal(torch.zeros(2, 5), torch.zeros(2, 5)),
                          torch.zeros(2))


def _batch(mnist_root, size=16):
    from datamodules import MNISTDataModule

    data = MNISTDataModule(data_dir=str(mnist_root), batch_size=size, download=False)
    data.setup("fit")
    return next(iter(data.val_dataloader()))


def test_importance_weighted_bound_tightens_as_k_grows(mnist_root):
    torch.manual_seed(0)
    model = VAE(network="mlp", latent_dim=8, hidden_dims=(64,)).eval()
    x = torch.bernoulli(_batch(mnist_root, 32)[0])
    nll = {}
    for k in (1, 10, 100):
        torch.manual_seed(1)
        nll[k] = torch.stack([-model.log_prob(x, num_samples=k) for _ in range(5)]).mean()
    assert nll[1] > nll[10] > nll[100]
    # K = 1 is the ELBO: compare with the training objective's two terms (beta = 1).
    torch.manual_seed(2)
    reconstruction, kl = model.negative_elbo_terms(x)
    negative_elbo = torch.stack([sum(model.negative_elbo_terms(x)).mean() for _ in range(20)]).mean()
    assert abs(negative_elbo - nll[1]) < 0.02 * nll[1]
    assert reconstruction.shape == kl.shape == (32,)


def test_log_prob_chunking_does_not_change_the_bound(mnist_root):
    model = VAE(network="mlp", latent_dim=4, hidden_dims=(32,)).eval()
    x = torch.bernoulli(_batch(mnist_root, 4)[0])
    torch.manual_seed(0)
    whole = model.log_prob(x, num_samples=30, chunk_size=30)
    torch.manual_seed(0)
    chunked = model.log_prob(x, num_samples=30, chunk_size=30)
    torch.manual_seed(0)
    small_chunks = model.log_prob(x, num_samples=30, chunk_size=7)
    torch.testing.assert_close(whole, chunked)
    assert small_chunks.shape == (4,) and torch.isfinite(small_chunks).all()


def test_loss_falls_when_overfitting_a_small_batch(mnist_root):
    torch.manual_seed(0)
    model = VAE(network="conv", latent_dim=8, hidden_dims=(64,), base_channels=8)
    batch = _batch(mnist_root, 16)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        loss = model.loss(batch, 0, "train")[0]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
    first, last = torch.stack(losses[:5]).mean(), torch.stack(losses[-5:]).mean()
    assert last < 0.6 * first, (first, last)


def test_kl_warmup_and_beta():
    model = VAE(network="mlp", hidden_dims=(8,), beta=0.5, kl_warmup_steps=100)
    assert model.kl_weight() == 0.0  # global_step is 0 outside a Trainer
    assert VAE(network="mlp", hidden_dims=(8,), beta=0.5).kl_weight() == 0.5


def test_gaussian_likelihood_for_vectors():
    model = VAE(data_shape=(2,), network="mlp", latent_dim=2, hidden_dims=(16,))
    assert model.likelihood == "gaussian"
    x = torch.randn(8, 2) * 3
    log_prob = model.log_prob(x, num_samples=5)
    assert log_prob.shape == (8,) and torch.isfinite(log_prob).all()
    assert model.sample(4).shape == (4, 2)


@pytest.mark.parametrize("kwargs, message", [
    (dict(data_shape=(2,), likelihood="bernoulli"), "bernoulli"),
    (dict(data_shape=(2,), network="conv"), "conv"),
    (dict(likelihood="poisson"), "likelihood must be one of"),
    (dict(network="resnet"), "network must be one of"),
    (dict(latent_dim=0), "latent_dim"),
    (dict(beta=-1.0), "beta"),
    (dict(data_shape=(1, 30, 30), network="conv"), "divisible by 4"),
])
def test_bad_arguments_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        VAE(**kwargs)


def test_log_prob_rejects_data_outside_the_contract():
    model = VAE(network="mlp", hidden_dims=(8,))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        model.log_prob(torch.full((2, 1, 28, 28), 2.0), num_samples=2)
    with pytest.raises(ValueError, match="shape"):
        model.log_prob(torch.rand(2, 784), num_samples=2)
    with pytest.raises(ValueError, match="num_samples"):
        model.sample(0)


def test_learning_rate_schedules():
    from lightning_gen.base import learning_rate_factor

    warmup_cosine = learning_rate_factor("cosine", warmup_steps=10, total_steps=110)
    assert warmup_cosine(0) == pytest.approx(0.1) and warmup_cosine(9) == pytest.approx(1.0)
    assert warmup_cosine(60) == pytest.approx(0.5) and warmup_cosine(110) == pytest.approx(0.0)
    assert learning_rate_factor("constant", 0, 100)(50) == 1.0


def test_cosine_over_a_fit_bounded_by_time_follows_the_time_spent():
    """With max_time only (the laptop presets), the cosine decays with the fraction of the time
    budget spent: from the full rate to about 0 when the Timer stops the fit."""
    import lightning as L

    from datamodules import ToyDataModule

    class RecordRates(L.Callback):
        def __init__(self):
            self.rates, self.spent = [], []

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            timer = next(c for c in trainer.callbacks if isinstance(c, L.pytorch.callbacks.Timer))
            self.rates.append(trainer.optimizers[0].param_groups[0]["lr"])
            self.spent.append(timer.time_elapsed() / (timer.time_elapsed() + timer.time_remaining()))

    data = ToyDataModule("moons", num_train=64, num_val=16, num_test=16, batch_size=16)
    record = RecordRates()
    trainer = L.Trainer(accelerator="cpu", max_epochs=-1, max_time={"seconds": 3}, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, limit_val_batches=0,
                        callbacks=[record])
    trainer.fit(VAE((2,), network="mlp", hidden_dims=(8,), learning_rate=1e-3, lr_schedule="cosine"),
                datamodule=data)
    rates, spent = torch.tensor(record.rates), torch.tensor(record.spent)
    assert len(rates) > 20
    assert rates[0] == pytest.approx(1e-3, rel=0.05) and rates[-1] < 0.1e-3
    assert torch.all(rates[1:] <= rates[:-1])
    # each step's rate is the cosine at the time spent when the previous step ended
    expected = 0.5e-3 * (1 + torch.cos(torch.pi * spent.clamp(max=1)))
    assert torch.all(rates[1:] >= expected[1:] - 1e-9)  # set before this step began
    assert torch.all(rates[2:] <= expected[1:-1] + 1e-9)  # ... after the one before it began


def test_warmup_with_an_endless_fit_and_cosine_needs_an_end(tmp_path):
    import lightning as L

    from datamodules import ToyDataModule

    data = ToyDataModule("moons", num_train=64, num_val=16, num_test=16, batch_size=16)
    trainer = L.Trainer(accelerator="cpu", max_epochs=-1, max_time={"seconds": 1}, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, limit_val_batches=0)
    trainer.fit(VAE((2,), network="mlp", hidden_dims=(8,), warmup_steps=5), datamodule=data)
    assert trainer.global_step > 0
    with pytest.raises(ValueError, match="cosine.*finite"):
        L.Trainer(accelerator="cpu", max_epochs=-1, logger=False, enable_checkpointing=False,
                  enable_progress_bar=False).fit(
            VAE((2,), network="mlp", hidden_dims=(8,), lr_schedule="cosine"), datamodule=data)
