"""Shared test set-up: MNIST extracted once into an ignored folder, W&B offline, small threads."""

from __future__ import annotations

import gzip
import os
import shutil
from pathlib import Path

# Idle OpenMP threads sleep instead of spinning: on a shared, loaded CPU a spinning team waits for
# descheduled threads at every parallel region, which made loops of small ops (autoregressive
# sampling: 784 steps) 100x slower. Read once when torch loads, so it is set before the import.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Under pytest-xdist (``-n 2``, the README's command) each worker is one of the machine's cores:
# one thread per worker and per process it starts, instead of two workers of two threads each
# contending for the same two cores.
PARALLEL_WORKER = "PYTEST_XDIST_WORKER" in os.environ
if PARALLEL_WORKER:
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED_MNIST = REPO.parent / "shared" / "datasets" / "MNIST" / "raw"
MNIST_NAMES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte",
               "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]


def _prepare_mnist() -> Path | None:
    """Point LIGHTNING_GEN_DATA at a folder holding MNIST/raw/*-ubyte, extracting the shared
    gzipped files into REPO/.data on first use. Returns None when no MNIST is available."""
    if "LIGHTNING_GEN_DATA" in os.environ:
        root = Path(os.environ["LIGHTNING_GEN_DATA"])
        return root if all((root / "MNIST" / "raw" / n).is_file() for n in MNIST_NAMES) else None
    root = REPO / ".data"
    raw = root / "MNIST" / "raw"
    if not all((raw / n).is_file() for n in MNIST_NAMES):
        if not all((SHARED_MNIST / f"{n}.gz").is_file() for n in MNIST_NAMES):
            return None
        raw.mkdir(parents=True, exist_ok=True)
        for name in MNIST_NAMES:
            # one partial file per process: parallel workers may extract at the same time
            partial = raw / f"{name}.{os.getpid()}.partial"
            with gzip.open(SHARED_MNIST / f"{name}.gz", "rb") as src, open(partial, "wb") as dst:
                shutil.copyfileobj(src, dst)
            partial.replace(raw / name)
    os.environ["LIGHTNING_GEN_DATA"] = str(root)
    return root


MNIST_ROOT = _prepare_mnist()
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
torch.set_num_threads(1 if PARALLEL_WORKER else min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def mnist_root() -> Path:
    """The folder holding MNIST/raw/ (the tests that need real MNIST fail without it, on purpose:
    CI provides it from ../shared/datasets)."""
    if MNIST_ROOT is None:
        raise RuntimeError(
            "MNIST not found: put the four *-ubyte.gz files in ../shared/datasets/MNIST/raw "
            "or set LIGHTNING_GEN_DATA to a folder holding MNIST/raw/*-ubyte"
        )
    return MNIST_ROOT


@pytest.fixture
def run_dir(tmp_path, monkeypatch) -> Path:
    """A temporary working directory (logs, checkpoints and outputs land there)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path
