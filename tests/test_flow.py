"""RealNVP: invertibility, log-dets against autograd's Jacobian, a normalized density, training,
bf16 safety, input checks, and fit -> checkpoint -> predict through the CLI."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from torch.autograd.functional import jacobian

from datamodules import ToyDataModule
from lightning_gen import RealNVP
from lightning_gen.flow.layers import (
    ActNorm,
    AffineCoupling,
    DequantizeLogit,
    Squeeze,
    alternating_mask,
    channel_mask,
    checkerboard_mask,
)
from lightning_gen.flow.nets import MLPConditioner, ResNetConditioner
from cli_helpers import fit_and_predict


def randomize(module: torch.nn.Module, std: float = 0.3, seed: int = 0) -> torch.nn.Module:
    """Random parameters, so no layer is the identity of its zero initialization."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)
    return module


def tiny_vector_flow(num_features: int = 3, mask: str = "alternating") -> RealNVP:
    return randomize(RealNVP((num_features,), num_layers=4, hidden_dims=(16,), mask=mask)).eval()


def tiny_image_flow(shape=(1, 4, 4), num_scales: int = 2) -> RealNVP:
    model = RealNVP(shape, num_scales=num_scales, couplings_per_scale=2, hidden_channels=4, num_blocks=1)
    return randomize(model, std=0.2).eval()


def log_abs_det_jacobian(function, x: torch.Tensor) -> torch.Tensor:
    """log|det d function(x)_i / dx_i| for each example i of the batch x, by autograd: (B,).

    Examples do not interact, so the Jacobian of the batch sum of the outputs, (D, B, D), holds
    each example's (D, D) Jacobian; this needs D backward passes instead of B * D."""
    batch_size, num_dims = len(x), x[0].numel()
    matrix = jacobian(lambda v: function(v).reshape(batch_size, num_dims).sum(0), x)
    blocks = matrix.reshape(num_dims, batch_size, num_dims).transpose(0, 1).double()  # (B, D, D)
    return torch.linalg.slogdet(blocks).logabsdet.float()


def layer_output(layer):
    return lambda v: layer(v)[0]


def layer_inverse(layer):
    return lambda v: layer.inverse(v)[0]


