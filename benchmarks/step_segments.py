"""Where a training step's time goes under the CLI's Trainer, segment by segment, beside the
plain loop's step of the same network (benchmarks/results/throughput.md, "What one self.log
costs").

One fit interleaves the two, step by step, as ``step_overhead.py --paired`` does: after each
Trainer batch, one plain step of a twin network (same weights, optimizer, loss and batches). Each
Trainer step is cut by timestamps at Lightning's hooks (a callback first in the Trainer's list,
the training step and its ``loss()`` wrapped, an optimizer step post-hook); each plain step by
timestamps around its five parts. Printed: mean microseconds per step of each segment, the minor
page faults per step of each side (``getrusage``: memory the allocator handed back to the
system and touched again), and the ``self.log`` calls per step with their mean time.

    python benchmarks/step_segments.py --family autoencoder --size config --batch-size 64 \\
        --steps 200 --warmup-steps 10 --threads 2

Families with automatic optimization only (the GAN steps its two optimizers by hand).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import logging
import os
import resource
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from arguments import apply_threads, count, count_or_zero
from step_overhead import build_model, cli_trainer
from throughput import FAMILIES, device_batches

from datamodules import MNISTDataModule

now = time.perf_counter

# (row, Trainer segment, plain segment): a Trainer step from the end of the plain step before it
# to its on_train_batch_end; "-" where the plain loop has no counterpart.
ROWS = (
    ("fetch, and Lightning's work between batches", "between", "fetch"),
    ("on_train_batch_start to training_step (hooks, optimizer and closure wrappers)", "into_step", None),
    ("loss()", "loss", "loss"),
    ("rest of training_step (the module's logging)", "step_rest", None),
    ("training_step to zero_grad", "to_zero_grad", None),
    ("zero_grad (and its hooks)", "zero_grad", "zero_grad"),
    ("backward (and its hooks)", "backward", "backward"),
    ("backward to optimizer step", "to_optimizer", None),
    ("optimizer step", "optimizer", "optimizer"),
    ("optimizer step to on_train_batch_end", "after_step", None),
    ("whole step", "total", "total"),
)


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


class Segments(L.Callback):
    """Timestamps at the hooks of each Trainer step, and the plain step after each batch."""

    def __init__(self, plain_step, warmup_steps: int) -> None:
        self.plain_step, self.warmup_steps = plain_step, warmup_steps
        self.marks: dict[str, float] = {}
        self.trainer_rows: list[dict[str, float]] = []
        self.plain_rows: list[dict[str, float]] = []
        self.faults = {"trainer": 0, "plain": 0}
        self.end_of_plain: tuple[float, int] | None = None  # (time, faults)

    def mark(self, name: str) -> None:
        self.marks[name] = now()

    def on_train_start(self, trainer, pl_module) -> None:
        for optimizer in trainer.optimizers:
            optimizer.register_step_post_hook(lambda *args: self.mark("optimizer_done"))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.mark("batch_start")

    def on_before_zero_grad(self, trainer, pl_module, optimizer) -> None:
        self.mark("before_zero_grad")

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        self.mark("before_backward")

    def on_after_backward(self, trainer, pl_module) -> None:
        self.mark("after_backward")

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.mark("before_optimizer")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        end, faults = now(), minor_faults()
        timed = batch_idx >= self.warmup_steps and self.end_of_plain is not None
        if timed:
            m, (start, start_faults) = self.marks, self.end_of_plain
            self.trainer_rows.append(dict(
                between=m["batch_start"] - start, into_step=m["step_in"] - m["batch_start"],
                loss=m["loss_out"] - m["loss_in"],
                step_rest=(m["step_out"] - m["step_in"]) - (m["loss_out"] - m["loss_in"]),
                to_zero_grad=m["before_zero_grad"] - m["step_out"],
                zero_grad=m["before_backward"] - m["before_zero_grad"],
                backward=m["after_backward"] - m["before_backward"],
                to_optimizer=m["before_optimizer"] - m["after_backward"],
                optimizer=m["optimizer_done"] - m["before_optimizer"],
                after_step=end - m["optimizer_done"], total=end - start))
            self.faults["trainer"] += faults - start_faults
        with torch.enable_grad():
            row = self.plain_step()
        end_of_plain = (now(), minor_faults())
        if timed:
            self.plain_rows.append({**row, "total": sum(row.values())})
            self.faults["plain"] += end_of_plain[1] - faults
        self.end_of_plain = end_of_plain


def timed_plain_step(model, batches):
    """One plain PyTorch step of ``model`` per call, returning the seconds of its five parts."""
    model.train()
    optimizer = model.configure_optimizers()

    def step() -> dict[str, float]:
        start = now()
        batch = next(batches)
        fetched = now()
        loss = model.loss(batch, 0, "train")[0]
        computed = now()
        optimizer.zero_grad(set_to_none=True)
        zeroed = now()
        loss.backward()
        backward = now()
        optimizer.step()
        return dict(fetch=fetched - start, loss=computed - fetched, zero_grad=zeroed - computed,
                    backward=backward - zeroed, optimizer=now() - backward)
    return step


def wrap_step(model, segments: Segments) -> None:
    """Timestamps around ``model``'s training_step and loss (instance attributes, so the class,
    and any other instance, is untouched)."""
    training_step, loss = model.training_step, model.loss

    def timed_training_step(*args, **kwargs):
        segments.mark("step_in")
        out = training_step(*args, **kwargs)
        segments.mark("step_out")
        return out

    def timed_loss(*args, **kwargs):
        segments.mark("loss_in")
        out = loss(*args, **kwargs)
        segments.mark("loss_out")
        return out

    model.training_step, model.loss = timed_training_step, timed_loss


@contextlib.contextmanager
def counted_logs(counter: list[float]):
    """``LightningModule.log`` timed: ``counter`` gets each call's seconds."""
    log = L.LightningModule.log

    def timed(self, *args, **kwargs):
        start = now()
        try:
            return log(self, *args, **kwargs)
        finally:
            counter.append(now() - start)

    L.LightningModule.log = timed
    try:
        yield
    finally:
        L.LightningModule.log = log


