"""Metrics shared by every family."""

from lightning_gen.metrics.likelihood import bits_per_dim

__all__ = ["bits_per_dim"]