# ------------------------------------------------------------------------------- invertibility
@pytest.mark.parametrize("mask", ["alternating", "random"])
def test_vector_flow_inverts(mask):
    torch.manual_seed(0)
    model = tiny_vector_flow(5, mask)
    x = 3 * torch.randn(64, 5)
    z, log_det = model(x)
    assert z.shape == (64, 5) and log_det.shape == (64,) and log_det.dtype == torch.float32
    assert (z - x).abs().max() > 0.1  # the flow is not the identity
    torch.testing.assert_close(model.inverse(z), x, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(model(model.inverse(z))[0], z, atol=1e-4, rtol=1e-4)


def test_image_flow_inverts_exactly_without_noise_and_to_the_level_with_it():
    torch.manual_seed(0)
    model = tiny_image_flow((1, 8, 8), num_scales=3)
    x = torch.randint(0, 256, (6, 1, 8, 8)).float() / 255  # 8-bit images as the data module yields
    z, log_det = model(x, dequantize=False)
    assert z.shape == (6, 64) and log_det.shape == (6,)
    torch.testing.assert_close(model.inverse(z), x, atol=1e-5, rtol=1e-5)
    # With dequantization noise, inverse returns the dequantized image u = (k + eps) / 256 in the
    # cell of level k: quantizing it gives x back, and u differs from x by less than a level.
    torch.manual_seed(1)
    z, _ = model(x)
    u = model.inverse(z)
    assert ((u - x).abs() < 1.5 / 255).all() and (u != x).any()
    torch.testing.assert_close(model.quantize(u), x, atol=1e-6, rtol=0)


# ------------------------------------------------------------------ log-dets against autograd
SINGLE_LAYERS = {
    "coupling_vector_alternating": (lambda: AffineCoupling(alternating_mask(4, 1), MLPConditioner(4, (8,)), 4), (4,)),
    "coupling_checkerboard": (lambda: AffineCoupling(checkerboard_mask(4, 4, 0), ResNetConditioner(2, 4, 1), 2),
                              (2, 4, 4)),
    "coupling_channel": (lambda: AffineCoupling(channel_mask(4, 1), ResNetConditioner(4, 4, 1), 4), (4, 2, 2)),
    "actnorm_vector": (lambda: ActNorm(3, image=False), (3,)),
    "actnorm_image": (lambda: ActNorm(2, image=True), (2, 3, 3)),
    "squeeze": (lambda: Squeeze(), (2, 4, 4)),
}


@pytest.mark.parametrize("name", sorted(SINGLE_LAYERS))
def test_single_layer_log_det_equals_autograd_jacobian(name):
    build, shape = SINGLE_LAYERS[name]
    layer = randomize(build(), seed=1).eval()
    torch.manual_seed(2)
    x = torch.randn(3, *shape)
    y, log_det = layer(x)
    x_back, inverse_log_det = layer.inverse(y)
    torch.testing.assert_close(x_back, x, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(log_det, log_abs_det_jacobian(layer_output(layer), x), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(inverse_log_det, log_abs_det_jacobian(layer_inverse(layer), y),
                               atol=1e-4, rtol=1e-4)
    if name.startswith("coupling"):
        assert log_det.abs().max() > 0.01  # a real scaling, not a volume-preserving layer


def test_dequantize_logit_log_det_is_with_respect_to_pixel_values_in_0_256():
    layer = DequantizeLogit(alpha=0.05)
    u = torch.rand(2, 1, 3, 3)
    y, log_det = layer(u, dequantize=False)
    # log|dy/du| from autograd; v = 256 u, so log|dy/dv| = log|dy/du| - D log 256.
    expected = log_abs_det_jacobian(lambda v: layer(v, dequantize=False)[0], u) - 9 * math.log(256)
    torch.testing.assert_close(log_det, expected, atol=1e-4, rtol=1e-5)
    u_back, inverse_log_det = layer.inverse(y)
    torch.testing.assert_close(u_back, u, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(inverse_log_det, -log_det)


def test_whole_vector_flow_log_det_equals_autograd_jacobian():
    model = tiny_vector_flow(3, "random")
    x = torch.randn(4, 3)
    _, log_det = model(x)
    torch.testing.assert_close(log_det, log_abs_det_jacobian(lambda v: model(v)[0], x), atol=1e-4, rtol=1e-4)


def test_whole_image_flow_log_det_equals_autograd_jacobian():
    # data_shape (1, 4, 4), 2 scales: checkerboard couplings, squeeze to (4, 2, 2), channel-wise
    # couplings, factor out (2, 2, 2), checkerboard couplings on the rest; z flat (B, 16).
    model = tiny_image_flow((1, 4, 4), num_scales=2)
    x = torch.rand(3, 1, 4, 4)
    z, log_det = model(x, dequantize=False)
    # The log-det is with respect to v = 256 x (pixel values in [0, 256)).
    expected = log_abs_det_jacobian(lambda v: model(v, dequantize=False)[0], x) - 16 * math.log(256)
    torch.testing.assert_close(log_det, expected, atol=2e-3, rtol=1e-4)
    standard_normal = -0.5 * (z.pow(2) + math.log(2 * math.pi)).sum(1)
    torch.testing.assert_close(model.log_prob(x, dequantize=False), standard_normal + log_det)


# ------------------------------------------------------------------------ normalized densities
def test_density_integrates_to_one_on_a_grid():
    torch.manual_seed(0)
    model = tiny_vector_flow(2)  # random couplings: a skewed, non-Gaussian density
    half_width, step = 8.0, 0.05
    axis = torch.arange(-half_width, half_width, step) + step / 2  # cell midpoints
    grid = torch.stack(torch.meshgrid(axis, axis, indexing="ij"), -1).reshape(-1, 2)
    with torch.no_grad():
        log_density = model.log_prob(grid)
    total = log_density.exp().sum() * step**2
    assert abs(total - 1.0) < 0.005, total
    # The density is not the prior's: the flow moved mass around.
    standard_normal = -0.5 * (grid.pow(2).sum(1) + 2 * math.log(2 * math.pi))
    assert (log_density.exp() - standard_normal.exp()).abs().max() > 0.02


def test_pixel_density_integrates_to_its_probability_mass_on_0_256():
    # One pixel: the density on v in [0, 256) integrates to the N(0, 1) mass of the interval the
    # logit maps [0, 1] to (at most 1: the flow's mass outside it is lost, so bits/dim is
    # conservative). A wrong unit in the log-det (u instead of v = 256 u) would be off by 256.
    model = randomize(RealNVP((1, 1, 1), num_scales=1, couplings_per_scale=2, hidden_channels=4,
                              num_blocks=1), std=0.5).eval()
    step = 1 / 4096
    u = (torch.arange(0, 1, step) + step / 2).view(-1, 1, 1, 1)
    with torch.no_grad():
        integral = model.log_prob(u, dequantize=False).exp().sum() * step * 256
        z_ends, _ = model(torch.tensor([0.0, 1.0]).view(2, 1, 1, 1), dequantize=False)
    normal = torch.distributions.Normal(0.0, 1.0)
    mass = (normal.cdf(z_ends.max()) - normal.cdf(z_ends.min()))
    assert 0.2 < mass <= 1.0
    torch.testing.assert_close(integral, mass, atol=1e-3, rtol=1e-3)


# ------------------------------------------------------------------------------------ training
def test_short_fit_on_8gaussians_lowers_the_test_nll(tmp_path):
    torch.manual_seed(0)
    data = ToyDataModule("8gaussians", num_train=4096, num_val=256, num_test=1024, batch_size=256)
    model = RealNVP(data.data_shape, num_layers=6, hidden_dims=(32, 32), learning_rate=1e-2)
    trainer = L.Trainer(accelerator="cpu", max_steps=100, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        default_root_dir=str(tmp_path))
    before = trainer.test(model, datamodule=data, verbose=False)[0]["test/nll"]
    trainer.fit(model, datamodule=data)
    after = trainer.test(model, datamodule=data, verbose=False)[0]["test/nll"]
    # The untrained flow is N(0, I) on data of radius 2.8: about 6 nats; the entropy is 2.84.
    assert before > 5.0
    assert after < 4.0 and after < before - 1.5, (before, after)
    bpd = trainer.callback_metrics["test/bpd"]
    torch.testing.assert_close(bpd, torch.tensor(after / (2 * math.log(2))), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape", [(2,), (1, 4, 4)])
def test_bf16_mixed_fit_step_is_finite(tmp_path, shape):
    torch.manual_seed(0)
    if len(shape) == 1:
        model = RealNVP(shape, num_layers=2, hidden_dims=(8,))
        x = torch.randn(16, *shape)
    else:
        model = RealNVP(shape, num_scales=2, couplings_per_scale=1, hidden_channels=4, num_blocks=1)
        x = torch.rand(16, *shape)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z, log_det = model(x)
    assert log_det.dtype == torch.float32 and torch.isfinite(log_det).all() and torch.isfinite(z).all()
    dataset = torch.utils.data.TensorDataset(x, torch.zeros(len(x), dtype=torch.long))
    trainer = L.Trainer(accelerator="cpu", precision="bf16-mixed", max_steps=3, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=str(tmp_path))
    trainer.fit(model, torch.utils.data.DataLoader(dataset, batch_size=8))
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    assert all(torch.isfinite(parameter).all() for parameter in model.parameters())
    assert torch.isfinite(model.sample(4)).all()


def test_sample_inverts_scaled_normal_noise():
    model = tiny_vector_flow(2)
    torch.manual_seed(3)
    samples = model.sample(10, temperature=0.5)
    torch.manual_seed(3)
    expected = model.inverse(0.5 * torch.randn(10, 2))
    torch.testing.assert_close(samples, expected)
    images = tiny_image_flow().sample(4)
    assert images.shape == (4, 1, 4, 4) and images.min() >= 0 and images.max() <= 1
    torch.testing.assert_close(images * 255, (images * 255).round())  # 8-bit levels


# -------------------------------------------------------------------------------- input checks
def test_inputs_outside_the_domain_raise_value_error():
    image_model = tiny_image_flow()
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        image_model(torch.full((2, 1, 4, 4), 1.5))
    with pytest.raises(ValueError, match="shape"):
        image_model.log_prob(torch.rand(2, 1, 5, 4))
    with pytest.raises(ValueError, match="shape"):
        image_model.inverse(torch.randn(2, 15))
    vector_model = tiny_vector_flow(2)
    with pytest.raises(ValueError, match="NaN"):
        vector_model(torch.tensor([[0.0, float("nan")]]))
    with pytest.raises(ValueError, match="shape"):
        vector_model(torch.randn(4, 3))
    with pytest.raises(ValueError, match="temperature"):
        vector_model.sample(2, temperature=0.0)


@pytest.mark.parametrize("arguments, message", [
    (dict(data_shape=(2,), mask="checkerboard"), "mask must be one of"),
    (dict(data_shape=(1,)), "at least 2 dimensions"),
    (dict(data_shape=(1, 28, 28), num_scales=4), "divisible by 8"),
    (dict(data_shape=(1, 4, 4), logit_alpha=0.5), "alpha"),
    (dict(data_shape=(2,), num_layers=0), "num_layers"),
])
def test_bad_arguments_raise_value_error(arguments, message):
    with pytest.raises(ValueError, match=message):
        RealNVP(**arguments)


# ------------------------------------------------------------------------------------------ CLI
def test_cli_fit_checkpoint_predict_toy(run_dir):
    output = fit_and_predict("realnvp_8gaussians.yaml", run_dir, "--model.init_args.hidden_dims", "[16]",
                             "--model.init_args.num_layers", "2", "--data.init_args.num_predict_samples", "32")
    samples = torch.load(output / "samples.pt")
    assert samples.shape == (32, 2) and samples.dtype == torch.float32 and torch.isfinite(samples).all()
    assert (output / "scatter.png").is_file()


def test_cli_fit_checkpoint_predict_mnist(run_dir, mnist_root):
    output = fit_and_predict("realnvp_mnist.yaml", run_dir, "--model.init_args.num_scales", "2",
                             "--model.init_args.couplings_per_scale", "1",
                             "--model.init_args.hidden_channels", "4", "--model.init_args.num_blocks", "1",
                             "--data.init_args.batch_size", "8", "--data.init_args.data_dir", str(mnist_root),
                             "--data.init_args.download", "false", "--data.init_args.num_predict_samples", "4")
    samples = torch.load(output / "samples.pt")
    assert samples.shape == (4, 1, 28, 28) and samples.dtype == torch.uint8
    assert (output / "grid.png").is_file()
