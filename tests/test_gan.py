"""GAN: which weights each step moves, the penalties against hand-computed values, bf16 autocast,
the conditional sampler, EMA, fit -> checkpoint -> predict through the CLI, and 2-process DDP."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from datamodules import MNISTDataModule, ToyDataModule
from lightning_gen import GAN
from lightning_gen.gan.losses import (
    discriminator_loss,
    energy_distance,
    generator_loss,
    gradient_penalty,
    interpolate,
    r1_penalty,
)
from cli_helpers import REPO, fit_and_predict

@pytest.fixture(autouse=True)
def one_thread():
    """These networks are tiny: with two threads on a busy machine, OpenMP's hand-offs cost ~20x
    the arithmetic. The previous setting is restored after each test."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


TINY_TOY = dict(generator_hidden_dims=(16,), discriminator_hidden_dims=(16,), latent_dim=2)


def toy_data(**overrides) -> ToyDataModule:
    settings = dict(num_train=256, num_val=64, num_test=64, batch_size=32, num_predict_samples=8)
    settings.update(overrides)
    return ToyDataModule("8gaussians", **settings)


def tiny_trainer(root, **overrides) -> L.Trainer:
    settings = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                    num_sanity_val_steps=0, default_root_dir=str(root))
    settings.update(overrides)
    return L.Trainer(**settings)


# ------------------------------------------------------------------------------- the two steps
class StepSpy(Callback):
    """Wraps each optimizer's step to record which parameters of G and D it changed."""

    def __init__(self) -> None:
        self.steps: list[tuple[str, set[str]]] = []

    def on_train_start(self, trainer, pl_module) -> None:
        names = {id(p): n for n, p in pl_module.named_parameters()}
        for label, optimizer in zip(("generator", "discriminator"), trainer.optimizers):
            original = optimizer.step

            def step(*args, _original=original, _label=label, **kwargs):
                before = {n: p.detach().clone() for n, p in pl_module.named_parameters()}
                result = _original(*args, **kwargs)
                changed = {n for n, p in pl_module.named_parameters() if not torch.equal(before[n], p)}
                self.steps.append((_label, changed))
                return result

            optimizer.step = step
        self.names = names


@pytest.mark.parametrize("loss", ["non_saturating", "wgan_gp"])
def test_discriminator_step_moves_only_d_and_generator_step_only_g(loss, tmp_path):
    torch.manual_seed(0)
    model = GAN((2,), loss=loss, n_critic=2, **TINY_TOY)
    spy = StepSpy()
    # n_critic=2: batch 0 takes a D step, batch 1 a D step then a G step (4 optimizer steps).
    tiny_trainer(tmp_path, max_steps=3, callbacks=[spy]).fit(model, datamodule=toy_data())
    generator = {n for n, _ in model.named_parameters() if n.startswith("generator.")}
    discriminator = {n for n, _ in model.named_parameters() if n.startswith("discriminator.")}
    assert [label for label, _ in spy.steps] == ["discriminator", "discriminator", "generator"]
    for label, changed in spy.steps:
        own = generator if label == "generator" else discriminator
        assert changed <= own, label
        # Every parameter of the stepped network moves, except the critic's output bias under the
        # WGAN loss, which neither E[D(G(z))] - E[D(x)] nor the penalty depends on.
        expected = own - {"discriminator.head.linear.bias"} if loss == "wgan_gp" else own
        assert changed >= expected, (label, expected - changed)


def test_n_critic_sets_the_ratio_of_steps(tmp_path):
    torch.manual_seed(0)
    model = GAN((2,), n_critic=3, **TINY_TOY)
    spy = StepSpy()
    tiny_trainer(tmp_path, max_steps=8, callbacks=[spy]).fit(model, datamodule=toy_data())
    labels = [label for label, _ in spy.steps]
    assert labels == ["discriminator"] * 3 + ["generator"] + ["discriminator"] * 3 + ["generator"]


class ForwardCounter:
    """Counts a network's forward passes."""

    def __init__(self, module: nn.Module) -> None:
        self.count = 0
        module.register_forward_hook(self.hook)

    def hook(self, module, inputs, output) -> None:
        self.count += 1


