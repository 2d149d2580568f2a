"""Running the command line inside the test process (fast) and checking what it writes, and
fake data files in a data set's own format for configs whose data cannot be downloaded in tests."""

from __future__ import annotations

import importlib.util
import os
import pickle
from pathlib import Path

import numpy as np

from lightning_gen.cli import main

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"

# The accelerator of the command-line tests: the CPU, or a GPU where one is lent
# (LIGHTNING_GEN_TEST_ACCELERATOR=gpu), so the configs as written meet the GPU's kernels, mixed
# precision and fused optimizers, which a CPU run cannot show.
ACCELERATOR = os.environ.get("LIGHTNING_GEN_TEST_ACCELERATOR", "cpu")

# Keep CLI tests small and quiet: CSV logs instead of W&B, no progress bars, one device.
# Note: pass batch limits as integers >= 2 ("1" parses as the float 1.0, i.e. 100% of the batches).
QUICK = ["--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir", "logs",
         "--trainer.enable_progress_bar", "false", "--trainer.accelerator", ACCELERATOR, "--trainer.devices", "1"]


def load_benchmark(name: str):
    """The script ``benchmarks/<name>.py`` as a module (the folder is no package)."""
    spec = importlib.util.spec_from_file_location(f"{name}_benchmark", REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_cli(*args: str, run: bool = True):
    """``python cli.py ARGS`` in this process; returns the LightningCLI object (``run=False``:
    instantiated, not run)."""
    return main(list(args), run=run)


def fit_and_predict(config: str, work_dir: Path, *extra: str, predict_extra: tuple[str, ...] = ()) -> Path:
    """fit a config for two steps, then predict from the saved checkpoint; returns the output folder."""
    config_path = str(CONFIGS / config)
    checkpoint = work_dir / "model.ckpt"
    cli = run_cli("fit", "--config", config_path, *QUICK, "--trainer.max_steps", "2",
                  "--trainer.limit_val_batches", "2", "--trainer.num_sanity_val_steps", "0",
                  "--trainer.callbacks", "[]", *extra)
    cli.trainer.save_checkpoint(checkpoint)
    output_dir = work_dir / "predictions"
    run_cli("predict", "--config", config_path, *QUICK, "--trainer.callbacks", "[]",
            "--ckpt_path", str(checkpoint), "--prediction_writer.output_dir", str(output_dir),
            *extra, *predict_extra)
    return output_dir


def write_cifar10(data_dir: Path, per_batch: int = 4, test_count: int = 3, seed: int = 0) -> dict:
    """CIFAR-10's python version with a few random images: five training batches, the test
    batch and batches.meta, each a pickled dict as the original (bytes keys)."""
    rng = np.random.default_rng(seed)
    folder = data_dir / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    written = {}
    for name, count in [*[(f"data_batch_{i}", per_batch) for i in range(1, 6)], ("test_batch", test_count)]:
        data = rng.integers(0, 256, (count, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, count).tolist()
        with open(folder / name, "wb") as handle:
            pickle.dump({b"batch_label": name.encode(), b"data": data, b"labels": labels}, handle, protocol=2)
        written[name] = (data, labels)
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship",
             b"truck"]
    with open(folder / "batches.meta", "wb") as handle:
        pickle.dump({b"label_names": names, b"num_cases_per_batch": per_batch, b"num_vis": 3072}, handle)
    return written
