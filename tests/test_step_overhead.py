"""The fixed cost of a training step (benchmarks/step_overhead.py) and what was cut from it.

A training step logs only what is read (``GenerativeModule.log_metric``): step values when
Lightning writes to the loggers, the progress bar's values when it is due, epoch means summed on
the device and logged once; the loss is checked for NaN at the logging interval from values kept
on the device; the weight average is one fused update over cached tensor lists; the callbacks of
``cli.py`` are not called at each step. Each test here fails if one of these changed what a user
sees: the logger's rows, the epoch means, ``callback_metrics``, the progress bar, divergence
errors, the average's values.
"""

from __future__ import annotations

import copy
import csv
import json
import statistics
import subprocess
import sys

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.profilers import SimpleProfiler
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_gen.base as base
from cli_helpers import CONFIGS, QUICK, REPO, run_cli
from lightning_gen import GAN, VAE, Diffusion, RealNVP
from lightning_gen.base import DivergenceError
from lightning_gen.callbacks import (
    CheckpointOnTerminate, ImageQualityMetrics, LastCheckpointAtFitEnd, PredictionWriter, SampleDistanceMetrics,
    SampleLogger,
)
from lightning_gen.callbacks.hooks import TRAINING_STEP_HOOKS, NullProfiler, StepFreeCallback
from lightning_gen.nn import ExponentialMovingAverage

BATCHES = 7
BATCH_SIZE = 8


def toy_loader(batches: int = BATCHES, nan_batch: int | None = None) -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batches * BATCH_SIZE, 2, generator=generator)
    if nan_batch is not None:
        x[nan_batch * BATCH_SIZE + 3] = float("nan")
    return DataLoader(TensorDataset(x, torch.zeros(len(x), dtype=torch.long)), batch_size=BATCH_SIZE)


MODELS = {
    "vae": lambda: VAE((2,), network="mlp", latent_dim=2, hidden_dims=(8,)),
    "realnvp": lambda: RealNVP((2,), num_layers=2, hidden_dims=(8,)),  # train/nll and train/bpd
    # two critic steps per generator step: half the batches have no train/loss of their own
    "gan": lambda: GAN((2,), latent_dim=2, generator_hidden_dims=(8,), discriminator_hidden_dims=(8,),
                       n_critic=2),
}


def fit(name, tmp_path, log_every_n_steps, callbacks=(), logger=True, **trainer_options):
    """One epoch of ``BATCHES`` batches, with a CSVLogger writing ``tmp_path/metrics.csv``."""
    torch.manual_seed(0)
    model = MODELS[name]()
    settings = dict(accelerator="cpu", devices=1, max_epochs=1, log_every_n_steps=log_every_n_steps,
                    logger=CSVLogger(str(tmp_path), name="", version="") if logger else False,
                    enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                    default_root_dir=str(tmp_path), callbacks=list(callbacks))
    settings.update(trainer_options)
    trainer = L.Trainer(**settings)
    trainer.fit(model, toy_loader())
    return model, trainer


def csv_rows(tmp_path) -> list[dict]:
    with open(tmp_path / "metrics.csv") as stream:
        return [{key: float(value) for key, value in row.items() if value != ""} for row in csv.DictReader(stream)]


def step_rows(rows) -> dict[int, dict]:
    """The rows of step values (no ``_epoch`` mean in them), by step."""
    return {int(row["step"]): row for row in rows if not any(key.endswith("_epoch") for key in row)}


def epoch_rows(rows) -> list[dict]:
    return [row for row in rows if any(key.endswith("_epoch") for key in row)]


