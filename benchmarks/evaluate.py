"""Train and evaluate every family with its config under a time budget; write a markdown table.

Each entry runs two commands of the ordinary CLI in a scratch folder:

    python cli.py fit  --config configs/X.yaml --trainer.max_time 00:00:MM:SS ...   (the config's
        max_epochs/max_steps still apply: training stops at whichever comes first)
    python cli.py test --config configs/X.yaml --ckpt_path <last.ckpt> \\
        --image_quality.feature_network <checkpoint> --image_quality.num_samples N ...

(``cli.py test`` runs FID/KID for MNIST models and MMD/sliced Wasserstein for 2-D models by
itself; the options only set the feature network and the sample counts) and reads the test metrics from the CSV log: test/nll and test/bpd where the model has a
likelihood, test/fid and test/kid (MNIST feature network) for images, test/mmd and
test/sliced_wasserstein for 2-D data.

Full size on a GPU (the feature network first: python cli.py features fit --config configs/mnist_features.yaml):

    python benchmarks/evaluate.py --budget-minutes 30 --accelerator gpu --num-samples 10000

Small on a CPU:

    python benchmarks/evaluate.py --budget-minutes 0.5 --accelerator cpu --num-samples 200 \\
        --test-batches 4 --val-batches 4

The feature network defaults to $LIGHTNING_GEN_FEATURE_NETWORK or checkpoints/mnist_features/last.ckpt
of the repository; without one, the MNIST rows have no FID/KID.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the benchmarks' shared helpers
from arguments import count, count_or_zero  # noqa: E402
METRICS = ["test/nll", "test/bpd", "test/fid", "test/kid", "test/mmd", "test/sliced_wasserstein"]


@dataclass
class Entry:
    config: str
    family: str
    model: str
    data: str
    sample_options: dict = field(default_factory=dict)
    fit_args: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.config.removesuffix(".yaml")

    @property
    def is_image(self) -> bool:
        return self.data == "MNIST"


ENTRIES = [
    Entry("vae_mnist.yaml", "VAE", "conv VAE (Bernoulli)", "MNIST"),
    Entry("gan_mnist.yaml", "GAN", "DCGAN", "MNIST"),
    Entry("pixelcnn_mnist.yaml", "autoregressive", "PixelCNN", "MNIST"),
    Entry("realnvp_mnist.yaml", "flow", "RealNVP (multi-scale)", "MNIST"),
    Entry("diffusion_mnist.yaml", "diffusion", "DDPM, DDIM 50 steps", "MNIST",
          {"sampler": "ddim", "steps": 50}),
    Entry("vae_8gaussians.yaml", "VAE", "MLP VAE (Gaussian)", "8gaussians"),
    Entry("gan_8gaussians.yaml", "GAN", "MLP GAN", "8gaussians"),
    Entry("realnvp_moons.yaml", "flow", "RealNVP (vector)", "moons"),
    Entry("diffusion_moons.yaml", "diffusion", "DDPM MLP", "moons"),
]


def run(command: list[str], cwd: Path, log: Path) -> float:
    """Run a CLI command, tee its output to ``log``; return its wall time. Raises on failure."""
    start = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": os.environ.get("WANDB_MODE", "offline")}
    with open(log, "w") as file:
        result = subprocess.run(command, cwd=cwd, env=env, stdout=file, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed (exit {result.returncode}); see {log}")
    return time.perf_counter() - start


def last_metrics(log_dir: Path) -> dict[str, float]:
    values: dict[str, float] = {}
    for path in sorted(log_dir.glob("**/metrics.csv")):
        with open(path) as file:
            for row in csv.DictReader(file):
                values.update({k: float(v) for k, v in row.items() if v not in ("", None)})
    return values


def evaluate(entry: Entry, args: argparse.Namespace, work: Path) -> dict[str, object]:
    work.mkdir(parents=True, exist_ok=True)
    config = str(REPO / "configs" / entry.config)
    budget_seconds = int(args.budget_minutes * 60)
    common = ["--trainer.accelerator", args.accelerator, "--trainer.devices", "1",
              "--trainer.enable_progress_bar", "false",
              "--trainer.logger", "lightning.pytorch.loggers.CSVLogger",
              "--trainer.logger.save_dir", "logs"]
    if args.val_batches:
        common += ["--trainer.limit_val_batches", str(args.val_batches)]
    fit_args = list(entry.fit_args)
    if entry.family == "VAE":  # the test bound's K is a hyperparameter saved in the checkpoint
        fit_args += ["--model.init_args.test_importance_samples", str(args.vae_test_importance_samples)]
    train_seconds = run(
        [sys.executable, str(REPO / "cli.py"), "fit", "--config", config, *common,
         "--trainer.logger.name", "fit",
         "--trainer.max_time", f"00:00:{budget_seconds // 60:02d}:{budget_seconds % 60:02d}",
         "--trainer.num_sanity_val_steps", "0", *fit_args],
        work, work / "fit.log")
    fitted = last_metrics(work / "logs" / "fit")
    checkpoint = work / "checkpoints" / entry.name / "last.ckpt"
    if entry.is_image:
        quality = ["--image_quality.num_samples", str(args.num_samples),
                   "--image_quality.kid_subset_size", str(min(1000, args.num_samples))]
        if args.feature_network is not None:
            quality += ["--image_quality.feature_network", args.feature_network]
        if entry.sample_options:
            quality += ["--image_quality.sample_options", json.dumps(entry.sample_options)]
    else:
        quality = ["--sample_distance.num_samples", str(min(args.num_samples, 5000))]
        if entry.sample_options:
            quality += ["--sample_distance.sample_options", json.dumps(entry.sample_options)]
    test_common = common + (["--trainer.limit_test_batches", str(args.test_batches)]
                            if args.test_batches else [])
    test_seconds = run(
        [sys.executable, str(REPO / "cli.py"), "test", "--config", config, *test_common,
         "--trainer.logger.name", "test", "--ckpt_path", str(checkpoint), *quality],
        work, work / "test.log")
    tested = last_metrics(work / "logs" / "test")
    return {"entry": entry, "train_seconds": train_seconds, "test_seconds": test_seconds,
            "steps": int(fitted.get("step", -1)) + 1, **{k: tested.get(k) for k in METRICS}}


def table(rows: list[dict], hardware: str, date: str) -> str:
    def number(value, digits=3):
        return "–" if value is None else f"{value:.{digits}g}"

    lines = ["| family | model | data | config | steps | train s | test/nll (nats) | test/bpd | "
             "test/fid | test/kid | test/mmd | test/sliced_wasserstein |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        entry = row["entry"]
        if "error" in row:
            lines.append(f"| {entry.family} | {entry.model} | {entry.data} | {entry.config} | "
                         f"failed: {row['error']} |||||||||")
            continue
        lines.append(
            f"| {entry.family} | {entry.model} | {entry.data} | {entry.config} | {row['steps']} | "
            f"{row['train_seconds']:.0f} | {number(row['test/nll'], 4)} | {number(row['test/bpd'])} | "
            f"{number(row['test/fid'])} | {number(row['test/kid'])} | {number(row['test/mmd'])} | "
            f"{number(row['test/sliced_wasserstein'])} |")
    lines.append("")
    lines.append(f"Hardware: {hardware}. Date: {date}. Train time is the wall time of `cli.py fit` "
                 "(start-up included) under `--trainer.max_time`.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget-minutes", type=float, default=10.0, help="training time per model")
    parser.add_argument("--accelerator", default="auto", choices=["auto", "cpu", "gpu"])
    parser.add_argument("--feature-network", default=None,
                        help="'inception' or an MNISTClassifier checkpoint (FID/KID of MNIST models); "
                             "default: $LIGHTNING_GEN_FEATURE_NETWORK or checkpoints/mnist_features/"
                             "last.ckpt of the repository when it exists")
    parser.add_argument("--num-samples", type=count, default=10000, help="generated samples for FID/KID, MMD, SW")
    parser.add_argument("--val-batches", type=count_or_zero, default=0, help="limit validation batches (0: all)")
    parser.add_argument("--test-batches", type=count_or_zero, default=0, help="limit test batches (0: all)")
    parser.add_argument("--vae-test-importance-samples", type=count, default=1000)
    parser.add_argument("--only", nargs="*", default=None, help="config names to run (default: all)")
    parser.add_argument("--work-dir", default=str(Path(tempfile.gettempdir()) / "lightning-gen-evaluate"))
    parser.add_argument("--output", default=None, help="write the markdown table here too")
    parser.add_argument("--hardware", default=None, help="hardware description for the table")
    args = parser.parse_args()
    if args.budget_minutes <= 0 or args.num_samples < 2:
        parser.error("--budget-minutes must be > 0 and --num-samples >= 2")
    if args.feature_network is None:
        default = Path(os.environ.get("LIGHTNING_GEN_FEATURE_NETWORK")
                       or REPO / "checkpoints" / "mnist_features" / "last.ckpt")
        if default.is_file():
            args.feature_network = str(default.resolve())
        else:
            print(f"No feature network at {default}: MNIST rows without FID/KID "
                  "(python cli.py features fit --config configs/mnist_features.yaml)", file=sys.stderr)
    elif args.feature_network != "inception":
        args.feature_network = str(Path(args.feature_network).resolve())  # the CLI runs elsewhere
    entries = [e for e in ENTRIES if args.only is None or e.name in args.only or e.config in args.only]
    if not entries:
        parser.error(f"--only matched nothing; names: {[e.name for e in ENTRIES]}")
    hardware = args.hardware or f"{platform.processor() or platform.machine()}, accelerator={args.accelerator}"
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    rows = []
    for entry in entries:
        print(f"== {entry.name}", flush=True)
        try:
            rows.append(evaluate(entry, args, Path(args.work_dir) / entry.name))
        except Exception as error:  # one failing family should not hide the others' numbers
            rows.append({"entry": entry, "error": str(error)[:200]})
        print(table(rows[-1:], hardware, date).splitlines()[2], flush=True)
    markdown = table(rows, hardware, date)
    print(markdown)
    if args.output:
        Path(args.output).write_text(markdown + "\n")


if __name__ == "__main__":
    main()
