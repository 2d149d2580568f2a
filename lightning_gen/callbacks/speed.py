"""SpeedOptions: torch.compile and channels_last for the networks of any family.

One callback instead of a hyperparameter in every family: the options change how the networks
run, not what they compute, so they belong to the run (the config's trainer callbacks), not to
the checkpoint. ``nn.Module.compile`` compiles in place, so parameter names, state dicts and
checkpoints are the same with and without it.

    python cli.py fit --config configs/diffusion_mnist.yaml \
        --trainer.callbacks+=lightning_gen.callbacks.SpeedOptions \
        --trainer.callbacks.compile=true --trainer.callbacks.channels_last=true

Defaults are off: on the 2-core CPU compilation costs more than a short fit gains, and on a GPU
neither has been measured in this project yet (benchmarks/results/throughput.md).
"""

from __future__ import annotations

import lightning as L
import torch
from torch import nn
from torchmetrics import Metric

from lightning_gen.callbacks.hooks import StepFreeCallback


class SpeedOptions(StepFreeCallback):
    """Compile the networks (the LightningModule's direct child modules with parameters) and/or
    store their convolution weights channels_last, when a fit, validation, test or prediction
    starts.

    Args:
        compile: ``torch.compile`` each network in place.
        channels_last: convert 4-D parameters and buffers to the channels_last memory format
            (NHWC), which cuDNN's convolutions run faster on tensor-core GPUs.
        compile_mode: ``torch.compile``'s mode: "default", "reduce-overhead", "max-autotune".
        compile_backend: ``torch.compile``'s backend ("inductor" generates kernels).
    """

    COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")

    def __init__(self, compile: bool = False, channels_last: bool = False,
                 compile_mode: str = "default", compile_backend: str = "inductor") -> None:
        for label, value in [("compile", compile), ("channels_last", channels_last)]:
            if not isinstance(value, bool):
                raise TypeError(f"{label} must be a bool, got {value!r}")
        if compile_mode not in self.COMPILE_MODES:
            raise ValueError(f"compile_mode must be one of {self.COMPILE_MODES}, got {compile_mode!r}")
        self.compile = compile
        self.channels_last = channels_last
        self.compile_mode = compile_mode
        self.compile_backend = compile_backend
        self.compiled: list[str] = []

    @staticmethod
    def networks(module: L.LightningModule) -> dict[str, nn.Module]:
        """The direct children that hold parameters, metrics excluded."""
        return {name: child for name, child in module.named_children()
                if not isinstance(child, Metric) and any(True for _ in child.parameters())}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for name, network in self.networks(pl_module).items():
            if self.channels_last:
                network.to(memory_format=torch.channels_last)
            # A network compiled before (by this callback at an earlier stage, or by another
            # instance on the same model) is left as it is: compiling again would recompile.
            already_compiled = getattr(network, "_compiled_call_impl", None) is not None
            if self.compile and not already_compiled:
                network.compile(mode=self.compile_mode, backend=self.compile_backend)
                self.compiled.append(name)
