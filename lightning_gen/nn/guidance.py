"""Classifier-free guidance (Ho & Salimans 2021), shared by the families that condition a
time-dependent network on a class label (Diffusion's denoiser, FlowMatching's velocity field).

Training replaces each label by the null label ``num_classes`` with probability ``label_dropout``,
so one network learns both the conditional and the unconditional prediction. Sampling combines
them:
    f_guided(x, t) = f(x, t) + scale (f(x, t, y) - f(x, t)),
where ``f`` is whatever the network predicts (the noise eps, or a velocity), scale = 1 is the plain
conditional model and larger values trade diversity for fidelity (the paper's w is scale - 1).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def drop_labels(y: Tensor | None, num_classes: int | None, label_dropout: float) -> Tensor | None:
    """For a conditional model, each label replaced by the null label with probability
    ``label_dropout``; None for an unconditional one."""
    if num_classes is None:
        return None
    dropped = torch.rand(y.shape, device=y.device) < label_dropout
    return torch.where(dropped, torch.full_like(y, num_classes), y)


def check_guidance(num_classes: int | None, label_dropout: float, guidance_scale: float) -> None:
    """A guidance scale other than 1 needs the unconditional prediction, which only a model trained
    with label dropout has."""
    if guidance_scale < 0:
        raise ValueError(f"guidance_scale must be >= 0, got {guidance_scale}")
    if num_classes is not None and label_dropout == 0.0 and guidance_scale != 1.0:
        raise ValueError("guidance_scale != 1 needs an unconditional model too: set label_dropout > 0")


def guided(predict: Callable[[Tensor, Tensor, Tensor | None], Tensor], y: Tensor | None,
           num_classes: int | None, guidance_scale: float) -> Callable[[Tensor, Tensor], Tensor]:
    """``(x, t) -> prediction`` with classifier-free guidance from ``predict(x, t, labels)``.

    Unconditional models (``y`` None) and scale 1 call ``predict`` once; otherwise the conditional
    and unconditional predictions come from one batched call of twice the batch."""

    def prediction(x: Tensor, t: Tensor) -> Tensor:
        if y is None or guidance_scale == 1.0:
            return predict(x, t, y)
        null = torch.full_like(y, num_classes)
        both = predict(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]))
        conditional, unconditional = both.chunk(2)
        return unconditional + guidance_scale * (conditional - unconditional)

    return prediction
