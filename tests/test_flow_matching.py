"""FlowMatching: the ODE solvers' orders, the likelihood of a known flow, the OT pairing, and the
family under a Trainer. The Gaussian target N(mu, diag(s^2)) has, for the straight path from
N(0, I), the closed-form marginal velocity (``gaussian_velocity``) and flow x_t = t mu + sigma_t x_0
with sigma_t = sqrt((1 - t)^2 + t^2 s^2), so x_1 = mu + s x_0 and log p_1 is N(mu, s^2)'s."""

from __future__ import annotations

import itertools
import math

import lightning as L
import pytest
import torch

from datamodules import ToyDataModule
from lightning_gen import FlowMatching
from lightning_gen.diffusion import MLPDenoiserConfig, UNetConfig
from lightning_gen.flow_matching import divergence, integrate, log_likelihood, network_evaluations, ot_pairing

MU = torch.tensor([1.5, -0.5], dtype=torch.float64)
SCALE = torch.tensor([0.5, 2.0], dtype=torch.float64)


@pytest.fixture(autouse=True)
def single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def gaussian_velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """E[x_1 - x_0 | x_t] for x_0 ~ N(0, I), x_1 ~ N(MU, diag(SCALE^2)), x_t on the straight path."""
    t = t.to(x.dtype)[:, None]
    variance = (1 - t) ** 2 + t**2 * SCALE**2
    return MU + (t * SCALE**2 - (1 - t)) / variance * (x - t * MU)


def gaussian_log_density(x: torch.Tensor) -> torch.Tensor:
    z = (x - MU) / SCALE
    return (-0.5 * z.pow(2) - torch.log(SCALE) - 0.5 * math.log(2 * math.pi)).sum(1)


