"""Callbacks that work with every family and every logger."""

from lightning_gen.callbacks.hooks import NullProfiler
from lightning_gen.callbacks.latent import LatentInterpolation, interpolate
from lightning_gen.callbacks.media import image_grid, log_image, samples_image, scatter_image
from lightning_gen.callbacks.prediction import PredictionWriter, write_samples
from lightning_gen.callbacks.progress import TimedProgressBar
from lightning_gen.callbacks.quality import ImageQualityMetrics, SampleDistanceMetrics
from lightning_gen.callbacks.samples import SampleLogger
from lightning_gen.callbacks.speed import SpeedOptions
from lightning_gen.callbacks.termination import CheckpointOnTerminate, LastCheckpointAtFitEnd

__all__ = [
    "CheckpointOnTerminate", "ImageQualityMetrics", "LastCheckpointAtFitEnd", "LatentInterpolation",
    "NullProfiler", "PredictionWriter", "SampleDistanceMetrics", "SampleLogger", "SpeedOptions", "TimedProgressBar", "image_grid", "interpolate",
    "log_image", "samples_image", "scatter_image", "write_samples",
]