# ------------------------------------------------------------------------------- the benchmark
def test_step_overhead_script_measures_every_family(tmp_path, mnist_root):
    output = tmp_path / "rows.json"
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "step_overhead.py"), "--size", "tiny", "--batch-size", "2",
         "--steps", "3", "--warmup-steps", "2", "--repeats", "1", "--threads", "1", "--json", str(output)],
        capture_output=True, text=True, timeout=600, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(output.read_text())["rows"]
    names = [row["family"] for row in rows]
    assert names == ["bare", "bare+log", "bare+callbacks", "bare+manual", "bare+ballast", "autoencoder", "vae", "gan",
                     "pixelcnn", "pixeltransformer", "realnvp", "diffusion", "flow_matching"]
    for row in rows:
        assert row["plain_us"] > 0 and row["trainer_us"] > 0 and row["parameters"] > 0, row
    table = result.stdout[result.stdout.index("| family |"):]
    assert all(f"| {name} |" in table for name in names)
    assert "project additions µs" in table


def test_paired_mode_reads_the_overhead_within_each_fit(tmp_path, mnist_root):
    """--paired --attribution: every row, the Lightning-alone column for the families, the second
    table with a speed ratio per third of the steps; the additions over the bare row and the own
    work read round by round, their medians in the table."""
    output = tmp_path / "rows.json"
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "step_overhead.py"), "--paired", "--attribution", "--size", "tiny",
         "--batch-size", "2", "--steps", "6", "--warmup-steps", "2", "--repeats", "3", "--threads", "1",
         "--families", "autoencoder", "gan", "--json", str(output)],
        capture_output=True, text=True, timeout=600, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(output.read_text())["rows"]
    assert [row["family"] for row in rows] == ["bare", "bare+log", "bare+callbacks", "bare+manual", "bare+ballast",
                                               "autoencoder", "gan"]
    for row in rows:
        assert row["plain_us"] > 0 and row["trainer_us"] > 0, row
        assert row["overhead_us"] == pytest.approx(row["trainer_us"] - row["plain_us"])
        assert len(row["third_ratios"]) == 3 and all(ratio > 0 for ratio in row["third_ratios"])
        assert ("alone_overhead_us" in row) == (row["family"] in ("autoencoder", "gan"))
        assert len(row["overhead_runs_us"]) == 3
    bare = rows[0]["overhead_runs_us"]
    for row in rows[1:]:
        per_round = [own - base for own, base in zip(row["overhead_runs_us"], bare)]
        assert row["additions_runs_us"] == pytest.approx(per_round)
        assert row["additions_us"] == pytest.approx(statistics.median(row["additions_runs_us"]))
        if "alone_overhead_us" in row:
            assert row["own_work_runs_us"] == pytest.approx(
                [own - alone for own, alone in zip(row["overhead_runs_us"], row["alone_overhead_runs_us"])])
            assert row["own_work_us"] == pytest.approx(statistics.median(row["own_work_runs_us"]))
    gan_line = next(line for line in result.stdout.splitlines() if line.startswith("| gan | "))
    gan = rows[-1]
    assert f"| {gan['additions_us']:.0f} | " in gan_line and f"| {gan['own_work_us']:.0f} |" in gan_line
    assert "Lightning alone, this network" in result.stdout and "in each third of the steps" in result.stdout


def test_count_calls_mode_counts_each_row_with_the_progress_bar_clocks_stopped(tmp_path, mnist_root):
    output = tmp_path / "calls.json"
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "step_overhead.py"), "--count-calls", "--size", "tiny",
         "--batch-size", "2", "--steps", "4", "--warmup-steps", "2", "--threads", "1", "--families", "vae",
         "--json", str(output)],
        capture_output=True, text=True, timeout=600, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {row["family"]: row for row in json.loads(output.read_text())["rows"]}
    assert sorted(rows) == ["bare", "bare+ballast", "bare+callbacks", "bare+log", "bare+manual", "vae"]
    assert all(row["trainer_calls"] > row["plain_calls"] > 0 for row in rows.values())
    # the ballast runs on both sides: Lightning's calls per step beyond the plain loop are the bare
    # module's, and the ballast is real work (many more calls on each side)
    overhead = {name: row["trainer_calls"] - row["plain_calls"] for name, row in rows.items()}
    assert overhead["bare+ballast"] == pytest.approx(overhead["bare"], abs=5)
    assert rows["bare+ballast"]["plain_calls"] > 5 * rows["bare"]["plain_calls"]
    assert "stripped_calls" in rows["vae"]
    assert "clocks stopped" in result.stdout

    sys.path.insert(0, str(REPO / "benchmarks"))
    import step_overhead

    import lightning_gen.callbacks.progress as progress

    clocks = (base.time, progress.time)
    with step_overhead.frozen_project_clocks():
        assert base.time.monotonic() == base.time.monotonic() == progress.time.monotonic()
    assert (base.time, progress.time) == clocks


