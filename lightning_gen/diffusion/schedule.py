"""The noise schedule of a discrete-time diffusion: betas, their products and the closed forms.

Notation (Ho et al. 2020): ``T`` steps indexed ``t = 0 .. T - 1`` here (the paper's t = 1 .. T),
``alpha_t = 1 - beta_t`` and ``alpha_bar_t = prod_{s <= t} alpha_s``.

- Forward process in closed form (Ho et al. 2020, eq. 4):
      q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I).
- Posterior of one reverse step (Ho et al. 2020, eqs. 6-7):
      q(x_{t-1} | x_t, x_0) = N(mu_tilde, beta_tilde_t I),
      mu_tilde = sqrt(alpha_bar_{t-1}) beta_t / (1 - alpha_bar_t) x_0
                 + sqrt(alpha_t) (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) x_t,
      beta_tilde_t = (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) beta_t,
  with alpha_bar_{-1} = 1 (so the last step, t = 0, has variance 0).
- Parameterizations of the network output: the noise eps (Ho et al. 2020, eq. 14) or
  v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x_0 (Salimans & Ho 2022, section 4).

Schedules: ``linear`` (Ho et al. 2020: beta from 1e-4 to 0.02 at T = 1000, both ends scaled by
1000 / T so that any T ends near pure noise, as in Nichol & Dhariwal 2021's code) and ``cosine``
(Nichol & Dhariwal 2021, eq. 17: alpha_bar_t = f(t) / f(0), f(t) = cos((t / T + s) / (1 + s) pi/2)^2,
s = 0.008, betas clipped at 0.999).

Conditioning: alpha_bar at the last step is tiny (4e-5 linear, 2e-9 cosine at T = 1000), so
x_0 = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t) multiplies the network's error in eps by
up to 1 / sqrt(alpha_bar_t) in the first sampling steps. Images survive it because x_0 is clipped to
[-1, 1]; unbounded vectors sample better with v-prediction (x_0 = sqrt(alpha_bar_t) x_t -
sqrt(1 - alpha_bar_t) v, no division), which is why configs/diffusion_moons.yaml uses it.

``NoiseSchedule`` is an ``nn.Module`` whose tables are non-persistent buffers: they move with the
model's device and are rebuilt from the hyperparameters, not stored in checkpoints.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

BETA_SCHEDULES = ("linear", "cosine")


def linear_betas(num_timesteps: int, max_beta: float = 0.999) -> Tensor:
    """Ho et al. 2020's 1e-4 .. 0.02 over T = 1000, rescaled by 1000 / T for other T: (T,) float64.

    For T < 50 the rescaled end passes 1 (alpha_bar_T = 0, x_0 no longer recoverable from eps), so
    betas are clipped at ``max_beta`` as in the cosine schedule."""
    scale = 1000.0 / num_timesteps
    betas = torch.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=torch.float64)
    return betas.clamp(max=max_beta)


def cosine_betas(num_timesteps: int, offset: float = 0.008, max_beta: float = 0.999) -> Tensor:
    """Nichol & Dhariwal 2021, eq. 17: beta_t = 1 - alpha_bar_t / alpha_bar_{t-1}: (T,) float64."""
    steps = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
    f = torch.cos((steps + offset) / (1 + offset) * math.pi / 2) ** 2
    alpha_bar = f / f[0]
    return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=max_beta)


def extract(table: Tensor, t: Tensor, ndim: int) -> Tensor:
    """table[t] for a batch of timesteps t (B,), shaped (B, 1, ..., 1) to broadcast over x."""
    return table[t].view(-1, *([1] * (ndim - 1)))


class NoiseSchedule(nn.Module):
    """Betas and the tables derived from them; closed forms of q(x_t | x_0) and the posterior.

    Args:
        num_timesteps: T.
        beta_schedule: ``"linear"`` or ``"cosine"``.
    """

    def __init__(self, num_timesteps: int = 1000, beta_schedule: str = "linear") -> None:
        super().__init__()
        if not isinstance(num_timesteps, int) or num_timesteps < 1:
            raise ValueError(f"num_timesteps must be a positive int, got {num_timesteps!r}")
        if beta_schedule not in BETA_SCHEDULES:
            raise ValueError(f"beta_schedule must be one of {BETA_SCHEDULES}, got {beta_schedule!r}")
        self.num_timesteps = num_timesteps
        self.beta_schedule = beta_schedule
        # Tables are computed in float64 and stored in float32 (the accuracy the samplers need).
        betas = linear_betas(num_timesteps) if beta_schedule == "linear" else cosine_betas(num_timesteps)
        alphas = 1.0 - betas
        alphas_cumprod = torch.cumprod(alphas, dim=0)
        alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
        posterior_variance = betas * (1 - alphas_cumprod_prev) / (1 - alphas_cumprod)
        tables = {
            "betas": betas,
            "alphas": alphas,
            "alphas_cumprod": alphas_cumprod,
            "alphas_cumprod_prev": alphas_cumprod_prev,
            "sqrt_alphas_cumprod": alphas_cumprod.sqrt(),
            "sqrt_one_minus_alphas_cumprod": (1 - alphas_cumprod).sqrt(),
            # Ho et al. 2020, eq. 7: the two coefficients of mu_tilde and beta_tilde.
            "posterior_mean_coef_x0": betas * alphas_cumprod_prev.sqrt() / (1 - alphas_cumprod),
            "posterior_mean_coef_xt": (1 - alphas_cumprod_prev) * alphas.sqrt() / (1 - alphas_cumprod),
            "posterior_variance": posterior_variance,
        }
        for name, table in tables.items():
            self.register_buffer(name, table.float(), persistent=False)

    def __len__(self) -> int:
        return self.num_timesteps

    def extra_repr(self) -> str:
        return f"num_timesteps={self.num_timesteps}, beta_schedule={self.beta_schedule!r}"

    # --------------------------------------------------------------------------- forward process
    def q_mean_variance(self, x0: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and variance of q(x_t | x_0) (Ho et al. 2020, eq. 4); variance shaped (B, 1, ...)."""
        mean = extract(self.sqrt_alphas_cumprod, t, x0.dim()) * x0
        variance = extract(1.0 - self.alphas_cumprod, t, x0.dim())
        return mean, variance

    def q_sample(self, x0: Tensor, t: Tensor, eps: Tensor | None = None) -> Tensor:
        """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps, eps ~ N(0, I): a draw from eq. 4."""
        if eps is None:
            eps = torch.randn_like(x0)
        return (extract(self.sqrt_alphas_cumprod, t, x0.dim()) * x0
                + extract(self.sqrt_one_minus_alphas_cumprod, t, x0.dim()) * eps)

    # --------------------------------------------------------------------------- reverse process
    def posterior_mean_variance(self, x0: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """mu_tilde(x_t, x_0) and beta_tilde_t of q(x_{t-1} | x_t, x_0) (Ho et al. 2020, eq. 7)."""
        mean = (extract(self.posterior_mean_coef_x0, t, x_t.dim()) * x0
                + extract(self.posterior_mean_coef_xt, t, x_t.dim()) * x_t)
        return mean, extract(self.posterior_variance, t, x_t.dim())

    # ----------------------------------------------------------------- network output conversions
    def predict_x0_from_eps(self, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """Invert eq. 4 for x_0 given the noise: x_0 = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t)."""
        return ((x_t - extract(self.sqrt_one_minus_alphas_cumprod, t, x_t.dim()) * eps)
                / extract(self.sqrt_alphas_cumprod, t, x_t.dim()))

    def predict_eps_from_x0(self, x_t: Tensor, t: Tensor, x0: Tensor) -> Tensor:
        """Invert eq. 4 for the noise given x_0."""
        return ((x_t - extract(self.sqrt_alphas_cumprod, t, x_t.dim()) * x0)
                / extract(self.sqrt_one_minus_alphas_cumprod, t, x_t.dim()))

    def snr(self, t: Tensor) -> Tensor:
        """The signal-to-noise ratio alpha_bar_t / (1 - alpha_bar_t) of q(x_t | x_0), shaped (B,)."""
        alpha_bar = self.alphas_cumprod[t]
        return alpha_bar / (1.0 - alpha_bar)

    def velocity(self, x0: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x_0 (Salimans & Ho 2022, section 4)."""
        return (extract(self.sqrt_alphas_cumprod, t, x0.dim()) * eps
                - extract(self.sqrt_one_minus_alphas_cumprod, t, x0.dim()) * x0)

    def eps_from_velocity(self, x_t: Tensor, t: Tensor, v: Tensor) -> Tensor:
        """eps = sqrt(1 - alpha_bar_t) x_t + sqrt(alpha_bar_t) v (x_t and v are a rotation of x_0, eps)."""
        return (extract(self.sqrt_one_minus_alphas_cumprod, t, x_t.dim()) * x_t
                + extract(self.sqrt_alphas_cumprod, t, x_t.dim()) * v)

    def model_predictions(self, x_t: Tensor, t: Tensor, output: Tensor, prediction: str,
                          clip_denoised: bool = False) -> tuple[Tensor, Tensor]:
        """The network's output for x_t as (eps, x_0_hat), for either prediction type, in one place
        (as lucidrains' ``model_predictions``). ``prediction``: ``"epsilon"`` (output = eps) or
        ``"v"`` (Salimans & Ho 2022). With ``clip_denoised`` x_0_hat is clipped to [-1, 1] and eps
        recomputed from it, so (eps, x_0_hat) stay a decomposition of x_t (Nichol & Dhariwal 2021)."""
        eps = self.eps_from_velocity(x_t, t, output) if prediction == "v" else output
        x0 = self.predict_x0_from_eps(x_t, t, eps)
        if clip_denoised:
            x0 = x0.clamp(-1.0, 1.0)
            eps = self.predict_eps_from_x0(x_t, t, x0)
        return eps, x0

    def timesteps(self, steps: int) -> list[int]:
        """``steps`` timesteps spread evenly over 0 .. T - 1, in decreasing order, ending at 0
        (the sub-sequence tau of DDIM, Song et al. 2021, section 4.2)."""
        if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= self.num_timesteps:
            raise ValueError(f"steps must be an int in 1..{self.num_timesteps} (T), got {steps!r}")
        if steps == 1:
            return [self.num_timesteps - 1]
        # Python ints computed on the host: the sampling loops index the tables without host syncs.
        spacing = (self.num_timesteps - 1) / (steps - 1)
        return [round(spacing * index) for index in reversed(range(steps))]
