"""Save a resumable last.ckpt when a run is stopped by SIGTERM."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lightning_gen.callbacks.hooks import StepFreeCallback


class CheckpointOnTerminate(StepFreeCallback):
    """When a fit is stopped by SIGTERM, save ``last.ckpt`` into the folder of every
    ModelCheckpoint that keeps one (``save_last``), so ``fit --ckpt_path last`` resumes it.

    Lightning turns SIGTERM into a SIGTERMException at the next batch boundary, after the batch's
    step, so the saved state (weights, optimizer, loop and data loader positions, random state) is
    that of a clean boundary and the resumed fit continues exactly where this one stopped.

    Args:
        enabled: False turns the callback off.
    """

    def __init__(self, enabled: bool = True) -> None:
        super().__init__()
        self.enabled = enabled

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if not self.enabled or not isinstance(exception, SIGTERMException) or not trainer.training:
            return
        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint) and callback.save_last and callback.dirpath:
                path = Path(callback.dirpath) / f"{callback.CHECKPOINT_NAME_LAST}{callback.FILE_EXTENSION}"
                trainer.save_checkpoint(path)
                rank_zero_info(f"SIGTERM: saved {path} at step {trainer.global_step}")
