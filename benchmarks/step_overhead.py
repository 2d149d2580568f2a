"""The fixed cost of a training step under the Trainer, per family, beside a bare LightningModule.

Each family's LightningModule is trained under the Trainer that ``cli.py fit`` builds (made by
``lightning_gen.cli.main(..., run=False)``, so it has the CLI's default callbacks and its
config-saving callback, the Trainer's default progress bar, model summary and checkpointing, a
``CSVLogger`` and ``log_every_n_steps 50``; the progress bar writes to a null stream), and a plain
PyTorch loop trains a copy of the same network (``throughput.plain_throughput``: same initial
weights, optimizer, loss and ``DeviceBatches`` data path). The two alternate ``--repeats`` times;
each side's time per step is the median. ``overhead = Trainer - plain`` (microseconds per step).

The same is measured for a bare LightningModule: one ``nn.Linear`` on the same batches, trained
with the project's AdamW and no logging, under the same Trainer. Its overhead is what Lightning
itself costs per step; a family's ``overhead - bare overhead`` is what the project adds (its
logging, hooks, EMA update, the GAN's manual optimization, callbacks). A second bare row,
``bare+log``, logs its loss to the progress bar and logger (one ``self.log``): the least a user
sees. ``bare+ballast`` (``BallastModule``) is the bare module with the tiny diffusion network's
forward and backward added to its loss on both sides: the same Lightning work, call for call, after
a heavier step. The same Python work takes longer then (colder caches), so the families' larger
networks cost Lightning more than one Linear layer does without any work of the project's.

Two uses:

    # the fixed cost: tiny networks and batches, so that compute is negligible (1 thread)
    python benchmarks/step_overhead.py --size tiny --batch-size 2 --steps 200 --threads 1
    # the ratio a user's run sees: config-size networks, batch 64
    python benchmarks/step_overhead.py --size config --batch-size 64 --steps 20 --threads 2

``--attribution`` adds a third timing per family: its network under Lightning alone (the same
module with GenerativeModule's per-step work switched off, ``without_project_steps``, and
without the CLI's callbacks), so that ``Trainer - Lightning alone`` is what the project's own
per-step work costs this network. ``--count-calls`` counts Python calls per step (cProfile)
instead of timing: the same comparison, unchanged by the load of a shared machine (with the clocks
of the work done every tenth of a second, the progress bar's, stopped: ``frozen_project_clocks``).

``--paired`` runs the plain loop inside the Trainer's fit, one plain step after
each Trainer step (``PairedPlainSteps``), and compares their total times: on a shared machine,
whose load changes over seconds, the two sides then see the same load, where alternating whole
runs gave ratios that moved by 10-25% between runs of the same command. Its ``--repeats`` are
rounds of one fit per row, so the bare module's fit and a family's are seconds apart, and a
family's additions over the bare module (and, with ``--attribution``, its own work) are read round
by round, their medians kept: the bare module's overhead alone moved by a third between two runs
of the same command minutes apart.

``--without-ema`` adds rows of diffusion and flow matching built without their weight average
(``ema_decay`` None): with ``--attribution``, what the average's update costs of the project's own
work, read in the same rounds.

``--size tiny`` shrinks ``throughput.py``'s small networks further (``TINY`` below); ``small`` and
``config`` are throughput.py's sizes. ``--json`` writes the rows for a program to read.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import cProfile
import datetime
import json
import logging
import os
import platform
import pstats
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from arguments import apply_threads, count, count_or_zero
from throughput import FAMILIES, StepTimer, build, device_batches, plain_step, plain_throughput

from datamodules import MNISTDataModule
from lightning_gen.base import adamw

# Networks smaller than throughput.py's "small" (init_args laid over them): a step's compute is
# then a small part of its time, and the Trainer's fixed cost stands out.
TINY = {
    "autoencoder": dict(latent_dim=4, hidden_dims=(8,), base_channels=4),
    "vae": dict(latent_dim=4, hidden_dims=(8,), base_channels=4),
    "gan": dict(latent_dim=4, base_channels=4),
    "pixelcnn": dict(hidden_channels=4, num_layers=1, head_channels=4),
    "pixeltransformer": dict(model_dim=8, num_layers=1, num_heads=1),
    "realnvp": dict(num_scales=1, couplings_per_scale=2, hidden_channels=4, num_blocks=1),
    "diffusion": dict(unet=dict(base_channels=4, channel_multipliers=(1, 1, 1), num_res_blocks=1,
                                attention_levels=(), num_heads=1)),
    "flow_matching": dict(unet=dict(base_channels=4, channel_multipliers=(1, 1, 1), num_res_blocks=1,
                                    attention_levels=(), num_heads=1)),
}
# The reference rows: a bare LightningModule, (1) as it is, (2) logging its loss to the progress
# bar and logger, (3) under the CLI's Trainer (with the project's callbacks), (4) with manual
# optimization of two optimizers, as the GAN steps (the Lightning machinery the GAN needs),
# (5) with the tiny diffusion U-Net's forward and backward as ballast on both sides (BallastModule).
BARE = ("bare", "bare+log", "bare+callbacks", "bare+manual", "bare+ballast")


class BareModule(L.LightningModule):
    """What Lightning costs with nothing of this project: one linear layer on the flattened
    images, the project's AdamW; ``log_loss`` logs the loss (progress bar and logger) once."""

    def __init__(self, log_loss: bool = False) -> None:
        super().__init__()
        self.linear = nn.Linear(MNISTDataModule.data_shape[-1] ** 2, 16)
        self.log_loss = log_loss

    def loss(self, batch, batch_idx: int, stage: str):
        x, _ = batch
        return self.linear(x.flatten(1)).square().mean(), {}

    def training_step(self, batch, batch_idx: int):
        loss = self.loss(batch, batch_idx, "train")[0]
        if self.log_loss:
            self.log("train/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return adamw(self.parameters(), lr=1e-3)


class BallastModule(BareModule):
    """The bare module whose loss also runs the tiny diffusion network's training loss forward
    and backward (its gradients dropped, its weights never stepped), in the Trainer and the plain
    loop alike: Lightning's work per step is the bare module's, call for call, next to a step as
    heavy as the tiny diffusion model's. Its overhead is what that same Lightning work costs after
    such a step (colder caches), the reference for the families' larger networks."""

    def __init__(self) -> None:
        super().__init__()
        self.ballast = build("diffusion", "small", TINY["diffusion"])

    def loss(self, batch, batch_idx: int, stage: str):
        self.ballast.loss(batch, batch_idx, stage)[0].backward()
        for parameter in self.ballast.parameters():
            parameter.grad = None
        return super().loss(batch, batch_idx, stage)

    def configure_optimizers(self):
        return adamw(self.linear.parameters(), lr=1e-3)


class BareManualModule(L.LightningModule):
    """Two linear layers, each with its own optimizer, stepped by hand (manual optimization) as
    the GAN steps its discriminator and generator; ``throughput.plain_throughput`` trains it the
    way it trains the GAN."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        features = MNISTDataModule.data_shape[-1] ** 2
        self.discriminator = nn.Linear(features, 16)
        self.generator = nn.Linear(features, 16)

    def batch_labels(self, y):
        return None

    def to_model_space(self, x):
        return x

    def discriminator_step_loss(self, real, y):
        self.real = real  # what the generator step's loss reads (the plain loop's order: D, then G)
        return self.discriminator(real.flatten(1)).square().mean(), {}

    def generator_step_loss(self, num_samples, y):
        return self.generator(self.real[:num_samples].flatten(1)).square().mean()

    def training_step(self, batch, batch_idx: int) -> None:
        x, _ = batch
        optimizer_g, optimizer_d = self.optimizers()
        d_loss, _ = self.discriminator_step_loss(x, None)
        optimizer_d.zero_grad(set_to_none=True)
        self.manual_backward(d_loss)
        optimizer_d.step()
        g_loss = self.generator_step_loss(len(x), None)
        optimizer_g.zero_grad(set_to_none=True)
        self.manual_backward(g_loss)
        optimizer_g.step()

    def configure_optimizers(self):
        return adamw(self.generator.parameters(), lr=1e-3), adamw(self.discriminator.parameters(), lr=1e-3)


# ``--without-ema`` rows: a family that keeps a weight average, built without it (ema_decay None),
# so that the average's share of the project's own work is read in the same rounds.
WITHOUT_EMA = " without EMA"
AVERAGED_FAMILIES = ("diffusion", "flow_matching")


def row_names(families: list[str], no_bare: bool = False, without_ema: bool = False) -> list[str]:
    """The rows a run measures, in order: the bare rows, the families, then the averaged families
    again without their average."""
    names = ([] if no_bare else list(BARE)) + list(families)
    if without_ema:
        names += [family + WITHOUT_EMA for family in families if family in AVERAGED_FAMILIES]
    return names


def build_model(name: str, size: str) -> L.LightningModule:
    if name.endswith(WITHOUT_EMA):
        family = name[:-len(WITHOUT_EMA)]
        return build(family, "small" if size == "tiny" else size,
                     {**(TINY[family] if size == "tiny" else {}), "ema_decay": None})
    if name == "bare+manual":
        return BareManualModule()
    if name == "bare+ballast":
        return BallastModule()
    if name in BARE:
        return BareModule(log_loss=name == "bare+log")
    if size == "tiny":
        return build(name, "small", TINY[name])
    return build(name, size)


def cli_trainer(root: Path, batches: int, log_every_n_steps: int, accelerator: str = "cpu",
                precision: str = "32-true", progress_bar: bool = True) -> L.Trainer:
    """The Trainer ``cli.py fit`` would build (its callbacks, the Trainer's defaults), with a
    CSVLogger under ``root``, one epoch of ``batches`` batches and no validation;
    ``progress_bar=False`` is ``--trainer.enable_progress_bar false``."""
    from lightning_gen.cli import main

    args = ["--model", "Autoencoder", "--model.init_args.reconstruction_loss", "mse",
            "--data", "ToyDataModule", "--seed_everything", "0",
            "--trainer.accelerator", accelerator, "--trainer.devices", "1", "--trainer.precision", precision,
            "--trainer.max_epochs", "1", "--trainer.limit_train_batches", str(batches),
            "--trainer.limit_val_batches", "0", "--trainer.num_sanity_val_steps", "0",
            "--trainer.log_every_n_steps", str(log_every_n_steps),
            "--trainer.default_root_dir", str(root),
            "--trainer.logger", "lightning.pytorch.loggers.CSVLogger",
            "--trainer.logger.save_dir", str(root)]
    if not progress_bar:
        args += ["--trainer.enable_progress_bar", "false"]
    return main(args, run=False).trainer


def lightning_trainer(root: Path, batches: int, log_every_n_steps: int) -> L.Trainer:
    """A Trainer with the same flags as ``cli_trainer`` and only Lightning's own callbacks
    (progress bar, model summary, checkpointing): what a bare Lightning script has."""
    from lightning.pytorch.loggers import CSVLogger

    return L.Trainer(accelerator="cpu", devices=1, max_epochs=1, limit_train_batches=batches,
                     limit_val_batches=0, num_sanity_val_steps=0, log_every_n_steps=log_every_n_steps,
                     default_root_dir=str(root), logger=CSVLogger(str(root)))


def trainer_maker(name: str):
    """The Trainer a row runs under: Lightning's own flags for the bare rows (but
    ``bare+callbacks``), the CLI's for the families."""
    return lightning_trainer if name in BARE and name != "bare+callbacks" else cli_trainer


def trainer_step_seconds(model, images, labels, args, device, make_trainer=cli_trainer) -> float:
    """Seconds per step of ``model`` under ``make_trainer``'s Trainer (default the CLI's), over
    ``args.steps`` steps after ``args.warmup_steps``."""
    timer = StepTimer(args.warmup_steps, args.warmup_steps + args.steps)
    with tempfile.TemporaryDirectory() as root, open(os.devnull, "w") as null, \
            contextlib.redirect_stdout(null), contextlib.redirect_stderr(null):
        trainer = make_trainer(Path(root), args.warmup_steps + args.steps, args.log_every_n_steps)
        trainer.callbacks.insert(0, timer)
        trainer.fit(model, train_dataloaders=device_batches(images, labels, args.batch_size, device))
    return timer.seconds() / timer.timed_batches


def plain_step_seconds(model, images, labels, args, device) -> float:
    options = SimpleNamespace(batch_size=args.batch_size, steps=args.steps, warmup_steps=args.warmup_steps,
                              compile=False, compile_backend="inductor", channels_last=False,
                              precision="32-true")
    return args.batch_size / plain_throughput(model, images, labels, options, device)


class PairedPlainSteps(L.Callback):
    """Interleaves the plain loop with the Trainer, step by step: after each Trainer batch, one
    plain step of a twin network on its own batch. Each Trainer step is timed from the end of the
    plain step before it to this callback's ``on_train_batch_end`` (first in the Trainer's list,
    so the rest of the Trainer's work on a batch, the other callbacks' hooks and the logging after
    it, falls into the next interval: every moment of the fit is in one of the two clocks). Load
    from other jobs then falls on the two sides alike, within a few hundred milliseconds, where
    alternating whole runs spread it over minutes."""

    def __init__(self, step, batches, warmup_batches: int) -> None:
        self.step, self.batches, self.warmup_batches = step, batches, warmup_batches
        self.trainer_times: list[float] = []
        self.plain_times: list[float] = []
        self.mark: float | None = None

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        now = time.perf_counter()
        timed = batch_idx >= self.warmup_batches and self.mark is not None
        if timed:
            self.trainer_times.append(now - self.mark)
        with torch.enable_grad():
            self.step(next(self.batches))
        self.mark = time.perf_counter()
        if timed:
            self.plain_times.append(self.mark - now)


def paired_step_seconds(model, twin, images, labels, args, device,
                        make_trainer=cli_trainer) -> tuple[list[float], list[float]]:
    """Per-step seconds of ``model`` under ``make_trainer``'s Trainer and of ``twin`` in the
    plain loop, interleaved in one fit (``PairedPlainSteps``), over ``args.steps`` steps after
    ``args.warmup_steps``."""
    options = SimpleNamespace(compile=False, compile_backend="inductor", channels_last=False,
                              precision="32-true")
    batches = iter(device_batches(images, labels, args.batch_size, device))
    pairing = PairedPlainSteps(plain_step(twin, options, device), batches, args.warmup_steps)
    with tempfile.TemporaryDirectory() as root, open(os.devnull, "w") as null, \
            contextlib.redirect_stdout(null), contextlib.redirect_stderr(null):
        trainer = make_trainer(Path(root), args.warmup_steps + args.steps, args.log_every_n_steps)
        trainer.callbacks.insert(0, pairing)
        trainer.fit(model, train_dataloaders=device_batches(images, labels, args.batch_size, device))
    return pairing.trainer_times, pairing.plain_times


def paired_summary(trainer_times: list[float], plain_times: list[float]) -> dict:
    """Means (µs per step: what a run's length sees), the median of the step-by-step differences
    (a typical step, unmoved by a rare slow one) and the speed ratio overall and in each third."""
    thirds = [slice(i * len(plain_times) // 3, (i + 1) * len(plain_times) // 3) for i in range(3)]
    plain_us, trainer_us = 1e6 * statistics.fmean(plain_times), 1e6 * statistics.fmean(trainer_times)
    return dict(plain_us=plain_us, trainer_us=trainer_us, overhead_us=trainer_us - plain_us,
                median_difference_us=1e6 * statistics.median(t - p for t, p in zip(trainer_times, plain_times)),
                ratio=sum(plain_times) / sum(trainer_times),
                third_ratios=[sum(plain_times[part]) / sum(trainer_times[part]) for part in thirds
                              if plain_times[part]])


class PairedRow:
    """One row of ``--paired``: its network, the twin the plain loop trains, the copy that runs
    under Lightning alone (``--attribution``), and the fits so far. ``main`` runs one fit of
    every row per round (``fit_once``), so that the rows' fits of a round are seconds apart and
    see the same load; a family's additions over the bare module are then read round by round."""

    def __init__(self, name: str, args) -> None:
        L.seed_everything(0, verbose=False)
        self.name = name
        self.model = build_model(name, args.size)
        self.twin = copy.deepcopy(self.model)
        self.stripped = copy.deepcopy(self.model) if args.attribution and name not in BARE else None
        self.make_trainer = trainer_maker(name)
        self.fits: list[dict] = []
        self.alone: list[dict] = []

    def fit_once(self, images, labels, args, device) -> None:
        self.fits.append(paired_summary(*paired_step_seconds(self.model, self.twin, images, labels, args, device,
                                                             self.make_trainer)))
        if self.stripped is not None:
            with without_project_steps():
                self.alone.append(paired_summary(*paired_step_seconds(self.stripped, self.twin, images, labels,
                                                                      args, device, lightning_trainer)))

    def row(self) -> dict:
        """The fit of median overhead, with every fit's overhead."""
        chosen = sorted(self.fits, key=lambda fit: fit["overhead_us"])[len(self.fits) // 2]
        row = dict(family=self.name, parameters=sum(p.numel() for p in self.model.parameters() if p.requires_grad),
                   **chosen, overhead_runs_us=[fit["overhead_us"] for fit in self.fits])
        if self.alone:
            row["alone_overhead_us"] = statistics.median(fit["overhead_us"] for fit in self.alone)
            row["alone_overhead_runs_us"] = [fit["overhead_us"] for fit in self.alone]
            # each fit against the Lightning-alone fit right after it
            row["own_work_runs_us"] = [fit["overhead_us"] - alone["overhead_us"]
                                       for fit, alone in zip(self.fits, self.alone)]
            row["own_work_us"] = statistics.median(row["own_work_runs_us"])
        return row


def measure_paired_rounds(names: list[str], images, labels, args, device) -> list[dict]:
    """``measure`` with the plain loop interleaved into each fit (``--paired``): the Trainer's
    overhead is read within one fit. ``--repeats`` rounds of one fit per row, the order of the
    rows reversed every other round (a load that rises or falls through a round then favours no
    row); each row keeps its median fit. With the bare row, each family's additions are also read
    per round (its overhead minus the bare module's of the same round) and their median kept:
    a change of load between rounds then falls on both terms of a difference."""
    rows = [PairedRow(name, args) for name in names]
    for round_index in range(args.repeats):
        for row in rows if round_index % 2 == 0 else reversed(rows):
            row.fit_once(images, labels, args, device)
    results = [row.row() for row in rows]
    bare = next((row for row in results if row["family"] == "bare"), None)
    if bare is not None:
        for row in results:
            if row["family"] != "bare":
                row["additions_runs_us"] = [own - base for own, base in
                                            zip(row["overhead_runs_us"], bare["overhead_runs_us"])]
                row["additions_us"] = statistics.median(row["additions_runs_us"])
    return results


def paired_table(rows: list[dict]) -> str:
    lines = ["| family | parameters | plain ms/step | Trainer ms/step | Lightning / plain speed | "
             "same, in each third of the steps |", "|---|---|---|---|---|---|"]
    for row in rows:
        thirds = ", ".join(f"{ratio:.3f}" for ratio in row["third_ratios"])
        lines.append(f"| {row['family']} | {row['parameters'] / 1e6:.3f} M | {row['plain_us'] / 1e3:.1f} "
                     f"| {row['trainer_us'] / 1e3:.1f} | {row['ratio']:.3f} | {thirds} |")
    return "\n".join(lines) + "\n"


# GenerativeModule's per-step work: logging, the divergence watch, the weight average (where a
# name is missing, as in older versions of the class, it is left out).
PROJECT_STEP_METHODS = ("on_train_batch_start", "on_train_batch_end", "watch_loss", "log_step_metrics",
                        "log_metric", "update_average")


@contextlib.contextmanager
def without_project_steps():
    """GenerativeModule's per-step work switched off: its per-step hooks and logging are no-ops
    and ``optimizer_step`` is Lightning's (no weight average). Under ``lightning_trainer`` (no
    CLI callbacks) what is left of a family's step is its network, loss and Lightning."""
    from lightning_gen.base import GenerativeModule

    saved = {name: GenerativeModule.__dict__[name] for name in (*PROJECT_STEP_METHODS, "optimizer_step")
             if name in GenerativeModule.__dict__}
    try:
        for name in saved:
            setattr(GenerativeModule, name, lambda self, *args, **kwargs: None)
        if "optimizer_step" in saved:
            GenerativeModule.optimizer_step = L.LightningModule.optimizer_step
        yield
    finally:
        for name, method in saved.items():
            setattr(GenerativeModule, name, method)


def measure(name: str, images, labels, args, device) -> dict:
    L.seed_everything(0, verbose=False)
    model = build_model(name, args.size)
    twin = copy.deepcopy(model)
    stripped = copy.deepcopy(model) if args.attribution and name not in BARE else None
    make_trainer = trainer_maker(name)
    trainer_times, plain_times, stripped_times = [], [], []
    for _ in range(args.repeats):  # alternating, medians kept (see throughput.py)
        trainer_times.append(trainer_step_seconds(model, images, labels, args, device, make_trainer))
        plain_times.append(plain_step_seconds(twin, images, labels, args, device))
        if stripped is not None:
            with without_project_steps():
                stripped_times.append(trainer_step_seconds(stripped, images, labels, args, device,
                                                           lightning_trainer))
    trainer_us, plain_us = statistics.median(trainer_times) * 1e6, statistics.median(plain_times) * 1e6
    row = dict(family=name, parameters=sum(p.numel() for p in model.parameters() if p.requires_grad),
               plain_us=plain_us, trainer_us=trainer_us, overhead_us=trainer_us - plain_us,
               ratio=plain_us / trainer_us,
               trainer_runs_us=[t * 1e6 for t in trainer_times], plain_runs_us=[t * 1e6 for t in plain_times])
    if stripped_times:
        stripped_us = statistics.median(stripped_times) * 1e6
        row.update(stripped_us=stripped_us, stripped_runs_us=[t * 1e6 for t in stripped_times],
                   alone_overhead_us=stripped_us - plain_us)
    return row


class CallCounter(L.Callback):
    """cProfile over the training steps after the warm-up: whole steps, as StepTimer times them."""

    def __init__(self, warmup_batches: int, batches: int) -> None:
        self.warmup_batches, self.batches = warmup_batches, batches
        self.profile = cProfile.Profile()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if batch_idx + 1 == self.warmup_batches:
            self.profile.enable()
        elif batch_idx + 1 == self.warmup_batches + self.batches:
            self.profile.disable()


def trainer_calls(model, images, labels, args, device, make_trainer=cli_trainer) -> float:
    """Python calls (functions and built-ins, as cProfile counts them) per training step under
    ``make_trainer``'s Trainer: a measure of the per-step work that the machine's load does not
    change."""
    counter = CallCounter(args.warmup_steps, args.steps)
    with tempfile.TemporaryDirectory() as root, open(os.devnull, "w") as null, \
            contextlib.redirect_stdout(null), contextlib.redirect_stderr(null):
        trainer = make_trainer(Path(root), args.warmup_steps + args.steps, args.log_every_n_steps)
        trainer.callbacks.insert(0, counter)
        trainer.fit(model, train_dataloaders=device_batches(images, labels, args.batch_size, device))
    return pstats.Stats(counter.profile).total_calls / args.steps


def plain_calls(model, images, labels, args, device) -> float:
    """Python calls per step of the plain loop: the difference between loops of 2N and N steps."""
    counts = []
    for steps in (args.steps, 2 * args.steps):
        profile = cProfile.Profile()
        profile.enable()
        plain_step_seconds(model, images, labels, SimpleNamespace(**{**vars(args), "steps": steps}), device)
        profile.disable()
        counts.append(pstats.Stats(profile).total_calls)
    return (counts[1] - counts[0]) / args.steps


@contextlib.contextmanager
def frozen_project_clocks():
    """The clock the models read to log the progress bar's values, and the CLI's bar reads to
    redraw (both every ``PROGRESS_BAR_INTERVAL_S``), stopped: that work is then done at the first
    batch only, so the counts are of the work done per step. (It is done per tenth of a second,
    not per step: a profiled step, several times slower, would do it more often per step.)"""
    import importlib

    frozen = SimpleNamespace(monotonic=lambda: 0.0)
    modules = []
    for name in ("lightning_gen.base", "lightning_gen.callbacks.progress"):
        try:
            module = importlib.import_module(name)
        except ImportError:  # a version of the project without that module
            continue
        if hasattr(module, "time"):
            modules.append((module, module.time))
            module.time = frozen
    try:
        yield
    finally:
        for module, clock in modules:
            module.time = clock


def count_calls(name: str, images, labels, args, device) -> dict:
    with frozen_project_clocks():
        return _count_calls(name, images, labels, args, device)


def _count_calls(name: str, images, labels, args, device) -> dict:
    L.seed_everything(0, verbose=False)
    model = build_model(name, args.size)
    plain, stripped = copy.deepcopy(model), copy.deepcopy(model)
    make_trainer = trainer_maker(name)
    row = dict(family=name, trainer_calls=trainer_calls(model, images, labels, args, device, make_trainer),
               plain_calls=plain_calls(plain, images, labels, args, device))
    if name not in BARE:
        with without_project_steps():
            row["stripped_calls"] = trainer_calls(stripped, images, labels, args, device, lightning_trainer)
    return row


def calls_table(rows: list[dict]) -> str:
    bare = next((row for row in rows if row["family"] == "bare"), None)
    lines = ["| row | plain loop calls/step | Trainer calls/step | overhead calls/step | bare Lightning overhead "
             "calls/step | Lightning alone, this network: overhead calls/step | project's own calls/step |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        overhead = row["trainer_calls"] - row["plain_calls"]
        bare_overhead = "-" if bare is None else f"{bare['trainer_calls'] - bare['plain_calls']:.0f}"
        alone = own = "-"
        if "stripped_calls" in row:
            alone = f"{row['stripped_calls'] - row['plain_calls']:.0f}"
            own = f"{row['trainer_calls'] - row['stripped_calls']:.0f}"
        lines.append(f"| {row['family']} | {row['plain_calls']:.0f} | {row['trainer_calls']:.0f} | {overhead:.0f} "
                     f"| {bare_overhead} | {alone} | {own} |")
    return "\n".join(lines) + "\n"


def table(rows: list[dict], bare: dict | None) -> str:
    """The markdown table; with ``--attribution`` two more columns: the family's network under
    Lightning alone (``without_project_steps``) minus the plain loop, and the full Trainer minus
    that (what the project's per-step work costs this network, measured directly). Under
    ``--paired`` the additions and the own work are medians of per-round differences (every
    round's additions listed, sorted, after the percentage); otherwise differences of medians."""
    attribution = any("alone_overhead_us" in row for row in rows)
    header = ("| family | parameters | plain µs/step | Trainer µs/step | overhead µs | bare Lightning "
              "overhead µs | project additions µs | additions / bare | Lightning / plain speed |")
    if attribution:
        header += " Lightning alone, this network: overhead µs | project's own work µs (Trainer - Lightning alone) |"
    lines = [header, "|---" * header.count(" | ") + "|---|"]
    for row in rows:
        if bare is not None and row["family"] != "bare":
            additions = row.get("additions_us", row["overhead_us"] - bare["overhead_us"])
            extra = f"{bare['overhead_us']:.0f} | {additions:.0f} | {100 * additions / bare['overhead_us']:.0f}%"
            if "additions_runs_us" in row:
                extra += f" ({', '.join(f'{value:.0f}' for value in sorted(row['additions_runs_us']))})"
        else:
            extra = "- | - | -"
        line = (f"| {row['family']} | {row['parameters'] / 1e6:.3f} M | {row['plain_us']:.0f} "
                f"| {row['trainer_us']:.0f} | {row['overhead_us']:.0f} | {extra} | {row['ratio']:.3f} |")
        if attribution and "alone_overhead_us" in row:
            own = row.get("own_work_us", row["overhead_us"] - row["alone_overhead_us"])
            line += f" {row['alone_overhead_us']:.0f} | {own:.0f} |"
        elif attribution:
            line += " - | - |"
        lines.append(line)
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="*", default=list(FAMILIES), choices=list(FAMILIES),
                        help="families to measure (none: the bare rows only)")
    parser.add_argument("--size", choices=("tiny", "small", "config"), default="tiny")
    parser.add_argument("--batch-size", type=count, default=2)
    parser.add_argument("--steps", type=count, default=200, help="timed training steps")
    parser.add_argument("--warmup-steps", type=count, default=20)
    parser.add_argument("--repeats", type=count, default=5, help="alternating timings; medians kept")
    parser.add_argument("--log-every-n-steps", type=count, default=50)
    parser.add_argument("--no-bare", action="store_true", help="skip the bare LightningModule rows")
    parser.add_argument("--count-calls", action="store_true",
                        help="count Python calls per step (cProfile) instead of timing: load-independent")
    parser.add_argument("--paired", action="store_true",
                        help="interleave the plain loop with the Trainer step by step in each fit "
                             "(PairedPlainSteps) instead of alternating whole runs")
    parser.add_argument("--attribution", action="store_true",
                        help="also time each family under Lightning alone (without_project_steps)")
    parser.add_argument("--without-ema", action="store_true",
                        help="also measure diffusion and flow matching (where in --families) without "
                             "their weight average")
    parser.add_argument("--threads", type=count_or_zero, default=0, help="CPU threads (0: torch's default)")
    parser.add_argument("--output", type=Path, default=None, help="append the table to this file")
    parser.add_argument("--json", type=Path, default=None, help="write the rows as JSON here")
    args = parser.parse_args()
    apply_threads(args.threads)
    # Lightning's start-up messages and the CLI's warning about sys.argv (this script's own
    # arguments) would repeat for every run.
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter.*")
    device = torch.device("cpu")

    data = MNISTDataModule(download=True)
    data.setup("fit")
    images, labels = data.train_set.images, data.train_set.labels

    names = row_names(args.families, args.no_bare, args.without_ema)
    if args.count_calls:
        rows = []
        for name in names:
            rows.append(count_calls(name, images, labels, args, device))
            print(rows[-1], flush=True)
        text = (f"\n{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, size {args.size}, batch "
                f"{args.batch_size}, Python calls per step (cProfile) over {args.steps} steps after "
                f"{args.warmup_steps}, log_every_n_steps {args.log_every_n_steps}, the progress bar's clocks "
                f"stopped (frozen_project_clocks)\n\n" + calls_table(rows))
        print(text)
        if args.output is not None:
            with open(args.output, "a") as stream:
                stream.write(text)
        if args.json is not None:
            args.json.write_text(json.dumps(dict(rows=rows), indent=1))
        return
    started = time.time()
    if args.paired:
        rows = measure_paired_rounds(names, images, labels, args, device)
        for row in rows:
            print(f"{row['family']}: plain {row['plain_us']:.0f} µs, Trainer {row['trainer_us']:.0f} µs, overhead "
                  f"{row['overhead_us']:.0f} µs (fits: {[round(t) for t in row['overhead_runs_us']]}"
                  + (f", Lightning alone {[round(t) for t in row['alone_overhead_runs_us']]}"
                     if "alone_overhead_us" in row else "")
                  + (f", additions per round {[round(t) for t in row['additions_runs_us']]}"
                     if "additions_runs_us" in row else "")
                  + f"), ratio {row['ratio']:.3f} (thirds {[round(r, 3) for r in row['third_ratios']]})", flush=True)
    else:
        rows = []
        for name in names:
            row = measure(name, images, labels, args, device)
            rows.append(row)
            print(f"{name}: plain {row['plain_us']:.0f} µs, Trainer {row['trainer_us']:.0f} µs, overhead "
                  f"{row['overhead_us']:.0f} µs (runs: Trainer {[round(t) for t in row['trainer_runs_us']]}, "
                  f"plain {[round(t) for t in row['plain_runs_us']]}"
                  + (f", Lightning alone {[round(t) for t in row['stripped_runs_us']]}" if "stripped_us" in row else "")
                  + ")", flush=True)
    bare = next((row for row in rows if row["family"] == "bare"), None)
    load = os.getloadavg()
    design = (f"Trainer and plain loop interleaved step by step in each fit, {args.repeats} rounds of one fit "
              f"per row, median overhead (and additions over the bare row, round by round) kept"
              if args.paired else f"median of {args.repeats} alternating Trainer/plain runs")
    header = (f"\n{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.machine()} CPU, "
              f"{torch.get_num_threads()} thread(s), size {args.size}, batch {args.batch_size}, "
              f"{args.steps} timed steps after {args.warmup_steps} warm-up, {design}, "
              f"log_every_n_steps {args.log_every_n_steps}, "
              f"{time.time() - started:.0f} s, load average at the end "
              f"{load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} (1 / 5 / 15 min)\n\n")
    text = header + table(rows, bare) + ("\n" + paired_table(rows) if args.paired else "")
    print(text)
    if args.output is not None:
        with open(args.output, "a") as stream:
            stream.write(text)
    if args.json is not None:
        args.json.write_text(json.dumps(dict(args={k: str(v) for k, v in vars(args).items()}, rows=rows,
                                             bare_overhead_us=None if bare is None else bare["overhead_us"]),
                                        indent=1))


if __name__ == "__main__":
    main()
