"""Reverse-process samplers: ancestral DDPM (Ho et al. 2020), DDIM (Song et al. 2021),
DPM-Solver++(2M) (Lu et al. 2022) and Heun (Karras et al. 2022).

All take a ``denoise(x_t, t) -> eps`` callable (the network's noise prediction, guidance already
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

Two higher-order solvers of the probability-flow ODE (deterministic given x_T), on the same
decreasing sub-sequence t_0 = T - 1 > t_1 > ... > t_{N-1} = 0 as DDIM, then the clean data
(alpha = 1, sigma = 0). Notation: alpha_t = sqrt(alpha_bar_t), sigma_t = sqrt(1 - alpha_bar_t),
lambda_t = log(alpha_t / sigma_t) (half the log-SNR); a step goes from s = t_{i-1} to t = t_i.

DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Algorithm 2; multistep, second order, in the data
prediction x_0_hat), with h_i = lambda_{t_i} - lambda_{t_{i-1}} and r_i = h_{i-1} / h_i:
    x_{t_i} = (sigma_{t_i} / sigma_{t_{i-1}}) x_{t_{i-1}} - alpha_{t_i} (e^{-h_i} - 1) D_i,
    D_i = (1 + 1 / (2 r_i)) x_0_hat(t_{i-1}) - 1 / (2 r_i) x_0_hat(t_{i-2}).
The first step uses D = x_0_hat (first order: exactly DDIM's step), as does the last one, into
lambda = +inf, where e^{-h} = 0 and the step returns x_0 = x_0_hat (as k-diffusion and diffusers do).
The coefficients are evaluated without lambda: e^{-h_i} = (sigma_{t_i} alpha_{t_{i-1}}) /
(alpha_{t_i} sigma_{t_{i-1}}), so - alpha_{t_i} (e^{-h_i} - 1) = alpha_{t_i} - (sigma_{t_i} /
sigma_{t_{i-1}}) alpha_{t_{i-1}}, finite at the last step too. One network evaluation per timestep:
``steps`` evaluations.

Heun (Karras et al. 2022, "Elucidating the Design Space", Algorithm 1 with S_churn = 0) on the
probability-flow ODE in sigma-space: x_hat = x / alpha_t, sigma(t) = sigma_t / alpha_t =
sqrt((1 - alpha_bar_t) / alpha_bar_t), D(x_hat; sigma) = x_0_hat, and (their eq. 4 with s(t) = 1)
    dx_hat / dsigma = (x_hat - D(x_hat; sigma)) / sigma,
which is the predicted noise eps. With sigma_0 > ... > sigma_{N-1} at the sub-sequence and
sigma_N = 0, each step is
    d_i = (x_hat_i - D(x_hat_i; sigma_i)) / sigma_i,   x_hat' = x_hat_i + (sigma_{i+1} - sigma_i) d_i,
    d'_i = (x_hat' - D(x_hat'; sigma_{i+1})) / sigma_{i+1},
    x_hat_{i+1} = x_hat_i + (sigma_{i+1} - sigma_i) (d_i + d'_i) / 2,
except the last, to sigma = 0, which is the Euler step alone (x_0 = x_0_hat). The network only
knows the discrete timesteps, so the corrector evaluates it at t_{i+1}, where sigma_{i+1} came from.
N timesteps cost 2 N - 1 network evaluations, and ``steps`` is that budget: N = ceil(steps / 2)
timesteps, 2 N - 1 evaluations (``steps`` when odd, ``steps - 1`` when even), so ``steps`` means
the same cost for every sampler. DDIM is the Euler method on this ODE (Karras et al. 2022, sec. 4),
which is why Heun and DPM-Solver++ reach a given accuracy with fewer evaluations.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from lightning_gen.diffusion.schedule import NoiseSchedule

SAMPLERS = ("ddpm", "ddim", "dpm_solver++", "heun")
ODE_SAMPLERS = ("dpm_solver++", "heun")  # deterministic: eta = 0 only

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


def check_steps(steps: int, num_timesteps: int) -> int:
    """A number of network evaluations in 1..T."""
    if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= num_timesteps:
        raise ValueError(f"steps must be an int in 1..{num_timesteps} (T), got {steps!r}")
    return steps


def heun_timesteps(steps: int) -> int:
    """The number N of sub-sequence timesteps Heun visits with a budget of ``steps`` network
    evaluations: N steps cost 2 N - 1 evaluations (the last step, to sigma = 0, is Euler's)."""
    return (steps + 1) // 2


def dpm_solver_coefficients(schedule: NoiseSchedule, timesteps: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-step tables (N,) of DPM-Solver++(2M) for the decreasing timesteps (N,), on their device:
    x_next = ratio * x + data * D, D = x_0_hat + weight * (x_0_hat - previous x_0_hat).

    ratio = sigma_next / sigma, data = -alpha_next (e^{-h} - 1) = alpha_next - ratio * alpha and
    weight = 1 / (2 r) = h_i / (2 h_{i-1}) (Lu et al. 2022, Algorithm 2); the step into the clean
    data (alpha = 1, sigma = 0) has ratio 0 and data 1, and it and the first step have weight 0
    (first order)."""
    alpha_bar = schedule.alphas_cumprod[timesteps]  # (N,)
    alpha_bar_next = torch.cat([alpha_bar[1:], torch.ones_like(alpha_bar[:1])])
    alpha, sigma = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
    ratio = (1 - alpha_bar_next).sqrt() / sigma
    data = alpha_bar_next.sqrt() - ratio * alpha
    # lambda is finite on the sub-sequence itself (sigma_0 = sqrt(beta_0) > 0); only the step into
    # the clean data, whose weight stays 0, would need lambda = +inf.
    log_snr_half = alpha.log() - sigma.log()  # lambda_{t_i}
    h = log_snr_half[1:] - log_snr_half[:-1]  # h of the steps between sub-sequence timesteps (N - 1,)
    weight = torch.zeros_like(alpha_bar)
    weight[1:-1] = h[1:] / (2 * h[:-1])
    return ratio, data, weight


def dpm_solver_loop(denoise: Denoiser, schedule: NoiseSchedule, x_T: Tensor, steps: int,
                    clip_denoised: bool, record: bool) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2) over ``steps`` timesteps, one network
    evaluation each; see the module docstring."""
    timesteps = torch.tensor(schedule.timesteps(steps), device=x_T.device)  # one host-to-device copy
    ratio, data, weight = dpm_solver_coefficients(schedule, timesteps)
    batch_size = x_T.shape[0]
    x, previous_x0 = x_T, None
    states = [x_T] if record else []
    denoised: list[Tensor] = []
    for index in range(steps):
        t = timesteps[index].expand(batch_size)
        x0, _ = denoised_prediction(schedule, x, t, denoise(x, t).float(), clip_denoised)
        # The 2M data estimate: a linear extrapolation in lambda of the last two x_0_hat.
        estimate = x0 if previous_x0 is None else x0 + weight[index] * (x0 - previous_x0)
        x = ratio[index] * x + data[index] * estimate
        previous_x0 = x0
        if record:
            states.append(x)
            denoised.append(x0)
    return x, states, denoised


def karras_timesteps(schedule: NoiseSchedule, num_steps: int, device: torch.device,
                     rho: float = 7.0) -> Tensor:
    """N = ``num_steps`` decreasing distinct timesteps (N,) from T - 1 to 0, spaced as Karras et al.
    2022's eq. 5: sigma_i = (sigma_max^(1/rho) + i / (N - 1) (sigma_min^(1/rho) -
    sigma_max^(1/rho)))^rho, each rounded to the timestep of the nearest sigma (in log), as their
    Appendix C does for the discrete-time models it samples (iDDPM, ADM).

    The spacing matters for Heun: with even timesteps the first step goes from sigma_max (157 for
    the linear schedule at T = 1000, 22000 for the cosine) to a sigma 10 to 4000 times smaller, where
    the trapezoidal rule's slope average is far off; rho = 7 shortens the steps at high sigma.
    Computed on the device with no host sync: rounding can give the same timestep twice where the
    schedule's sigmas are sparse (near t = 0), so duplicates are pushed to the next free timesteps
    (a running min, then a running max from the end keep the sequence strictly decreasing in
    T - 1 .. 0)."""
    alpha_bar = schedule.alphas_cumprod.to(device)
    log_sigmas = 0.5 * (torch.log1p(-alpha_bar) - alpha_bar.log())  # (T,), increasing in t
    ramp = torch.linspace(0.0, 1.0, num_steps, device=device)
    log_max, log_min = log_sigmas[-1], log_sigmas[0]
    targets = rho * torch.log(torch.exp(log_max / rho) + ramp * (torch.exp(log_min / rho) - torch.exp(log_max / rho)))
    timesteps = (log_sigmas[None, :] - targets[:, None]).abs().argmin(dim=1)  # (N,)
    index = torch.arange(num_steps, device=device)
    # t_i = min_{j <= i} (t_j - (i - j)): each below its predecessor (the tail may drop under 0) ...
    timesteps = (torch.cummin(timesteps + index, dim=0).values - index).clamp(min=0)
    # ... then t_i = max_{j >= i} (t_j + (j - i)): each above its successor, the last at 0.
    return torch.cummax((timesteps + index).flip(0), dim=0).values.flip(0) - index


def heun_loop(denoise: Denoiser, schedule: NoiseSchedule, x_T: Tensor, steps: int,
              clip_denoised: bool, record: bool) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """Heun's method (Karras et al. 2022, Algorithm 1, S_churn = 0) with a budget of ``steps``
    network evaluations (``heun_timesteps``); see the module docstring. ``record`` keeps one state
    and one x_0_hat (the predictor's) per timestep."""
    num_steps = heun_timesteps(steps)
    timesteps = karras_timesteps(schedule, num_steps, x_T.device)
    alpha_bar = schedule.alphas_cumprod[timesteps]
    scale = alpha_bar.sqrt()  # x_t = scale * x_hat
    sigmas = ((1 - alpha_bar) / alpha_bar).sqrt()
    sigma_steps = torch.cat([sigmas[1:], torch.zeros_like(sigmas[:1])]) - sigmas  # sigma_{i+1} - sigma_i
    batch_size = x_T.shape[0]

    def slope(x_hat: Tensor, index: int) -> tuple[Tensor, Tensor]:
        """(x_0_hat, dx_hat/dsigma) at the timestep ``index``: the slope (x_hat - D) / sigma is the
        (clipping-consistent) eps of x_t = scale x_hat, without dividing by sigma."""
        t = timesteps[index].expand(batch_size)
        x_t = scale[index] * x_hat
        return denoised_prediction(schedule, x_t, t, denoise(x_t, t).float(), clip_denoised)

    x_hat = x_T / scale[0]
    states = [x_T] if record else []
    denoised: list[Tensor] = []
    for index in range(num_steps):
        x0, d = slope(x_hat, index)
        if index == num_steps - 1:
            # Euler into sigma = 0: x_hat - sigma d = x_0_hat, taken as is rather than as the
            # difference of two numbers of size sigma (float32 would lose 1e-4 at sigma_max).
            x_hat = x0
        else:
            x_next = x_hat + sigma_steps[index] * d  # Euler, then the corrector
            _, d_next = slope(x_next, index + 1)
            x_hat = x_hat + sigma_steps[index] * (d + d_next) / 2
        if record:
            states.append(scale[index + 1] * x_hat if index < num_steps - 1 else x_hat)
            denoised.append(x0)
    return x_hat, states, denoised


def sampling_loop(denoise: Denoiser, schedule: NoiseSchedule, x_T: Tensor, sampler: str = "ddim",
                  steps: int | None = None, eta: float = 0.0, clip_denoised: bool = True,
                  record: bool = False) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """Run the reverse process from x_T (B, ...) to x_0.

    Args:
        denoise: the noise prediction ``(x_t, t) -> eps``.
        sampler: ``"ddpm"`` (ancestral, all T steps), ``"ddim"``, ``"dpm_solver++"`` (2M) or
            ``"heun"``.
        steps: the number of network evaluations. DDPM: T (None means T); the others: 1..T (None
            means 50, or T when T < 50). DDIM and DPM-Solver++ visit ``steps`` timesteps; Heun
            visits N = ceil(steps / 2) timesteps for 2 N - 1 evaluations (``steps`` when odd).
        eta: DDIM's noise scale (0 deterministic, 1 the DDPM posterior on the sub-sequence); the
            ODE solvers (DPM-Solver++, Heun) are deterministic and need eta = 0.
        clip_denoised: clip x_0_hat to [-1, 1] at each step (images).
        record: also return every intermediate state.

    Returns:
        (x_0, states, denoised): ``states`` is [x_T, ..., x_0] (one per timestep visited, then x_0)
        and ``denoised`` the x_0_hat of each timestep when ``record``, else two empty lists.
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
    if sampler in ODE_SAMPLERS:
        if eta != 0:
            raise ValueError(f"sampler={sampler!r} solves the deterministic probability-flow ODE: "
                             f"use eta=0 (got {eta}), or sampler='ddim' for eta > 0")
        loop = dpm_solver_loop if sampler == "dpm_solver++" else heun_loop
        return loop(denoise, schedule, x_T, check_steps(steps, num_timesteps), clip_denoised, record)
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
