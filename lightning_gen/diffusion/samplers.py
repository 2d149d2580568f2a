"""Reverse-process samplers: ancestral DDPM (Ho et al. 2020) and DDIM (Song et al. 2021).

Both take a ``denoise(x_t, t) -> eps`` callable (the network's noise prediction, guidance already
applied) and a ``NoiseSchedule``. Timesteps are Python ints computed on the host before the loop
and the per-step timestep tensors are built on the device ahead of time, so a sampling loop makes no
host-device synchronization (no ``.item()``, no data-dependent Python branch): on a GPU the host
queues all steps' kernels without waiting.

DDPM step (Ho et al. 2020, Algorithm 2 with the posterior variance beta_tilde, eq. 7):
    x_0_hat = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t)   (clipped to [-1, 1] for images)
    x_{t-1} = mu_tilde(x_t, x_0_hat) + sqrt(beta_tilde_t) z,  z ~ N(0, I)

DDIM step from t to an earlier t' (Song et al. 2021, eq. 12 with sigma from eq. 16):
    x_{t'} = sqrt(alpha_bar_t') x_0_hat + sqrt(1 - alpha_bar_t' - sigma^2) eps + sigma z,
    sigma = eta sqrt((1 - alpha_bar_t') / (1 - alpha_bar_t)) sqrt(1 - alpha_bar_t / alpha_bar_t').
eta = 0 is deterministic given x_T; eta = 1 with t' = t - 1 is the DDPM posterior step (sigma^2 =
beta_tilde_t and the mean equals mu_tilde), which the tests check.

When x_0_hat is clipped, eps is recomputed from the clipped x_0_hat so that (x_0_hat, eps) stay a
consistent decomposition of x_t (as in Nichol & Dhariwal 2021's code); the DDIM / DDPM equivalence
then holds with clipping too.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from lightning_gen.diffusion.schedule import NoiseSchedule

SAMPLERS = ("ddpm", "ddim")

Denoiser = Callable[[Tensor, Tensor], Tensor]  # (x_t (B, ...), t (B,)) -> eps (B, ...)


def check_eta(eta: float, name: str = "eta") -> float:
    """DDIM's eta scales sigma_t between 0 (deterministic) and 1 (the DDPM posterior's variance,
    Song et al. 2021, eq. 16); above 1 the coefficient sqrt(1 - alpha_{t-1} - sigma_t^2) of eq. 12
    has no real value."""
    if not isinstance(eta, (int, float)) or isinstance(eta, bool) or not 0.0 <= eta <= 1.0:
        raise ValueError(f"{name} must be in [0, 1] (0: deterministic DDIM, 1: DDPM's variance), "
                         f"got {eta!r}")
    return eta


def denoised_prediction(schedule: NoiseSchedule, x_t: Tensor, t: Tensor, eps: Tensor,
                        clip_denoised: bool) -> tuple[Tensor, Tensor]:
    """x_0_hat from the predicted noise, optionally clipped to [-1, 1], and the matching eps
    (``NoiseSchedule.model_predictions``)."""
    eps, x0 = schedule.model_predictions(x_t, t, eps, "epsilon", clip_denoised)
    return x0, eps


def ddpm_step(schedule: NoiseSchedule, x_t: Tensor, t: Tensor, eps: Tensor, noise: Tensor | None,
              clip_denoised: bool = True) -> tuple[Tensor, Tensor]:
    """One ancestral step x_t -> x_{t-1} for timesteps t (B,); returns (x_{t-1}, x_0_hat).

    ``noise`` is z ~ N(0, I) (None: the posterior mean, as at t = 0 where beta_tilde_0 = 0).
    """
    x0, _ = denoised_prediction(schedule, x_t, t, eps, clip_denoised)
    mean, variance = schedule.posterior_mean_variance(x0, x_t, t)
    if noise is None:
        return mean, x0
    return mean + variance.sqrt() * noise, x0


def ddim_sigma(schedule: NoiseSchedule, t: Tensor, t_prev: Tensor, eta: float, ndim: int) -> Tensor:
    """sigma_t(eta) of Song et al. 2021, eq. 16, shaped (B, 1, ...); t_prev = -1 means x_0."""
    alpha_bar = schedule.alphas_cumprod[t]
    alpha_bar_prev = previous_alpha_bar(schedule, t_prev)
    variance = (1 - alpha_bar_prev) / (1 - alpha_bar) * (1 - alpha_bar / alpha_bar_prev)
    return (eta * variance.clamp(min=0).sqrt()).view(-1, *([1] * (ndim - 1)))


def previous_alpha_bar(schedule: NoiseSchedule, t_prev: Tensor) -> Tensor:
    """alpha_bar at t_prev (B,), with alpha_bar_{-1} = 1 (the clean data)."""
    table = schedule.alphas_cumprod
    return torch.where(t_prev >= 0, table[t_prev.clamp(min=0)], torch.ones_like(table[0]))


def ddim_step(schedule: NoiseSchedule, x_t: Tensor, t: Tensor, t_prev: Tensor, eps: Tensor,
              eta: float, noise: Tensor | None, clip_denoised: bool = True) -> tuple[Tensor, Tensor]:
    """One DDIM step x_t -> x_{t_prev} (Song et al. 2021, eq. 12); returns (x_{t_prev}, x_0_hat).

    ``noise`` is z ~ N(0, I), only used when eta > 0 (None: no noise term).
    """
    x0, eps = denoised_prediction(schedule, x_t, t, eps, clip_denoised)
    ndim = x_t.dim()
    alpha_bar_prev = previous_alpha_bar(schedule, t_prev).view(-1, *([1] * (ndim - 1)))
    sigma = ddim_sigma(schedule, t, t_prev, eta, ndim)
    direction = (1 - alpha_bar_prev - sigma**2).clamp(min=0).sqrt() * eps  # "direction pointing to x_t"
    x_prev = alpha_bar_prev.sqrt() * x0 + direction
    if noise is not None and eta > 0:
        x_prev = x_prev + sigma * noise
    return x_prev, x0


def sampling_loop(denoise: Denoiser, schedule: NoiseSchedule, x_T: Tensor, sampler: str = "ddim",
                  steps: int | None = None, eta: float = 0.0, clip_denoised: bool = True,
                  record: bool = False) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """Run the reverse process from x_T (B, ...) to x_0.

    Args:
        denoise: the noise prediction ``(x_t, t) -> eps``.
        sampler: ``"ddpm"`` (ancestral, all T steps) or ``"ddim"``.
        steps: number of network evaluations; DDPM: T (None means T); DDIM: 1..T (None means 50,
            or T when T < 50).
        eta: DDIM's noise scale (0 deterministic, 1 the DDPM posterior on the sub-sequence).
        clip_denoised: clip x_0_hat to [-1, 1] at each step (images).
        record: also return every intermediate state.

    Returns:
        (x_0, states, denoised): ``states`` is [x_T, ..., x_0] and ``denoised`` the x_0_hat of each
        step when ``record``, else two empty lists.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    num_timesteps = schedule.num_timesteps
    if sampler == "ddpm":
        if steps not in (None, num_timesteps):
            raise ValueError(
                f"the ancestral DDPM sampler walks all T = {num_timesteps} steps (steps=None or "
                f"{num_timesteps}), got steps={steps!r}; for fewer steps use sampler='ddim' with eta=1.0, "
                "the DDPM posterior on a sub-sequence (Song et al. 2021, eq. 16)")
        steps = num_timesteps
    elif steps is None:
        steps = min(50, num_timesteps)
    check_eta(eta)
    timesteps = schedule.timesteps(steps)  # Python ints, decreasing, ending at 0 when steps > 1
    previous = timesteps[1:] + [-1]
    batch_size, device = x_T.shape[0], x_T.device
    # All per-step timestep tensors built up front: one host-to-device copy, no syncs in the loop.
    table = torch.tensor([timesteps, previous], device=device)  # (2, steps)
    x = x_T
    states = [x_T] if record else []
    denoised: list[Tensor] = []
    for index, step in enumerate(timesteps):
        t = table[0, index].expand(batch_size)  # (B,)
        eps = denoise(x, t).float()
        if sampler == "ddpm":
            noise = torch.randn_like(x) if step > 0 else None
            x, x0 = ddpm_step(schedule, x, t, eps, noise, clip_denoised)
        else:
            t_prev = table[1, index].expand(batch_size)
            noise = torch.randn_like(x) if eta > 0 and previous[index] >= 0 else None
            x, x0 = ddim_step(schedule, x, t, t_prev, eps, eta, noise, clip_denoised)
        if record:
            states.append(x)
            denoised.append(x0)
    return x, states, denoised