@pytest.mark.parametrize("solver, order", [("euler", 1), ("midpoint", 2), ("heun", 2)])
def test_solvers_reach_the_target_at_their_order(solver, order):
    x0 = torch.randn(256, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    exact = MU + SCALE * x0
    errors = [(integrate(gaussian_velocity, x0, steps, solver)[0] - exact).abs().max().item()
              for steps in (8, 16, 32, 64)]
    rates = [math.log2(coarse / fine) for coarse, fine in zip(errors, errors[1:])]
    # Halving the step divides the error by at least 2^order (measured: Euler 0.94-0.98, Heun
    # 2.05-2.17; midpoint 2.98-3.00, one order better than its guarantee on this linear field).
    assert all(rate > order - 0.25 for rate in rates), (errors, rates)
    if order == 1:
        assert all(rate < 1.25 for rate in rates), (errors, rates)  # and Euler is no better
    assert errors[-1] < (0.2 if order == 1 else 1e-3)


def test_samples_match_the_target_mean_and_covariance():
    x0 = torch.randn(20000, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    samples, states = integrate(gaussian_velocity, x0, 32, "heun", record=True)
    assert len(states) == 33 and torch.equal(states[-1], samples)
    assert torch.allclose(samples.mean(0), MU, atol=0.04)
    covariance = torch.cov(samples.T)
    assert torch.allclose(covariance.diagonal(), SCALE**2, rtol=0.04)
    assert abs(covariance[0, 1]) < 0.03
    assert network_evaluations("euler", 10) == 10 and network_evaluations("heun", 10) == 20


@pytest.mark.parametrize("trace", ["exact", "hutchinson"])
def test_log_likelihood_of_the_gaussian_flow_is_the_analytic_density(trace):
    x1 = MU + SCALE * torch.randn(64, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    estimate = log_likelihood(gaussian_velocity, x1, 64, "heun", trace=trace, num_probes=1,
                              generator=torch.Generator().manual_seed(3))
    exact = gaussian_log_density(x1)
    if trace == "exact":
        assert torch.allclose(estimate.double(), exact, atol=2e-3), (estimate - exact).abs().max()
    else:
        # The field is linear in x, so eps^T J eps with Rademacher eps differs from tr J only by the
        # off-diagonal terms (zero here): the estimate is exact for this field too.
        assert torch.allclose(estimate.double(), exact, atol=2e-3)


def test_hutchinson_divergence_is_unbiased_for_a_coupled_field():
    weight = torch.tensor([[0.3, -1.2, 0.5], [0.8, 0.1, -0.7], [1.1, 0.4, -0.2]])

    def field(x, t):
        return torch.tanh(x @ weight.T) * (1 + t[:, None])

    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(4))
    t = torch.full((4,), 0.3)
    _, exact = divergence(field, x, t, "exact")
    probes = (torch.randint(0, 2, (4000, 4, 3), generator=torch.Generator().manual_seed(5)) * 2 - 1).float()
    _, estimate = divergence(field, x, t, "hutchinson", probes)
    _, single = divergence(field, x, t, "hutchinson", probes[:1])
    assert not torch.allclose(single, exact, atol=1e-3)  # one probe is noisy here...
    assert torch.allclose(estimate, exact, atol=0.05)  # ...and its mean is the trace


def test_ot_pairing_is_the_optimal_permutation():
    generator = torch.Generator().manual_seed(6)
    noise, data = torch.randn(6, 2, generator=generator), torch.randn(6, 2, generator=generator) + 3
    paired = ot_pairing(noise, data)
    assert sorted(paired[:, 0].tolist()) == sorted(noise[:, 0].tolist())  # a permutation
    best = min(((data - noise[list(order)]) ** 2).sum().item() for order in itertools.permutations(range(6)))
    assert ((data - paired) ** 2).sum().item() == pytest.approx(best, rel=1e-6)


def tiny_vector_model(**options) -> FlowMatching:
    return FlowMatching((2,), mlp=MLPDenoiserConfig(hidden_dim=32, num_layers=2), **options)


def test_training_lowers_the_loss_and_test_logs_nll_and_bpd(tmp_path):
    L.seed_everything(0)
    model = tiny_vector_model(coupling="ot", learning_rate=3e-3, ema_decay=0.9, likelihood_steps=8)
    data = ToyDataModule("8gaussians", batch_size=128, num_train=2048, num_val=256, num_test=256)
    trainer = L.Trainer(max_steps=150, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, accelerator="cpu", default_root_dir=tmp_path)
    before = trainer.validate(model, data, verbose=False)[0]["val/loss"]
    trainer.fit(model, data)
    after = trainer.validate(model, data, verbose=False)[0]["val/loss"]
    assert after < 0.8 * before
    metrics = trainer.test(model, data, verbose=False)[0]
    assert {"test/loss", "test/nll", "test/bpd"} <= set(metrics)
    assert math.isfinite(metrics["test/nll"])
    assert metrics["test/bpd"] == pytest.approx(metrics["test/nll"] / (2 * math.log(2)), rel=1e-5)


def test_sampling_options_and_bad_arguments():
    model = tiny_vector_model().eval()
    x0 = torch.randn(5, 2)
    assert torch.equal(model.sample(5, x0=x0), model.sample(5, x0=x0))
    assert not torch.allclose(model.sample(5, steps=2, sampler="euler", x0=x0),
                              model.sample(5, steps=2, sampler="heun", x0=x0))
    with pytest.raises(ValueError, match="sampler must be one of"):
        model.sample(5, sampler="rk45")
    with pytest.raises(ValueError, match="steps must be a positive int"):
        model.sample(5, steps=0)
    with pytest.raises(ValueError, match="coupling must be one of"):
        FlowMatching((2,), coupling="sinkhorn")
    with pytest.raises(ValueError, match="label_dropout > 0"):
        FlowMatching((2,), num_classes=2, label_dropout=0.0, guidance_scale=2.0)


def test_conditional_image_model_scores_and_samples_in_range():
    model = FlowMatching((1, 8, 8), num_classes=3, likelihood_steps=2, ema_decay=None, unet=UNetConfig(
        base_channels=4, channel_multipliers=(1, 2), num_res_blocks=1, attention_levels=(), num_heads=1))
    with torch.no_grad():  # the U-Net starts with zeroed output layers: give the labels a say
        for parameter in model.network.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    samples = model.sample(6, steps=2, guidance_scale=2.0)
    assert samples.shape == (6, 1, 8, 8) and 0 <= samples.min() and samples.max() <= 1
    x = torch.rand(4, 1, 8, 8)
    conditional = model.log_prob(x, torch.tensor([0, 1, 2, 0]), generator=torch.Generator().manual_seed(0))
    unconditional = model.log_prob(x, generator=torch.Generator().manual_seed(0))  # the null label
    assert conditional.shape == unconditional.shape == (4,)
    assert torch.isfinite(conditional).all() and not torch.equal(conditional, unconditional)
    with pytest.raises(ValueError, match="unconditional"):
        tiny_vector_model().log_prob(torch.randn(3, 2), torch.zeros(3, dtype=torch.long))
