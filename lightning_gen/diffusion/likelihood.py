"""The variational bound on the negative log-likelihood of a diffusion model (Ho et al. 2020, eq. 5).

With T steps indexed t = 0 .. T - 1 (the paper's 1 .. T) and x_0 the data, per example:
    L = L_T + sum_{t=1}^{T-1} L_{t-1} + L_0  >=  -log p_theta(x_0),
    L_T     = KL(q(x_{T-1} | x_0) || N(0, I))                       (no parameters),
    L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p_theta(x_{t-1} | x_t)),     x_t ~ q(x_t | x_0),
    L_0     = -log p_theta(x_0 | x_{t=0}),
where p_theta(x_{t-1} | x_t) = N(mu_tilde(x_t, x_0_hat), beta_tilde_t I) has the posterior's
(Ho et al. 2020, eq. 7) mean with the network's x_0_hat and its fixed variance beta_tilde_t, so the
KL of two Gaussians with one variance is |mu_tilde(x_t, x_0) - mu_tilde(x_t, x_0_hat)|^2 /
(2 beta_tilde_t). beta_tilde vanishes only at t = 0, which is the decoder's term:

- images: the discretized Gaussian decoder of Ho et al. 2020 (sec. 3.3, eq. 13; Nichol & Dhariwal
  2021's ``discretized_gaussian_log_likelihood``): the images are first quantized to the 8-bit
  levels round(255 x) / 255 in [0, 1], mapped to [-1, 1], and each pixel's probability is the mass
  of N(x_0_hat, beta_0) over its bin of width 2 / 255 (the end bins reach to -inf and +inf). L is
  then the code length of the discrete 8-bit data, comparable with (and a valid upper bound where)
  the flows' dequantized bits/dim.
- vectors: a continuous Gaussian density N(x_0; x_0_hat, beta_0 I): the bound is on the
  continuous data's negative log density (a continuous-data bound, in nats).

At t = 0 the posterior mean mu_tilde(x_t, x_0_hat) is x_0_hat itself (its coefficients are 1 and
0), and beta_0, the variance of the first forward step, is how far x_{t=0} leaves x_0 uncertain;
Nichol & Dhariwal 2021's code uses beta_tilde_1 (about beta_0 / 2) there instead.

Every L_{t-1} is one draw of x_t ~ q(x_t | x_0) (as Nichol & Dhariwal 2021's ``calc_bpd_loop``),
so even the sum over all t is a Monte-Carlo estimate of the expectation in eq. 5 over x_t; with
``timesteps=k`` the sum over t is itself estimated, unbiasedly, by (T - 1) times the mean of L_{t-1}
over k timesteps drawn uniformly from 1 .. T - 1 per example.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from lightning_gen.diffusion.schedule import NoiseSchedule, extract

EpsPrediction = Callable[[Tensor, Tensor], Tensor]  # (x_t, t) -> eps, as the samplers take it


def normal_kl_to_standard(mean: Tensor, variance: Tensor) -> Tensor:
    """KL(N(mean, variance) || N(0, 1)) per element."""
    return 0.5 * (variance + mean**2 - 1.0 - variance.log())


def log_normal_cdf_difference(upper: Tensor, lower: Tensor) -> Tensor:
    """log(Phi(upper) - Phi(lower)) for lower < upper, stable in both tails: above 0 the mass is
    read from the upper tail by symmetry (Phi(b) - Phi(a) = Phi(-a) - Phi(-b)), so the difference
    is always taken below the median, where log_ndtr is exact, and log(1 - e^-d) by expm1."""
    flip = lower > 0
    low = torch.where(flip, -upper, lower)
    high = torch.where(flip, -lower, upper)
    log_high = torch.special.log_ndtr(high)
    return log_high + torch.log(-torch.expm1(torch.special.log_ndtr(low) - log_high))


def discretized_gaussian_log_likelihood(x: Tensor, mean: Tensor, log_scale: Tensor) -> Tensor:
    """log P(x) per element for x on the 256 levels of [-1, 1] under N(mean, exp(log_scale)^2)
    discretized to bins of width 2 / 255, the end bins extended to -inf / +inf (Ho et al. 2020,
    eq. 13)."""
    inverse_scale = torch.exp(-log_scale)
    half_bin = 1.0 / 255.0
    upper = torch.where(x > 1.0 - 1e-3, torch.full_like(x, math.inf), (x - mean + half_bin) * inverse_scale)
    lower = torch.where(x < -1.0 + 1e-3, torch.full_like(x, -math.inf), (x - mean - half_bin) * inverse_scale)
    return log_normal_cdf_difference(upper, lower)


def quantize_images(x: Tensor) -> Tensor:
    """Images in [0, 1] -> their 8-bit levels round(255 x) / 255 (the data the bound is of)."""
    return torch.round(x.clamp(0.0, 1.0) * 255.0) / 255.0


def sum_per_example(values: Tensor) -> Tensor:
    return values.flatten(1).sum(dim=1)


def prior_term(schedule: NoiseSchedule, x0: Tensor) -> Tensor:
    """L_T = KL(q(x_{T-1} | x_0) || N(0, I)) per example (B,)."""
    t = torch.full((len(x0),), schedule.num_timesteps - 1, device=x0.device, dtype=torch.long)
    mean, variance = schedule.q_mean_variance(x0, t)
    return sum_per_example(normal_kl_to_standard(mean, variance.expand_as(mean)))


def denoising_term(schedule: NoiseSchedule, eps_prediction: EpsPrediction, x0: Tensor, t: Tensor, noise: Tensor,
                   clip_denoised: bool) -> Tensor:
    """L_{t-1} per example (B,) for timesteps t >= 1 (B,) and x_t = q_sample(x0, t, noise)."""
    x_t = schedule.q_sample(x0, t, noise)
    eps, x0_hat = schedule.model_predictions(x_t, t, eps_prediction(x_t, t).float(), "epsilon",
                                             clip_denoised)
    coefficient = extract(schedule.posterior_mean_coef_x0, t, x0.dim())
    variance = extract(schedule.posterior_variance, t, x0.dim())
    return sum_per_example(coefficient**2 * (x0 - x0_hat) ** 2 / (2.0 * variance))


def decoder_term(schedule: NoiseSchedule, eps_prediction: EpsPrediction, x0: Tensor, noise: Tensor,
                 clip_denoised: bool, discrete: bool) -> Tensor:
    """L_0 = -log p(x_0 | x_{t=0}) per example (B,): the discretized Gaussian for images (x0 on the
    256 levels of [-1, 1]), the Gaussian density for vectors; mean x_0_hat, variance beta_0."""
    t = torch.zeros(len(x0), device=x0.device, dtype=torch.long)
    x_t = schedule.q_sample(x0, t, noise)
    _, x0_hat = schedule.model_predictions(x_t, t, eps_prediction(x_t, t).float(), "epsilon",
                                           clip_denoised)
    variance = schedule.betas[0]
    log_scale = 0.5 * variance.log()
    if discrete:
        log_likelihood = discretized_gaussian_log_likelihood(x0, x0_hat, log_scale)
    else:
        log_likelihood = -0.5 * ((x0 - x0_hat) ** 2 / variance + math.log(2 * math.pi)) - log_scale
    return -sum_per_example(log_likelihood)


def variational_bound(schedule: NoiseSchedule, eps_prediction: EpsPrediction, x0: Tensor, discrete: bool,
                      timesteps: int | None = None, clip_denoised: bool = False,
                      generator: torch.Generator | None = None) -> Tensor:
    """L = L_T + sum_{t>=1} L_{t-1} + L_0 in nats per example (B,) for x0 in model space.

    Args:
        eps_prediction: ``(x_t, t) -> eps`` (the network's noise prediction, no guidance).
        x0: (B, ...) in model space; for ``discrete`` images already on the 256 levels of [-1, 1].
        discrete: the discretized decoder (8-bit images) instead of the Gaussian density (vectors).
        timesteps: None sums all T - 1 terms L_{t-1} (T - 1 network evaluations of the batch);
            k >= 1 estimates the sum as (T - 1) times the mean over k timesteps drawn uniformly
            from 1 .. T - 1 for each example (k evaluations). The decoder always costs one more.
        clip_denoised: clip x_0_hat to [-1, 1] (images), as sampling does; p stays a valid model.
        generator: the source of x_t's noise and of the drawn timesteps.
    """
    num_timesteps = schedule.num_timesteps
    if timesteps is not None and (not isinstance(timesteps, int) or isinstance(timesteps, bool)
                                  or timesteps < 1):
        raise ValueError(f"timesteps must be None (all T) or an int >= 1, got {timesteps!r}")
    batch_size, device = len(x0), x0.device

    def draw_noise() -> Tensor:
        return torch.randn(x0.shape, device=device, generator=generator)

    total = prior_term(schedule, x0) + decoder_term(schedule, eps_prediction, x0, draw_noise(),
                                                    clip_denoised, discrete)
    if num_timesteps == 1:
        return total
    if timesteps is None:
        # Python ints, one batched evaluation per timestep: the exact sum over t.
        for step in range(1, num_timesteps):
            t = torch.full((batch_size,), step, device=device, dtype=torch.long)
            total = total + denoising_term(schedule, eps_prediction, x0, t, draw_noise(), clip_denoised)
        return total
    estimate = torch.zeros_like(total)
    for _ in range(timesteps):
        t = torch.randint(1, num_timesteps, (batch_size,), device=device, generator=generator)
        estimate = estimate + denoising_term(schedule, eps_prediction, x0, t, draw_noise(), clip_denoised)
    return total + (num_timesteps - 1) * estimate / timesteps
