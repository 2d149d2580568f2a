"""Laptop presets: fit and predict each ``configs/cpu/<family>_mnist.yaml`` as a user would, then
score the samples.

For each preset, in a scratch folder (``--scratch``, default ``benchmarks/runs/laptop/``, ignored
by git), two ordinary CLI commands:

    python cli.py fit --config configs/cpu/X.yaml                       (stops by itself: max_time)
    python cli.py predict --config configs/cpu/X.yaml --ckpt_path checkpoints/cpu/X/last.ckpt \\
        --data.init_args.num_predict_samples 1000

then the ``samples.pt`` predict wrote is scored with the MNIST classifier
(``lightning_gen.metrics.digit_scores``: mean maximum softmax, entropy of the predicted-label
histogram) and its FID against the 10,000 test digits (same network's features). A sample is
"recognisable" at confidence >= 0.9 and label entropy >= 2.2 nats (real test digits: 0.99 and
2.29 with configs/mnist_features.yaml's network). A class-conditional preset draws sample i for
the i-th test digit's label; its row adds the label agreement (the fraction of samples the
classifier reads as the digit asked for), since its label entropy is that of the labels asked for.

Writes ``--output`` (a markdown table: family, steps done, fit minutes, predict seconds,
confidence and its standard error, label entropy, label agreement, FID, load average, the
machine's speed: GFLOP/s
of a matrix product before the fit, the share of CPU time stolen by other tenants during it, and
the precision the fit ran in) and
``laptop_<family>.png`` (the first 64 samples) beside it. Any failing command stops the run with
its error (exit 1); nothing is skipped.

    python benchmarks/laptop.py                                  # every preset, ~70 minutes
    python benchmarks/laptop.py --families gan_mnist --minutes 3 # a shorter trial (the table says so)
    # predict again from the checkpoints an earlier run left in --scratch, with other predict options
    python benchmarks/laptop.py --families gan_mnist --scratch <earlier scratch> --predict-only \
        --predict-args="--model.init_args.predict_rejection_gamma 0" --output <another table>

The feature network defaults to $LIGHTNING_GEN_FEATURE_NETWORK or checkpoints/mnist_features/
last.ckpt (``python cli.py features fit --config configs/mnist_features.yaml``).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torchvision.utils import save_image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the benchmarks' shared helpers
from arguments import count, feature_network_file  # noqa: E402

from lightning_gen.cli import cpu_bf16_units  # noqa: E402
from lightning_gen.metrics import (  # noqa: E402
    digit_scores, extract_features, fid_kid_from_features, load_feature_network, load_mnist_classifier,
    real_features,
)

PRESETS = REPO / "configs" / "cpu"
FAMILIES = ("gan_mnist", "diffusion_mnist", "flow_matching_mnist", "pixelcnn_mnist",
            "pixeltransformer_mnist", "vae_mnist")
MIN_CONFIDENCE, MIN_LABEL_ENTROPY = 0.9, 2.2


class CommandFailed(RuntimeError):
    pass


def run(command: list[str], cwd: Path) -> float:
    """Run a CLI command in ``cwd``; its wall-clock seconds. Raises with the output's tail on failure."""
    environment = {**os.environ, "PYTHONPATH": str(REPO)}
    environment.setdefault("WANDB_MODE", "offline")
    # Idle OpenMP threads sleep instead of spinning: on a machine where other jobs run, a spinning
    # team waits for descheduled threads at every parallel region (measured here: a DCGAN trained
    # 429 batches in ten minutes, against 659 in one minute with the machine to itself).
    environment.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    start = time.perf_counter()
    result = subprocess.run(command, cwd=cwd, env=environment, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    (cwd / f"{command[2]}.log").write_text(result.stdout + result.stderr)
    if result.returncode != 0:
        raise CommandFailed(f"{' '.join(command)} exited {result.returncode}:\n{result.stderr[-3000:]}")
    return seconds


def reference_gflops(size: int = 512, products: int = 20, repeats: int = 5) -> float:
    """GFLOP/s of float32 matrix products on torch's threads (median of ``repeats``): how fast
    the machine is right before a fit, so that rows from different hours can be compared (the
    shared 2-core machine has run the same preset at 700 and at 4,513 batches in ten minutes)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(products):
            a @ b
        times.append(time.perf_counter() - start)
    return 2 * size**3 * products / statistics.median(times) / 1e9


def cpu_times() -> tuple[int, int] | None:
    """(stolen, total) CPU time in ticks since boot from /proc/stat (Linux), None elsewhere.
    Stolen time is what a virtual machine's CPUs waited while the host ran other tenants; the
    load average does not show it."""
    try:
        fields = [int(value) for value in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    return (fields[7] if len(fields) > 7 else 0), sum(fields[:8])


def stolen_share(before: tuple[int, int] | None, after: tuple[int, int] | None) -> float | None:
    if before is None or after is None or after[1] <= before[1]:
        return None
    return (after[0] - before[0]) / (after[1] - before[1])


def batches_trained(state: dict) -> int:
    """Training batches of the fit (the GAN's global_step counts two optimizer steps per batch)."""
    return int(state["loops"]["fit_loop"]["epoch_loop.batch_progress"]["total"]["completed"])


def fit_precision(folder: Path) -> str:
    """The precision the fit ran in, from the config.yaml LightningCLI saved (which records the
    choice of ``bf16_on_native_cpu``)."""
    import yaml

    saved = sorted(folder.rglob("config.yaml"))
    if len(saved) != 1:
        raise CommandFailed(f"{folder}: expected one saved config.yaml of the fit, found {len(saved)}")
    return str(yaml.safe_load(saved[0].read_text())["trainer"]["precision"])


def max_time(minutes: float) -> str:
    seconds = round(minutes * 60)
    return f"00:{seconds // 3600:02d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def test_digit_features(features, feature_network: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The feature network's features of the 10,000 MNIST test digits (cached by
    ``real_features``) and their labels: what samples are scored against."""
    from datamodules import MNISTDataModule

    test = MNISTDataModule(download=False)
    test.setup("test")
    real = real_features(features, feature_network, torch.cat([x for x, _ in test.test_dataloader()]),
                         name="MNISTDataModule")
    return real, test.test_set.labels


def samples_fid(real: torch.Tensor, features, images: torch.Tensor) -> float:
    """FID of ``images`` (N, 1, 28, 28) in [0, 1] against the test digits' features ``real``."""
    fid, _ = fid_kid_from_features(real, extract_features(features, images), kid_subset_size=min(1000, len(images)))
    return float(fid)


def evaluate(family: str, args: argparse.Namespace, scorer, features, real, test_labels) -> dict:
    config = PRESETS / f"{family}.yaml"
    folder = args.scratch / family
    checkpoint = folder / "checkpoints" / "cpu" / family / "last.ckpt"
    cli = [sys.executable, str(REPO / "cli.py")]
    if args.predict_only:  # the fit of an earlier run: its checkpoint, no fit figures
        if not checkpoint.is_file():
            raise CommandFailed(f"--predict-only: no checkpoint {checkpoint} from an earlier run")
        # (nor the fit's precision: each predict rewrites the saved config.yaml the fit left)
        fit_seconds = load = gflops = stolen = precision = None
    else:
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        load = os.getloadavg()[0]
        gflops = reference_gflops()
        fit = cli + ["fit", "--config", str(config)]
        if args.minutes is not None:
            fit += ["--trainer.max_time", max_time(args.minutes)]
        before = cpu_times()
        fit_seconds = run(fit, folder)
        stolen = stolen_share(before, cpu_times())
        precision = fit_precision(folder)
    predict_seconds = run(cli + ["predict", "--config", str(config), "--ckpt_path", str(checkpoint),
                                 "--data.init_args.num_predict_samples", str(args.num_samples),
                                 *args.predict_args.split()], folder)
    samples = torch.load(folder / "outputs" / "cpu" / family / "samples.pt")  # uint8 (N, 1, 28, 28)
    if len(samples) != args.num_samples:
        raise CommandFailed(f"{family}: predict wrote {len(samples)} samples, asked {args.num_samples}")
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    # A class-conditional model draws sample i for the i-th test label (the predict set's labels).
    conditional = state["hyper_parameters"].get("num_classes") is not None
    scores = digit_scores(samples, scorer, labels=test_labels[:len(samples)] if conditional else None)
    images = samples.float() / 255
    fid = samples_fid(real, features, images)
    save_image(images[:64], args.output.parent / f"laptop_{family}.png", nrow=8, padding=2, pad_value=0.5)
    return dict(family=family, steps=batches_trained(state),
                fit_minutes=None if fit_seconds is None else fit_seconds / 60,
                predict_seconds=predict_seconds, confidence=scores.confidence,
                confidence_standard_error=scores.confidence_standard_error,
                label_entropy=scores.label_entropy, label_agreement=scores.label_agreement,
                fid=fid, load=load, gflops=gflops, stolen=stolen, precision=precision,
                recognisable=scores.recognisable(MIN_CONFIDENCE, MIN_LABEL_ENTROPY))


def table(rows: list[dict], args: argparse.Namespace, feature_network: str) -> list[str]:
    budget = "each preset's own max_time (10 minutes)" if args.minutes is None else \
        f"max_time overridden to {args.minutes} minutes (a trial, not the presets as written)"
    if args.predict_only:
        budget = (f"none here: predict only, from the checkpoints of an earlier run in {args.scratch}"
                  + (f", with `{args.predict_args}`" if args.predict_args else ""))
    lines = [
        f"# Laptop presets on MNIST ({datetime.date.today()})",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
        f"{torch.__version__}; fit budget: {budget}. Scores of {args.num_samples} predict samples with "
        f"the MNIST classifier {feature_network}: confidence = mean max softmax (goal >= {MIN_CONFIDENCE}; "
        f"s.e.: its standard error, the spread of the mean between draws of as many samples), "
        f"label entropy in nats (goal >= {MIN_LABEL_ENTROPY}; uniform 2.303); FID against the 10,000 "
        f"test digits (few samples bias FID upwards); label agreement (class-conditional presets): "
        f"the fraction of samples the classifier reads as the digit they were drawn for. Fit minutes "
        f"are the whole command (start-up, validation, checkpoints included); load = 1-minute load "
        f"average before the fit; GFLOP/s = float32 512x512 matrix products on torch's "
        f"{torch.get_num_threads()} threads right before the fit; stolen = the share of the CPU time "
        f"during the fit that the host gave to other virtual machines (/proc/stat; '-' where there "
        f"is none); precision = the fit's (bf16_on_native_cpu chooses bf16-mixed on CPUs with bf16 "
        f"arithmetic, AMX or AVX512-BF16; this one has {', '.join(cpu_bf16_units()) or 'none'}); "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'PASSIVE')}.",
        "",
        f"    python benchmarks/laptop.py {' '.join(sys.argv[1:])}",
        "",
        "| family | steps | fit min | predict s | confidence | s.e. | label entropy | label agreement | FID "
        "| goal met | load | GFLOP/s | stolen | precision |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---|",
    ]
    def shown(value, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    for row in rows:
        lines.append(
            f"| {row['family']} | {row['steps']} | {shown(row['fit_minutes'], '.1f')} | {row['predict_seconds']:.0f} "
            f"| {row['confidence']:.3f} | {row['confidence_standard_error']:.3f} | {row['label_entropy']:.3f} "
            f"| {shown(row['label_agreement'], '.3f')} "
            f"| {row['fid']:.1f} | {'yes' if row['recognisable'] else 'no'} | {shown(row['load'], '.1f')} "
            f"| {shown(row['gflops'], '.0f')} | {shown(row['stolen'], '.0%')} | {shown(row['precision'], 's')} |")
    lines += ["", *[f"![{row['family']}](laptop_{row['family']}.png)" for row in rows]]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", default=",".join(FAMILIES),
                        help=f"comma-separated preset names from configs/cpu/ (default: {','.join(FAMILIES)})")
    parser.add_argument("--minutes", type=float, default=None,
                        help="override the presets' max_time (trials; default: as written)")
    parser.add_argument("--num-samples", type=count, default=1000)
    parser.add_argument("--feature-network", default=None)
    parser.add_argument("--scratch", type=Path, default=REPO / "benchmarks" / "runs" / "laptop")
    parser.add_argument("--output", type=Path, default=REPO / "benchmarks" / "results" / "laptop.md")
    parser.add_argument("--predict-only", action="store_true",
                        help="no fit: predict from the checkpoints an earlier run left in --scratch")
    parser.add_argument("--predict-args", default="",
                        help='more predict arguments, e.g. "--model.init_args.predict_rejection_gamma 0"')
    args = parser.parse_args(argv)
    families = [name for name in args.families.split(",") if name]
    unknown = [name for name in families if not (PRESETS / f"{name}.yaml").is_file()]
    if unknown or not families:
        parser.error(f"no preset configs/cpu/<name>.yaml for {unknown or 'an empty --families'}; "
                     f"choose from {', '.join(FAMILIES)}")
    if args.num_samples < 2 or (args.minutes is not None and args.minutes <= 0):
        parser.error("--num-samples must be >= 2 and --minutes > 0")
    if args.predict_only and args.minutes is not None:
        parser.error("--minutes sets the fit's budget; --predict-only runs no fit")
    feature_network = feature_network_file(parser, args.feature_network)
    scorer = load_mnist_classifier(feature_network)
    features = load_feature_network(feature_network)
    real, test_labels = test_digit_features(features, feature_network)
    args.scratch.mkdir(parents=True, exist_ok=True)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for family in families:
        try:
            rows.append(evaluate(family, args, scorer, features, real, test_labels))
        except CommandFailed as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
        print(rows[-1], flush=True)
        args.output.write_text("\n".join(table(rows, args, feature_network)) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
