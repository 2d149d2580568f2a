"""GenerativeModule: what every family shares.

The contract (see README "The contract"):
- ``data_shape`` is the shape of one example as the data module yields it: (C, H, W) images in
  [0, 1] or (D,) vectors in data coordinates. ``cli.py`` links it from the data module, so a model
  trains on whichever data module it is given without extra configuration.
- ``sample(num_samples, **options)`` returns a tensor of shape (num_samples, *data_shape) on the
  model's device, in data space, reproducible under ``torch.manual_seed``.
- ``predict_step`` returns samples, one per example of the predict batch, so ``cli.py predict`` is
  generation; conditional models take the batch's labels. A predict batch ``(x, y, index)`` that
  carries the global indices of its examples (as the project's data modules yield it) is drawn
  under a seed derived from the run's seed and ``index[0]``, so every batch, on every rank, draws
  different samples, and the samples of a seed do not depend on the number of processes.
- Constructor arguments that only change sampling or evaluation (``EVALUATION_OPTIONS``: the
  ``predict_*`` options, the VAE's importance-sample counts, ...) are not saved as
  hyperparameters: a checkpoint holds the model, and ``cli.py predict/test --ckpt_path`` takes
  these options from the config and the command line.
- Models with a likelihood define ``log_prob(x) -> Tensor[B]`` in nats per example, for ``x`` as
  the data module yields it; ``log_likelihood_metrics`` logs it as ``{stage}/nll`` and
  ``{stage}/bpd``.
- Metric names: ``train/loss``, ``val/loss``, ``val/nll``, ``val/bpd``, ``test/...``: the same in
  every family so dashboards line up. Training metrics reach the logger under these exact names
  (per step, at Lightning's ``log_every_n_steps`` interval) and as ``<name>_epoch`` (the epoch
  mean); see ``log_metric`` for what each step costs.

The template every family fills in (as nflows' ``Transform`` or diffusers' schedulers do):
- ``loss(batch, batch_idx, stage) -> (loss, metrics)``: the loss of one batch and the other
  metrics to log; ``training_step``, ``validation_step`` and ``test_step`` are this class's and
  log them under the contract's names (a ``"nll"`` entry, per example, also gives bits/dim). A
  family that steps its own optimizers (the GAN) overrides ``training_step`` only.
- ``sample(num_samples, **options)``, and ``predict_options()`` for what ``predict`` passes it.
- ``averaged_network()`` where the family keeps an exponential moving average: this class
  updates it after every optimizer step and ``sampling_network(use_ema)`` chooses it.
- Class labels: one ``num_classes`` attribute (None: unconditional); ``batch_labels(y)`` gives
  the network the batch's labels when conditional, and ``sampling_labels(y, n)`` applies the one
  rule for sampling: none for an unconditional model, else the given ones or, when ``y`` is None,
  every class in turn (0, 1, ..., K-1, 0, ...).
- ``to_model_space`` / ``from_model_space``: images [0, 1] <-> [-1, 1] for the families whose
  networks work there (vectors unchanged).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Container, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import Any, ClassVar

import lightning as L
import torch
from lightning.pytorch.callbacks import Timer
from lightning.pytorch.plugins.precision import MixedPrecision
from torch import Tensor, nn

from lightning_gen.metrics.likelihood import bits_per_dim
from lightning_gen.nn.ema import ExponentialMovingAverage, select_network
from lightning_gen.runtime import skip_nvml_probe_without_driver

# After Lightning's import, which sets the variable this looks at (see lightning_gen/runtime.py).
skip_nvml_probe_without_driver()

LR_SCHEDULES = ("constant", "cosine")
#: Seconds between two updates of the training values shown in the progress bar (``prog_bar``
#: metrics, the loss; logged for a bar that reads ``trainer.progress_bar_metrics``), and between
#: two redraws of the CLI's bar (``TimedProgressBar``, which reads them from the module): about
#: what an eye can follow, and what tqdm's own ``mininterval`` is.
PROGRESS_BAR_INTERVAL_S = 0.1
#: Training values (metrics, watched losses) kept before they are reduced: bounds the memory of a
#: long interval between two logging steps.
PENDING_VALUES = 1024
# Keys this project adds to every checkpoint it writes.
CLASS_KEY = "lightning_gen_class"
RNG_KEY = "lightning_gen_rng_states"
# The seed of every validation and test draw (with the batch and rank; see evaluation_rng).
EVALUATION_SEED = 0


class DivergenceError(RuntimeError):
    """The training loss became NaN or infinite."""


class CheckpointMismatchError(ValueError):
    """A checkpoint holds a model of another class than the one it is loaded into."""


def class_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def logger_writes_this_step(trainer: L.Trainer | None) -> bool:
    """Whether Lightning writes the step values to the loggers after the current training batch
    (its ``log_every_n_steps`` interval, a stop, ``fast_dev_run``): Lightning's own test
    (``should_update_logs``), or True where a Lightning version lacks it."""
    if trainer is None:
        return True
    try:
        writes = trainer._logger_connector.should_update_logs
    except AttributeError:
        return True
    return bool(writes) or bool(trainer.fast_dev_run)


def forget_earlier_step_values(trainer: L.Trainer | None, names: Container[str]) -> None:
    """Mark this module's training step values (``train/{name}`` for ``name`` in ``names``)
    logged by earlier batches as not logged in the current one.

    Lightning keeps a logged value in its result collection until the epoch ends and, after every
    batch, copies each one into its metric dictionaries, converting every ``prog_bar`` value to a
    Python number (``_ResultCollection.metrics``): on a GPU, a host sync per batch for as long as
    any batch of the epoch logged the loss for the progress bar. A value was copied when it was
    logged and stays in ``callback_metrics`` and ``progress_bar_metrics``; the module logs every
    value again on each step whose values Lightning writes (``log_metric``), so loggers and
    callbacks see what they saw before. Values logged by others (callbacks, a subclass's own
    ``self.log``) are left as they are. Where a Lightning version stores results otherwise, this
    does nothing (the values are then copied, and converted, as before).
    """
    results = getattr(trainer, "_results", None) if trainer is not None else None
    if not results:
        return
    for item in results.values():
        meta = getattr(item, "meta", None)
        name = getattr(meta, "name", "")
        if (name.startswith("train/") and name[6:] in names and getattr(meta, "on_step", False)
                and not getattr(meta, "on_epoch", True) and hasattr(item, "has_reset")):
            item.has_reset = True


class StepLogging:
    """What the current training batch logs (see ``GenerativeModule.log_metric``)."""

    __slots__ = ("bar_reads_logged_values", "every_step", "in_batch", "late", "logged_names", "progress_bar",
                 "progress_bar_time", "write")

    def __init__(self) -> None:
        self.bar_reads_logged_values = True  # the progress bar shows what the module logs
        self.every_step = False  # a callback monitors a training step value: log every step
        self.in_batch = False  # between on_train_batch_start and on_train_batch_end
        self.write = True  # Lightning writes the step values to the loggers after this batch
        self.progress_bar = True  # the progress bar's values are due for an update
        self.progress_bar_time = -math.inf  # when they were last logged (time.monotonic)
        self.late = False  # a stop made this epoch log from on_train_batch_end (see there)
        self.logged_names: set[str] = set()  # the metrics this batch logged


class TrainingMetrics:
    """The training metrics of one epoch, for their epoch means and last values.

    ``add`` keeps each step's value (detached, on its device) and batch size; every
    ``PENDING_VALUES`` values and at ``epoch_means`` the kept values of a metric are summed in one
    operation, on the device. A step thus costs a list append per metric and no host sync, where
    Lightning's ``on_epoch=True`` accumulation costs a ``self.log`` per metric and step. The mean
    is weighted by batch size, as Lightning's is.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.pending: dict[str, dict[int, list[Tensor]]] = {}  # name -> batch size -> values
        self.totals: dict[str, Tensor] = {}  # name -> sum of batch size * value
        self.counts: dict[str, int] = {}  # name -> sum of batch sizes
        self.latest: dict[str, tuple[Tensor, int | None, bool]] = {}  # name -> (value, batch size, prog_bar)
        self.size = 0

    def add(self, name: str, value: Tensor, batch_size: int | None, prog_bar: bool = False) -> None:
        value = value.detach()
        self.latest[name] = (value, batch_size, prog_bar)
        self.pending.setdefault(name, {}).setdefault(1 if batch_size is None else int(batch_size), []).append(value)
        self.size += 1
        if self.size >= PENDING_VALUES:
            self.reduce()

    def reduce(self) -> None:
        """Sum the kept values into the totals (on the device; no host sync)."""
        for name, groups in self.pending.items():
            for batch_size, values in groups.items():
                stacked = torch.stack([value.reshape(()) for value in values])
                if stacked.dtype != torch.float64:
                    stacked = stacked.float()  # as Lightning accumulates: float32, or float64
                total = stacked.sum() * batch_size
                self.totals[name] = total if name not in self.totals else self.totals[name] + total
                self.counts[name] = self.counts.get(name, 0) + batch_size * len(values)
        self.pending = {}
        self.size = 0

    def epoch_means(self) -> dict[str, Tensor]:
        """The batch-size-weighted mean of each metric over the values added since ``reset``."""
        self.reduce()
        return {name: total / self.counts[name] for name, total in self.totals.items()}