@pytest.mark.parametrize("network, n_critic", [("mlp", 1), ("dcgan", 2)])
def test_reuse_fake_batch_takes_the_steps_of_fresh_batches_of_the_same_noise_with_fewer_forwards(
        network, n_critic, tmp_path):
    """With the noise held fixed, a G step on the D step's batch is the G step on a fresh batch:
    the same weights after every step (only batch norm's running statistics, updated once instead
    of twice, may differ), with one generator forward pass less per G step."""
    data_shape, data = ((2,), toy_data(batch_size=8)) if network == "mlp" else ((1, 8, 8), None)
    kwargs = dict(TINY_TOY) if network == "mlp" else dict(base_channels=4, latent_dim=3)
    torch.manual_seed(0)
    fresh = GAN(data_shape, network=network, n_critic=n_critic, **kwargs)
    reuse = GAN(data_shape, network=network, n_critic=n_critic, reuse_fake_batch=True, **kwargs)
    reuse.load_state_dict(fresh.state_dict())
    initial = [parameter.detach().clone() for parameter in fresh.parameters()]
    z = torch.randn(8, fresh.latent_dim)
    batches = 2 * n_critic
    if data is None:
        images = torch.rand(8 * batches, *data_shape)
        data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, torch.zeros(len(images))),
                                           batch_size=8)
    counters = {}
    for name, model in (("fresh", fresh), ("reuse", reuse)):
        model.noise = lambda num_samples, truncation=None: z[:num_samples].clone()
        counters[name] = ForwardCounter(model.generator)
        torch.manual_seed(1)
        trainer = tiny_trainer(tmp_path / name, max_steps=batches + batches // n_critic)
        if isinstance(data, L.LightningDataModule):
            trainer.fit(model, datamodule=data)
        else:
            trainer.fit(model, train_dataloaders=data)
    for (name, a), b in zip(fresh.named_parameters(), reuse.parameters()):
        assert torch.equal(a, b), name  # the same arithmetic in the same order
    generator_steps = batches // n_critic
    assert counters["fresh"].count == batches + generator_steps
    assert counters["reuse"].count == batches
    # Both networks moved, so the comparison above compared trained weights.
    moved = [name for (name, a), b in zip(fresh.named_parameters(), initial) if not torch.equal(a, b)]
    assert any(name.startswith("generator.") for name in moved)
    assert any(name.startswith("discriminator.") for name in moved)


def test_learning_rate_schedules_step_with_their_optimizers(tmp_path):
    model = GAN((2,), lr_schedule="cosine", warmup_steps=4, generator_learning_rate=1e-3,
                discriminator_learning_rate=2e-3, n_critic=2, **TINY_TOY)
    # 3 batches: 3 D steps, 1 G step (4 optimizer steps); warm-up factor (n + 1) / 4 after n steps.
    trainer = tiny_trainer(tmp_path, max_steps=4)
    trainer.fit(model, datamodule=toy_data())
    optimizer_g, optimizer_d = trainer.optimizers
    assert optimizer_d.param_groups[0]["lr"] == pytest.approx(2e-3 * 4 / 4)
    assert optimizer_g.param_groups[0]["lr"] == pytest.approx(1e-3 * 2 / 4)


@pytest.mark.parametrize("lr_schedule", ["constant", "cosine"])
def test_schedules_of_a_fit_bounded_by_time_only(tmp_path, lr_schedule):
    """max_time without max_steps (the laptop preset): the warm-up runs, and a cosine decays
    both optimizers' rates with the time spent, to about 0 when the fit stops."""
    import lightning as L

    model = GAN((2,), lr_schedule=lr_schedule, warmup_steps=2, generator_learning_rate=1e-3,
                discriminator_learning_rate=2e-3, **TINY_TOY)
    trainer = L.Trainer(default_root_dir=tmp_path, accelerator="cpu", max_epochs=-1,
                        max_time={"seconds": 2}, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, limit_val_batches=0, enable_model_summary=False)
    trainer.fit(model, datamodule=toy_data())
    assert trainer.global_step > 10
    rates = [optimizer.param_groups[0]["lr"] for optimizer in trainer.optimizers]
    if lr_schedule == "constant":
        assert rates == [pytest.approx(1e-3), pytest.approx(2e-3)]
    else:
        assert rates[0] < 0.2e-3 and rates[1] < 0.4e-3


# ------------------------------------------------------------------------------------- losses
def test_adversarial_losses_match_their_formulas():
    real, fake = torch.tensor([2.0, -1.0, 0.5]), torch.tensor([0.3, -2.0, 1.5])
    sigmoid = torch.sigmoid
    expected = -(sigmoid(real).log().mean() + (1 - sigmoid(fake)).log().mean())
    torch.testing.assert_close(discriminator_loss("non_saturating", real, fake), expected)
    torch.testing.assert_close(generator_loss("non_saturating", fake), -sigmoid(fake).log().mean())
    # hinge: mean(relu(1 - r)) = (0 + 2 + 0.5) / 3, mean(relu(1 + f)) = (1.3 + 0 + 2.5) / 3
    torch.testing.assert_close(discriminator_loss("hinge", real, fake), torch.tensor(2.5 / 3 + 3.8 / 3))
    torch.testing.assert_close(discriminator_loss("wgan_gp", real, fake), fake.mean() - real.mean())
    torch.testing.assert_close(generator_loss("hinge", fake), -fake.mean())
    with pytest.raises(ValueError, match="loss must be one of"):
        generator_loss("least_squares", fake)


def test_gradient_penalty_equals_hand_computed_value():
    # D(x) = sum(a * x^2) / 2 has grad_x D = a * x, so the penalty is mean((||a * x|| - 1)^2).
    a = torch.tensor([3.0, 4.0])
    x_hat = torch.tensor([[1.0, 0.0], [0.0, 0.5], [0.2, 0.2]], requires_grad=True)

    def discriminator(x):
        return (a * x.pow(2)).sum(1) / 2

    # ||(3, 0)|| = 3, ||(0, 2)|| = 2, ||(0.6, 0.8)|| = 1  ->  ((2)^2 + (1)^2 + 0) / 3
    penalty = gradient_penalty(discriminator, x_hat)
    torch.testing.assert_close(penalty, torch.tensor(5.0 / 3.0))
    # It is differentiable in the discriminator's parameters (double back-propagation):
    # d/da of mean((||a * x|| - 1)^2) at the three points, by hand.
    a.requires_grad_(True)
    gradient_penalty(discriminator, x_hat).backward()
    norms = torch.tensor([3.0, 2.0, 1.0])
    expected = torch.zeros(2)
    for point, norm in zip(x_hat.detach(), norms):
        expected += 2 * (norm - 1) * (a.detach() * point.pow(2)) / norm / 3
    torch.testing.assert_close(a.grad, expected)


def test_r1_penalty_of_a_linear_discriminator_is_the_squared_weight_norm():
    w = torch.tensor([1.0, -2.0, 2.0])
    real = torch.randn(5, 3).requires_grad_(True)
    torch.testing.assert_close(r1_penalty(real @ w, real), torch.tensor(9.0))
    with pytest.raises(ValueError, match="require grad"):
        r1_penalty(real.detach() @ w, real.detach())


def test_interpolation_lies_on_the_segment():
    torch.manual_seed(0)
    real, fake = torch.zeros(64, 1, 2, 2), torch.ones(64, 1, 2, 2)
    x_hat = interpolate(real, fake)
    assert x_hat.requires_grad and x_hat.shape == real.shape
    # One eps per example: all pixels of an example share it, eps spreads over [0, 1].
    per_example = x_hat.flatten(1)
    assert torch.equal(per_example, per_example[:, :1].expand_as(per_example))
    assert per_example.min() >= 0 and per_example.max() <= 1 and per_example.std() > 0.2


def test_gradient_penalty_under_bf16_autocast_matches_float32():
    torch.manual_seed(0)
    discriminator = nn.Sequential(nn.Linear(16, 64), nn.LeakyReLU(0.2), nn.Linear(64, 1),
                                  nn.Flatten(0))
    x_hat = torch.randn(32, 16).requires_grad_(True)
    exact = gradient_penalty(discriminator, x_hat)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = gradient_penalty(discriminator, x_hat)
        assert discriminator(x_hat).dtype == torch.bfloat16  # autocast is really on
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, exact, rtol=3e-2, atol=1e-3)
    mixed.backward()
    # The penalty reaches every weight (the biases of the last layer cannot change an input gradient).
    for name, parameter in discriminator.named_parameters():
        if name.endswith("weight"):
            assert torch.isfinite(parameter.grad).all() and parameter.grad.abs().sum() > 0, name


