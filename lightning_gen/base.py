"""GenerativeModule: what every family shares.

The contract (see README "The contract"):
- ``data_shape`` is the shape of one example as the data module yields it: (C, H, W) images in
  [0, 1] or (D,) vectors in data coordinates. ``cli.py`` links it from the data module, so a model
  trains on whichever data module it is given without extra configuration.
- ``sample(num_samples, **options)`` returns a tensor of shape (num_samples, *data_shape) on the
  model's device, in data space, reproducible under ``torch.manual_seed``.
- ``predict_step`` returns samples, one per example of the predict batch, so ``cli.py predict`` is
  generation; conditional models take the batch's labels.
- Models with a likelihood define ``log_prob(x) -> Tensor[B]`` in nats per example, for ``x`` as
  the data module yields it; ``log_likelihood_metrics`` logs it as ``{stage}/nll`` and
  ``{stage}/bpd``.
- Metric names: ``train/loss``, ``val/loss``, ``val/nll``, ``val/bpd``, ``test/...``: the same in
  every family so dashboards line up. Training metrics reach the logger under these exact names
  (per step) and as ``<name>_epoch`` (the epoch mean).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from torch import Tensor

from lightning_gen.metrics.likelihood import bits_per_dim

LR_SCHEDULES = ("constant", "cosine")


class GenerativeModule(L.LightningModule):
    """Base class of every family: data shape, optimizer set-up, sampling and logging helpers.

    Args:
        data_shape: shape of one example: (C, H, W) for images, (D,) for vectors.
        learning_rate: AdamW learning rate.
        weight_decay: AdamW weight decay.
        lr_schedule: ``"constant"`` or ``"cosine"`` (cosine decay to 0 over the whole fit).
        warmup_steps: linear warm-up from 0 over this many optimizer steps.
    """

    def __init__(
        self,
        data_shape: Sequence[int],
        learning_rate: float,
        weight_decay: float = 0.0,
        lr_schedule: str = "constant",
        warmup_steps: int = 0,
    ) -> None:
        super().__init__()
        data_shape = tuple(int(size) for size in data_shape)
        if len(data_shape) not in (1, 3) or any(size < 1 for size in data_shape):
            raise ValueError(
                f"data_shape must be (C, H, W) for images or (D,) for vectors, got {data_shape}"
            )
        if learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {learning_rate}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        if lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {lr_schedule!r}")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        self.data_shape = data_shape
        self.learning_rate = learning_rate
        self.weight_decay = weight_decay
        self.lr_schedule = lr_schedule
        self.warmup_steps = warmup_steps

    # ----------------------------------------------------------------------------- data helpers
    @property
    def is_image(self) -> bool:
        return len(self.data_shape) == 3

    @property
    def num_dims(self) -> int:
        """Dimensions of one example (784 for MNIST), the denominator of bits/dim."""
        return math.prod(self.data_shape)

    def check_data(self, x: Tensor) -> None:
        """Raise a ValueError when ``x`` does not have the data shape (or the [0, 1] image range)."""
        if tuple(x.shape[1:]) != self.data_shape:
            raise ValueError(
                f"expected a batch of shape (B, {', '.join(map(str, self.data_shape))}), "
                f"got {tuple(x.shape)}"
            )
        if self.is_image and (x.min() < 0 or x.max() > 1):
            raise ValueError(
                f"images must lie in [0, 1] (as MNISTDataModule yields them), got values in "
                f"[{x.min().item():.3g}, {x.max().item():.3g}]"
            )

    @staticmethod
    def check_num_samples(num_samples: int) -> None:
        if not isinstance(num_samples, int) or isinstance(num_samples, bool) or num_samples < 1:
            raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")

    # --------------------------------------------------------------------------------- training
    def _shared_step(self, batch: Any, stage: str) -> Tensor:
        """The loss of one batch at ``stage`` ("train", "val" or "test"), logged under the
        contract's names; every family implements it (or overrides training_step, as the GAN)."""
        raise NotImplementedError(f"{type(self).__name__} does not implement _shared_step()")

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._shared_step(batch, "train")

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._shared_step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._shared_step(batch, "test")

    # --------------------------------------------------------------------------------- sampling
    def sample(self, num_samples: int, **options: Any) -> Tensor:
        """Draw ``num_samples`` examples in data space: (num_samples, *data_shape)."""
        raise NotImplementedError(f"{type(self).__name__} does not implement sample()")

    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, _ = batch
        return self.sample(len(x))

    # ---------------------------------------------------------------------------------- logging
    def log_metric(self, stage: str, name: str, value: Tensor, batch_size: int | None = None,
                   prog_bar: bool = False) -> None:
        """Log ``{stage}/{name}`` under that exact name.

        Training: the step value as ``train/{name}`` and the epoch mean as ``train/{name}_epoch``
        (Lightning's own ``on_step=True, on_epoch=True`` would rename the step value
        ``train/{name}_step``, so no logger would see the contract's ``train/{name}``).
        Validation and test: the epoch mean, synced over the ranks.
        """
        key = f"{stage}/{name}"
        if stage == "train":
            self.log(key, value, on_step=True, on_epoch=False, prog_bar=prog_bar,
                     batch_size=batch_size)
            self.log(f"{key}_epoch", value, on_step=False, on_epoch=True, batch_size=batch_size)
        else:
            self.log(key, value, on_epoch=True, prog_bar=prog_bar, sync_dist=True,
                     batch_size=batch_size)

    def log_likelihood_metrics(self, stage: str, nll: Tensor) -> None:
        """Log the mean negative log-likelihood (nats per example) and bits/dim of a batch."""
        nll = nll.mean()
        self.log_metric(stage, "nll", nll, batch_size=None)
        self.log_metric(stage, "bpd", bits_per_dim(nll, self.num_dims))

    def log_loss(self, stage: str, loss: Tensor, batch_size: int) -> None:
        """``{stage}/loss`` (see ``log_metric``), shown in the progress bar when training and
        validating."""
        self.log_metric(stage, "loss", loss, batch_size=batch_size, prog_bar=stage != "test")

    # -------------------------------------------------------------------------------- optimizer
    def optimizer_parameters(self) -> Any:
        """What the optimizer trains: every parameter that requires a gradient (not EMA copies)."""
        return [parameter for parameter in self.parameters() if parameter.requires_grad]

    def configure_optimizers(self) -> Any:
        optimizer = adamw(self.optimizer_parameters(), lr=self.learning_rate,
                          weight_decay=self.weight_decay)
        if self.lr_schedule == "constant" and self.warmup_steps == 0:
            return optimizer
        estimated = self.trainer.estimated_stepping_batches  # inf when the fit has no end
        if math.isinf(estimated):
            if self.lr_schedule == "cosine":
                raise ValueError("lr_schedule='cosine' needs a finite fit: set trainer max_steps or "
                                 "max_epochs, or use lr_schedule='constant'")
            estimated = self.warmup_steps
        total_steps = max(int(estimated), 1)
        schedule = learning_rate_factor(self.lr_schedule, self.warmup_steps, total_steps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


FUSED_ADAMW_DEVICES = ("cuda", "cpu")


def use_fused_adamw(parameters: Sequence[Tensor]) -> bool:
    """Whether AdamW's fused kernel applies: every parameter a float tensor on one device type that
    has the kernel (CUDA; CPU since torch 2.4). It updates all parameters in a few launches instead
    of a loop over tensors; on a 2-core CPU the conv VAE of configs/vae_mnist.yaml trains 31-49%
    faster with it (benchmarks/results/throughput.md, "Speed options")."""
    device_types = {parameter.device.type for parameter in parameters}
    return (len(device_types) == 1 and device_types <= set(FUSED_ADAMW_DEVICES)
            and all(parameter.is_floating_point() for parameter in parameters))


def adamw(parameters, **options: Any) -> torch.optim.AdamW:
    """``torch.optim.AdamW``, fused where ``use_fused_adamw`` says so (every family's optimizer)."""
    parameters = list(parameters)
    return torch.optim.AdamW(parameters, fused=use_fused_adamw(parameters) or None, **options)


def learning_rate_factor(schedule: str, warmup_steps: int, total_steps: int):
    """The multiplier of the base learning rate at each step: linear warm-up, then the schedule."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = min((step - warmup_steps) / max(total_steps - warmup_steps, 1), 1.0)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor
