"""TimedProgressBar: redrawn at most every refresh_interval seconds, exact at the end, the
command line's default bar."""

from __future__ import annotations

import csv

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress import tqdm_progress
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, TensorDataset

import lightning_gen.base as base
import lightning_gen.callbacks.progress as progress
from cli_helpers import run_cli
from lightning_gen import VAE
from lightning_gen.callbacks import TimedProgressBar

BATCH_SIZE = 4


class Clock:
    """``time`` for the bar: ``monotonic`` advances by ``step`` seconds at each call."""

    def __init__(self, step: float) -> None:
        self.now, self.step = 0.0, step

    def monotonic(self) -> float:
        self.now += self.step
        return self.now


def loader(batches: int) -> DataLoader:
    x = torch.randn(batches * BATCH_SIZE, 2, generator=torch.Generator().manual_seed(0))
    return DataLoader(TensorDataset(x, torch.zeros(len(x), dtype=torch.long)), batch_size=BATCH_SIZE)


class Redraws:
    """Each redraw of a bar: (its description, the count it shows), in order."""

    def __init__(self, monkeypatch) -> None:
        self.shown: list[tuple[str, int]] = []
        refresh = tqdm_progress.Tqdm.refresh

        def record(bar, *args, **kwargs):
            if not bar.disable:
                self.shown.append((bar.desc, bar.n))
            return refresh(bar, *args, **kwargs)

        monkeypatch.setattr(tqdm_progress.Tqdm, "refresh", record)

    def counts(self, prefix: str) -> list[int]:
        return [n for desc, n in self.shown if desc.startswith(prefix)]


def trainer(bar, **options) -> L.Trainer:
    settings = dict(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
                    enable_model_summary=False, num_sanity_val_steps=0, callbacks=[bar])
    settings.update(options)
    return L.Trainer(**settings)


def model() -> VAE:
    torch.manual_seed(0)
    return VAE((2,), network="mlp", latent_dim=2, hidden_dims=(8,))


def test_a_frozen_clock_redraws_the_first_and_last_batch_of_each_bar(monkeypatch):
    monkeypatch.setattr(progress, "time", Clock(step=0.0))
    redraws = Redraws(monkeypatch)
    fit = trainer(TimedProgressBar(), max_epochs=2, limit_val_batches=5)
    fit.fit(model(), loader(9), loader(5))
    # Batch 1 of each epoch (the clock starts anew), its last batch, and the parent's redraws at
    # the end of validation and of the epoch, which show the same count.
    for epoch in (0, 1):
        assert set(redraws.counts(f"Epoch {epoch}")) == {0, 1, 9}, redraws.shown
    assert set(redraws.counts("Validation DataLoader")) == {0, 5}
    fit.test(fit.lightning_module, loader(6))
    assert set(redraws.counts("Testing")) == {0, 6}


def test_a_clock_past_the_interval_at_every_call_redraws_every_batch_once(monkeypatch):
    monkeypatch.setattr(progress, "time", Clock(step=1.0))
    redraws = Redraws(monkeypatch)
    trainer(TimedProgressBar(), limit_val_batches=0).fit(model(), loader(6))
    counts = redraws.counts("Epoch 0")
    for n in range(1, 7):
        assert n in counts
    # Lightning's bar redraws twice per training batch (the count, then the metrics); this one once.
    assert counts.count(3) == 1


def test_the_bar_shows_the_batches_done_when_a_run_stops_inside_an_epoch(monkeypatch):
    monkeypatch.setattr(progress, "time", Clock(step=0.0))
    bar = TimedProgressBar()
    trainer(bar, max_steps=4, limit_val_batches=0).fit(model(), loader(9))
    assert bar.train_progress_bar.n == 4


def test_predict_bar_ends_at_its_total(monkeypatch):
    monkeypatch.setattr(progress, "time", Clock(step=0.0))
    bar = TimedProgressBar()
    fit = trainer(bar, limit_val_batches=0)
    fit.predict(model(), loader(7))
    assert bar.predict_progress_bar.n == 7


def item_calls(monkeypatch, bar, batches: int) -> int:
    """Tensor.item calls during a fit of ``batches`` batches: on a GPU, each is a host sync."""
    calls = []
    item = torch.Tensor.item
    monkeypatch.setattr(torch.Tensor, "item", lambda tensor: calls.append(1) or item(tensor))
    trainer(bar, limit_val_batches=0).fit(model(), loader(batches))
    monkeypatch.setattr(torch.Tensor, "item", item)
    return len(calls)


@pytest.mark.parametrize("bar", [TimedProgressBar, TQDMProgressBar])
def test_the_progress_bar_loss_costs_no_host_sync_per_batch(bar, monkeypatch):
    """The loss shown in the bar is converted when it is shown (TimedProgressBar) or logged
    (Lightning's bar), not after every later batch (Lightning converts every prog_bar value of
    the epoch after each batch unless the module marks the earlier ones as not logged:
    base.forget_earlier_step_values)."""
    monkeypatch.setattr(progress, "time", Clock(step=0.0))  # the timed bar redraws the first and last batch
    monkeypatch.setattr(base, "PROGRESS_BAR_INTERVAL_S", 3600.0)  # the loss is logged at batch 1 only
    counts = [item_calls(monkeypatch, bar(), batches) for batches in (8, 16)]
    assert counts[0] == counts[1]
    if bar is TQDMProgressBar:  # the test can fail: one conversion per batch without the module's mark
        monkeypatch.setattr(base, "forget_earlier_step_values", lambda trainer, names: None)
        without = [item_calls(monkeypatch, bar(), batches) for batches in (8, 16)]
        assert without[1] - without[0] >= 8