def test_energy_distance_hand_value_and_behaviour():
    x, y = torch.tensor([[0.0], [2.0]]), torch.tensor([[1.0], [4.0]])
    # between: (1 + 4 + 1 + 2) / 4 = 2; within x: 2; within y: 3  ->  2 * 2 - 2 - 3 = -1
    torch.testing.assert_close(energy_distance(x, y), torch.tensor(-1.0))
    torch.manual_seed(0)
    a, b = torch.randn(500, 2), torch.randn(500, 2)
    same, shifted = energy_distance(a, b), energy_distance(a, b + 1.0)
    assert abs(same) < 0.05 and shifted > 0.5
    with pytest.raises(ValueError, match="at least 2"):
        energy_distance(a[:1], b)


# ----------------------------------------------------------------------------------- sampling
def test_conditional_sampler_honours_labels():
    torch.manual_seed(0)
    model = GAN(num_classes=10, network="mlp", latent_dim=8, generator_hidden_dims=(32,),
                discriminator_hidden_dims=(32,)).eval()
    assert model.sample(4, y=3).shape == (4, 1, 28, 28)
    assert model.sample(3, y=[1, 2, 9]).shape == (3, 1, 28, 28)
    assert model.sample(5).shape == (5, 1, 28, 28)  # default labels 0..4
    torch.manual_seed(1)
    threes = model.sample(6, y=torch.full((6,), 3))
    torch.manual_seed(1)
    fives = model.sample(6, y=5)
    torch.manual_seed(1)
    again = model.sample(6, y=[3] * 6)
    torch.testing.assert_close(threes, again)
    assert not torch.allclose(threes, fives)  # the same noise, another label: another image
    with pytest.raises(ValueError, match="shape"):
        model.sample(4, y=torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="shape"):
        model.sample(4, y=torch.zeros(4, 1, dtype=torch.long))
    with pytest.raises(ValueError, match=r"labels must lie in 0\.\.9"):
        model.sample(2, y=[0, 10])
    with pytest.raises(TypeError, match="integer"):
        model.sample(2, y=torch.tensor([0.0, 1.0]))
    # predict_step draws the batch's labels.
    labels = torch.tensor([7, 7, 1])
    torch.manual_seed(2)
    predicted = model.predict_step((torch.zeros(3, 1, 28, 28), labels), 0)
    torch.manual_seed(2)
    torch.testing.assert_close(predicted, model.sample(3, y=labels))
    with pytest.raises(ValueError, match="unconditional"):
        GAN((2,), **TINY_TOY).sample(2, y=1)