def test_paired_steps_time_the_plain_step_and_the_trainer_between_them():
    """PairedPlainSteps: one plain step after each Trainer batch, timed apart from the Trainer's
    work; the two clocks together cover the timed part of the fit and nothing twice."""
    import time

    sys.path.insert(0, str(REPO / "benchmarks"))
    import step_overhead

    sleep_s, steps, warmup = 0.1, 6, 2
    done = []
    pairing = step_overhead.PairedPlainSteps(lambda batch: done.append(batch) or time.sleep(sleep_s),
                                             iter(range(100)), warmup)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=1, limit_train_batches=warmup + steps,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[pairing])
    started = time.perf_counter()
    trainer.fit(step_overhead.BareModule(), DataLoader(TensorDataset(torch.randn(40, 1, 28, 28),
                                                                     torch.zeros(40, dtype=torch.long)),
                                                       batch_size=4))
    elapsed = time.perf_counter() - started
    assert done == list(range(warmup + steps))  # one plain step per batch, on its own batches
    assert len(pairing.plain_times) == len(pairing.trainer_times) == steps
    assert all(t >= sleep_s for t in pairing.plain_times)
    # a bare step (about 1 ms): the plain step's sleep is in none of them (the median allows for
    # one step slowed by a garbage collection or the machine's load)
    assert all(t > 0 for t in pairing.trainer_times) and statistics.median(pairing.trainer_times) < sleep_s / 2
    assert sum(pairing.plain_times) + sum(pairing.trainer_times) < elapsed


# -------------------------------------------------------------------------------------- logging
@pytest.mark.parametrize("name", sorted(MODELS))
def test_logger_rows_at_an_interval_are_those_of_logging_every_step(name, tmp_path):
    """Logging step values only on the steps Lightning writes changes no value it writes: the
    rows of log_every_n_steps=3 are the log_every_n_steps=1 rows of the same steps, with the
    same names; the epoch means are the same and equal the mean of every step's value."""
    fit(name, tmp_path / "every", 1)
    fit(name, tmp_path / "third", 3)
    every, third = csv_rows(tmp_path / "every"), csv_rows(tmp_path / "third")
    every_steps, third_steps = step_rows(every), step_rows(third)
    assert sorted(third_steps) == [2, 5]  # batches 3 and 6 of 7
    assert len(every_steps) == BATCHES
    for step, row in third_steps.items():
        assert row == every_steps[step], step
    names = {key for row in every_steps.values() for key in row} - {"epoch", "step"}
    assert "train/loss" in names and all(key.startswith("train/") for key in names)
    assert not [key for key in names if key.endswith("_step")]
    (epoch_every,), (epoch_third,) = epoch_rows(every), epoch_rows(third)
    assert epoch_every == epoch_third
    assert {key for key in epoch_every if key.endswith("_epoch")} == {f"{key}_epoch" for key in names}
    for key in names:
        if name == "gan" and key in ("train/loss", "train/g_loss"):
            continue  # logged every other batch: checked below
        values = torch.tensor([every_steps[step][key] for step in sorted(every_steps)])
        torch.testing.assert_close(torch.tensor(epoch_every[f"{key}_epoch"]), values.mean(), msg=key)