def log_calls(monkeypatch, bar, batches: int) -> int:
    """LightningModule.log calls during a fit of ``batches`` batches (no logging step after the
    first: log_every_n_steps 50) under ``bar`` (None: no progress bar)."""
    calls = []
    log = L.LightningModule.log
    monkeypatch.setattr(L.LightningModule, "log", lambda *args, **kwargs: calls.append(1) or log(*args, **kwargs))
    options = dict(enable_progress_bar=False, callbacks=[]) if bar is None else {}
    trainer(bar, limit_val_batches=0, **options).fit(model(), loader(batches))
    monkeypatch.setattr(L.LightningModule, "log", log)
    return len(calls)


@pytest.mark.parametrize("bar, logs_per_batch", [
    (lambda: TimedProgressBar(refresh_interval=0.0), False), (lambda: None, False), (TQDMProgressBar, True)],
    ids=["TimedProgressBar", "no bar", "TQDMProgressBar"])
def test_the_module_logs_for_the_bar_only_for_a_bar_that_shows_what_it_logs(bar, logs_per_batch, monkeypatch):
    """With the module's bar interval at 0, Lightning's bar, which shows
    trainer.progress_bar_metrics, needs a self.log of the loss per batch; TimedProgressBar, which
    reads the module, and a fit without a bar need none."""
    monkeypatch.setattr(base, "PROGRESS_BAR_INTERVAL_S", 0.0)
    counts = [log_calls(monkeypatch, bar(), batches) for batches in (8, 16)]
    assert counts[1] - counts[0] == (8 if logs_per_batch else 0)


class RecordedMetrics:
    """What the bar's get_metrics returned at each call (each redraw of the training bar)."""

    def __init__(self, bar: TimedProgressBar) -> None:
        self.calls: list[dict] = []
        get_metrics = bar.get_metrics

        def record(trainer, pl_module):
            metrics = get_metrics(trainer, pl_module)
            self.calls.append(dict(metrics))
            return metrics

        bar.get_metrics = record


def test_the_timed_bar_shows_each_step_loss_after_the_version(tmp_path):
    """Redrawn after every batch, the bar shows that batch's loss, as the logger wrote it, after
    the logger's version number, as Lightning's bar orders them."""
    batches = 6
    every = CSVLogger(str(tmp_path / "every"), name="", version="")
    trainer(TimedProgressBar(), limit_val_batches=0, logger=every, log_every_n_steps=1).fit(model(), loader(batches))
    with open(tmp_path / "every" / "metrics.csv") as stream:
        losses = [float(row["train/loss"]) for row in csv.DictReader(stream) if row.get("train/loss")]
    assert len(losses) == batches
    bar = TimedProgressBar(refresh_interval=0.0)
    recorded = RecordedMetrics(bar)
    shown_logger = CSVLogger(str(tmp_path / "shown"), name="", version=3)
    trainer(bar, limit_val_batches=0, logger=shown_logger, log_every_n_steps=50).fit(model(), loader(batches))
    per_batch = recorded.calls[:batches]
    assert [metrics["train/loss"] for metrics in per_batch] == pytest.approx(losses, rel=1e-6)
    assert all(list(metrics)[:2] == ["v_num", "train/loss"] and metrics["v_num"] == 3 for metrics in per_batch)


def test_refresh_interval_must_be_a_duration():
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="refresh_interval"):
            TimedProgressBar(refresh_interval=bad)


CLI = ["--model", "VAE", "--model.network", "mlp", "--data", "ToyDataModule", "--trainer.logger", "false",
       "--trainer.accelerator", "cpu", "--trainer.devices", "1"]


def test_the_command_line_uses_the_timed_bar_by_default():
    assert type(run_cli(*CLI, run=False).trainer.progress_bar_callback) is TimedProgressBar


def test_the_command_line_keeps_a_bar_the_config_names_and_no_bar_when_turned_off():
    cli = run_cli(*CLI, "--trainer.callbacks", "lightning.pytorch.callbacks.TQDMProgressBar",
                  "--trainer.callbacks.refresh_rate", "5", run=False)
    bar = cli.trainer.progress_bar_callback
    assert type(bar) is TQDMProgressBar and bar.refresh_rate == 5
    assert run_cli(*CLI, "--trainer.enable_progress_bar", "false", run=False).trainer.progress_bar_callback is None
    cli = run_cli(*CLI, "--trainer.callbacks", "lightning_gen.callbacks.TimedProgressBar",
                  "--trainer.callbacks.refresh_interval", "0.5", run=False)
    assert [type(c) for c in cli.trainer.callbacks].count(TimedProgressBar) == 1
    assert cli.trainer.progress_bar_callback.refresh_interval == 0.5


def test_a_fit_from_the_command_line_shows_the_bar_to_its_end_with_the_loss(tmp_path, capsys):
    run_cli("fit", *CLI, "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "12",
            "--trainer.limit_val_batches", "2", "--trainer.default_root_dir", str(tmp_path),
            "--trainer.enable_checkpointing", "false")
    output = capsys.readouterr().out
    last = output.rsplit("Epoch 0:", 1)[1]
    assert last.lstrip().startswith("100%") and "12/12" in last and "train/loss=" in last, output[-500:]
