"""The weight average's check shared by the families that keep one: fit a few steps while
recording the trained weights after each, then replay the average by hand."""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback


class RecordWeights(Callback):
    def __init__(self) -> None:
        self.weights: list[list[torch.Tensor]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.weights.append([p.detach().clone() for p in pl_module.network.parameters()])


def fit_and_check_the_average(model, tmp_path, steps: int, decay: float, **fit_data) -> L.Trainer:
    """Fit ``model`` (its ``network`` averaged in ``model.ema``) for ``steps`` optimizer steps on
    ``fit_data`` (Trainer.fit's keywords) and assert that the average is the one replayed by hand,
    warm-up included (ExponentialMovingAverage: decay min(decay, (1 + n) / (10 + n)) at update n)."""
    initial = [p.detach().clone() for p in model.network.parameters()]
    recorder = RecordWeights()
    trainer = L.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        callbacks=[recorder], default_root_dir=str(tmp_path))
    trainer.fit(model, **fit_data)
    assert int(model.ema.num_updates) == steps == len(recorder.weights)
    expected = initial
    for n, weights in enumerate(recorder.weights):
        weight = min(decay, (1 + n) / (10 + n))
        expected = [weight * e + (1 - weight) * w for e, w in zip(expected, weights)]
    for average, hand in zip(model.ema.averaged.parameters(), expected):
        torch.testing.assert_close(average, hand)
    return trainer