def test_gan_epoch_means_count_generator_steps_only(tmp_path):
    """The GAN's generator loss is a mean over the batches with a generator step (n_critic=2:
    batches 2, 4, 6), and a step without one reports the last one's value, as Lightning kept it."""
    model, trainer = fit("gan", tmp_path, 1)
    rows = csv_rows(tmp_path)
    steps = step_rows(rows)
    generator_batches = [1, 3, 5]  # batch indices (the CSV's step counts batches)
    values = [steps[index]["train/g_loss"] for index in generator_batches]
    (epoch,) = epoch_rows(rows)
    torch.testing.assert_close(torch.tensor(epoch["train/g_loss_epoch"]), torch.tensor(values).mean())
    torch.testing.assert_close(torch.tensor(epoch["train/loss_epoch"]), torch.tensor(values).mean())
    assert 0 not in steps or "train/g_loss" not in steps[0]  # none yet in the epoch
    assert steps[2]["train/g_loss"] == steps[1]["train/g_loss"]  # batch 3: no generator step


@pytest.mark.parametrize("name", sorted(MODELS))
def test_callback_metrics_after_a_fit_hold_the_last_step_values(name, tmp_path):
    """A fit shorter than the logging interval still leaves every training value, of the last
    step, in trainer.callback_metrics (as when every step logged), and the epoch means."""
    _, reference = fit(name, tmp_path / "every", 1)
    expected = step_rows(csv_rows(tmp_path / "every"))[BATCHES - 1]
    _, trainer = fit(name, tmp_path / "none", 50, logger=False)
    metrics = trainer.callback_metrics
    for key, value in expected.items():
        if key.startswith("train/"):
            assert float(metrics[key]) == pytest.approx(value, rel=1e-6), key
            assert f"{key}_epoch" in metrics
    assert {key for key in metrics if key.startswith("train/")} == {
        key for key in reference.callback_metrics if key.startswith("train/")}


class RecordProgressBar(Callback):
    """The progress bar's train/loss as a bar would show it at the start of each batch."""

    def __init__(self) -> None:
        self.values: list[float | None] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.values.append(trainer.progress_bar_metrics.get("train/loss"))


def test_progress_bar_shows_each_step_loss_when_it_refreshes(tmp_path, monkeypatch):
    """Under a bar that shows trainer.progress_bar_metrics (Lightning's), the bar's loss is the
    last step's whenever the bar is due for an update (here: always)."""
    monkeypatch.setattr(base, "PROGRESS_BAR_INTERVAL_S", 0.0)
    fit("vae", tmp_path / "every", 1)
    losses = [row["train/loss"] for _, row in sorted(step_rows(csv_rows(tmp_path / "every")).items())]
    recorder = RecordProgressBar()
    fit("vae", tmp_path / "bar", 50, callbacks=[recorder, TQDMProgressBar()], logger=False,
        enable_progress_bar=True)
    assert recorder.values[0] is None
    assert recorder.values[1:] == pytest.approx(losses[:-1], rel=1e-6)


def test_progress_bar_loss_is_throttled_but_present(tmp_path, monkeypatch):
    """With a refresh interval longer than the fit, Lightning's bar shows the first step's loss."""
    monkeypatch.setattr(base, "PROGRESS_BAR_INTERVAL_S", 3600.0)
    fit("vae", tmp_path / "every", 1)
    first = step_rows(csv_rows(tmp_path / "every"))[0]["train/loss"]
    recorder = RecordProgressBar()
    fit("vae", tmp_path / "bar", 50, callbacks=[recorder, TQDMProgressBar()], logger=False,
        enable_progress_bar=True)
    assert recorder.values[1:] == pytest.approx([first] * (BATCHES - 1), rel=1e-6)


class RecordCallbackMetrics(Callback):
    def __init__(self) -> None:
        self.values: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.values.append(float(trainer.callback_metrics["train/loss"]))


class LogAtFirstBatch(Callback):
    """A value logged by someone else than the module, once, as a step value."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == 0:
            pl_module.log("train/first_batch", 7.0, on_step=True, on_epoch=False)


def test_values_logged_by_others_still_reach_every_logging_step(tmp_path):
    """The module forgets only its own earlier step values between batches (it logs them again
    when they are written): a callback's value stays in Lightning's results, as before."""
    fit("vae", tmp_path, 3, callbacks=[LogAtFirstBatch()])
    steps = step_rows(csv_rows(tmp_path))
    assert sorted(steps) == [2, 5]
    assert all(row["train/first_batch"] == 7.0 for row in steps.values())


def test_a_callback_monitoring_a_training_step_value_reads_it_every_step(tmp_path):
    fit("vae", tmp_path / "every", 1)
    losses = [row["train/loss"] for _, row in sorted(step_rows(csv_rows(tmp_path / "every")).items())]
    recorder = RecordCallbackMetrics()
    checkpoint = ModelCheckpoint(dirpath=str(tmp_path / "checkpoints"), monitor="train/loss",
                                 every_n_train_steps=1)
    model, _ = fit("vae", tmp_path / "monitored", 50, callbacks=[recorder, checkpoint], logger=False,
                   enable_checkpointing=True)
    assert model._logging.every_step
    assert recorder.values == pytest.approx(losses, rel=1e-6)
    assert checkpoint.best_model_score == pytest.approx(min(losses), rel=1e-6)


class StopAt(Callback):
    """Stop the fit after a batch, from on_train_batch_end, as the Timer callback (max_time) does."""

    def __init__(self, batch: int) -> None:
        self.batch = batch

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx == self.batch:
            trainer.should_stop = True


@pytest.mark.parametrize("name", ["vae", "gan"])
def test_a_stop_after_a_step_logs_that_steps_values(name, tmp_path):
    fit(name, tmp_path / "every", 1)
    fit(name, tmp_path / "stopped", 50, callbacks=[StopAt(3)])
    every, stopped = step_rows(csv_rows(tmp_path / "every")), step_rows(csv_rows(tmp_path / "stopped"))
    assert sorted(stopped) == [3]
    assert stopped[3] == every[3]


# ----------------------------------------------------------------------------------- divergence
@pytest.mark.parametrize("name", sorted(MODELS))
def test_divergence_names_the_step_of_the_first_nan(name, tmp_path):
    torch.manual_seed(0)
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, log_every_n_steps=50,
                        default_root_dir=str(tmp_path))
    model = MODELS[name]()
    # the GAN takes a discriminator step per batch and a generator step every second one:
    # optimizer steps 0 | 1, 2 | 3 | 4, 5 | 6: batch 4's discriminator step is step 6
    expected = {"gan": 6}.get(name, 4)
    with pytest.raises(DivergenceError, match=f"at step {expected} "):
        trainer.fit(model, toy_loader(nan_batch=4))


def test_watched_losses_are_checked_in_bounded_memory(monkeypatch):
    """A long interval between checks keeps at most PENDING_VALUES losses."""
    monkeypatch.setattr(base, "PENDING_VALUES", 4)
    model = MODELS["vae"]()
    for step in range(10):
        model.watch_loss(torch.tensor(float(step)))
        assert len(model._watched_losses) < 4
    model.watch_loss(torch.tensor(float("inf")))
    with pytest.raises(DivergenceError, match="at step 0 "):  # no Trainer: global_step is 0
        for _ in range(4):
            model.watch_loss(torch.tensor(1.0))


def test_training_metrics_epoch_means_weight_batch_sizes(monkeypatch):
    monkeypatch.setattr(base, "PENDING_VALUES", 3)  # reduces in the middle, too
    metrics = base.TrainingMetrics()
    values = [(1.0, 8), (2.0, 8), (4.0, 3), (8.0, 8), (16.0, 1)]
    for value, batch_size in values:
        metrics.add("loss", torch.tensor(value), batch_size)
    expected = sum(v * b for v, b in values) / sum(b for _, b in values)
    torch.testing.assert_close(metrics.epoch_means()["loss"], torch.tensor(expected))
    assert metrics.latest["loss"][0] == 16.0


# ------------------------------------------------------------------------------------------ EMA
def reference_update(ema: ExponentialMovingAverage, network: nn.Module) -> None:
    """The per-tensor loop the fused update replaced, its decay from the saved count."""
    with torch.no_grad():
        n = int(ema.num_updates)
        weight = 1.0 - min(ema.decay, (1.0 + n) / (10.0 + n))
        for average, value in zip(ema.averaged.parameters(), network.parameters()):
            average.lerp_(value.detach().to(average.dtype), weight)
        for average, value in zip(ema.averaged.buffers(), network.buffers()):
            average.copy_(value)
        ema.num_updates += 1


def test_fused_ema_update_is_the_per_tensor_update_bit_for_bit():
    torch.manual_seed(0)
    network = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    fused, looped = ExponentialMovingAverage(network, 0.9), ExponentialMovingAverage(network, 0.9)
    optimizer = torch.optim.SGD(network.parameters(), lr=0.1)
    for step in range(12):
        network(torch.randn(4, 1, 8, 8)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        fused.update(network)
        reference_update(looped, network)
        if step == 5:  # a reload in place, then another network of the same shape
            state = copy.deepcopy(fused.state_dict())
            fused.load_state_dict(state)
            looped.load_state_dict(state)
        if step == 8:
            network = copy.deepcopy(network)
            optimizer = torch.optim.SGD(network.parameters(), lr=0.1)
    for (name, mine), theirs in zip(fused.state_dict().items(), looped.state_dict().values()):
        assert torch.equal(mine, theirs), name
    assert int(fused.num_updates) == 12


def test_ema_decay_continues_from_a_loaded_count():
    """The decay's count lives on the host too (no device read per update); a loaded state dict
    (a checkpoint's) sets it, so the warm-up resumes where the saved average left it."""
    network = nn.Linear(3, 2)
    trained = ExponentialMovingAverage(network, 0.99)
    for _ in range(7):
        trained.update(network)
    resumed = ExponentialMovingAverage(network, 0.99)
    assert resumed.current_decay() == 1.0 / 10.0
    resumed.load_state_dict(trained.state_dict())
    assert resumed.current_decay() == trained.current_decay() == 8.0 / 17.0
    assert ExponentialMovingAverage(network, 0.3, warmup=False).current_decay() == 0.3


def test_ema_follows_the_network_after_it_moves_and_reloads(monkeypatch):
    torch.manual_seed(0)
    model = Diffusion((2,), num_timesteps=10, ema_decay=0.5)
    model.update_average()  # builds the cached lists
    # A conversion that replaces every Parameter object (torch's opt-in behaviour of .to()).
    monkeypatch.setattr(torch.__future__, "get_overwrite_module_params_on_conversion", lambda: True)
    before = list(model.network.parameters())
    model.float()
    assert not any(a is b for a, b in zip(before, model.network.parameters()))
    model.network.load_state_dict({key: value + 1 for key, value in model.network.state_dict().items()})
    model.update_average()
    network, ema = model.averaged_network()
    reference = ExponentialMovingAverage(network, 0.5)
    reference.load_state_dict(ema.state_dict())
    model.update_average()
    reference_update(reference, network)
    for mine, theirs in zip(ema.state_dict().values(), reference.state_dict().values()):
        assert torch.equal(mine, theirs)


# ------------------------------------------------------------------------------------ callbacks
def test_the_cli_callbacks_are_not_called_at_each_step(tmp_path):
    for callback_class in (SampleLogger, PredictionWriter, ImageQualityMetrics, SampleDistanceMetrics,
                           CheckpointOnTerminate, LastCheckpointAtFitEnd):
        assert issubclass(callback_class, StepFreeCallback)
        for hook in TRAINING_STEP_HOOKS:
            assert getattr(callback_class, hook) is None, (callback_class, hook)

    class CountingLogger(SampleLogger):  # a subclass that works at each step gets its hooks called
        count = 0

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            CountingLogger.count += 1

    assert CountingLogger.on_train_batch_start is None
    fit("vae", tmp_path, 50, callbacks=[CountingLogger(every_n_epochs=0), CheckpointOnTerminate(),
                                        PredictionWriter()], logger=False)
    assert CountingLogger.count == BATCHES


def test_single_process_gan_steps_leave_the_generator_without_a_zero_gradient(tmp_path):
    """The zero-gradient term that keeps DDP's reducer complete is left out of single-process
    steps (tests/test_gan.py runs the two-process fit that needs it)."""
    torch.manual_seed(0)
    model = MODELS["gan"]()
    L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_progress_bar=False,
              enable_model_summary=False, enable_checkpointing=False,
              default_root_dir=str(tmp_path)).fit(model, toy_loader(1))
    model.zero_grad(set_to_none=True)
    loss, _ = model.discriminator_step_loss(torch.randn(4, 2), None)
    loss.backward()
    assert all(parameter.grad is None for parameter in model.generator.parameters())
    assert all(parameter.grad is not None for parameter in model.discriminator.parameters())


@pytest.mark.parametrize("name", sorted(MODELS))
def test_lightnings_hook_name_bookkeeping_skips_nn_modules_setattr(name, tmp_path, monkeypatch):
    """Lightning sets the module's _current_fx_name around every hook call; GenerativeModule
    stores it without nn.Module.__setattr__ (whose checks for parameters, buffers and modules
    cost about 1.4 us a call). The attribute still reads back as Lightning set it, and a module or
    parameter set on the model is still registered."""
    calls = []
    module_setattr = nn.Module.__setattr__

    def counting_setattr(module, attribute, value):
        calls.append(attribute)
        module_setattr(module, attribute, value)

    class Window(Callback):  # counts over the middle batches' hooks only
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if batch_idx == 2:
                monkeypatch.setattr(nn.Module, "__setattr__", counting_setattr)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if batch_idx == BATCHES - 2:
                monkeypatch.setattr(nn.Module, "__setattr__", module_setattr)

    model, trainer = fit(name, tmp_path, 50, callbacks=[Window()], logger=False)
    assert trainer.global_step > 0 and calls == []
    model._current_fx_name = "training_step"
    assert model._current_fx_name == vars(model)["_current_fx_name"] == "training_step"
    model.extra = nn.Linear(1, 1)
    model.scale = nn.Parameter(torch.ones(1))
    assert "extra" in dict(model.named_children()) and "scale" in dict(model.named_parameters())