def test_ema_is_used_for_sampling_and_saved_in_checkpoints(tmp_path):
    torch.manual_seed(0)
    model = GAN((2,), ema_decay=0.9, **TINY_TOY)
    trainer = tiny_trainer(tmp_path, max_steps=20)
    trainer.fit(model, datamodule=toy_data())
    averaged = dict(model.generator_ema.averaged.named_parameters())
    assert any(not torch.equal(p, averaged[n]) for n, p in model.generator.named_parameters())
    samples = {}
    for use_ema in (None, True, False):
        torch.manual_seed(3)
        samples[use_ema] = model.sample(16, use_ema=use_ema)
    torch.testing.assert_close(samples[None], samples[True])
    assert not torch.allclose(samples[True], samples[False])
    path = tmp_path / "ema.ckpt"
    trainer.save_checkpoint(path)
    state = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
    assert any(key.startswith("generator_ema.averaged.") for key in state)
    reloaded = GAN.load_from_checkpoint(path, map_location="cpu")
    torch.manual_seed(3)
    torch.testing.assert_close(reloaded.sample(16), samples[True])
    with pytest.raises(ValueError, match="ema_decay"):
        GAN((2,), **TINY_TOY).sample(2, use_ema=True)


def test_sampling_does_not_touch_batch_norm_statistics():
    model = GAN(base_channels=4, latent_dim=8).train()
    before = {n: b.clone() for n, b in model.generator.named_buffers()}
    first = model.sample(4)
    assert model.generator.training  # the mode is restored
    assert all(torch.equal(before[n], b) for n, b in model.generator.named_buffers())
    assert first.min() >= 0 and first.max() <= 1


