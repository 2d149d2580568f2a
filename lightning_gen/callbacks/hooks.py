"""A base class for callbacks that do nothing during training steps.

Lightning calls each of its per-step hooks on every callback of the Trainer, whether the callback
implements it or not: for every step of a fit, six hooks (``on_train_batch_start``,
``on_before_backward``, ``on_after_backward``, ``on_before_optimizer_step``,
``on_before_zero_grad``, ``on_train_batch_end``), each a Python call inside a profiler context.
For the callbacks ``cli.py`` adds to every run (which work after validation, test or predict, or
on SIGTERM) that came to about 36 empty calls per step, a tenth of what Lightning itself costs per
step at a tiny network (benchmarks/results/throughput.md, "Fixed cost per step"). Lightning skips
a hook attribute that is not callable (``trainer/call.py``, ``_call_callback_hooks``), so a
subclass of ``StepFreeCallback`` has ``None`` for each per-step hook it does not implement.

A subclass that implements one of these hooks defines it as usual; it must not call
``super().<hook>(...)`` for them (the base class's hook is None, not Lightning's empty method).

``NullProfiler`` is the other half of that dispatch: Lightning wraps each hook call in
``trainer.profiler.profile(name)``, and its default profiler (``PassThroughProfiler``), which
records nothing, still builds a generator-based context manager for each one: about 45 a
training step under ``cli.py``'s Trainer.
"""

from __future__ import annotations

import contextlib

from lightning.pytorch.callbacks import Callback
from lightning.pytorch.profilers import PassThroughProfiler

#: The hooks Lightning calls on every callback at every training step.
TRAINING_STEP_HOOKS = ("on_train_batch_start", "on_before_backward", "on_after_backward",
                       "on_before_optimizer_step", "on_before_zero_grad", "on_train_batch_end")


class StepFreeCallback(Callback):
    """A Callback whose per-step training hooks, unless a subclass implements them, are None, so
    that Lightning does not call them (see the module docstring)."""

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        for hook in TRAINING_STEP_HOOKS:
            if getattr(cls, hook) is getattr(Callback, hook):
                setattr(cls, hook, None)


for _hook in TRAINING_STEP_HOOKS:
    setattr(StepFreeCallback, _hook, None)


class NullProfiler(PassThroughProfiler):
    """Lightning's default profiler (records nothing) with a ``profile`` that returns one shared,
    reusable ``nullcontext`` instead of a new generator-based context manager per call (0.2-0.3
    against 1.0-1.4 us a call on the 2-core CPU: benchmarks/hook_costs.py). ``cli.py``
    uses it unless the config names a profiler (``--trainer.profiler simple`` keeps Lightning's
    report); ``L.Trainer(profiler=NullProfiler())`` does the same in a script."""

    _nothing = contextlib.nullcontext()

    def profile(self, action_name: str) -> contextlib.AbstractContextManager:
        return self._nothing