class GenerativeModule(L.LightningModule):
    """Base class of every family: data shape, optimizer set-up, sampling and logging helpers.

    Families take the four optimizer arguments below as keywords (``**optimizer_options``), so
    they are written once, here; ``--print_config`` and the configs show them with the family's
    other arguments.

    Args:
        data_shape: shape of one example: (C, H, W) for images, (D,) for vectors.
        learning_rate: AdamW learning rate (None: the family's ``DEFAULT_LEARNING_RATE``).
        weight_decay: AdamW weight decay.
        lr_schedule: ``"constant"`` or ``"cosine"`` (cosine decay to 0 over the whole fit: over
            its steps when max_steps or max_epochs bound it, else over the time of a fit bounded
            by max_time only, following the fraction of max_time spent).
        warmup_steps: linear warm-up from 0 over this many optimizer steps.
    """

    #: Constructor arguments that only change sampling or evaluation: left out of the checkpoint's
    #: hyperparameters (``save_hyperparameters(ignore=...)``), so that LightningCLI, which lays a
    #: checkpoint's hyperparameters over the command line, lets the command line decide them.
    EVALUATION_OPTIONS: ClassVar[tuple[str, ...]] = ()
    #: Number of class labels of a class-conditional model; None: unconditional.
    num_classes: int | None = None
    #: The AdamW learning rate when none is given (each family sets its own).
    DEFAULT_LEARNING_RATE: ClassVar[float] = 1e-3

    def __init__(
        self,
        data_shape: Sequence[int],
        *,
        learning_rate: float | None = None,
        weight_decay: float = 0.0,
        lr_schedule: str = "constant",
        warmup_steps: int = 0,
    ) -> None:
        super().__init__()
        if learning_rate is None:
            learning_rate = self.DEFAULT_LEARNING_RATE
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
        # The first training step whose loss was not finite (-1: none), kept on the device so that
        # watching the loss adds no host sync; read at the logging interval and before saving.
        self._first_nonfinite_step: Tensor | None = None
        # (loss detached, global step) of the steps watched since the last check.
        self._watched_losses: list[tuple[Tensor, int]] = []
        # The epoch's training metrics (see log_metric) and this batch's logging decision.
        # (A plain object, set once: nn.Module's __setattr__ would cost more than the rest of
        # the per-step bookkeeping.)
        self._training_metrics = TrainingMetrics()
        self._logging = StepLogging()
        self._rng_states_to_restore: dict[str, Any] | None = None
        self._predict_seed = 0

    def __setattr__(self, name: str, value: Any) -> None:
        # Lightning sets _current_fx_name (a hook's name, or None) before and after every hook
        # it calls: 44 times a training step. nn.Module.__setattr__ first checks whether the
        # value is a parameter, buffer or module (1.4-1.5 us a call on the 2-core CPU, against
        # 0.2 us here: benchmarks/hook_costs.py); a name or None is neither, and goes into the
        # instance's dict, where nn.Module would put it too.
        if name == "_current_fx_name":
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

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

    def starting_noise(self, noise: Tensor | None, num_samples: int, name: str) -> Tensor:
        """The noise a sampler starts from, float32 on the model's device: drawn from N(0, I)
        when ``noise`` is None, else the given one, checked to be (num_samples, *data_shape)."""
        if noise is None:
            return torch.randn(num_samples, *self.data_shape, device=self.device)
        if tuple(noise.shape) != (num_samples, *self.data_shape):
            raise ValueError(f"{name} must have shape {(num_samples, *self.data_shape)}, got {tuple(noise.shape)}")
        return noise.to(self.device).float()

    def to_model_space(self, x: Tensor) -> Tensor:
        """Images [0, 1] -> [-1, 1] (Ho et al. 2020, sec. 3.3; a tanh generator's range);
        vectors unchanged."""
        return x * 2.0 - 1.0 if self.is_image else x

    def from_model_space(self, x: Tensor) -> Tensor:
        """Back to data space: images [-1, 1] -> [0, 1], clamped; vectors unchanged."""
        return ((x + 1.0) / 2.0).clamp(0.0, 1.0) if self.is_image else x

    # ---------------------------------------------------------------------------------- labels
    def batch_labels(self, y: Tensor | None) -> Tensor | None:
        """The labels the network takes from a batch: ``y`` when conditional, else None. Not
        range-checked (that would sync with the device every step): ``setup`` compares
        ``num_classes`` with the data module's, and an embedding rejects what is out of range."""
        return y if self.num_classes is not None else None

    def sampling_labels(self, y: Tensor | int | Sequence[int] | None, num_samples: int) -> Tensor | None:
        """Labels for drawing ``num_samples`` examples, (num_samples,) int64 on the model's device.

        The one rule of every family: an unconditional model takes none; a conditional one takes
        one label for all, ``num_samples`` labels, or (``y=None``) every class in turn:
        0, 1, ..., K-1, 0, 1, ... (so a grid of K columns shows one class per column).
        """
        if self.num_classes is None:
            if y is not None:
                raise ValueError(f"{type(self).__name__} is unconditional (num_classes=None): "
                                 "sample without y")
            return None
        if y is None:
            return torch.arange(num_samples, device=self.device) % self.num_classes
        labels = torch.as_tensor(y, device=self.device)
        if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
            raise TypeError(f"labels y must be integers, got dtype {labels.dtype}")
        labels = labels.long().expand(num_samples) if labels.dim() == 0 else labels.long()
        if labels.shape != (num_samples,):
            raise ValueError(f"y must be one label or {num_samples} labels, got shape {tuple(labels.shape)}")
        if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):  # user input
            raise ValueError(f"labels must lie in 0..{self.num_classes - 1}, got "
                             f"{labels.min().item()}..{labels.max().item()}")
        return labels

    # --------------------------------------------------------------------------------- training
    def loss(self, batch: Any, batch_idx: int, stage: str) -> tuple[Tensor | None, dict[str, Tensor]]:
        """The loss of one batch at ``stage`` ("train", "val" or "test") and the other metrics to
        log, by name without the stage (``"nll"``: per-example nats, also logged as bits/dim).
        Every family implements it; a loss of None logs nothing under ``{stage}/loss``."""
        raise NotImplementedError(f"{type(self).__name__} does not implement loss()")

    def _step(self, batch: Any, batch_idx: int, stage: str) -> Tensor | None:
        loss, metrics = self.loss(batch, batch_idx, stage)
        batch_size = len(batch[0]) if isinstance(batch, (tuple, list)) else len(batch)
        if loss is not None:
            self.log_loss(stage, loss, batch_size)
        for name, value in metrics.items():
            if name == "nll":
                self.log_likelihood_metrics(stage, value, batch_size=batch_size)
            else:
                self.log_metric(stage, name, value, batch_size=batch_size)
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss = self._step(batch, batch_idx, "train")
        self.watch_loss(loss)
        self.log_step_metrics()
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor | None:
        with self.evaluation_rng(batch_idx):
            return self._step(batch, batch_idx, "val")

    def test_step(self, batch: Any, batch_idx: int) -> Tensor | None:
        with self.evaluation_rng(batch_idx):
            return self._step(batch, batch_idx, "test")

    def evaluation_rng(self, batch_idx: int) -> AbstractContextManager[None]:
        """The random state of an evaluation batch's draws (noise, time steps, latents,
        dequantization): seeded by the batch and the rank alone, leaving the global state as it was.

        Why: validation inside a fit then takes nothing from the training draws, so a fit draws
        the same whether and when it validates, and a fit stopped by SIGTERM inside a validation
        resumes exactly (callbacks/termination.py). And every evaluation of a run, and of any
        other run or checkpoint on the same data, uses the same draws (common random numbers), so
        differences in val/ and test/ metrics come from the weights, not from the noise."""
        trainer = self._trainer  # None when a step is called outside a Trainer
        world_size, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        return self.seeded_rng(EVALUATION_SEED, batch_idx * world_size + rank)

    # ---------------------------------------------------------------------- the weight average
    def averaged_network(self) -> tuple[nn.Module, ExponentialMovingAverage | None] | None:
        """(the trained network that is sampled, its moving average or None) for families that
        can keep an average (Diffusion's and flow matching's networks, the GAN's generator,
        PixelCNN's and the pixel transformer's networks); None for the others."""
        return None

    def update_average(self) -> None:
        """Move the average towards the trained weights (after each optimizer step)."""
        pair = self.averaged_network()
        if pair is not None and pair[1] is not None:
            pair[1].update(pair[0])

    def sampling_network(self, use_ema: bool | None = None) -> nn.Module:
        """The averaged network when there is one (default), or the trained one (``use_ema=False``)."""
        pair = self.averaged_network()
        if pair is None:
            raise ValueError(f"{type(self).__name__} keeps no weight average")
        return select_network(pair[0], pair[1], use_ema)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        # The average follows every optimizer step (not every batch, which differs when gradients
        # accumulate). Families with manual optimization call update_average themselves.
        super().optimizer_step(*args, **kwargs)
        self.update_average()

    # --------------------------------------------------------------------------------- sampling
    def sample(self, num_samples: int, **options: Any) -> Tensor:
        """Draw ``num_samples`` examples in data space: (num_samples, *data_shape)."""
        raise NotImplementedError(f"{type(self).__name__} does not implement sample()")

    def predict_options(self) -> dict[str, Any]:
        """Keyword arguments of ``sample`` that ``predict`` uses (the family's ``predict_*``)."""
        return {}

    def predict_samples(self, x: Tensor, y: Tensor | None) -> Tensor:
        """The samples of one predict batch: ``len(x)`` draws with ``predict_options``;
        class-conditional models draw the batch's labels ``y``."""
        labels = self.batch_labels(y)
        return self.sample(len(x), **self.predict_options(), **({"y": labels} if labels is not None else {}))

    def on_predict_start(self) -> None:
        # The run's seed (seed_everything's, the same on every rank), read before any batch
        # reseeds the generator.
        self._predict_seed = torch.initial_seed()

    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y, index = unpack_predict_batch(batch)
        if len(x) == 0:  # a rank left without examples (see datamodules.PredictBatches)
            return torch.empty(0, *self.data_shape, device=self.device)
        if index is None:
            return self.predict_samples(x, y)
        with self.seeded_rng(self._predict_seed, int(index[0])):
            return self.predict_samples(x, y)

    @contextmanager
    def seeded_rng(self, seed: int, offset: int) -> Iterator[None]:
        """Draw under a seed made of ``seed`` and ``offset``, leaving the global RNG as it was."""
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed((seed * 1_000_003 + offset) % (2**63 - 1))
            yield

    def setup(self, stage: str) -> None:
        # A conditional model must know every label of its data: a label >= num_classes would be
        # an index error deep in an embedding, or silently the null label of classifier-free
        # guidance. Checked here, before any step, against the data module's class count.
        data_classes = getattr(getattr(self.trainer, "datamodule", None), "num_classes", None)
        if self.num_classes is not None and data_classes is not None and data_classes > self.num_classes:
            raise ValueError(
                f"the data has {data_classes} classes (labels 0..{data_classes - 1}) but "
                f"{type(self).__name__} was built with num_classes={self.num_classes}: set "
                f"--model.init_args.num_classes {data_classes}"
            )

    # ------------------------------------------------------------------------------ divergence
    def watch_loss(self, loss: Tensor) -> None:
        """Remember a training loss and its step, to check it is finite at the next check (the
        logging interval, the end of the epoch, before a checkpoint): nothing is computed per
        step, and there is no host sync."""
        value = loss.detach()
        if value.numel() != 1:  # NaN and inf survive the maximum of the absolute values
            value = value.float().abs().amax() if value.numel() else value.new_zeros((), dtype=torch.float)
        self._watched_losses.append((value, self.global_step))
        if len(self._watched_losses) >= PENDING_VALUES:
            self.check_finite_training()  # one host sync in PENDING_VALUES steps, at most

    def _reduce_watched_losses(self) -> None:
        """Fold the watched losses into ``_first_nonfinite_step`` (on the device)."""
        if not self._watched_losses:
            return
        watched = list(self._watched_losses)
        self._watched_losses.clear()
        values = torch.stack([value.reshape(()).float() for value, _ in watched])
        finite = torch.isfinite(values)
        steps = torch.tensor([step for _, step in watched], dtype=torch.long, device=values.device)
        first_bad = torch.where(finite, torch.iinfo(torch.long).max, steps).min()
        first = self._first_nonfinite_step
        if first is None or first.device != values.device:
            first = torch.full((), -1, dtype=torch.long, device=values.device)
        self._first_nonfinite_step = torch.where((first < 0) & ~finite.all(), first_bad, first)

    def check_finite_training(self) -> None:
        """Raise DivergenceError when a training loss was not finite (one host sync)."""
        self._reduce_watched_losses()
        if self._first_nonfinite_step is None:
            return
        step = int(self._first_nonfinite_step)
        if step < 0:
            return
        raise DivergenceError(
            f"training diverged: the loss of {type(self).__name__} became NaN or infinite at step "
            f"{step} (learning rate {self.learning_rate:g}). Lower the learning rate, add gradient "
            "clipping (--trainer.gradient_clip_val 1.0) or train in 32-true precision; if the data "
            "can hold NaN or inf, clean it. No checkpoint was saved after that step."
        )

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # Which training values this batch logs (see log_metric): all of them when Lightning
        # writes to the loggers after it, the progress bar's when it is due for an update.
        logging = self._logging
        now = time.monotonic()
        logging.write = logging.every_step or logger_writes_this_step(self._trainer)
        logging.progress_bar = logging.write or (logging.bar_reads_logged_values and
                                                 now - logging.progress_bar_time >= PROGRESS_BAR_INTERVAL_S)
        if logging.progress_bar:
            logging.progress_bar_time = now
        forget_earlier_step_values(self._trainer, self._training_metrics.latest)
        logging.in_batch = True
        logging.logged_names.clear()

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        logging = self._logging
        in_batch, logging.in_batch = logging.in_batch, False
        # A stop decided after the training step (a Timer's max_time, in a callback's
        # on_train_batch_end) makes Lightning write this step too: give it this step's values
        # (from here on, as this hook's entries now take precedence).
        if in_batch and self.trainer.should_stop and (not logging.write or logging.late) \
                and logger_writes_this_step(self.trainer):
            logging.late = True
            for name, (value, batch_size, prog_bar) in self._training_metrics.latest.items():
                self.log(f"train/{name}", value, on_step=True, on_epoch=False, prog_bar=prog_bar,
                         batch_size=batch_size)
        # At the logging interval, where logging reads values from the device anyway.
        interval = max(int(getattr(self.trainer, "log_every_n_steps", 50) or 50), 1)
        if self.global_step % interval == 0:
            self.check_finite_training()

    def on_train_epoch_start(self) -> None:
        self._training_metrics.reset()
        self._logging.late = False

    def on_train_epoch_end(self) -> None:
        self.check_finite_training()
        self.log_training_epoch_metrics()

    def on_train_end(self) -> None:
        self.check_finite_training()

    # ----------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Never write weights of a diverged run (a good last.ckpt stays as it was).
        self.check_finite_training()
        finite = [parameter.detach().isfinite().all() for parameter in self.parameters()]
        if finite and not bool(torch.stack(finite).all()):
            raise DivergenceError(
                f"{type(self).__name__} has NaN or infinite weights; the checkpoint was not saved. "
                "Lower the learning rate or add gradient clipping (--trainer.gradient_clip_val 1.0)."
            )
        checkpoint[CLASS_KEY] = class_path(type(self))
        # The random state, so that a resumed fit draws what the uninterrupted one would have
        # (restored when training starts, after anything that runs before it has drawn).
        states = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            states["cuda"] = torch.cuda.get_rng_state_all()
        checkpoint[RNG_KEY] = states

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get(CLASS_KEY)
        if saved is not None and saved != class_path(type(self)):
            raise CheckpointMismatchError(
                f"the checkpoint holds a {saved} model, not a {class_path(type(self))}: load it "
                f"with the class it was trained as"
            )
        self._rng_states_to_restore = checkpoint.get(RNG_KEY)

    def on_train_start(self) -> None:
        self._training_metrics.reset()
        self._logging = StepLogging()
        # A callback that monitors a training step value (a ModelCheckpoint with monitor
        # "train/loss" and every_n_train_steps) reads it after any step: log every step then.
        self._logging.every_step = any(
            isinstance(getattr(callback, "monitor", None), str) and callback.monitor.startswith("train/")
            and not callback.monitor.endswith("_epoch") for callback in self.trainer.callbacks)
        # Without a bar, or with one that reads the values from this module (TimedProgressBar,
        # the CLI's), no self.log is needed between logging steps: one costs more than all of
        # Lightning's other per-step work (benchmarks/results/throughput.md, "What one self.log
        # costs").
        bar = self.trainer.progress_bar_callback
        self._logging.bar_reads_logged_values = bar is not None and not getattr(bar, "reads_training_values", False)
        states, self._rng_states_to_restore = self._rng_states_to_restore, None
        if states is not None and self.trainer.ckpt_path is not None:  # resuming a fit
            torch.set_rng_state(states["torch"])
            if "cuda" in states and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(states["cuda"])

    # ---------------------------------------------------------------------------------- logging
    def log_metric(self, stage: str, name: str, value: Tensor, batch_size: int | None = None,
                   prog_bar: bool = False) -> None:
        """Log ``{stage}/{name}`` under that exact name.

        Training: the step value as ``train/{name}`` and the epoch mean as ``train/{name}_epoch``
        (Lightning's own ``on_step=True, on_epoch=True`` would rename the step value
        ``train/{name}_step``, so no logger would see the contract's ``train/{name}``). One
        ``self.log`` costs about as much as all of Lightning's own work in a bare training step
        (benchmarks/results/throughput.md, "Fixed cost per step"), so a step logs only what is
        read:

        - the step values on the steps after which Lightning writes to the loggers (every
          ``log_every_n_steps``, at a stop, every step under ``fast_dev_run``), with the last
          value of a metric the step did not compute (``log_step_metrics``): the loggers get the
          values they got when every step logged; ``trainer.callback_metrics`` holds the values
          of the last such step, and, after the epoch, of the last step (given to
          ``callback_metrics`` only, not to the loggers);
        - the progress bar's values (``prog_bar``: the loss) also whenever the bar is due for an
          update (``PROGRESS_BAR_INTERVAL_S``), when the Trainer has a progress bar that shows
          ``trainer.progress_bar_metrics`` (not when it has none, nor when the bar reads them from
          the module at each redraw, ``progress_bar_values``, as ``TimedProgressBar``, the CLI's
          bar, does);
        - every step value on every step when a callback monitors one (``monitor`` naming a
          ``train/`` value that is not an ``_epoch`` mean), so it never reads a stale one;
        - the epoch mean (weighted by ``batch_size``) is summed on the device, without a host
          sync, and logged once, at the end of the epoch (``on_train_epoch_end``).

        Validation and test: the epoch mean, synced over the ranks.
        """
        key = f"{stage}/{name}"
        if stage != "train" or self._trainer is None:
            if stage == "train":  # outside a fit: a no-op that warns, as self.log is
                self.log(key, value, on_step=True, on_epoch=False, prog_bar=prog_bar, batch_size=batch_size)
            else:
                self.log(key, value, on_epoch=True, prog_bar=prog_bar, sync_dist=True,
                         batch_size=batch_size)
            return
        if not isinstance(value, Tensor):
            value = torch.tensor(float(value))
        self._training_metrics.add(name, value, batch_size, prog_bar)
        if self._logs_step_value(prog_bar):
            self._logging.logged_names.add(name)
            self.log(key, value, on_step=True, on_epoch=False, prog_bar=prog_bar, batch_size=batch_size)

    def _logs_step_value(self, prog_bar: bool) -> bool:
        """Whether this training batch logs a step value (see log_metric); True outside the
        batch hooks (every value is then logged as it comes)."""
        logging = self._logging
        return not logging.in_batch or logging.write or (prog_bar and logging.progress_bar)

    def progress_bar_values(self) -> dict[str, float]:
        """The latest training values logged with ``prog_bar`` (the loss), by logged name, as
        Python numbers: what a progress bar shows. A bar that reads them here at each redraw, and
        says so with a true ``reads_training_values`` attribute, spares the module a ``self.log``
        per redraw between logging steps (``TimedProgressBar``)."""
        return {f"train/{name}": value.item() for name, (value, _, prog_bar)
                in self._training_metrics.latest.items() if prog_bar and value.numel() == 1}

    def log_step_metrics(self) -> None:
        """At the end of a training step that logs (see log_metric), log the last value of each
        training metric the step did not log itself (the GAN's generator loss in a batch without
        a generator step), as Lightning, which keeps a logged value until it is logged again,
        wrote them. The base class's ``training_step`` calls it; a ``training_step`` of a family's
        own calls it last."""
        logged = self._logging.logged_names
        if not self._logging.in_batch:
            return
        for name, (value, batch_size, prog_bar) in self._training_metrics.latest.items():
            if name not in logged and self._logs_step_value(prog_bar):
                logged.add(name)
                self.log(f"train/{name}", value, on_step=True, on_epoch=False, prog_bar=prog_bar,
                         batch_size=batch_size)

    def log_training_epoch_metrics(self) -> None:
        """Log the epoch means of the training metrics as ``train/{name}_epoch``, and give
        ``trainer.callback_metrics`` (not the loggers) the last step's values; called at the end
        of each training epoch."""
        metrics = self._training_metrics
        for name, mean in metrics.epoch_means().items():
            self.log(f"train/{name}_epoch", mean, on_step=False, on_epoch=True, batch_size=1)
        for name, (value, batch_size, _) in metrics.latest.items():
            self.log(f"train/{name}", value, on_step=False, on_epoch=True, logger=False,
                     batch_size=batch_size)
        metrics.reset()

    def log_likelihood_metrics(self, stage: str, nll: Tensor, batch_size: int | None = None) -> None:
        """Log the mean negative log-likelihood (nats per example) and bits/dim of a batch
        (``batch_size`` weights the training epoch means; by default the length of ``nll``)."""
        if stage == "train" and batch_size is None:
            batch_size = len(nll) if nll.dim() else None
        nll = nll.mean()
        if stage != "train":
            batch_size = None  # Lightning takes it from the batch, as it always has
        self.log_metric(stage, "nll", nll, batch_size=batch_size)
        self.log_metric(stage, "bpd", bits_per_dim(nll, self.num_dims), batch_size=batch_size)

    def log_loss(self, stage: str, loss: Tensor, batch_size: int) -> None:
        """``{stage}/loss`` (see ``log_metric``), shown in the progress bar when training and
        validating."""
        self.log_metric(stage, "loss", loss, batch_size=batch_size, prog_bar=stage != "test")

    # -------------------------------------------------------------------------------- optimizer
    def optimizer_parameters(self) -> Any:
        """What the optimizer trains: every parameter that requires a gradient (not EMA copies)."""
        return [parameter for parameter in self.parameters() if parameter.requires_grad]

    def configure_optimizers(self) -> Any:
        optimizer = adamw(self.optimizer_parameters(), trainer=self._trainer, lr=self.learning_rate,
                          weight_decay=self.weight_decay)
        if self.lr_schedule == "constant" and self.warmup_steps == 0:
            return optimizer
        schedule = learning_rate_factor(self.lr_schedule, self.warmup_steps,
                                        *schedule_horizon(self.trainer, self.lr_schedule,
                                                          self.trainer.estimated_stepping_batches))
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


