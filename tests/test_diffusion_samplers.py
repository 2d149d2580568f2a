"""Diffusion's faster samplers (DPM-Solver++(2M), Heun) and its variational bound, checked on a
Gaussian target whose optimal denoiser, probability-flow ODE and likelihood are known in closed
form, then through the module's API and the Trainer."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from torch import nn

from datamodules import ToyDataModule
from lightning_gen import Diffusion
from lightning_gen.diffusion.likelihood import (discretized_gaussian_log_likelihood,
                                                variational_bound)
from lightning_gen.diffusion.samplers import karras_timesteps, sampling_loop
from lightning_gen.diffusion.schedule import NoiseSchedule
from lightning_gen.nn.denoisers import MLPDenoiserConfig, UNetConfig


@pytest.fixture(autouse=True)
def single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# Three independent coordinates with different scales: the denoiser's curvature sits at sigma ~ s.
MEAN = torch.tensor([1.0, -0.5, 0.0], dtype=torch.float64)
STD = torch.tensor([0.5, 0.1, 2.0], dtype=torch.float64)


def gaussian_eps(schedule: NoiseSchedule, mean: Tensor = MEAN, std: Tensor = STD):
    """The optimal noise prediction for x_0 ~ N(mean, diag(std^2)): with x_t = sqrt(ab) x_0 +
    sqrt(1 - ab) eps, E[eps | x_t] = sqrt(1 - ab) (x_t - sqrt(ab) mean) / (ab std^2 + 1 - ab)."""
    alpha_bar = schedule.alphas_cumprod.double()

    def denoise(x_t, t):
        ab = alpha_bar[t].view(-1, *([1] * (x_t.dim() - 1)))
        return (1 - ab).sqrt() * (x_t - ab.sqrt() * mean) / (ab * std**2 + 1 - ab)

    return denoise


Tensor = torch.Tensor


def exact_ode_map(schedule: NoiseSchedule, x_T: Tensor) -> Tensor:
    """Where the samplers should take x_T: the probability-flow ODE solved exactly from sigma_max =
    sigma(T - 1) to sigma_0 = sigma(0), then the last step every sampler takes, x_0 = D(x; sigma_0).

    In sigma-space (x_hat = x / sqrt(ab), sigma^2 = (1 - ab) / ab) the ODE dx_hat/dsigma =
    (x_hat - D) / sigma with D = mean + std^2 / (std^2 + sigma^2) (x_hat - mean) has the solution
    x_hat(sigma) - mean proportional to sqrt(std^2 + sigma^2). It is the continuous ODE, free of any
    discretization, so it measures each solver's error, where a 1000-step DDIM run would carry
    DDIM's own first-order error (the final denoising step is common to all and excluded)."""
    alpha_bar = schedule.alphas_cumprod.double()
    sigma_max2 = (1 - alpha_bar[-1]) / alpha_bar[-1]
    sigma_min2 = (1 - alpha_bar[0]) / alpha_bar[0]
    x_hat = x_T / alpha_bar[-1].sqrt()
    at_sigma_min = MEAN + ((STD**2 + sigma_min2) / (STD**2 + sigma_max2)).sqrt() * (x_hat - MEAN)
    return MEAN + STD**2 / (STD**2 + sigma_min2) * (at_sigma_min - MEAN)


def map_error(schedule, sampler, steps, x_T, reference) -> float:
    x0, _, _ = sampling_loop(gaussian_eps(schedule), schedule, x_T, sampler, steps, clip_denoised=False)
    return ((x0 - reference) ** 2).mean().sqrt().item()


