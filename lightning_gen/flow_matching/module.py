"""Flow matching (Lipman et al. 2023) on the straight path of rectified flow (Liu et al. 2023),
with independent or minibatch optimal-transport coupling (Tong et al. 2024).

Path and training: noise x_0 ~ N(0, I) and a data point x_1 are joined by the straight line
    x_t = (1 - t) x_0 + t x_1,  t ~ Uniform[0, 1],
whose velocity is u = x_1 - x_0; the network v_theta(x_t, t) regresses it (conditional flow
matching, Lipman et al. 2023, eq. 9 with sigma_min = 0):
    loss = E_{t, x_0, x_1} || v_theta(x_t, t) - (x_1 - x_0) ||^2   (mean over dimensions).
Its minimizer is the marginal field E[x_1 - x_0 | x_t], whose flow carries N(0, I) at t = 0 to the
data distribution at t = 1. ``coupling="ot"`` pairs the batch's noise and data by the exact
optimal assignment first (``coupling.py``). ``val/loss`` and ``test/loss`` are the same MSE with
a fixed t and noise per batch, from the EMA weights when there are some.

Sampling integrates dx/dt = v_theta(x, t) from noise at t = 0 to t = 1 with Euler, midpoint or
Heun steps (``ode.py``); the number of network evaluations is ``steps`` (Euler) or ``2 steps``.

Likelihood (``log_prob``): the instantaneous change of variables (``ode.py``), solved backwards
from the data with ``likelihood_steps`` steps of ``likelihood_solver``; the divergence is exact
for vectors and Hutchinson's estimate with ``likelihood_probes`` Rademacher probes for images.
Images are scored as RealNVP scores them: the 8-bit levels round(255 x) dequantized with uniform
noise to [0, 256)^D, so ``test/bpd`` compares with RealNVP's bits/dim. ``test/nll`` and
``test/bpd`` are logged by ``trainer.test`` (each test batch costs (1 + probes) x evaluations
forward and backward passes); validation logs the loss only.

Shared with Diffusion: the networks (``nn/denoisers.py``: the U-Net for images, the residual MLP
for vectors; the time t in [0, 1] enters as 1000 t, the range whose sinusoidal embedding the
discrete diffusion's timesteps use), classifier-free guidance (``nn/guidance.py``) and the
weight average (``nn/ema.py``). Images are scaled to [-1, 1] for the network.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_gen import checks
from lightning_gen.base import GenerativeModule
from lightning_gen.flow_matching.coupling import COUPLINGS, pair
from lightning_gen.flow_matching.ode import SOLVERS, check_solver, integrate, log_likelihood
from lightning_gen.nn.denoisers import MLPDenoiserConfig, UNetConfig, time_network
from lightning_gen.nn.ema import ExponentialMovingAverage
from lightning_gen.nn.guidance import check_guidance, drop_labels, guided

#: The network sees 1000 t: the timestep range of a 1000-step diffusion, which the sinusoidal
#: embedding's frequencies are laid out for (t in [0, 1] alone would barely turn its phases).
TIME_SCALE = 1000.0


class FlowMatching(GenerativeModule):
    """Conditional flow matching with a U-Net for images (C, H, W) or a residual MLP for vectors (D,).

    Args:
        data_shape: (C, H, W) images in [0, 1] or (D,) vectors (linked from the data module).
        coupling: ``"independent"`` or ``"ot"`` (minibatch optimal transport).
        unet: the U-Net for images (``UNetConfig``), a nested group as in Diffusion.
        mlp: the residual MLP for vectors (``MLPDenoiserConfig``).
        num_classes: number of labels for a class-conditional model (None: unconditional).
        label_dropout: probability of training with the null label (classifier-free guidance).
        guidance_scale: default guidance scale of ``sample`` for conditional models (1: none).
        ema_decay: decay of the weight average used for sampling and evaluation (None: no EMA).
        predict_sampler, predict_steps: the ODE solver (``"euler"``, ``"midpoint"``, ``"heun"``)
            and its step count for ``predict`` and the default ``sample``.
        likelihood_solver, likelihood_steps: the solver of ``log_prob`` (and ``test/nll``).
        likelihood_probes: Hutchinson probes per example for images (vectors: exact trace).
        optimizer_options: learning_rate (default ``DEFAULT_LEARNING_RATE``), weight_decay,
            lr_schedule, warmup_steps, as keywords: see GenerativeModule.

    ``guidance_scale`` and the ``predict_*`` and ``likelihood_*`` options change evaluation only:
    they are not saved as hyperparameters (``cli.py predict/test --ckpt_path`` takes them from
    the config and the command line).
    """

    DEFAULT_LEARNING_RATE = 2e-4
    EVALUATION_OPTIONS = ("guidance_scale", "predict_sampler", "predict_steps", "likelihood_solver",
                          "likelihood_steps", "likelihood_probes")

    def __init__(
        self,
        data_shape: Sequence[int] = (1, 28, 28),
        coupling: str = "independent",
        unet: UNetConfig = UNetConfig(),
        mlp: MLPDenoiserConfig = MLPDenoiserConfig(),
        num_classes: int | None = None,
        label_dropout: float = 0.1,
        guidance_scale: float = 1.0,
        ema_decay: float | None = 0.999,
        predict_sampler: str = "heun",
        predict_steps: int = 25,
        likelihood_solver: str = "heun",
        likelihood_steps: int = 20,
        likelihood_probes: int = 1,
        **optimizer_options: Any,
    ) -> None:
        super().__init__(data_shape, **optimizer_options)
        self.save_hyperparameters(ignore=self.EVALUATION_OPTIONS)
        checks.one_of("coupling", coupling, COUPLINGS)
        checks.fraction(label_dropout=label_dropout)
        check_guidance(num_classes, label_dropout, guidance_scale)
        check_solver(predict_sampler, predict_steps, "predict_sampler")
        check_solver(likelihood_solver, likelihood_steps, "likelihood_solver")
        checks.at_least(1, likelihood_probes=likelihood_probes)
        self.coupling = coupling
        self.num_classes = checks.optional_classes(num_classes)
        self.label_dropout = label_dropout
        self.guidance_scale = guidance_scale
        self.predict_sampler = predict_sampler
        self.predict_steps = predict_steps
        self.likelihood_solver = likelihood_solver
        self.likelihood_steps = likelihood_steps
        self.likelihood_probes = likelihood_probes
        self.network, groups = time_network(self.data_shape, unet, mlp, num_classes)
        self.hparams.update(groups)  # plain dicts: a checkpoint stays loadable weights-only
        self.ema = ExponentialMovingAverage(self.network, ema_decay) if ema_decay is not None else None

    def averaged_network(self) -> tuple[nn.Module, ExponentialMovingAverage | None]:
        return self.network, self.ema

    @staticmethod
    def velocity_of(network: nn.Module):
        """``(x, t, y) -> v`` for t in [0, 1] (B,) from a network that takes 1000 t."""

        def velocity(x: Tensor, t: Tensor, y: Tensor | None) -> Tensor:
            return network(x, t * TIME_SCALE, y).float()

        return velocity

    # ------------------------------------------------------------------------------- training
    def flow_matching_loss(self, x1: Tensor, y: Tensor | None, network: nn.Module | None = None,
                           generator: torch.Generator | None = None) -> Tensor:
        """The conditional flow-matching loss of data x_1 in model space (B, ...): a scalar."""
        network = network if network is not None else self.network
        x0 = pair(torch.randn(x1.shape, device=x1.device, generator=generator), x1, self.coupling)
        t = torch.rand(len(x1), device=x1.device, generator=generator)  # (B,)
        t_ = t.view(-1, *([1] * (x1.dim() - 1)))
        x_t = (1 - t_) * x0 + t_ * x1
        return F.mse_loss(self.velocity_of(network)(x_t, t, y), x1 - x0)

    def loss(self, batch: tuple[Tensor, Tensor], batch_idx: int, stage: str) -> tuple[Tensor, dict]:
        x, y = batch
        x1 = self.to_model_space(x)
        if stage == "train":
            return self.flow_matching_loss(x1, drop_labels(y, self.num_classes, self.label_dropout)), {}
        # Fixed t and noise per batch (seeded by its index) so that epochs measure the same thing.
        generator = torch.Generator(device=x1.device).manual_seed(batch_idx)
        labels = self.batch_labels(y)
        loss = self.flow_matching_loss(x1, labels, self.sampling_network(), generator)
        if stage == "test":  # conditional models: -log p(x | y), as the other families report
            return loss, {"nll": -self.log_prob(x, labels, generator=generator)}
        return loss, {}

    # ----------------------------------------------------------------------------- likelihood
    def log_prob(self, x: Tensor, y: Tensor | None = None, use_ema: bool | None = None,
                 generator: torch.Generator | None = None) -> Tensor:
        """log p(x) in nats per example (B,) by the instantaneous change of variables.

        Vectors: the density in data coordinates, with the exact divergence. Images (in [0, 1]):
        the density of the uniformly dequantized 8-bit image on [0, 256)^D (as RealNVP's
        ``log_prob``), with Hutchinson's divergence estimate (``likelihood_probes`` probes).
        Conditional models score log p(x | y) with labels ``y``, and with ``y=None`` the
        unconditional density log p(x) that label dropout trained (the null label).
        """
        if self.num_classes is None and y is not None:
            raise ValueError(f"{type(self).__name__} is unconditional (num_classes=None): score without y")
        network = self.velocity_of(self.sampling_network(use_ema))

        def velocity(state: Tensor, t: Tensor) -> Tensor:
            return network(state, t, y)

        # The divergence needs autograd through the network, also where Lightning evaluates
        # under inference mode (the clone makes the input an ordinary tensor).
        with torch.inference_mode(False):
            if not self.is_image:
                return log_likelihood(velocity, x.float().clone(), self.likelihood_steps,
                                      self.likelihood_solver)
            levels = torch.round(x.float() * 255)
            noise = torch.rand(x.shape, device=x.device, generator=generator)
            model_space = (levels + noise) / 128.0 - 1.0  # 2 u - 1 for u = (k + noise) / 256
            log_density = log_likelihood(velocity, model_space.clone(), self.likelihood_steps,
                                         self.likelihood_solver, trace="hutchinson",
                                         num_probes=self.likelihood_probes, generator=generator)
        # Change of variables from model space y = v / 128 - 1 to v in [0, 256)^D.
        return log_density - self.num_dims * math.log(128.0)

    # ------------------------------------------------------------------------------- sampling
    @torch.no_grad()
    def sample(
        self,
        num_samples: int,
        sampler: str | None = None,
        steps: int | None = None,
        y: Tensor | int | Sequence[int] | None = None,
        guidance_scale: float | None = None,
        use_ema: bool | None = None,
        x0: Tensor | None = None,
    ) -> Tensor:
        """Draw samples in data space: images (N, C, H, W) in [0, 1] or vectors (N, D).

        Args:
            num_samples: N.
            sampler: ``"euler"``, ``"midpoint"`` or ``"heun"`` (default ``predict_sampler``).
            steps: solver steps (default ``predict_steps``); Euler evaluates the network once per
                step, midpoint and Heun twice.
            y: labels of a conditional model: one int, or N of them (default: cycle 0..K-1).
            guidance_scale: classifier-free guidance scale (default: the model's).
            use_ema: sample with the averaged weights (default: when there are some).
            x0: the starting noise (N, *data_shape) (default: drawn from N(0, I)).
        """
        self.check_num_samples(num_samples)
        sampler = self.predict_sampler if sampler is None else sampler
        steps = self.predict_steps if steps is None else steps
        check_solver(sampler, steps)
        guidance_scale = self.guidance_scale if guidance_scale is None else guidance_scale
        check_guidance(self.num_classes, self.label_dropout, guidance_scale)
        labels = self.sampling_labels(y, num_samples)
        x0 = self.starting_noise(x0, num_samples, "x0")
        network = self.velocity_of(self.sampling_network(use_ema))
        velocity = guided(network, labels, self.num_classes, guidance_scale)
        x1, _ = integrate(velocity, x0, steps, sampler)
        return self.from_model_space(x1).float()

    def predict_options(self) -> dict[str, Any]:
        return {"sampler": self.predict_sampler, "steps": self.predict_steps}


__all__ = ["FlowMatching", "SOLVERS"]