def clips_unscaled_gradients(trainer: L.Trainer | None) -> bool:
    """Whether the Trainer clips gradients under a mixed-precision plugin: Lightning then refuses
    an optimizer that unscales gradients inside its step (fused AdamW), even in bf16 where there
    is no scale, so such runs need the unfused optimizer."""
    if trainer is None:
        return False
    return bool(trainer.gradient_clip_val) and isinstance(trainer.precision_plugin, MixedPrecision)


def adamw(parameters, trainer: L.Trainer | None = None, **options: Any) -> torch.optim.AdamW:
    """``torch.optim.AdamW``, fused where ``use_fused_adamw`` says so and the Trainer allows it
    (every family's optimizer)."""
    parameters = list(parameters)
    fused = use_fused_adamw(parameters) and not clips_unscaled_gradients(trainer)
    return torch.optim.AdamW(parameters, fused=fused or None, **options)


def unpack_predict_batch(batch: Any) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """``(x, y)`` or ``(x, y, index)`` -> (x, y, index); a bare tensor is ``x``."""
    if isinstance(batch, Tensor):
        return batch, None, None
    if len(batch) == 2:
        return batch[0], batch[1], None
    if len(batch) == 3:
        return batch[0], batch[1], batch[2]
    raise ValueError(f"a predict batch is x, (x, y) or (x, y, index), got {len(batch)} items")


