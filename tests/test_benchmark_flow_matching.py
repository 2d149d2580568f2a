"""benchmarks/flow_matching.py mnist scores two fit checkpoints at every sampler and budget."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import lightning as L
import torch

from cli_helpers import REPO
from datamodules import MNISTDataModule
from lightning_gen import Diffusion, FlowMatching
from lightning_gen.diffusion import UNetConfig
from lightning_gen.metrics import MNISTClassifier

TINY_UNET = UNetConfig(base_channels=8, channel_multipliers=(1, 2), num_res_blocks=1, attention_levels=(),
                       norm_groups=4)


def fit_one_step(model: L.LightningModule, path) -> None:
    trainer = L.Trainer(max_steps=1, limit_val_batches=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    trainer.fit(model, datamodule=MNISTDataModule(batch_size=4, download=False))
    trainer.save_checkpoint(path)


def test_mnist_mode_scores_given_checkpoints_at_each_sampler_and_budget(mnist_root, tmp_path):
    fit_one_step(Diffusion(unet=TINY_UNET, ema_decay=0.99), tmp_path / "diffusion.ckpt")
    fit_one_step(FlowMatching(unet=TINY_UNET, ema_decay=0.99), tmp_path / "fm.ckpt")
    classifier = MNISTClassifier(base_channels=4, feature_dim=16)
    torch.save({"state_dict": classifier.state_dict(), "hyper_parameters": dict(classifier.hparams),
                "pytorch-lightning_version": L.__version__}, tmp_path / "features.ckpt")
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "flow_matching.py"), "mnist", "--checkpoints",
         str(tmp_path / "diffusion.ckpt"), str(tmp_path / "fm.ckpt"), "--fid-samples", "4",
         "--fid-batch-size", "4", "--feature-network", str(tmp_path / "features.ckpt"), "--threads", "1",
         "--results", str(tmp_path / "results")],
        env={**os.environ, "LIGHTNING_GEN_DATA": str(mnist_root), "LIGHTNING_GEN_CACHE": str(tmp_path / "cache")},
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    text = (tmp_path / "results" / "flow_matching_mnist.md").read_text()
    assert "step 1, batch 4" in text and "'base_channels': 8" in text
    rows = [[cell.strip() for cell in line.split("|")[1:-1]] for line in text.splitlines()
            if line.startswith("| Diffusion") or line.startswith("| FlowMatching")]
    evaluations = {(row[0], int(row[2])) for row in rows}
    assert evaluations == {
        *((f"Diffusion {s}", n) for s in ("ddim", "dpm_solver++") for n in (10, 20, 50)),
        *(("Diffusion heun", n) for n in (9, 19, 49)),
        *((f"FlowMatching {s}", n) for s in ("euler", "heun") for n in (10, 20, 50)),
    }
    assert all(math.isfinite(float(row[3])) and float(row[4]) >= 0 for row in rows)  # FID, seconds


def test_checkpoints_must_exist(tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "flow_matching.py"), "mnist", "--checkpoints",
         str(tmp_path / "a.ckpt"), str(tmp_path / "b.ckpt")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "no checkpoint at" in result.stderr
