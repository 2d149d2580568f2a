"""What one of Lightning's hook calls costs in its bookkeeping, with and without the project's
shortcuts (benchmarks/results/throughput.md, "Lightning's per-hook bookkeeping").

Lightning sets the module's ``_current_fx_name`` before and after every hook it calls and wraps
each call in ``trainer.profiler.profile(name)``. Printed, in microseconds per call (median of 5
timings): the attribute set through ``nn.Module.__setattr__`` and through
``GenerativeModule.__setattr__``, and one ``with profiler.profile(...)`` under Lightning's
``PassThroughProfiler`` and under ``NullProfiler``; then one ``self.log`` of a step value for the
progress bar inside a training step (what a bar that reads ``trainer.progress_bar_metrics`` needs
per redraw; "What one self.log costs"); then one update of the weight average
(``ExponentialMovingAverage.update``, after every optimizer step of diffusion and flow matching)
of the U-Net of ``step_overhead.py --size tiny`` (146 tensors) and of configs/diffusion_mnist.yaml
(246 tensors, 4.1M parameters), warm, one thread.

    python benchmarks/hook_costs.py [--calls 200000] [--log-calls 2000] [--ema-calls 2000]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import timeit
import warnings
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.profilers import PassThroughProfiler
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from arguments import count

from lightning_gen import Autoencoder
from lightning_gen.callbacks import NullProfiler
from lightning_gen.nn import ExponentialMovingAverage


def per_call_us(statement, calls: int) -> float:
    return statistics.median(timeit.repeat(statement, number=calls, repeat=5)) / calls * 1e6


def profiled_hook(profiler):
    def run() -> None:
        with profiler.profile("[Callback]ModelCheckpoint.on_train_batch_end"):
            pass
    return run


class TimedLog(L.LightningModule):
    """One training step that times ``self.log`` of its loss (a step value for the progress bar,
    as the models log it) inside the step, where Lightning accepts it."""

    def __init__(self, calls: int) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(2, 1)
        self.calls = calls
        self.microseconds: float | None = None

    def training_step(self, batch, batch_idx: int):
        loss = self.linear(batch[0]).square().mean()
        value = loss.detach()
        self.microseconds = per_call_us(lambda: self.log("train/loss", value, on_step=True, on_epoch=False,
                                                         prog_bar=True, batch_size=1), self.calls)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def log_us(calls: int) -> float:
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # its start and stop notes
    warnings.filterwarnings("ignore", module="lightning")
    module = TimedLog(calls)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=1, logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False)
    trainer.fit(module, DataLoader(TensorDataset(torch.randn(4, 2)), batch_size=4))
    return module.microseconds


def ema_update_us(size: str, calls: int) -> float:
    from step_overhead import TINY
    from throughput import build

    network = build("diffusion", "config", TINY["diffusion"] if size == "tiny" else None).network
    average = ExponentialMovingAverage(network, 0.999)
    return per_call_us(lambda: average.update(network), calls)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=count, default=200_000, help="calls per timing")
    parser.add_argument("--log-calls", type=count, default=2_000, help="self.log calls per timing")
    parser.add_argument("--ema-calls", type=count, default=2_000,
                        help="weight-average updates per timing (the config-size network: a 50th of them)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = Autoencoder((2,), latent_dim=2, hidden_dims=(8,), reconstruction_loss="mse")
    module = torch.nn.Linear(2, 2)
    rows = [
        ("nn.Module.__setattr__ of _current_fx_name",
         per_call_us(lambda: setattr(module, "_current_fx_name", "training_step"), args.calls)),
        ("GenerativeModule.__setattr__ of _current_fx_name",
         per_call_us(lambda: setattr(model, "_current_fx_name", "training_step"), args.calls)),
        ("GenerativeModule.__setattr__ of another attribute",
         per_call_us(lambda: setattr(model, "_another_attribute", 1), args.calls)),
        ("with PassThroughProfiler().profile(name)", per_call_us(profiled_hook(PassThroughProfiler()), args.calls)),
        ("with NullProfiler().profile(name)", per_call_us(profiled_hook(NullProfiler()), args.calls)),
        ("self.log of a progress-bar step value in a training step", log_us(args.log_calls)),
        ("weight-average update, tiny U-Net (146 tensors)", ema_update_us("tiny", args.ema_calls)),
        ("weight-average update, the config's U-Net (246 tensors)", ema_update_us("config", max(args.ema_calls // 50, 1))),
    ]
    for name, microseconds in rows:
        print(f"{name}: {microseconds:.2f} us")


if __name__ == "__main__":
    main()