def test_truncation_bounds_the_noise_and_none_draws_the_training_noise():
    model = GAN((2,), **TINY_TOY)
    torch.manual_seed(0)
    plain = model.noise(20000)
    torch.manual_seed(0)
    assert torch.equal(model.noise(20000, None), plain)
    truncated = model.noise(20000, truncation=0.5)  # 40,000 values: a standard error of 0.5% on the variance
    assert truncated.abs().max() <= 0.5
    # N(0, 1) truncated to [-t, t] has variance 1 - 2 t phi(t) / (2 Phi(t) - 1)
    t = torch.tensor(0.5, dtype=torch.float64)
    phi = torch.exp(-t**2 / 2) / math.sqrt(2 * math.pi)
    expected = 1 - 2 * t * phi / torch.erf(t / math.sqrt(2))
    assert abs(truncated.double().var() - expected) < 0.02 * expected
    assert abs(truncated.mean()) < 0.01  # symmetric
    # the samples follow the noise: a tight truncation draws samples nearer each other
    torch.manual_seed(1)
    spread = model.sample(2000).std(0).mean()
    torch.manual_seed(1)
    tight = model.sample(2000, truncation=0.1).std(0).mean()
    assert tight < 0.5 * spread, (tight, spread)
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="truncation must be None"):
            model.sample(2, truncation=bad)
        with pytest.raises(ValueError, match="predict_truncation must be None"):
            GAN((2,), predict_truncation=bad, **TINY_TOY)


def test_generator_extra_layers_add_convolutions_at_both_low_resolutions():
    torch.manual_seed(0)
    plain = GAN(base_channels=4, latent_dim=8)
    deeper = GAN(base_channels=4, latent_dim=8, generator_extra_layers=2)
    widths = [(layer.in_channels, layer.out_channels, layer.kernel_size)
              for layer in deeper.generator.modules() if type(layer) is nn.Conv2d]
    assert widths == [(8, 8, (3, 3))] * 2 + [(4, 4, (3, 3))] * 2  # 2c at H/4, then c at H/2
    assert not any(type(layer) is nn.Conv2d for layer in plain.generator.modules())
    # the input of each added convolution has the resolution its width belongs to
    sizes = []
    hooks = [layer.register_forward_hook(lambda m, args, out: sizes.append(tuple(out.shape[1:])))
             for layer in deeper.generator.modules() if type(layer) is nn.Conv2d]
    assert deeper.sample(3).shape == (3, 1, 28, 28)
    for hook in hooks:
        hook.remove()
    assert sizes == [(8, 7, 7)] * 2 + [(4, 14, 14)] * 2
    # 0 keeps the original layer indices (state-dict names), so earlier checkpoints still load
    layers = [type(layer).__name__ for layer in plain.generator.upsample]
    assert layers == ["BatchNorm2d", "ReLU", "ConvTranspose2d", "BatchNorm2d", "ReLU",
                      "ConvTranspose2d", "Tanh"]


def test_discriminator_extra_layers_add_convolutions_after_each_strided_one():
    plain = GAN(base_channels=4, latent_dim=8)
    deeper = GAN(base_channels=4, latent_dim=8, discriminator_extra_layers=1)
    convolutions = [layer for layer in deeper.discriminator.modules() if type(layer) is nn.Conv2d]
    shapes = [(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride) for layer in convolutions]
    assert shapes == [(1, 4, (4, 4), (2, 2)), (4, 4, (3, 3), (1, 1)),   # c at H/2
                      (4, 8, (4, 4), (2, 2)), (8, 8, (3, 3), (1, 1))]   # 2c at H/4
    sizes = []
    hooks = [layer.register_forward_hook(lambda m, args, out: sizes.append(tuple(out.shape[1:])))
             for layer in convolutions]
    assert deeper.discriminator(torch.rand(3, 1, 28, 28)).shape == (3,)
    for hook in hooks:
        hook.remove()
    assert sizes == [(4, 14, 14)] * 2 + [(8, 7, 7)] * 2
    # 0 keeps the original layers (state-dict names), so earlier checkpoints still load
    assert [type(layer).__name__ for layer in plain.discriminator.features] == [
        "Conv2d", "LeakyReLU", "Conv2d", "LeakyReLU"]


