"""No training_step waits on the device: every family in the contract registry trains with the
tensor-to-host conversions (``.item()``, ``float()``, ``int()``, ``bool()`` as in ``if t:``,
``.tolist()``, ``.numpy()``, ``.cpu()``) made to raise inside its training_step.

On a GPU each such conversion blocks the host until the queued kernels finish, so the CPU cannot
run ahead and launch the next step's kernels: one per step costs throughput at small batches. The
CPU has no such wait, so the test replaces the conversions themselves; it fails on CPU for the
same code that would sync on CUDA. The optimizer's step is exempt (manual optimization calls it
inside training_step; its conversions touch the CPU-resident step counters only), and so is the
first training step: one-time work such as ActNorm's data-dependent initialization may sync once.
Flow matching's minibatch optimal-transport pairing is exempt too: it is solved on the host.
A second test guards whole batches under the Trainer ``cli.py fit`` builds (the callbacks, the
modules' EMA and schedule hooks, Lightning's loop), where the H200 run of benchmarks/gpu_check.py
showed the Trainer's host time in full for small steps.
"""

from __future__ import annotations

import contextlib

import lightning as L
import pytest
import torch

from cli_helpers import load_benchmark
from lightning_gen.flow_matching import module as flow_matching_module
from test_contract import FAMILIES, make_data, tiny_trainer

CONVERSIONS = ("item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "__index__")


class HostSyncError(AssertionError):
    """A tensor-to-host conversion inside training_step (raised by SyncGuard)."""


class SyncGuard:
    """While active, the tensor-to-host conversions raise HostSyncError."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.monkeypatch = monkeypatch
        self.active = False
        for name in CONVERSIONS:
            original = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._guarded(name, original))

    def _guarded(self, name, original):
        guard = self

        def conversion(tensor, *args, **kwargs):
            if guard.active:
                raise HostSyncError(f"Tensor.{name} called in training_step (a host sync)")
            return original(tensor, *args, **kwargs)

        return conversion

    @contextlib.contextmanager
    def enabled(self, active: bool):
        previous, self.active = self.active, active
        try:
            yield
        finally:
            self.active = previous


def exempt_ot_pairing(model, guard: SyncGuard, monkeypatch: pytest.MonkeyPatch) -> None:
    """Minibatch optimal transport solves its assignment on the host by design (one copy of the
    cost matrix per step, flow_matching/coupling.py): unguarded; the rest of the step is still
    guarded."""
    if getattr(model, "coupling", None) != "ot":
        return
    pair = flow_matching_module.pair

    def unguarded_pair(*args, **kwargs):
        with guard.enabled(False):
            return pair(*args, **kwargs)

    monkeypatch.setattr(flow_matching_module, "pair", unguarded_pair)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_training_step_does_not_sync_with_the_device(name, tmp_path, mnist_root, monkeypatch):
    family = FAMILIES[name]
    torch.manual_seed(0)
    data = make_data(family.data, mnist_root)
    model = family.build(data.data_shape)
    guard = SyncGuard(monkeypatch)
    steps = []

    training_step = model.training_step

    def guarded_training_step(*args, **kwargs):
        with guard.enabled(bool(steps)):  # every step after the first
            output = training_step(*args, **kwargs)
        steps.append(output)
        return output

    monkeypatch.setattr(model, "training_step", guarded_training_step)
    exempt_ot_pairing(model, guard, monkeypatch)
    trainer = tiny_trainer(tmp_path, max_steps=6, limit_val_batches=0)
    optimizer_step = trainer.strategy.optimizer_step

    def unguarded_optimizer_step(*args, **kwargs):
        with guard.enabled(False):
            return optimizer_step(*args, **kwargs)

    monkeypatch.setattr(trainer.strategy, "optimizer_step", unguarded_optimizer_step)
    trainer.fit(model, datamodule=data)
    assert len(steps) >= 3  # guarded steps really ran (a GAN step is two optimizer steps)
    with guard.enabled(True), pytest.raises(HostSyncError):
        torch.ones(1).item()  # the guard itself works


class GuardBatches(L.Callback):
    """Turns the guard on at the start of the second training batch and off at the epoch's end:
    every hook, callback and loop step in between is guarded, not only training_step."""

    def __init__(self, guard: SyncGuard) -> None:
        self.guard, self.guarded_batches = guard, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx >= 1:
            self.guard.active = True
            self.guarded_batches += 1

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.guard.active = False


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_batches_under_the_cli_trainer_do_not_sync_with_the_device(name, tmp_path, mnist_root, monkeypatch):
    """The Trainer ``cli.py fit`` builds (its callbacks, the modules' EMA and schedule hooks,
    Lightning's loop between batches), without a progress bar and between logging steps, makes
    no tensor-to-host conversion from the second batch to the end of the epoch: a GPU keeps its
    queue full there. (The bar converts at its redraws and the logger at its logging steps, by
    design.)"""
    family = FAMILIES[name]
    torch.manual_seed(0)
    data = make_data(family.data, mnist_root)
    model = family.build(data.data_shape)
    # the benchmarks' copy of the Trainer cli.py fit builds: 6 batches, no logging step among them
    trainer = load_benchmark("step_overhead").cli_trainer(tmp_path, 6, 1000, progress_bar=False)
    guard = SyncGuard(monkeypatch)
    guarding = GuardBatches(guard)
    trainer.callbacks.insert(0, guarding)
    exempt_ot_pairing(model, guard, monkeypatch)
    trainer.fit(model, datamodule=data)
    assert guarding.guarded_batches == trainer.num_training_batches - 1 >= 3 and not guard.active


@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "dpm_solver++", "heun"])
def test_sampling_loop_does_not_sync_with_the_device(sampler, monkeypatch):
    """The samplers' loops (Diffusion.sample's work) make no tensor-to-host conversion either:
    timesteps and coefficient tables are built before the loop (Heun's Karras sub-sequence on the
    device itself), so a GPU queues every step's kernels without waiting."""
    from lightning_gen.diffusion.samplers import sampling_loop
    from lightning_gen.diffusion.schedule import NoiseSchedule

    schedule = NoiseSchedule(40, "cosine")
    network = torch.nn.Linear(3, 3)
    denoise = lambda x, t: network(x) * (t[:, None] + 1) / 40  # noqa: E731  (uses t as a tensor)
    x_T = torch.randn(4, 3)
    guard = SyncGuard(monkeypatch)
    with torch.no_grad(), guard.enabled(True):
        x0, states, _ = sampling_loop(denoise, schedule, x_T, sampler, None if sampler == "ddpm" else 9,
                                      eta=0.5 if sampler == "ddim" else 0.0, record=True)
    assert torch.isfinite(x0).all() and len(states) >= 2


@pytest.mark.parametrize("solver", ["euler", "midpoint", "heun"])
def test_flow_matching_sampling_does_not_sync_with_the_device(solver, monkeypatch):
    """FlowMatching.sample's work, with guidance: the solver's times are Python floats, so its
    loop makes no tensor-to-host conversion."""
    from lightning_gen import FlowMatching
    from lightning_gen.diffusion import MLPDenoiserConfig

    model = FlowMatching((3,), mlp=MLPDenoiserConfig(8, 1), num_classes=2, guidance_scale=2.0)
    x0 = torch.randn(4, 3)
    guard = SyncGuard(monkeypatch)
    # y=None: labels cycle through the classes (given labels are range-checked once, on the host).
    with guard.enabled(True):
        samples = model.sample(4, sampler=solver, steps=3, x0=x0)
    assert samples.shape == (4, 3) and torch.isfinite(samples).all()
