"""A callback that sends this process SIGTERM at a chosen point of a fit, so that a test can
stop a ``cli.py fit`` at an exact step (in training or inside a validation) without racing it."""

from __future__ import annotations

import os
import signal

import lightning as L


class SigtermAt(L.Callback):
    """Send SIGTERM to this process once: after training step ``step`` (``stage="train"``),
    after the first batch of the first validation that starts at or after that step
    (``stage="validation"``), or after the first batch of the sanity check (``stage="sanity"``)."""

    def __init__(self, step: int = 0, stage: str = "train") -> None:
        if stage not in ("train", "validation", "sanity"):
            raise ValueError(f"stage must be 'train', 'validation' or 'sanity', not {stage!r}")
        self.step = step
        self.stage = stage
        self.sent = False

    def _send(self) -> None:
        self.sent = True
        os.kill(os.getpid(), signal.SIGTERM)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.stage == "train" and not self.sent and trainer.global_step >= self.step:
            self._send()

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if self.sent:
            return
        if self.stage == "sanity" and trainer.sanity_checking:
            self._send()
        elif self.stage == "validation" and not trainer.sanity_checking and trainer.global_step >= self.step:
            self._send()