def test_training_improves_the_energy_distance_on_8gaussians(tmp_path):
    torch.manual_seed(0)
    model = GAN((2,), latent_dim=2, generator_hidden_dims=(32, 32), discriminator_hidden_dims=(32, 32),
                generator_learning_rate=2e-3, discriminator_learning_rate=2e-3)
    data = toy_data(num_train=6400, num_val=512, batch_size=64)
    trainer = tiny_trainer(tmp_path, max_steps=160, max_epochs=1, limit_val_batches=None)
    before = trainer.validate(model, datamodule=data, verbose=False)[0]["val/loss"]
    trainer.fit(model, datamodule=data)
    logged = dict(trainer.callback_metrics)
    after = trainer.validate(model, datamodule=data, verbose=False)[0]["val/loss"]
    assert after < 0.5 * before, (before, after)
    for name in ("train/loss", "train/d_loss", "train/g_loss", "train/d_real", "train/d_fake"):
        assert torch.isfinite(logged[name]), name


# ------------------------------------------------------------------------ precision, arguments
def test_bf16_mixed_fit_with_gradient_penalty_and_r1(tmp_path):
    torch.manual_seed(0)
    model = GAN((2,), loss="wgan_gp", r1_weight=1.0, spectral_norm=True, **TINY_TOY)
    trainer = tiny_trainer(tmp_path, max_steps=6, precision="bf16-mixed")
    trainer.fit(model, datamodule=toy_data())
    for name in ("train/d_loss", "train/g_loss", "train/gradient_penalty", "train/r1"):
        assert torch.isfinite(trainer.callback_metrics[name]), name
    assert all(torch.isfinite(p).all() and p.dtype == torch.float32 for p in model.parameters())


def test_bf16_mixed_dcgan_step(tmp_path, mnist_root):
    torch.manual_seed(0)
    model = GAN(base_channels=4, latent_dim=8, num_classes=10)
    data = MNISTDataModule(data_dir=str(mnist_root), batch_size=8, download=False)
    trainer = tiny_trainer(tmp_path, max_steps=2, precision="bf16-mixed")
    trainer.fit(model, datamodule=data)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(data_shape=(2,), network="dcgan"), ValueError, "dcgan"),
    (dict(data_shape=(1, 30, 30), network="dcgan"), ValueError, "divisible by 4"),
    (dict(network="resnet"), ValueError, "network must be one of"),
    (dict(loss="least_squares"), ValueError, "loss must be one of"),
    (dict(n_critic=0), ValueError, "n_critic"),
    (dict(generator_betas=(0.5,)), ValueError, "generator_betas"),
    (dict(discriminator_betas=(0.5, 1.0)), ValueError, "discriminator_betas"),
    (dict(num_classes=1), ValueError, "num_classes"),
    (dict(gradient_penalty_weight=-1.0), ValueError, "gradient_penalty_weight"),
    (dict(discriminator_learning_rate=0.0), ValueError, "discriminator_learning_rate"),
    (dict(ema_decay=1.0), ValueError, "decay"),
    (dict(generator_extra_layers=-1), ValueError, "generator_extra_layers"),
    (dict(data_shape=(2,), generator_extra_layers=1), ValueError, "dcgan"),
    (dict(discriminator_extra_layers=-1), ValueError, "discriminator_extra_layers"),
    (dict(data_shape=(2,), discriminator_extra_layers=1), ValueError, "discriminator_extra_layers applies"),
])
def test_bad_arguments_are_rejected(kwargs, error, message):
    with pytest.raises(error, match=message):
        GAN(**kwargs)


