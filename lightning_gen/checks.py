"""Argument checks shared by every family: each raises ValueError with the name, what is
allowed and what was given, so a constructor states its rules in a line each."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def at_least(minimum: float, **values: float) -> None:
    """Every value >= minimum: ``at_least(1, latent_dim=latent_dim, num_layers=num_layers)``."""
    for name, value in values.items():
        if value < minimum:
            raise ValueError(f"{name} must be >= {minimum}, got {value}")


def positive(**values: float) -> None:
    """Every value > 0 (a temperature, a rate)."""
    for name, value in values.items():
        if not value > 0:
            raise ValueError(f"{name} must be > 0, got {value}")


def fraction(**values: float) -> None:
    """Every value in [0, 1) (a dropout rate, a probability that must leave something)."""
    for name, value in values.items():
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {value}")


def one_of(name: str, value: Any, choices: Iterable[Any]) -> Any:
    """``value`` if it is one of ``choices``."""
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def optional_classes(num_classes: int | None, minimum: int = 1) -> int | None:
    """A class count of a conditional model (an int >= minimum) or None (unconditional)."""
    if num_classes is not None and (not isinstance(num_classes, int) or isinstance(num_classes, bool)
                                    or num_classes < minimum):
        raise ValueError(f"num_classes must be an int >= {minimum} (or None for an unconditional "
                         f"model), got {num_classes!r}")
    return num_classes


def average_to_predict(predict_use_ema: bool | None, ema_decay: float | None, averaged: str) -> None:
    """``predict_use_ema=True`` asks for the ``averaged`` network's moving average, which only a
    model built with ``ema_decay`` keeps."""
    if predict_use_ema and ema_decay is None:
        raise ValueError(f"predict_use_ema=True needs a {averaged} average: set ema_decay")