def measure(family: str, images, labels, args) -> dict:
    device = torch.device("cpu")
    L.seed_everything(0, verbose=False)
    model = build_model(family, args.size)
    if not model.automatic_optimization:
        raise SystemExit(f"error: {family} steps its optimizers by hand; choose a family with automatic "
                         "optimization")
    twin = copy.deepcopy(model)
    segments = Segments(timed_plain_step(twin, iter(device_batches(images, labels, args.batch_size, device))),
                        args.warmup_steps)
    wrap_step(model, segments)
    logs: list[float] = []
    with tempfile.TemporaryDirectory() as root, open(os.devnull, "w") as null, \
            contextlib.redirect_stdout(null), contextlib.redirect_stderr(null), counted_logs(logs):
        trainer = cli_trainer(Path(root), args.warmup_steps + args.steps, args.log_every_n_steps)
        trainer.callbacks.insert(0, segments)
        trainer.fit(model, train_dataloaders=device_batches(images, labels, args.batch_size, device))
    steps = len(segments.trainer_rows)
    return dict(family=family, steps=steps,
                trainer={key: 1e6 * statistics.fmean(row[key] for row in segments.trainer_rows)
                         for key in segments.trainer_rows[0]},
                plain={key: 1e6 * statistics.fmean(row[key] for row in segments.plain_rows)
                       for key in segments.plain_rows[0]},
                faults={side: total / steps for side, total in segments.faults.items()},
                log_calls=len(logs), log_us=1e6 * statistics.fmean(logs) if logs else 0.0)


def table(result: dict) -> str:
    trainer, plain = result["trainer"], result["plain"]
    lines = [f"{result['family']}, {result['steps']} steps: µs per step (mean)", "",
             "| segment | Trainer | plain | Trainer - plain |", "|---|---|---|---|"]
    for name, trainer_key, plain_key in ROWS:
        mine = trainer[trainer_key]
        theirs = plain.get(plain_key) if plain_key else None
        lines.append(f"| {name} | {mine:.0f} | {'-' if theirs is None else f'{theirs:.0f}'} | "
                     f"{mine - (theirs or 0.0):.0f} |")
    faults = result["faults"]
    lines += ["", f"minor page faults per step: Trainer {faults['trainer']:.0f}, plain {faults['plain']:.0f}",
              f"self.log: {result['log_calls']} calls in the fit (warm-up included), "
              f"{result['log_us']:.0f} µs each on average",
              f"Lightning / plain speed: {plain['total'] / trainer['total']:.3f}"]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=sorted(FAMILIES), default="autoencoder")
    parser.add_argument("--size", choices=("tiny", "small", "config"), default="config")
    parser.add_argument("--batch-size", type=count, default=64)
    parser.add_argument("--steps", type=count, default=200, help="timed training steps")
    parser.add_argument("--warmup-steps", type=count, default=10)
    parser.add_argument("--log-every-n-steps", type=count, default=50)
    parser.add_argument("--threads", type=count_or_zero, default=2, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args()
    apply_threads(args.threads)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter.*")
    data = MNISTDataModule(download=True)
    data.setup("fit")
    print(table(measure(args.family, data.train_set.images, data.train_set.labels, args)), end="")


if __name__ == "__main__":
    main()