def test_network_defaults_follow_the_data_and_the_penalty_follows_the_loss():
    assert GAN(base_channels=4).architecture == "dcgan"
    assert GAN((2,), **TINY_TOY).architecture == "mlp"
    assert GAN((2,), loss="wgan_gp", **TINY_TOY).gradient_penalty_weight == 10.0
    assert GAN((2,), loss="hinge", **TINY_TOY).gradient_penalty_weight == 0.0


# ------------------------------------------------------------------------------------ the CLI
def test_fit_checkpoint_predict_through_the_cli_mnist(run_dir, mnist_root):
    output = fit_and_predict(
        "gan_mnist.yaml", run_dir, "--model.init_args.base_channels", "4",
        "--model.init_args.latent_dim", "8", "--model.init_args.num_classes", "10",
        "--data.init_args.batch_size", "8", "--data.init_args.num_predict_samples", "12")
    samples = torch.load(output / "samples.pt")
    assert samples.dtype == torch.uint8 and samples.shape == (12, 1, 28, 28)
    assert (output / "grid.png").is_file() and (output / "000011.png").is_file()
    state = torch.load(run_dir / "model.ckpt", map_location="cpu", weights_only=False)
    assert state["hyper_parameters"]["num_classes"] == 10
    assert any(key.startswith("generator_ema.") for key in state["state_dict"])


def test_the_seed_mlp_config_fits_and_predicts(run_dir, mnist_root):
    output = fit_and_predict(
        "gan_mlp_mnist.yaml", run_dir, "--model.init_args.generator_hidden_dims", "[16, 32]",
        "--model.init_args.discriminator_hidden_dims", "[32, 16]", "--data.init_args.batch_size", "8",
        "--data.init_args.num_predict_samples", "4")
    samples = torch.load(output / "samples.pt")
    assert samples.dtype == torch.uint8 and samples.shape == (4, 1, 28, 28)
    state = torch.load(run_dir / "model.ckpt", map_location="cpu", weights_only=False)
    assert state["hyper_parameters"]["network"] == "mlp"
    assert not any(key.startswith("generator_ema.") for key in state["state_dict"])  # the seed's: no EMA


def test_fit_checkpoint_predict_through_the_cli_8gaussians(run_dir):
    output = fit_and_predict(
        "gan_8gaussians.yaml", run_dir, "--data.init_args.num_train", "256",
        "--data.init_args.num_predict_samples", "50", "--model.init_args.n_critic", "1")
    samples = torch.load(output / "samples.pt")
    assert samples.dtype == torch.float32 and samples.shape == (50, 2)
    assert torch.isfinite(samples).all() and (output / "scatter.png").is_file()


@pytest.mark.slow
def test_two_process_ddp_fit_through_the_cli(tmp_path):
    """DDP on two CPU processes with find_unused_parameters=False (the plain "ddp" strategy): every
    backward must reach every parameter, or the second step fails."""
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": str(REPO)}
    command = [sys.executable, str(REPO / "cli.py"), "fit", "--config", str(REPO / "configs" / "gan_8gaussians.yaml"),
               "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp",
               "--trainer.max_steps", "14", "--trainer.logger", "false", "--trainer.callbacks", "[]",
               "--trainer.enable_progress_bar", "false", "--trainer.limit_val_batches", "1",
               "--trainer.num_sanity_val_steps", "0", "--trainer.val_check_interval", "5",
               "--data.init_args.num_train", "2048", "--data.init_args.batch_size", "64",
               "--sample_logger.every_n_epochs", "0"]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Expected to have finished reduction" not in result.stderr


# ------------------------------------------------------------ discriminator rejection sampling
class FirstCoordinate(nn.Module):
    """A 'generator' that outputs its noise's first coordinate: samples from N(0, 1)."""

    def forward(self, z, y=None):
        return z[:, :1]


class LogSigmoidRatio(nn.Module):
    """A 'discriminator' whose logit is log sigmoid(+-x): the log-ratio of the density
    N(0, 1) * sigmoid(x) (label 0, or unconditional) or N(0, 1) * sigmoid(-x) (label 1) to N(0, 1)."""

    def forward(self, x, y=None):
        sign = 1.0 if y is None else 1.0 - 2.0 * y.float()
        return torch.nn.functional.logsigmoid(sign * x[:, 0])


