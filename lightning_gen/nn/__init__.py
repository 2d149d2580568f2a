"""Blocks used by two families or more (plain nn.Modules, no Lightning)."""

from lightning_gen.nn.ema import ExponentialMovingAverage
from lightning_gen.nn.encoders import ConvDecoder, ConvEncoder, MLPDecoder, MLPEncoder, build_decoder, build_encoder
from lightning_gen.nn.mlp import MLP

__all__ = [
    "MLP", "ConvDecoder", "ConvEncoder", "ExponentialMovingAverage", "MLPDecoder", "MLPEncoder",
    "build_decoder", "build_encoder",
]