def learning_rate_factor(schedule: str, warmup_steps: int, total_steps: int,
                         time_spent: Callable[[], float] | None = None):
    """The multiplier of the base learning rate at each step: linear warm-up, then the schedule.

    With ``time_spent`` (a fit bounded by time only) the cosine follows its fraction of the time
    budget spent, warm-up included, instead of the steps.
    """

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        if time_spent is not None:
            progress = time_spent()
        else:
            progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def schedule_horizon(trainer: L.Trainer, schedule: str,
                     total_steps: float) -> tuple[int, Callable[[], float] | None]:
    """What a schedule spans: (optimizer steps of the fit, None), or for a fit with no step bound
    (``total_steps`` inf) that max_time bounds, (1, the fraction of max_time spent). A cosine
    needs one of the two; warm-up alone does not."""
    if not math.isinf(total_steps):
        return max(int(total_steps), 1), None
    time_spent = fraction_of_max_time(trainer)
    if schedule == "cosine" and time_spent is None:
        raise ValueError("lr_schedule='cosine' needs a finite fit: set trainer max_steps, "
                         "max_epochs or max_time, or use lr_schedule='constant'")
    return 1, time_spent


def fraction_of_max_time(trainer: L.Trainer) -> Callable[[], float] | None:
    """For a fit with trainer ``max_time``: a function giving the fraction of that time spent so
    far (Lightning's ``Timer``, which stops the fit, counts it: validation included, and resumed
    across a checkpoint); None without max_time."""
    timer = next((callback for callback in trainer.callbacks if isinstance(callback, Timer)), None)
    if timer is None or timer.time_remaining() is None:
        return None

    def fraction() -> float:
        elapsed = timer.time_elapsed()
        return elapsed / max(elapsed + timer.time_remaining(), 1e-9)

    return fraction