# ----------------------------------------------------------------------------------- samplers
@pytest.mark.parametrize("beta_schedule", ["linear", "cosine"])
def test_samplers_reach_the_gaussian_target(beta_schedule):
    schedule = NoiseSchedule(1000, beta_schedule)
    n = 4000
    x_T = torch.randn(n, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    # Enough evaluations for the narrow coordinate (std 0.1): at 50 DPM-Solver++'s variance there
    # is still 30% off (DDIM's more), see the next test for the error against the steps.
    for sampler, steps in (("ddim", 400), ("dpm_solver++", 200), ("heun", 199)):
        x0, _, _ = sampling_loop(gaussian_eps(schedule), schedule, x_T, sampler, steps, clip_denoised=False)
        # Five standard errors of the sample mean and variance, plus 1% / 3% for the solver's error.
        mean_error = (x0.mean(0) - MEAN).abs()
        assert (mean_error < 5 * STD / math.sqrt(n) + 0.01 * STD).all(), (sampler, mean_error)
        variance_ratio = x0.var(0) / STD**2
        assert ((variance_ratio - 1).abs() < 5 * math.sqrt(2 / n) + 0.03).all(), (sampler, variance_ratio)


@pytest.mark.parametrize("beta_schedule", ["linear", "cosine"])
def test_solver_errors_shrink_at_their_order(beta_schedule):
    """RMS error of the deterministic map x_T -> x_0 against the exact ODE solution. Measured
    (linear / cosine), evaluations: DDIM 20: 0.175 / 0.164, DPM-Solver++ 20: 0.146 / 0.065,
    Heun 19: 0.354 / 2.25; at 200: DDIM 0.0178 / 0.0163, DPM-Solver++ 0.0040 / 0.0018, Heun 199:
    0.0024 / 0.013."""
    schedule = NoiseSchedule(1000, beta_schedule)
    x_T = torch.randn(1000, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    reference = exact_ode_map(schedule, x_T)
    errors = {sampler: {steps: map_error(schedule, sampler, steps, x_T, reference) for steps in (10, 20, 50, 200, 400)}
              for sampler in ("ddim", "dpm_solver++")}
    errors["heun"] = {steps: map_error(schedule, "heun", steps, x_T, reference) for steps in (19, 49, 199, 399)}
    for sampler, by_steps in errors.items():
        values = list(by_steps.values())
        assert all(a > b for a, b in zip(values, values[1:])), (sampler, by_steps)
    # Doubling the evaluations halves DDIM's (Euler's) error and quarters the second-order ones'.
    assert 1.8 < errors["ddim"][200] / errors["ddim"][400] < 2.2, errors["ddim"]
    assert errors["dpm_solver++"][200] / errors["dpm_solver++"][400] > 3.0, errors["dpm_solver++"]
    assert errors["heun"][199] / errors["heun"][399] > 3.0, errors["heun"]
    # At equal evaluations DPM-Solver++ beats DDIM from 20 on (the cosine schedule from 10).
    assert errors["dpm_solver++"][20] < errors["ddim"][20]
    assert errors["dpm_solver++"][200] < 0.3 * errors["ddim"][200]
    if beta_schedule == "cosine":
        assert errors["dpm_solver++"][10] < 0.6 * errors["ddim"][10]
    # Heun needs more steps here: its large first steps (sigma falls by ~e per step with 10 steps)
    # cost more than its order gains; with ~200 evaluations it is well ahead of DDIM.
    assert errors["heun"][199] < errors["ddim"][200]


def test_dpm_solver_and_heun_reduce_to_ddim_with_one_timestep():
    # One timestep: DPM-Solver++'s first-order step and Heun's lone Euler step are DDIM's x_0_hat.
    schedule = NoiseSchedule(50, "cosine")
    x_T = torch.randn(6, 3, dtype=torch.float64)
    ddim, _, _ = sampling_loop(gaussian_eps(schedule), schedule, x_T, "ddim", 1, clip_denoised=False)
    for sampler, steps in (("dpm_solver++", 1), ("heun", 1), ("heun", 2)):
        x0, _, _ = sampling_loop(gaussian_eps(schedule), schedule, x_T, sampler, steps, clip_denoised=False)
        torch.testing.assert_close(x0, ddim)


def test_heun_counts_network_evaluations_and_visits_karras_timesteps():
    schedule = NoiseSchedule(1000, "linear")
    calls = []

    def denoise(x, t):
        calls.append(int(t[0]))
        return torch.zeros_like(x)

    for steps, expected_calls in ((1, 1), (2, 1), (9, 9), (10, 9), (50, 49)):
        calls.clear()
        sampling_loop(denoise, schedule, torch.randn(2, 3), "heun", steps)
        assert len(calls) == expected_calls, (steps, len(calls))
    visited = karras_timesteps(schedule, 25, torch.device("cpu")).tolist()
    assert calls[0] == 999 and calls[-1] == 0 and sorted(set(calls), reverse=True) == visited
    for beta_schedule in ("linear", "cosine"):  # distinct, decreasing, from T - 1 to 0, any N
        for num_steps in (2, 5, 30, 200, 1000):
            sequence = karras_timesteps(NoiseSchedule(1000, beta_schedule), num_steps, torch.device("cpu")).tolist()
            assert len(sequence) == num_steps and sequence[0] == 999 and sequence[-1] == 0
            assert all(a > b for a, b in zip(sequence, sequence[1:]))
    calls.clear()
    sampling_loop(denoise, schedule, torch.randn(2, 3), "dpm_solver++", 20)
    assert calls == schedule.timesteps(20)


# ---------------------------------------------------------------------------- variational bound
class GaussianEpsNetwork(nn.Module):
    """The optimal eps-prediction of N(mean, diag(std^2)) data as a network ``(x_t, t, y) -> eps``."""

    def __init__(self, schedule: NoiseSchedule, mean: Tensor, std: Tensor) -> None:
        super().__init__()
        self.denoise = gaussian_eps(schedule, mean, std)

    def forward(self, x_t, t, y=None):
        return self.denoise(x_t.double(), t).float()


def gaussian_model(mean, std, num_timesteps=1000) -> Diffusion:
    model = Diffusion((len(mean),), num_timesteps=num_timesteps, mlp=MLPDenoiserConfig(8, 1), ema_decay=None)
    model.network = GaussianEpsNetwork(model.schedule, mean, std)
    return model.eval()


def test_variational_bound_is_above_and_near_the_exact_nll_of_gaussian_data():
    mean, std = torch.tensor([0.5, -1.0], dtype=torch.float64), torch.tensor([0.3, 1.5], dtype=torch.float64)
    model = gaussian_model(mean, std)
    n = 2000
    x = (mean + std * torch.randn(n, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)).float()
    exact_nll = (0.5 * ((x.double() - mean) / std) ** 2 + std.log() + 0.5 * math.log(2 * math.pi)).sum(1)
    bound = model.variational_bound(x, generator=torch.Generator().manual_seed(1)).double()  # all T terms
    gap = (bound - exact_nll).mean().item()
    standard_error = (bound - exact_nll).std().item() / math.sqrt(n)
    # E[L] >= E[-log p_model] >= E[-log p_data] (Gibbs). Measured gap: 0.98 nats for the two dims
    # (exact 2.03 nats). Nearly all of it is the fixed reverse variance beta_tilde_t (Ho et al.'s
    # choice): for continuous data the true reverse variance at small t is about beta_t, up to
    # twice beta_tilde_t (L_{t-1} at t = 1 alone is 0.6 nats per dim), so the gap is about 0.5
    # nats per dimension and does not vanish as T grows.
    assert gap > -3 * standard_error, (gap, standard_error)
    assert gap < 0.6 * 2, (gap, standard_error)


def test_timestep_estimate_of_the_bound_is_unbiased():
    mean, std = torch.tensor([0.5, -1.0], dtype=torch.float64), torch.tensor([0.3, 1.5], dtype=torch.float64)
    model = gaussian_model(mean, std, num_timesteps=200)
    copies = 4000
    x = torch.tensor([[0.9, 0.2]]).expand(copies, 2)  # one example, scored many times
    full = model.variational_bound(x, timesteps=None, generator=torch.Generator().manual_seed(2)).double()
    estimate = model.variational_bound(x, timesteps=1, generator=torch.Generator().manual_seed(3)).double()
    standard_error = math.sqrt(estimate.var().item() / copies + full.var().item() / copies)
    assert abs(estimate.mean().item() - full.mean().item()) < 4 * standard_error, (
        estimate.mean().item(), full.mean().item(), standard_error)
    assert estimate.std() > full.std()  # the timestep draw adds variance, not bias


def test_discretized_decoder_sums_to_one_over_the_256_levels():
    levels = torch.arange(256, dtype=torch.float32) / 255 * 2 - 1  # (256,)
    for mean, log_scale in ((0.0, -3.0), (0.97, -5.0), (-2.5, -1.0), (0.3, -8.0)):
        log_p = discretized_gaussian_log_likelihood(levels, torch.full_like(levels, mean),
                                                    torch.full_like(levels, log_scale))
        assert torch.isfinite(log_p).all()
        assert log_p.exp().double().sum().item() == pytest.approx(1.0, abs=1e-4)


def test_variational_bound_counts_every_term_once():
    """With T = 1 the bound is L_T + L_0 alone; the function and the module agree on images."""
    schedule = NoiseSchedule(1, "linear")
    x0 = torch.rand(3, 4) * 2 - 1
    zero = lambda x_t, t: torch.zeros_like(x_t)  # noqa: E731
    bound = variational_bound(schedule, zero, x0, discrete=False, generator=torch.Generator().manual_seed(0))
    assert bound.shape == (3,) and torch.isfinite(bound).all()
    model = Diffusion((1, 8, 8), num_timesteps=4, ema_decay=None,
                      unet=UNetConfig(base_channels=4, channel_multipliers=(1,), num_res_blocks=1,
                                      attention_levels=(), num_heads=1, norm_groups=4))
    images = torch.rand(2, 1, 8, 8)
    nll = model.variational_bound(images, generator=torch.Generator().manual_seed(0))
    assert nll.shape == (2,) and torch.isfinite(nll).all() and (nll > 0).all()
    # 8-bit data: an image and its quantized version score alike.
    quantized = torch.round(images * 255) / 255
    torch.testing.assert_close(nll, model.variational_bound(quantized, generator=torch.Generator().manual_seed(0)))


# ---------------------------------------------------------------------------------------- API
@pytest.mark.parametrize("prediction", ["epsilon", "v"])
def test_sample_with_the_new_samplers(prediction):
    torch.manual_seed(0)
    model = Diffusion((2,), num_timesteps=50, prediction=prediction, mlp=MLPDenoiserConfig(16, 1)).eval()
    x_T = torch.randn(5, 2)
    for sampler in ("dpm_solver++", "heun"):
        for steps in (1, 4, 7, 50):
            torch.manual_seed(1)
            first = model.sample(5, sampler=sampler, steps=steps, x_T=x_T)
            torch.manual_seed(2)
            second = model.sample(5, sampler=sampler, steps=steps, x_T=x_T)
            assert first.shape == (5, 2) and torch.isfinite(first).all()
            torch.testing.assert_close(first, second, rtol=0, atol=0)  # deterministic given x_T
        trajectory = model.sample_trajectory(5, sampler=sampler, steps=7, x_T=x_T)
        visited = 7 if sampler == "dpm_solver++" else 4
        assert trajectory["states"].shape == (visited + 1, 5, 2)
        assert trajectory["denoised"].shape == (visited, 5, 2)
        torch.testing.assert_close(trajectory["states"][-1], model.sample(5, sampler=sampler, steps=7, x_T=x_T))


def test_new_samplers_on_images_with_clipping():
    torch.manual_seed(0)
    model = Diffusion((1, 8, 8), num_timesteps=20, ema_decay=None,
                      unet=UNetConfig(base_channels=4, channel_multipliers=(1,), num_res_blocks=1,
                                      attention_levels=(), num_heads=1, norm_groups=4))
    for parameter in model.network.output_conv.parameters():  # leave the zero-initialized output
        nn.init.normal_(parameter, std=0.3)
    model.eval()
    for sampler in ("dpm_solver++", "heun"):
        samples = model.sample(3, sampler=sampler, steps=5)
        assert samples.shape == (3, 1, 8, 8) and samples.min() >= 0 and samples.max() <= 1


def test_bad_steps_and_options_raise_one_line_errors():
    model = Diffusion((2,), num_timesteps=20, mlp=MLPDenoiserConfig(8, 1))
    for sampler in ("dpm_solver++", "heun"):
        for steps in (0, 21, -3, 2.5, True):
            with pytest.raises(ValueError, match=r"steps must be an int in 1\.\.20") as error:
                model.sample(2, sampler=sampler, steps=steps)
            assert "\n" not in str(error.value)
        with pytest.raises(ValueError, match="eta=0"):
            model.sample(2, sampler=sampler, eta=0.5)
    with pytest.raises(ValueError, match="predict_eta"):
        Diffusion((2,), predict_sampler="heun", predict_eta=1.0)
    with pytest.raises(ValueError, match="predict_sampler"):
        Diffusion((2,), predict_sampler="euler")
    with pytest.raises(ValueError, match="test_vlb_timesteps"):
        Diffusion((2,), test_vlb_timesteps=-1)
    # A DDIM model with eta = 1 still samples with the ODE solvers (predict_eta is DDIM's).
    noisy = Diffusion((2,), num_timesteps=20, mlp=MLPDenoiserConfig(8, 1), predict_eta=1.0)
    assert noisy.sample(2, sampler="heun", steps=5).shape == (2, 2)


def test_predict_uses_predict_sampler():
    torch.manual_seed(0)
    model = Diffusion((2,), num_timesteps=30, mlp=MLPDenoiserConfig(8, 1), predict_sampler="dpm_solver++",
                      predict_steps=6).eval()
    assert model.predict_options() == {"sampler": "dpm_solver++", "steps": 6, "eta": 0.0}
    torch.manual_seed(3)
    predicted = model.predict_step((torch.zeros(4, 2), torch.zeros(4, dtype=torch.long)), 0)
    torch.manual_seed(3)
    torch.testing.assert_close(predicted, model.sample(4, sampler="dpm_solver++", steps=6))
    assert "predict_sampler" not in model.hparams and "test_vlb_timesteps" not in model.hparams


def test_trainer_test_logs_nll_and_bpd(tmp_path, mnist_root):
    from datamodules import MNISTDataModule

    torch.manual_seed(0)
    runs = [
        (Diffusion((2,), num_timesteps=20, mlp=MLPDenoiserConfig(8, 1)),
         ToyDataModule("moons", num_train=32, num_val=16, num_test=32, batch_size=16)),
        (Diffusion((1, 28, 28), num_timesteps=10, test_vlb_timesteps=None,
                   unet=UNetConfig(base_channels=4, channel_multipliers=(1,), num_res_blocks=1,
                                   attention_levels=(), num_heads=1, norm_groups=4)),
         MNISTDataModule(data_dir=str(mnist_root), download=False, batch_size=4)),
    ]
    for model, data in runs:
        trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, limit_test_batches=2, default_root_dir=str(tmp_path))
        metrics = trainer.test(model, datamodule=data, verbose=False)[0]
        assert {"test/loss", "test/nll", "test/bpd"} <= set(metrics), metrics
        assert math.isfinite(metrics["test/nll"])
        assert metrics["test/bpd"] == pytest.approx(metrics["test/nll"] / (model.num_dims * math.log(2)), rel=1e-4)
        validation = trainer.validate(model, datamodule=data, verbose=False)[0]
        assert "val/nll" not in validation  # validation stays the cheap loss by default
