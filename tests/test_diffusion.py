"""Diffusion family: the schedule's closed forms, the samplers, EMA, training and the CLI."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from torch import nn

from datamodules import ToyDataModule, sample_toy
from lightning_gen import Diffusion
from lightning_gen.nn.denoisers import MLPDenoiserConfig, ResBlock, UNet, UNetConfig
from lightning_gen.nn.guidance import drop_labels
from lightning_gen.diffusion.samplers import ddim_step, ddpm_step, sampling_loop
from lightning_gen.diffusion.schedule import NoiseSchedule
from lightning_gen.nn import ExponentialMovingAverage
from cli_helpers import fit_and_predict
from ema_helpers import fit_and_check_the_average


@pytest.fixture(autouse=True)
def single_thread():
    """These networks are tiny: one thread avoids OpenMP synchronization, which dominates (by 100x
    on a busy 2-core machine) at this size."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_unet_model(**overrides) -> Diffusion:
    settings = dict(num_timesteps=20, predict_steps=5,
                    unet=UNetConfig(base_channels=8, channel_multipliers=(1, 2), num_res_blocks=1,
                                    attention_levels=(1,), num_heads=2, norm_groups=4))
    settings.update(overrides)
    return Diffusion((1, 28, 28), **settings)


# ----------------------------------------------------------------------------------- schedule
@pytest.mark.parametrize("beta_schedule", ["linear", "cosine"])
def test_schedule_tables_match_hand_computation(beta_schedule):
    T = 50
    schedule = NoiseSchedule(T, beta_schedule)
    betas = schedule.betas.double()
    alpha_bar, products = 1.0, []
    for beta in betas.tolist():  # alpha_bar_t = prod_{s <= t} (1 - beta_s), by hand
        alpha_bar *= 1.0 - beta
        products.append(alpha_bar)
    torch.testing.assert_close(schedule.alphas_cumprod.double(), torch.tensor(products, dtype=torch.float64),
                               rtol=1e-5, atol=1e-7)
    if beta_schedule == "linear":  # Ho et al.'s 1e-4 .. 0.02 at T = 1000, scaled by 1000 / T
        assert betas[0].item() == pytest.approx(1e-4 * 1000 / T)
        assert betas[-1].item() == pytest.approx(0.02 * 1000 / T)
    else:  # Nichol & Dhariwal 2021, eq. 17, where no beta was clipped
        f = lambda t: math.cos((t / T + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        for t in (0, 10, 25, 40):
            assert schedule.alphas_cumprod[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-5)
    # Both end near pure noise.
    assert schedule.alphas_cumprod[-1] < 0.05


@pytest.mark.parametrize("beta_schedule", ["linear", "cosine"])
def test_q_sample_matches_closed_form_mean_and_variance(beta_schedule):
    schedule = NoiseSchedule(100, beta_schedule)
    torch.manual_seed(0)
    n = 40000
    x0 = torch.tensor([-1.0, -0.3, 0.5, 1.0])  # four "pixels"
    for t_value in (0, 10, 50, 99):
        t = torch.full((n,), t_value)
        x_t = schedule.q_sample(x0.expand(n, 4), t)  # (n, 4)
        alpha_bar = schedule.alphas_cumprod[t_value].double()
        mean, variance = alpha_bar.sqrt() * x0.double(), 1 - alpha_bar
        # Tolerances from the standard errors: sd(mean) = sqrt(var / n); for a Gaussian,
        # sd(sample variance) = var sqrt(2 / (n - 1)). Five standard errors.
        mean_error = (x_t.double().mean(0) - mean).abs()
        assert (mean_error < 5 * (variance / n).sqrt()).all(), (t_value, mean_error)
        variance_error = (x_t.double().var(0) - variance).abs()
        assert (variance_error < 5 * variance * math.sqrt(2 / (n - 1))).all(), (t_value, variance_error)
        closed_mean, closed_variance = schedule.q_mean_variance(x0[None], t[:1])
        torch.testing.assert_close(closed_mean[0].double(), mean, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(closed_variance.double().squeeze(), variance, rtol=1e-6, atol=1e-6)


def test_parameterizations_invert_each_other():
    schedule = NoiseSchedule(100, "cosine")
    torch.manual_seed(0)
    x0, eps = torch.randn(16, 3), torch.randn(16, 3)
    t = torch.randint(0, 100, (16,))
    x_t = schedule.q_sample(x0, t, eps)
    torch.testing.assert_close(schedule.predict_x0_from_eps(x_t, t, eps), x0, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(schedule.predict_eps_from_x0(x_t, t, x0), eps, rtol=1e-3, atol=1e-3)
    v = schedule.velocity(x0, t, eps)
    torch.testing.assert_close(schedule.eps_from_velocity(x_t, t, v), eps, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("prediction", ["epsilon", "v"])
def test_min_snr_weights_are_min_snr_gamma_on_the_x0_error(prediction):
    """Min-SNR-gamma (Hang et al. 2023): whatever the network predicts, the weighted loss of an
    output is min(SNR_t, gamma) times the squared error of the x_0 that output implies."""
    gamma = 5.0
    model = Diffusion((3,), num_timesteps=1000, beta_schedule="cosine", prediction=prediction,
                      min_snr_gamma=gamma, mlp=MLPDenoiserConfig(8, 1))
    torch.manual_seed(0)
    x0, eps, x0_hat = torch.randn(12, 3).double(), torch.randn(12, 3).double(), torch.randn(12, 3).double()
    t = torch.tensor([5, 20, 60, 100, 200, 300, 400, 500, 600, 700, 800, 900])
    alpha_bar = model.schedule.alphas_cumprod[t].double()[:, None]
    snr = alpha_bar / (1 - alpha_bar)
    x_t = alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * eps
    eps_hat = (x_t - alpha_bar.sqrt() * x0_hat) / (1 - alpha_bar).sqrt()
    if prediction == "epsilon":
        target, output = eps, eps_hat
    else:
        target = alpha_bar.sqrt() * eps - (1 - alpha_bar).sqrt() * x0
        output = alpha_bar.sqrt() * eps_hat - (1 - alpha_bar).sqrt() * x0_hat
    weighted = model.loss_weights(t).double() * (output - target).pow(2).mean(dim=1)
    expected = snr[:, 0].clamp(max=gamma) * (x0_hat - x0).pow(2).mean(dim=1)
    torch.testing.assert_close(weighted, expected, rtol=1e-4, atol=1e-6)
    # Both sides of gamma are in this t range, and the weights are finite at t = T - 1 (SNR ~ 0).
    assert (snr[:, 0] > gamma).any() and (snr[:, 0] < gamma).any()
    assert torch.isfinite(model.loss_weights(torch.tensor([999]))).all()


def test_min_snr_loss_is_the_weighted_mean_of_the_per_example_errors():
    torch.manual_seed(0)
    model = Diffusion((2,), num_timesteps=50, prediction="v", min_snr_gamma=5.0, mlp=MLPDenoiserConfig(8, 1))
    x0 = torch.randn(16, 2)
    loss = model.diffusion_loss(x0, None, generator=torch.Generator().manual_seed(3))
    generator = torch.Generator().manual_seed(3)  # the same draws in the same order
    t = torch.randint(0, 50, (16,), generator=generator)
    eps = torch.randn(x0.shape, generator=generator)
    errors = (model.network(model.schedule.q_sample(x0, t, eps), t, None)
              - model.schedule.velocity(x0, t, eps)).pow(2).mean(dim=1)
    torch.testing.assert_close(loss, (model.loss_weights(t) * errors).mean())
    unweighted = Diffusion((2,), num_timesteps=50, prediction="v", mlp=MLPDenoiserConfig(8, 1))
    unweighted.network.load_state_dict(model.network.state_dict())
    torch.testing.assert_close(unweighted.diffusion_loss(x0, None, generator=torch.Generator().manual_seed(3)),
                               errors.mean())
    assert not torch.allclose(loss, errors.mean())


def test_ddim_timesteps_are_a_decreasing_subsequence():
    schedule = NoiseSchedule(1000)
    steps = schedule.timesteps(50)
    assert len(steps) == 50 and steps[0] == 999 and steps[-1] == 0
    assert all(a > b for a, b in zip(steps, steps[1:]))
    assert schedule.timesteps(1000) == list(range(999, -1, -1))
    with pytest.raises(ValueError, match="steps"):
        schedule.timesteps(1001)


# ----------------------------------------------------------------------------------- samplers
@pytest.mark.parametrize("clip_denoised", [False, True])
def test_ddim_with_eta_one_and_all_steps_is_the_ddpm_posterior_step(clip_denoised):
    T = 30
    schedule = NoiseSchedule(T, "linear")
    torch.manual_seed(0)
    x_t, eps, noise = torch.randn(8, 5), torch.randn(8, 5), torch.randn(8, 5)
    for t_value in (T - 1, 15, 1):
        t = torch.full((8,), t_value)
        x_ddim, _ = ddim_step(schedule, x_t, t, t - 1, eps, 1.0, noise, clip_denoised)
        x_ddpm, _ = ddpm_step(schedule, x_t, t, eps, noise, clip_denoised)
        torch.testing.assert_close(x_ddim, x_ddpm, rtol=1e-4, atol=1e-5)
        # ... and both are Ho et al. 2020, eq. 7, written out by hand in float64.
        betas = schedule.betas.double()
        alpha_bar = torch.cumprod(1 - betas, 0)
        a_t, a_prev, beta = alpha_bar[t_value], alpha_bar[t_value - 1], betas[t_value]
        x0 = (x_t.double() - (1 - a_t).sqrt() * eps.double()) / a_t.sqrt()
        if clip_denoised:
            x0 = x0.clamp(-1, 1)
        mean = a_prev.sqrt() * beta / (1 - a_t) * x0 + (1 - beta).sqrt() * (1 - a_prev) / (1 - a_t) * x_t.double()
        variance = (1 - a_prev) / (1 - a_t) * beta
        torch.testing.assert_close(x_ddpm.double(), mean + variance.sqrt() * noise.double(), rtol=1e-4, atol=1e-4)
    # The whole loops agree too: DDIM over all T steps with eta = 1 draws the same noise as DDPM.
    denoise = lambda x, t: torch.sin(x + t[:, None].float() / T)  # noqa: E731  (any function)
    x_T = torch.randn(8, 5)
    torch.manual_seed(1)
    ddpm_result, _, _ = sampling_loop(denoise, schedule, x_T, "ddpm", clip_denoised=clip_denoised)
    torch.manual_seed(1)
    ddim_result, _, _ = sampling_loop(denoise, schedule, x_T, "ddim", steps=T, eta=1.0,
                                      clip_denoised=clip_denoised)
    torch.testing.assert_close(ddim_result, ddpm_result, rtol=1e-4, atol=1e-4)


def test_ddim_with_eta_zero_is_deterministic_given_x_T():
    torch.manual_seed(0)
    model = Diffusion((2,), num_timesteps=50, mlp=MLPDenoiserConfig(16, 1)).eval()
    x_T = torch.randn(6, 2)
    torch.manual_seed(1)
    first = model.sample(6, sampler="ddim", steps=10, eta=0.0, x_T=x_T)
    torch.manual_seed(2)  # a different RNG state changes nothing
    second = model.sample(6, sampler="ddim", steps=10, eta=0.0, x_T=x_T)
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    # With eta > 0 (or DDPM) the same x_T gives different samples under different seeds.
    torch.manual_seed(1)
    noisy = model.sample(6, sampler="ddim", steps=10, eta=1.0, x_T=x_T)
    torch.manual_seed(2)
    assert not torch.allclose(noisy, model.sample(6, sampler="ddim", steps=10, eta=1.0, x_T=x_T))


def test_sample_trajectory_ends_at_the_sample():
    torch.manual_seed(0)
    model = tiny_unet_model()
    for parameter in model.network.output_conv.parameters():  # leave the zero-initialized output
        nn.init.normal_(parameter, std=0.1)
    model.ema = None
    model.eval()
    torch.manual_seed(3)
    trajectory = model.sample_trajectory(4, steps=5)
    torch.manual_seed(3)
    samples = model.sample(4, steps=5)
    assert trajectory["states"].shape == (6, 4, 1, 28, 28)
    assert trajectory["denoised"].shape == (5, 4, 1, 28, 28)
    torch.testing.assert_close(trajectory["states"][-1], samples)
    assert trajectory["states"].min() >= 0 and trajectory["states"].max() <= 1


def test_bad_sampler_arguments_raise():
    model = Diffusion((2,), num_timesteps=20, mlp=MLPDenoiserConfig(8, 1))
    with pytest.raises(ValueError, match="sampler"):
        model.sample(2, sampler="euler")
    with pytest.raises(ValueError, match="all T"):
        model.sample(2, sampler="ddpm", steps=5)
    with pytest.raises(ValueError, match="eta"):
        model.sample(2, eta=-1.0)
    with pytest.raises(ValueError, match="prediction"):
        Diffusion((2,), prediction="x0")
    with pytest.raises(ValueError, match="beta_schedule"):
        Diffusion((2,), beta_schedule="quadratic")
    for gamma in (0.0, -5.0, True):
        with pytest.raises(ValueError, match="min_snr_gamma must be None"):
            Diffusion((2,), min_snr_gamma=gamma)
    with pytest.raises(ValueError, match="unconditional"):
        model.sample(2, y=1)


def test_unet_keeps_the_shape_of_odd_sized_images():
    torch.manual_seed(0)
    network = UNet(1, base_channels=4, channel_multipliers=(1, 2, 2, 2), num_res_blocks=1,
                   attention_levels=(3,), num_heads=1, norm_groups=4)
    for size in (28, 32, 13):  # 28 -> 14 -> 7 -> 4 and back up to the skips' sizes
        x = torch.randn(2, 1, size, size)
        assert network(x, torch.tensor([0, 5])).shape == x.shape


# ---------------------------------------------------------------------------------------- EMA
def test_network_options_are_one_group_per_network_and_checkpoint_as_plain_dicts(tmp_path):
    model = Diffusion((2,), num_timesteps=10, mlp=MLPDenoiserConfig(hidden_dim=12, num_layers=2))
    assert model.network.input_layer.out_features == 12 and len(model.network.blocks) == 2
    # The group of the other data kind is refused when changed, never silently ignored.
    with pytest.raises(ValueError, match="unet options apply to images"):
        Diffusion((2,), unet=UNetConfig(base_channels=8))
    with pytest.raises(ValueError, match="mlp options apply to vector data"):
        Diffusion((1, 8, 8), mlp=MLPDenoiserConfig(hidden_dim=8))
    # Saved as dicts (a weights-only load can read them) and rebuilt into the same network.
    path = tmp_path / "model.ckpt"
    trainer = L.Trainer(max_steps=0, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.strategy.connect(model)
    trainer.save_checkpoint(path)
    hyperparameters = torch.load(path, weights_only=True)["hyper_parameters"]
    assert hyperparameters["mlp"] == {"hidden_dim": 12, "num_layers": 2}
    restored = Diffusion.load_from_checkpoint(path)
    assert restored.network.input_layer.out_features == 12
    for name, value in model.state_dict().items():
        assert torch.equal(value, restored.state_dict()[name]), name


def test_the_embedding_reaches_a_block_whose_norm_groups_hold_one_channel():
    # 8 channels in 8 groups: a bias added before the GroupNorm would be subtracted again.
    torch.manual_seed(0)
    block = ResBlock(8, 8, embedding_dim=16, norm_groups=8)
    nn.init.normal_(block.conv2.weight, std=0.1)  # zero-initialized: the branch would be silent
    x = torch.randn(2, 8, 6, 6)
    first, second = torch.randn(2, 16), torch.randn(2, 16)
    assert (block(x, first) - block(x, second)).abs().max() > 1e-2


def test_ema_update_math():
    network = nn.Linear(3, 2)
    ema = ExponentialMovingAverage(network, decay=0.9, warmup=False)
    start = [p.detach().clone() for p in network.parameters()]
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.add_(1.0)
    ema.update(network)
    for average, initial, current in zip(ema.averaged.parameters(), start, network.parameters()):
        torch.testing.assert_close(average, 0.9 * initial + 0.1 * current.detach())
    # With warm-up the decay at update n is min(decay, (1 + n) / (10 + n)): 0.1 at n = 0.
    ema = ExponentialMovingAverage(network, decay=0.9, warmup=True)
    before = [p.detach().clone() for p in ema.averaged.parameters()]
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.mul_(-2.0)
    ema.update(network)
    for average, old, current in zip(ema.averaged.parameters(), before, network.parameters()):
        torch.testing.assert_close(average, 0.1 * old + 0.9 * current.detach())


def test_ema_follows_each_optimizer_step_and_is_checkpointed(tmp_path):
    torch.manual_seed(0)
    model = Diffusion((2,), num_timesteps=20, prediction="v", mlp=MLPDenoiserConfig(8, 1),
                      ema_decay=0.5, learning_rate=1e-2)
    data = ToyDataModule("moons", num_train=64, num_val=16, num_test=16, batch_size=16)
    trainer = fit_and_check_the_average(model, tmp_path, steps=4, decay=0.5, datamodule=data)
    # The averaged weights travel in the checkpoint and are what sampling uses by default.
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    assert any(key.startswith("ema.averaged.") for key in torch.load(path, weights_only=False)["state_dict"])
    reloaded = Diffusion.load_from_checkpoint(path).eval()
    for average, loaded in zip(model.ema.averaged.parameters(), reloaded.ema.averaged.parameters()):
        torch.testing.assert_close(average, loaded)
    assert reloaded.ema.current_decay() == model.ema.current_decay() == 5 / 14  # the warm-up goes on
    x_T = torch.randn(5, 2)
    torch.testing.assert_close(reloaded.sample(5, x_T=x_T), reloaded.sample(5, x_T=x_T, use_ema=True))
    assert not torch.allclose(reloaded.sample(5, x_T=x_T), reloaded.sample(5, x_T=x_T, use_ema=False))


# ----------------------------------------------------------------------------------- training
@pytest.mark.parametrize("prediction, min_snr_gamma", [("epsilon", None), ("v", None), ("v", 5.0)])
def test_loss_falls_on_a_tiny_batch(prediction, min_snr_gamma, mnist_root):
    from datamodules import MNISTDataModule

    data = MNISTDataModule(data_dir=str(mnist_root), download=False)
    data.setup("test")
    x = torch.stack([data.test_set[index][0] for index in range(8)])  # (8, 1, 28, 28) in [0, 1]
    torch.manual_seed(0)
    model = tiny_unet_model(prediction=prediction, num_timesteps=100, min_snr_gamma=min_snr_gamma)
    x0 = model.to_model_space(x)

    def fixed_noise_loss() -> float:  # the same t and eps before and after training
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            return sum(model.diffusion_loss(x0, None, generator=generator).item() for _ in range(4)) / 4

    before = fixed_noise_loss()
    optimizer = torch.optim.Adam(model.network.parameters(), lr=3e-3)
    for _ in range(60):
        optimizer.zero_grad()
        model.diffusion_loss(x0, None).backward()
        optimizer.step()
    after = fixed_noise_loss()
    assert after < 0.5 * before, (before, after)


def test_conditional_sampling_honours_labels():
    torch.manual_seed(0)
    # Moons' label is its moon: 0 the upper one (mean about (-1, 1.07)), 1 the lower (1, -0.47).
    # v-prediction: well conditioned at the noisy end for unbounded vectors (see schedule.py).
    points, labels = sample_toy("moons", 4096, seed=0)
    model = Diffusion((2,), num_timesteps=100, beta_schedule="cosine", prediction="v",
                      mlp=MLPDenoiserConfig(hidden_dim=64, num_layers=2),
                      num_classes=2, label_dropout=0.2, guidance_scale=1.0, ema_decay=None)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(300):
        index = torch.randint(0, len(points), (256,))
        optimizer.zero_grad()
        model.diffusion_loss(points[index], drop_labels(labels[index], 2, model.label_dropout)).backward()
        optimizer.step()
    model.eval()
    class_means = torch.stack([points[labels == k].mean(0) for k in (0, 1)])  # (2, 2)
    torch.manual_seed(1)
    x_T = torch.randn(400, 2)
    for k in (0, 1):
        samples = model.sample(400, steps=20, y=k, x_T=x_T)
        assert samples.shape == (400, 2)
        distances = (samples.mean(0) - class_means).norm(dim=1)
        assert distances[k] < 0.4 < distances[1 - k], (k, distances)
    # Without y the labels cycle 0, 1, 0, 1, ...; wrong labels raise.
    cycled = model.sample(4, steps=20, x_T=x_T[:4])
    torch.testing.assert_close(cycled, model.sample(4, steps=20, y=[0, 1, 0, 1], x_T=x_T[:4]))
    with pytest.raises(ValueError, match="labels"):
        model.sample(2, y=[0, 2])
    with pytest.raises(ValueError, match="one label or"):
        model.sample(3, y=[0, 1])
    # Guidance: scale 0 is the unconditional model, 1 the conditional one, others differ from both.
    y = torch.tensor([0, 1, 1, 0])
    t = torch.tensor([10, 50, 90, 99])
    x_t = torch.randn(4, 2)
    with torch.no_grad():  # the network predicts v; the denoiser returns eps
        conditional = model.schedule.eps_from_velocity(x_t, t, model.network(x_t, t, y))
        unconditional = model.schedule.eps_from_velocity(x_t, t, model.network(x_t, t, torch.full_like(y, 2)))
        torch.testing.assert_close(model.denoiser(model.network, y, 0.0)(x_t, t), unconditional)
        torch.testing.assert_close(model.denoiser(model.network, y, 1.0)(x_t, t), conditional)
        torch.testing.assert_close(model.denoiser(model.network, y, 3.0)(x_t, t),
                                   unconditional + 3.0 * (conditional - unconditional))
    guided = model.sample(4, steps=20, y=y, x_T=x_T[:4], guidance_scale=3.0)
    assert not torch.allclose(guided, model.sample(4, steps=20, y=y, x_T=x_T[:4], guidance_scale=1.0))


# ---------------------------------------------------------------------------------------- CLI
TINY_UNET = ["--model.init_args.num_timesteps", "20", "--model.init_args.unet.base_channels", "4",
             "--model.init_args.unet.channel_multipliers", "[1, 2]", "--model.init_args.unet.num_res_blocks", "1",
             "--model.init_args.unet.attention_levels", "[1]", "--model.init_args.unet.num_heads", "1",
             "--model.init_args.predict_steps", "5", "--data.init_args.batch_size", "8",
             "--data.init_args.num_predict_samples", "6", "--data.init_args.download", "false"]


def test_cli_fit_checkpoint_predict_moons(run_dir):
    output = fit_and_predict("diffusion_moons.yaml", run_dir, "--model.init_args.mlp.hidden_dim", "16",
                             "--model.init_args.num_timesteps", "50", "--data.init_args.num_train", "256",
                             "--data.init_args.num_predict_samples", "300")
    samples = torch.load(output / "samples.pt")
    assert samples.shape == (300, 2) and torch.isfinite(samples).all()
    assert (output / "scatter.png").is_file()


def test_cli_fit_checkpoint_predict_conditional_mnist(run_dir, mnist_root):
    output = fit_and_predict("diffusion_mnist_cond.yaml", run_dir, *TINY_UNET)
    samples = torch.load(output / "samples.pt")
    assert samples.shape == (6, 1, 28, 28) and samples.dtype == torch.uint8
    assert (output / "grid.png").is_file() and (output / "000005.png").is_file()
    checkpoint = torch.load(run_dir / "model.ckpt", weights_only=False)
    assert checkpoint["hyper_parameters"]["num_classes"] == 10
    assert any(key.startswith("ema.averaged.") for key in checkpoint["state_dict"])
