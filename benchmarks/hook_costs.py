"""What one of Lightning's hook calls costs in its bookkeeping, with and without the project's
shortcuts (benchmarks/results/throughput.md, "Lightning's per-hook bookkeeping").

Lightning sets the module's ``_current_fx_name`` before and after every hook it calls and wraps
each call in ``trainer.profiler.profile(name)``. Printed, in microseconds per call (median of 5
timings): the attribute set through ``nn.Module.__setattr__`` and through
``GenerativeModule.__setattr__``, and one ``with profiler.profile(...)`` under Lightning's
``PassThroughProfiler`` and under ``NullProfiler``.

    python benchmarks/hook_costs.py [--calls 200000]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import timeit
from pathlib import Path

import torch
from lightning.pytorch.profilers import PassThroughProfiler

sys.path.insert(0, str(Path(__file__).resolve().parent))
from arguments import count

from lightning_gen import Autoencoder
from lightning_gen.callbacks import NullProfiler


def per_call_us(statement, calls: int) -> float:
    return statistics.median(timeit.repeat(statement, number=calls, repeat=5)) / calls * 1e6


def profiled_hook(profiler):
    def run() -> None:
        with profiler.profile("[Callback]ModelCheckpoint.on_train_batch_end"):
            pass
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=count, default=200_000, help="calls per timing")
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
    ]
    for name, microseconds in rows:
        print(f"{name}: {microseconds:.2f} us")


if __name__ == "__main__":
    main()
