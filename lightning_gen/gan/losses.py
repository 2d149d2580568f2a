"""Adversarial losses, gradient penalties, and the sample-based distance logged as ``val/loss``.

Every loss takes the discriminator's raw scores (B,) and returns a scalar to minimize.

- ``non_saturating`` (Goodfellow et al. 2014, sec. 3): D minimizes BCE with target 1 on real and
  0 on fake scores; G minimizes BCE with target 1 on fake scores (-log D(G(z)) instead of
  log(1 - D(G(z))), which saturates early in training). The targets are shaped like the
  *scores* (a target built with ``ones_like(real_data)`` would be shaped like the images and
  broadcast wrongly).
- ``hinge`` (Lim & Ye 2017; Miyato et al. 2018, eq. 16-17): D minimizes
  E[relu(1 - D(x))] + E[relu(1 + D(G(z)))]; G minimizes -E[D(G(z))].
- ``wgan_gp`` (Gulrajani et al. 2017, Algorithm 1): the critic minimizes E[D(G(z))] - E[D(x)]
  + lambda E[(||grad_x_hat D(x_hat)||_2 - 1)^2] on x_hat = eps x + (1 - eps) G(z), eps ~ U[0, 1];
  G minimizes -E[D(G(z))].
- R1 (Mescheder et al. 2018, eq. 9): gamma / 2 E_real[||grad_x D(x)||^2], with any loss.

Under bf16 autocast the input gradients come back in the input's dtype (float32), but the scores
are bf16: scores are summed in float32 before differentiating and norms are taken in float32,
so the penalty's precision is that of the network's bf16 matmuls, not of a bf16 reduction.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

LOSSES = ("non_saturating", "hinge", "wgan_gp")
# Pairwise distances without the ||a||^2 + ||b||^2 - 2ab shortcut, whose rounding leaves the
# zero self-distances at ~1e-3 for MNIST-sized vectors.
EXACT = "donot_use_mm_for_euclid_dist"


def check_loss(loss: str) -> None:
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")


def discriminator_loss(loss: str, real_scores: Tensor, fake_scores: Tensor) -> Tensor:
    """The discriminator's adversarial loss (no penalty): a scalar, computed in float32."""
    check_loss(loss)
    real_scores, fake_scores = real_scores.float(), fake_scores.float()  # (B,), (B,)
    if loss == "non_saturating":
        return (F.binary_cross_entropy_with_logits(real_scores, torch.ones_like(real_scores))
                + F.binary_cross_entropy_with_logits(fake_scores, torch.zeros_like(fake_scores)))
    if loss == "hinge":
        return F.relu(1.0 - real_scores).mean() + F.relu(1.0 + fake_scores).mean()
    return fake_scores.mean() - real_scores.mean()  # wgan_gp: -(the critic's W1 estimate)


def generator_loss(loss: str, fake_scores: Tensor) -> Tensor:
    """The generator's adversarial loss: a scalar, computed in float32."""
    check_loss(loss)
    fake_scores = fake_scores.float()  # (B,)
    if loss == "non_saturating":
        return F.binary_cross_entropy_with_logits(fake_scores, torch.ones_like(fake_scores))
    return -fake_scores.mean()  # hinge and wgan_gp


def interpolate(real: Tensor, fake: Tensor) -> Tensor:
    """x_hat = eps * real + (1 - eps) * fake, one eps ~ U[0, 1] per example (Gulrajani et al.
    2017, Algorithm 1, line 6); returned detached and requiring grad, ready for the penalty."""
    eps = torch.rand(len(real), *([1] * (real.dim() - 1)), device=real.device, dtype=real.dtype)
    # Under autocast the generator's output is bf16: x_hat takes the data's (float32) dtype.
    return torch.lerp(fake.detach().to(real.dtype), real.detach(), eps).requires_grad_(True)


def input_gradient_norm(scores: Tensor, x: Tensor) -> Tensor:
    """||grad_x sum_b D(x)_b||_2 per example, (B,), in float32, keeping the graph so that the
    penalty can be back-propagated into the discriminator (double back-propagation).

    ``scores`` (B,) must have been computed from ``x`` (which requires grad). Summing over the
    batch gives each example's own gradient because the discriminator treats examples
    independently (no batch norm).
    """
    (gradient,) = torch.autograd.grad(scores.float().sum(), x, create_graph=True)
    gradient = gradient.float().flatten(1)  # (B, D)
    # sqrt(sum + tiny): the norm's derivative is finite where the gradient vanishes.
    return torch.sqrt(gradient.pow(2).sum(1) + 1e-12)


def gradient_penalty(discriminator: Callable[[Tensor], Tensor], x_hat: Tensor) -> Tensor:
    """WGAN-GP's E[(||grad D(x_hat)||_2 - 1)^2] (Gulrajani et al. 2017, eq. 3), a scalar.

    ``discriminator`` maps (B, *data) to scores (B,) (bind labels with a lambda); ``x_hat``
    requires grad (see ``interpolate``). Runs under whatever autocast is active.
    """
    if not x_hat.requires_grad:
        raise ValueError("x_hat must require grad (use interpolate(real, fake))")
    return (input_gradient_norm(discriminator(x_hat), x_hat) - 1.0).pow(2).mean()


def r1_penalty(real_scores: Tensor, real: Tensor) -> Tensor:
    """R1's E[||grad_x D(x)||^2] on real data (Mescheder et al. 2018, eq. 9, without gamma / 2);
    ``real`` must require grad and ``real_scores`` be computed from it."""
    if not real.requires_grad:
        raise ValueError("real must require grad before the discriminator sees it")
    return input_gradient_norm(real_scores, real).pow(2).mean()


def energy_distance(x: Tensor, y: Tensor) -> Tensor:
    """Energy distance between two samples (Székely & Rizzo 2013), a scalar:
    2 E||X - Y|| - E||X - X'|| - E||Y - Y'||, with the within-sample terms as U-statistics
    (distinct pairs only), so the estimate is unbiased: zero in expectation exactly when X and Y
    have the same distribution, and not tied to any network. Both (N, ...) with N >= 2."""
    if len(x) < 2 or len(y) < 2:
        raise ValueError(f"energy_distance needs at least 2 points per sample, got {len(x)} and {len(y)}")
    x, y = x.flatten(1).float(), y.flatten(1).float()  # (N, D), (M, D)
    n, m = len(x), len(y)
    between = torch.cdist(x, y, compute_mode=EXACT).mean()
    within_x = torch.cdist(x, x, compute_mode=EXACT).sum() / (n * (n - 1))  # the diagonal is zero
    within_y = torch.cdist(y, y, compute_mode=EXACT).sum() / (m * (m - 1))
    return 2.0 * between - within_x - within_y
