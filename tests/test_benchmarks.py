"""The benchmark scripts run at a tiny size, so an API change cannot leave them broken."""

from __future__ import annotations

import os
import subprocess
import sys

from cli_helpers import REPO


def test_throughput_script_measures_every_family(mnist_root):
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "throughput.py"), "--size", "small", "--batch-size", "4",
         "--steps", "1", "--warmup-steps", "1", "--repeats", "1", "--sample-count", "2", "--threads", "1"],
        env={**os.environ, "PYTHONPATH": str(REPO), "LIGHTNING_GEN_DATA": str(mnist_root)},
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line.split("|")[1:-1] for line in result.stdout.splitlines()
            if line.startswith("| ") and not line.startswith("| family")]
    # (the script prints its table as it goes, then whole)
    assert {row[0].strip() for row in rows} == {
        "autoencoder", "vae", "gan", "pixelcnn", "pixeltransformer", "realnvp", "diffusion"}
    for row in rows:  # Lightning img/s, plain img/s, ratio, sampling img/s: all measured
        assert all(float(cell) > 0 for cell in row[2:]), row