def test_null_profiler_is_the_clis_default_and_a_named_profiler_is_kept(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = ["--config", str(CONFIGS / "vae_8gaussians.yaml"), *QUICK]
    assert type(run_cli(*config, run=False).trainer.profiler) is NullProfiler
    named = run_cli(*config, "--trainer.profiler", "simple", run=False).trainer.profiler
    assert type(named) is SimpleProfiler
    # NullProfiler records nothing and hands out one reusable context for every action
    profiler = NullProfiler()
    with profiler.profile("a") as first, profiler.profile("b") as second:
        assert first is second is None
    assert profiler.profile("a") is profiler.profile("b")
    assert profiler.summary() == ""



def test_step_timer_waits_for_the_device_only_where_the_plain_loop_does(monkeypatch):
    """StepTimer synchronizes at the end of the warm-up and after the last timed batch, as the
    plain loop does (a wait after every step would stall a GPU's queue on the Trainer side only),
    and refuses to report a time when the fit stopped short of its batches."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import step_overhead
    import throughput

    waits = []
    monkeypatch.setattr(throughput, "synchronize", lambda device: waits.append(device))
    data = DataLoader(TensorDataset(torch.randn(40, 1, 28, 28), torch.zeros(40, dtype=torch.long)), batch_size=4)

    def fit(timer, batches):
        trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=1, limit_train_batches=batches, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            callbacks=[timer])
        trainer.fit(step_overhead.BareModule(), data)

    timer = throughput.StepTimer(warmup_batches=2, batches=7)
    fit(timer, 7)
    assert len(waits) == 2 and timer.timed_batches == 5 and timer.seconds() > 0

    short = throughput.StepTimer(warmup_batches=2, batches=7)
    fit(short, 5)
    with pytest.raises(RuntimeError, match="ran 5 of the 7 batches"):
        short.seconds()
    with pytest.raises(ValueError, match="more batches"):
        throughput.StepTimer(warmup_batches=3, batches=3)
