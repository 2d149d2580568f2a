"""How noise and data are paired in a training batch.

- ``independent``: each data point with the noise drawn beside it (conditional flow matching,
  Lipman et al. 2023; rectified flow, Liu et al. 2023).
- ``ot``: the batch's noise re-ordered by the exact assignment that minimizes the summed squared
  distance to the data (minibatch optimal transport, Tong et al. 2024, OT-CFM; Pooladian et al.
  2023). The pairs' straight paths cross less, so the learned field is straighter and few-step
  solvers err less. Solved on the host by SciPy's ``linear_sum_assignment`` (O(B^3); a batch of 256
  takes a few milliseconds) after one copy of the (B, B) cost matrix: a host sync per step.

Labels stay with their data points, so class-conditional training is unchanged by the pairing.
"""

from __future__ import annotations

import torch
from torch import Tensor

COUPLINGS = ("independent", "ot")


def ot_pairing(noise: Tensor, data: Tensor) -> Tensor:
    """The noise (B, ...) re-ordered so that ``noise[i]`` is data[i]'s partner under the
    squared-Euclidean optimal assignment of the batch."""
    from scipy.optimize import linear_sum_assignment  # only this coupling needs SciPy

    cost = torch.cdist(data.flatten(1).float(), noise.flatten(1).float()).pow(2)  # (B, B)
    rows, columns = linear_sum_assignment(cost.detach().cpu().numpy())
    order = torch.as_tensor(columns[rows.argsort()], device=noise.device)
    return noise[order]


def pair(noise: Tensor, data: Tensor, coupling: str) -> Tensor:
    """The noise to pair with ``data`` under ``coupling``."""
    return ot_pairing(noise, data) if coupling == "ot" else noise
