"""Fixed-step ODE solvers over t in [0, 1] and the log-likelihood of a continuous normalizing flow.

A velocity field ``velocity(x, t) -> dx/dt`` (x (B, ...), t (B,) real) defines the flow
dx/dt = v(x, t) from noise at t = 0 to data at t = 1. The solvers take ``steps`` equal steps of
size h = (t1 - t0) / steps:

- ``euler``:    x' = x + h v(x, t)                                       (order 1, 1 evaluation)
- ``midpoint``: x' = x + h v(x + h/2 v(x, t), t + h/2)                   (order 2, 2 evaluations)
- ``heun``:     k1 = v(x, t), k2 = v(x + h k1, t + h), x' = x + h (k1 + k2) / 2
                                                                         (order 2, 2 evaluations)

The global error of an order-p solver falls as steps^-p on a smooth field (tests check both orders
on a Gaussian target whose flow is known in closed form). Times are Python floats and the time
tensors are built from them, so a solve makes no host-device synchronization.

Log-likelihood (instantaneous change of variables, Chen et al. 2018, theorem 1):
    d log p(x_t) / dt = -div v(x_t, t),  so  log p_1(x_1) = log p_0(x_0) - int_0^1 div v(x_t, t) dt,
with x_0 found by solving the ODE backwards from the data point x_1; the divergence is integrated
alongside x by the same solver. The divergence is exact (one backward pass per dimension:
affordable for 2-D data) or Hutchinson's estimate E_eps[eps^T (dv/dx) eps] with Rademacher probes
held fixed along the path (Grathwohl et al. 2019, FFJORD), unbiased for the divergence at each
evaluation; the log-likelihood then carries the solver's discretization error, which shrinks with
the step count.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

Velocity = Callable[[Tensor, Tensor], Tensor]
SOLVERS = ("euler", "midpoint", "heun")
TRACES = ("exact", "hutchinson")
LOG_2PI = math.log(2 * math.pi)


def check_solver(solver: str, steps: int, name: str = "sampler") -> None:
    if solver not in SOLVERS:
        raise ValueError(f"{name} must be one of {SOLVERS}, got {solver!r}")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")


def network_evaluations(solver: str, steps: int) -> int:
    """Network evaluations of one solve: ``steps`` for Euler, ``2 steps`` for midpoint and Heun."""
    return steps if solver == "euler" else 2 * steps


def solver_step(velocity: Callable, x: Tensor, t: float, h: float, solver: str) -> Tensor:
    """One step of ``solver`` from time t to t + h (``velocity(x, t_float)``)."""
    if solver == "euler":
        return x + h * velocity(x, t)
    if solver == "midpoint":
        return x + h * velocity(x + 0.5 * h * velocity(x, t), t + 0.5 * h)
    k1 = velocity(x, t)
    k2 = velocity(x + h * k1, t + h)
    return x + 0.5 * h * (k1 + k2)


def integrate(velocity: Velocity, x: Tensor, steps: int, solver: str = "heun", t0: float = 0.0,
              t1: float = 1.0, record: bool = False) -> tuple[Tensor, list[Tensor]]:
    """Solve dx/dt = velocity(x, t) from t0 to t1 in ``steps`` equal steps.

    Returns (x at t1, [x at t0, ..., x at t1] when ``record`` else []).
    """
    check_solver(solver, steps)
    h = (t1 - t0) / steps
    batch_size, device = x.shape[0], x.device

    def at(state: Tensor, t: float) -> Tensor:
        return velocity(state, torch.full((batch_size,), t, device=device))

    states = [x] if record else []
    for index in range(steps):
        x = solver_step(at, x, t0 + index * h, h, solver)
        if record:
            states.append(x)
    return x, states


def divergence(velocity: Velocity, x: Tensor, t: Tensor, trace: str = "exact",
               probes: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(v(x, t), div_x v(x, t) (B,)) for a batch whose examples do not interact (the networks
    here normalize per example), so one backward pass of the batch sum gives every example's row.

    ``trace="exact"``: D backward passes; ``"hutchinson"``: the mean over ``probes`` (P, B, ...)
    of eps^T (dv/dx) eps, one backward pass per probe.
    """
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        v = velocity(x, t)
        flat_v = v.flatten(1)
        if trace == "exact":
            total = torch.zeros(x.shape[0], device=x.device, dtype=flat_v.dtype)
            for dim in range(flat_v.shape[1]):
                (row,) = torch.autograd.grad(flat_v[:, dim].sum(), x, retain_graph=True)
                total = total + row.flatten(1)[:, dim]
        else:
            estimates = []
            for eps in probes:
                (vjp,) = torch.autograd.grad((v * eps).sum(), x, retain_graph=True)
                estimates.append((vjp * eps).flatten(1).sum(1))
            total = torch.stack(estimates).mean(0)
    return v.detach(), total.detach()


def log_likelihood(velocity: Velocity, x1: Tensor, steps: int, solver: str = "heun",
                   trace: str = "exact", num_probes: int = 1,
                   generator: torch.Generator | None = None) -> Tensor:
    """log p_1(x_1) in nats per example (B,) under the flow of ``velocity`` from N(0, I) at t = 0.

    Solves the ODE backwards from x_1 (t = 1) to x_0 (t = 0) with the divergence integral
    alongside (see the module docstring). ``trace``: ``"exact"`` or ``"hutchinson"`` with
    ``num_probes`` Rademacher probes drawn once per example (from ``generator`` when given).
    """
    check_solver(solver, steps, "solver")
    if trace not in TRACES:
        raise ValueError(f"trace must be one of {TRACES}, got {trace!r}")
    probes = None
    if trace == "hutchinson":
        if num_probes < 1:
            raise ValueError(f"num_probes must be >= 1, got {num_probes}")
        signs = torch.randint(0, 2, (num_probes, *x1.shape), device=x1.device, generator=generator)
        probes = signs.to(x1.dtype) * 2 - 1
    batch_size, device = x1.shape[0], x1.device

    def velocity_and_divergence(x: Tensor, t: float) -> tuple[Tensor, Tensor]:
        return divergence(velocity, x, torch.full((batch_size,), t, device=device), trace, probes)

    # The solver steps of ``solver_step`` written for the pair (x, integral of the divergence).
    h = -1.0 / steps
    x, integral = x1.detach().float(), torch.zeros(batch_size, device=device)
    for index in range(steps):
        t = 1.0 + index * h
        if solver == "euler":
            v, div = velocity_and_divergence(x, t)
        elif solver == "midpoint":
            with torch.no_grad():  # the first stage needs the velocity only, not its divergence
                v = velocity(x, torch.full((batch_size,), t, device=device)).detach()
            v, div = velocity_and_divergence(x + 0.5 * h * v, t + 0.5 * h)
        else:
            v1, div1 = velocity_and_divergence(x, t)
            v2, div2 = velocity_and_divergence(x + h * v1, t + h)
            v, div = 0.5 * (v1 + v2), 0.5 * (div1 + div2)
        x, integral = x + h * v, integral + h * div
    # integral = int_1^0 div dt = -int_0^1 div dt.
    return standard_normal_log_density(x) + integral


def standard_normal_log_density(x: Tensor) -> Tensor:
    """log N(x; 0, I) summed over every dimension but the first: (B,)."""
    flat = x.flatten(1)
    return -0.5 * (flat.pow(2).sum(1) + flat.shape[1] * LOG_2PI)
