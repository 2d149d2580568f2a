"""Likelihood units: nats per example and bits per dimension."""

from __future__ import annotations

import math

from torch import Tensor


def bits_per_dim(nll_nats: Tensor | float, num_dims: int) -> Tensor | float:
    """Convert a negative log-likelihood in nats per example to bits per dimension.

    bits/dim = nll / (num_dims * ln 2). For 8-bit images, pass the nll of the discrete data (the
    continuous density of dequantized pixels in [0, 256) plus any preprocessing log-det), as the
    flow and autoregressive families report it.
    """
    if num_dims < 1:
        raise ValueError(f"num_dims must be >= 1, got {num_dims}")
    return nll_nats / (num_dims * math.log(2.0))
