"""Log a picture of the model's samples every few validation epochs."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch

from lightning_gen.callbacks.hooks import StepFreeCallback
from lightning_gen.callbacks.media import log_image, samples_image


class SampleLogger(StepFreeCallback):
    """After validation, draw ``num_samples`` samples and log a grid (images) or a scatter plot.

    Samples are drawn on rank zero under a fixed seed that leaves the training RNG untouched, so the
    pictures of successive epochs show the same noise passed through a better model. 2-D scatter
    plots show the validation points in grey behind the samples.

    Args:
        num_samples: samples per picture.
        every_n_epochs: log after every n-th validation epoch; 0 turns the callback off.
        seed: seed of the sampling noise.
        sample_options: keyword arguments for the model's ``sample`` (e.g. ``{"steps": 20}``).
        key: the logged media's name.
    """

    def __init__(
        self,
        num_samples: int = 64,
        every_n_epochs: int = 1,
        seed: int = 0,
        sample_options: dict[str, Any] | None = None,
        key: str = "val/samples",
    ) -> None:
        super().__init__()
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if every_n_epochs < 0:
            raise ValueError(f"every_n_epochs must be >= 0 (0 = off), got {every_n_epochs}")
        self.num_samples = num_samples
        self.every_n_epochs = every_n_epochs
        self.seed = seed
        self.sample_options = dict(sample_options or {})
        self.key = key
        self._reference: list[torch.Tensor] = []

    def _active(self, trainer: L.Trainer) -> bool:
        return (
            self.every_n_epochs > 0
            and not trainer.sanity_checking
            and trainer.is_global_zero
            and (trainer.current_epoch + 1) % self.every_n_epochs == 0
        )

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._reference = []

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if not self._active(trainer):
            return
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        if x.dim() == 2 and sum(len(r) for r in self._reference) < 2000:
            self._reference.append(x.detach().cpu())

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._active(trainer):
            return
        devices = [pl_module.device] if pl_module.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            torch.manual_seed(self.seed)
            samples = pl_module.sample(self.num_samples, **self.sample_options)
        reference = torch.cat(self._reference) if self._reference else None
        log_image(trainer, self.key, samples_image(samples, reference))
        self._reference = []