def tilted_normal_mean() -> float:
    """Mean of the density proportional to N(0, 1) * sigmoid(x), by quadrature."""
    x = torch.linspace(-12, 12, 200001, dtype=torch.float64)
    weight = torch.exp(-x**2 / 2) * torch.sigmoid(x)
    return float((x * weight).sum() / weight.sum())


def ratio_gan(num_classes=None) -> GAN:
    model = GAN((1,), network="mlp", latent_dim=1, num_classes=num_classes, **{
        k: v for k, v in TINY_TOY.items() if k != "latent_dim"})
    model.generator, model.discriminator = FirstCoordinate(), LogSigmoidRatio()
    return model


def test_rejection_acceptance_is_the_density_ratio_over_its_bound_at_gamma_zero():
    from lightning_gen.gan.module import rejection_acceptance

    bound = torch.tensor(2.0)
    logits = torch.linspace(-8.0, 1.9, 100)
    exact = torch.exp(logits - bound)
    accepted = rejection_acceptance(logits, bound, 0.0)
    assert torch.allclose(accepted.double(), exact.double(), rtol=1e-4)
    assert (accepted.diff() > 0).all()  # higher logits are kept more often
    assert (rejection_acceptance(logits, bound, 2.0) < accepted).all()
    assert (rejection_acceptance(logits, bound, -2.0) > accepted).all()
    at_bound = rejection_acceptance(bound.reshape(1), bound, 0.0)
    assert torch.isfinite(at_bound).all() and 0.99 < at_bound.item() <= 1.0


def test_rejection_sampling_draws_the_distribution_the_discriminator_ratio_describes():
    model = ratio_gan()
    torch.manual_seed(0)
    plain = model.sample(4000)[:, 0]
    torch.manual_seed(0)
    rejected = model.sample(4000, rejection_gamma=0.0)[:, 0]
    torch.manual_seed(0)
    again = model.sample(4000, rejection_gamma=0.0)[:, 0]
    target = tilted_normal_mean()  # about 0.41; the standard error of 4,000 draws is about 0.015
    assert abs(plain.mean().item()) < 0.05
    assert abs(rejected.mean().item() - target) < 0.05, (rejected.mean().item(), target)
    assert torch.equal(rejected, again)  # reproducible under the seed


def test_rejection_sampling_keeps_each_position_with_its_label():
    model = ratio_gan(num_classes=2)
    labels = torch.arange(4000) % 2
    torch.manual_seed(0)
    samples = model.sample(4000, y=labels, rejection_gamma=0.0)[:, 0]
    target = tilted_normal_mean()
    assert abs(samples[labels == 0].mean().item() - target) < 0.07
    assert abs(samples[labels == 1].mean().item() + target) < 0.07


def test_rejection_sampling_refuses_what_it_cannot_do():
    with pytest.raises(ValueError, match="predict_rejection_gamma needs loss='non_saturating'"):
        GAN((2,), loss="hinge", predict_rejection_gamma=0.0, **TINY_TOY)
    hinge = GAN((2,), loss="hinge", **TINY_TOY)
    with pytest.raises(ValueError, match="rejection_gamma needs loss='non_saturating'"):
        hinge.sample(2, rejection_gamma=0.0)
    for bad in (float("nan"), float("inf"), True, "0"):
        with pytest.raises(ValueError, match="rejection_gamma must be None"):
            GAN((2,), predict_rejection_gamma=bad, **TINY_TOY)
    model = ratio_gan()
    with pytest.raises(RuntimeError, match="lower rejection_gamma"):
        model.sample(8, rejection_gamma=60.0)  # accepts about e^-60 of the proposals


def test_rejection_sampling_leaves_the_discriminator_as_it_was():
    model = GAN((2,), spectral_norm=True, **TINY_TOY)
    before = {name: value.clone() for name, value in model.discriminator.state_dict().items()}
    model.sample(16, rejection_gamma=0.0)
    assert model.discriminator.training
    after = model.discriminator.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)  # spectral norm's u, v unchanged
