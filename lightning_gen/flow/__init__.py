"""Normalizing flows: RealNVP (Dinh et al. 2017) on vectors and on images."""

from lightning_gen.flow.module import RealNVP

__all__ = ["RealNVP"]
