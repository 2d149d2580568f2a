"""TimedProgressBar: Lightning's TQDM progress bar, redrawn at most every ``refresh_interval`` s.

Lightning's ``TQDMProgressBar`` redraws after every batch (``refresh_rate`` 1), twice in a
training batch (the count, then the metrics), and reads the ``prog_bar`` metrics each time, which
converts each to a Python number: a host sync per metric and step on a GPU, and on the 2-core CPU
about 0.1 ms per step without a metric and 0.3 ms with the loss (benchmarks/results/
throughput.md, "Fixed cost per step"), a third of everything else Lightning does in a bare step.
An eye follows about ten redraws a second, which is also tqdm's own ``mininterval``, so this bar
redraws a training, validation, test or predict bar when ``refresh_interval`` has passed since
its last redraw, once per redraw, and always at a bar's last batch; when a run stops before the
last batch (``max_steps``, ``max_time``, a stop) the bar is brought to the batches done before it
is closed, so the count it leaves is exact.

The training values it shows (the loss) it reads from the module at each redraw
(``GenerativeModule.progress_bar_values``), where Lightning's bar reads what the module logged:
the module then calls ``self.log`` for them only at the steps whose values go to the loggers,
where one ``self.log`` per redraw cost the config-size autoencoder about 0.3 ms per step on the
2-core CPU (benchmarks/results/throughput.md, "What one self.log costs").

``cli.py`` uses it unless the config turns the bar off (``trainer.enable_progress_bar: false``)
or names a progress bar of its own in ``trainer.callbacks``.
"""

from __future__ import annotations

import math
import time
from typing import Any

from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.progress_bar import get_standard_metrics
from lightning.pytorch.trainer.states import TrainerFn

from lightning_gen.base import PROGRESS_BAR_INTERVAL_S


class TimedProgressBar(TQDMProgressBar):
    """``TQDMProgressBar`` that redraws at most every ``refresh_interval`` seconds (and at each
    bar's last batch), reading the metrics once per redraw.

    Args:
        refresh_interval: least seconds between two redraws (default: the interval at which
            the models log the bar's values); 0 redraws after every batch (as Lightning's bar
            does, but once per batch).
        refresh_rate: as ``TQDMProgressBar``: redraw only after every ``refresh_rate``-th batch.
        process_position, leave: as ``TQDMProgressBar``.
    """

    #: GenerativeModule reads this: the bar takes the module's training values itself.
    reads_training_values = True

    def __init__(self, refresh_interval: float = PROGRESS_BAR_INTERVAL_S, refresh_rate: int = 1,
                 process_position: int = 0, leave: bool = False) -> None:
        if not math.isfinite(refresh_interval) or refresh_interval < 0:
            raise ValueError(f"refresh_interval must be a finite number of seconds >= 0, got {refresh_interval}")
        super().__init__(refresh_rate=refresh_rate, process_position=process_position, leave=leave)
        self.refresh_interval = float(refresh_interval)
        self._last_redraw = -math.inf
        self._batches_done: dict[str, int] = {}  # bar -> batches done, shown or not

    def get_metrics(self, trainer, pl_module) -> dict[str, int | str | float | dict[str, float]]:
        """Lightning's bar metrics, with a fit's training values as of the latest step (from
        ``progress_bar_values``, for a module that has it), after the standard ones (``v_num``)."""
        metrics = super().get_metrics(trainer, pl_module)
        values = getattr(pl_module, "progress_bar_values", None)
        if values is None or trainer.state.fn != TrainerFn.FITTING:
            return metrics
        latest = values()
        standard = {key: metrics[key] for key in get_standard_metrics(trainer) if key in metrics}
        return {**standard, **latest, **{key: value for key, value in metrics.items() if key not in latest}}

    def _due(self, bar_name: str, current: int, total: int | float) -> bool:
        """Record ``current`` batches done on ``bar_name`` and say whether to redraw now."""
        self._batches_done[bar_name] = current
        if not self._should_update(current, total):
            return False
        now = time.monotonic()
        if current == total or now - self._last_redraw >= self.refresh_interval:
            self._last_redraw = now
            return True
        return False

    def _advance(self, bar_name: str, bar, done: int) -> None:
        """An evaluation bar after a batch: redraw it at ``done`` batches when due."""
        if bar is not None and self._due(bar_name, done, bar.total) and not bar.disable:
            bar.n = done
            bar.refresh()

    def _catch_up(self, bar_name: str, bar, redraw: bool = True) -> None:
        """Bring ``bar`` to the batches done, where a skipped redraw left it behind."""
        done = self._batches_done.pop(bar_name, None)
        if bar is not None and not bar.disable and done is not None and bar.n != done:
            bar.n = done
            if redraw:
                bar.refresh()

    def on_train_epoch_start(self, trainer, *args: Any) -> None:
        self._batches_done.pop("train", None)
        self._last_redraw = -math.inf  # the new epoch's first batch is shown
        super().on_train_epoch_start(trainer, *args)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        bar = self.train_progress_bar
        if bar is not None and self._due("train", batch_idx + 1, bar.total):
            bar.n = batch_idx + 1
            if not bar.disable:
                bar.set_postfix(self.get_metrics(trainer, pl_module))  # redraws once

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        # The parent then redraws the bar with the epoch's metrics.
        self._catch_up("train", self.train_progress_bar, redraw=False)
        super().on_train_epoch_end(trainer, pl_module)

    def on_train_end(self, *args: Any) -> None:
        # A stop inside an epoch (max_steps, a Timer) ends the fit without on_train_epoch_end.
        self._catch_up("train", self.train_progress_bar)
        super().on_train_end(*args)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int,
                                dataloader_idx: int = 0) -> None:
        self._advance("val", self.val_progress_bar, batch_idx + 1)

    def on_validation_end(self, trainer, pl_module) -> None:
        self._catch_up("val", self.val_progress_bar)
        super().on_validation_end(trainer, pl_module)

    def on_sanity_check_end(self, *args: Any) -> None:
        self._catch_up("val", self.val_progress_bar)
        super().on_sanity_check_end(*args)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int,
                          dataloader_idx: int = 0) -> None:
        self._advance("test", self.test_progress_bar, batch_idx + 1)

    def on_test_end(self, trainer, pl_module) -> None:
        self._catch_up("test", self.test_progress_bar)
        super().on_test_end(trainer, pl_module)

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int,
                             dataloader_idx: int = 0) -> None:
        self._advance("predict", self.predict_progress_bar, batch_idx + 1)

    def on_predict_end(self, trainer, pl_module) -> None:
        self._catch_up("predict", self.predict_progress_bar)
        super().on_predict_end(trainer, pl_module)
