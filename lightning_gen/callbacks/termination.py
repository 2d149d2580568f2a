"""Keep ``last.ckpt`` the last state of a fit: when SIGTERM stops it, and when it ends."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lightning_gen.callbacks.hooks import StepFreeCallback


def last_checkpoint_paths(trainer: L.Trainer) -> list[tuple[ModelCheckpoint, Path]]:
    """(callback, ``<dirpath>/last.ckpt``) of every ModelCheckpoint of the trainer that keeps a
    last checkpoint (``save_last``)."""
    return [(callback, Path(callback.dirpath) / f"{callback.CHECKPOINT_NAME_LAST}{callback.FILE_EXTENSION}")
            for callback in trainer.checkpoint_callbacks
            if isinstance(callback, ModelCheckpoint) and callback.save_last and callback.dirpath]


class CheckpointOnTerminate(StepFreeCallback):
    """When a fit is stopped by SIGTERM, save ``last.ckpt`` into the folder of every
    ModelCheckpoint that keeps one (``save_last``), so ``fit --ckpt_path last`` resumes it.

    Lightning turns SIGTERM into a SIGTERMException at the next batch boundary, after the batch's
    step, so the saved state (weights, optimizer, loop and data loader positions, random state) is
    that of a clean boundary and the resumed fit continues exactly where this one stopped.

    A SIGTERM inside a validation of the fit stops it after that validation batch. The state
    saved is then that of the last training step (validation draws from its own seeded random
    state, ``GenerativeModule.evaluation_rng``, and changes no weights), and the resumed fit goes
    on training from there without finishing that one validation: its metrics, its checkpoint
    choice and what callbacks do at its end are skipped. A SIGTERM in the sanity check, before
    the first training step, saves nothing (there is nothing to resume).

    The paths saved (none when the callback is off or no ModelCheckpoint keeps ``last.ckpt``) are
    set on the exception as ``saved_checkpoints``; the CLI's last line names them.

    Args:
        enabled: False turns the callback off.
    """

    def __init__(self, enabled: bool = True) -> None:
        super().__init__()
        self.enabled = enabled

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if (not isinstance(exception, SIGTERMException) or trainer.state.fn != TrainerFn.FITTING
                or trainer.sanity_checking):
            return
        saved: list[Path] = []
        exception.saved_checkpoints = saved
        if not self.enabled:
            return
        for _, path in last_checkpoint_paths(trainer):
            trainer.save_checkpoint(path, weights_only=False)  # all of it, to resume from
            saved.append(path)
            rank_zero_info(f"SIGTERM: saved {path} at step {trainer.global_step}")


class LastCheckpointAtFitEnd(StepFreeCallback):
    """When a fit ends (max_steps, max_epochs, max_time, early stopping), save ``last.ckpt`` into
    the folder of every ModelCheckpoint that keeps one (``save_last``), unless it saved it at
    this very step.

    Why: Lightning 2.6's ModelCheckpoint with a ``monitor`` writes ``last.ckpt`` only when it
    also writes a top-k checkpoint, that is when the monitored value improved. A fit whose
    ``val/loss`` stopped improving (a GAN's, or any fit near its end) would leave ``last.ckpt``
    at an older step, so that ``predict --ckpt_path .../last.ckpt`` sampled older weights and
    ``fit --ckpt_path last`` trained those steps again. The best checkpoint
    (``epoch=E-step=S.ckpt``) stays as the ModelCheckpoint chose it.

    Args:
        enabled: False turns the callback off (``last.ckpt`` as Lightning leaves it).
    """

    def __init__(self, enabled: bool = True) -> None:
        super().__init__()
        self.enabled = enabled

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.enabled or trainer.fast_dev_run:
            return
        for callback, path in last_checkpoint_paths(trainer):
            # Lightning's record of its own last save (read with a default: a private attribute).
            if (getattr(callback, "_last_global_step_saved", None) == trainer.global_step
                    and callback.last_model_path and Path(callback.last_model_path) == path):
                continue
            if trainer.is_global_zero and path.is_symlink():  # save_last="link": replace the link
                path.unlink()
            trainer.save_checkpoint(path, weights_only=False)  # all of it, to resume from
            callback.last_model_path = str(path)
            rank_zero_info(f"saved {path} at step {trainer.global_step}, the end of the fit")
