"""Flow matching against diffusion (FID per network evaluation) and against RealNVP (2-D NLL).

mnist: train ``Diffusion`` and ``FlowMatching`` with the same U-Net, batch, optimizer and number
of optimizer steps on MNIST (diffusion for --minutes, flow matching for as many steps), then
draw --fid-samples samples from each EMA network with every sampler at 10, 20 and 50 network
evaluations and score them with FID against the 10,000 test images through the project's MNIST
feature network (--feature-network, default $LIGHTNING_GEN_FEATURE_NETWORK or
checkpoints/mnist_features/last.ckpt, trained by
``python cli.py features fit --config configs/mnist_features.yaml``).

    python benchmarks/flow_matching.py mnist --minutes 12 --fid-samples 1000 --threads 2    # CPU

toy: on 8gaussians and checkerboard, train ``FlowMatching`` and ``RealNVP`` from their configs
(configs/flow_matching_<name>.yaml, configs/realnvp_<name>.yaml) for the same --minutes each,
then report each model's test NLL (nats, 5,000 held-out points) beside the distribution's true
entropy, the floor any model's expected NLL sits on.

    python benchmarks/flow_matching.py toy --minutes 3 --threads 2

Each writes a markdown table to benchmarks/results/ (and prints it); checkpoints go to
benchmarks/runs/ (ignored by git), and --skip-training evaluates the ones there. ``mnist
--checkpoints D F`` evaluates two checkpoints of ``cli.py fit`` instead, e.g. the laptop presets'
(configs/cpu/diffusion_mnist.yaml and configs/cpu/flow_matching_mnist.yaml: one U-Net, ten minutes each):

    python benchmarks/flow_matching.py mnist --threads 2 --checkpoints \\
        benchmarks/runs/laptop/diffusion_mnist/checkpoints/cpu/diffusion_mnist/last.ckpt \\
        benchmarks/runs/laptop/flow_matching_mnist/checkpoints/cpu/flow_matching_mnist/last.ckpt
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import sys
import time
from pathlib import Path

import lightning as L
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the benchmarks' shared helpers
from arguments import apply_threads, count, feature_network_file  # noqa: E402

from datamodules import MNISTDataModule, ToyDataModule  # noqa: E402
from datamodules.toy import TOY_ENTROPY  # noqa: E402
from lightning_gen import Diffusion, FlowMatching, RealNVP  # noqa: E402
from lightning_gen.diffusion import UNetConfig  # noqa: E402

RUNS = REPO / "benchmarks" / "runs" / "flow_matching"
RESULTS = REPO / "benchmarks" / "results"
# A U-Net sized for a CPU budget (about 1M parameters); both families train exactly this network.
CPU_UNET = UNetConfig(base_channels=32, channel_multipliers=(1, 2, 2), num_res_blocks=1,
                      attention_levels=(2,), num_heads=4)
EVALUATIONS = (10, 20, 50)


def hardware() -> str:
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def trainer(root: Path, **limits) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                     default_root_dir=str(root), enable_checkpointing=False, **limits)


def train(model: L.LightningModule, data: L.LightningDataModule, path: Path, **limits) -> dict:
    L.seed_everything(0)
    run = trainer(path.parent, **limits)
    start = time.perf_counter()
    run.fit(model, datamodule=data)
    minutes = (time.perf_counter() - start) / 60
    run.save_checkpoint(path)
    torch.save({"steps": run.global_step, "minutes": minutes}, path.with_suffix(".json.pt"))
    return {"steps": run.global_step, "minutes": minutes}


def run_record(path: Path) -> dict:
    return torch.load(path.with_suffix(".json.pt"), weights_only=True)


# ------------------------------------------------------------------------------------ MNIST
def diffusion_samplers() -> list[tuple[str, dict, int]]:
    """(label, sample options, network evaluations) for Diffusion at 10/20/50 evaluations:
    ``steps`` counts evaluations for every sampler, but Heun's last step costs one, so an even
    budget gives it one fewer (9, 19, 49)."""
    rows = []
    for sampler in ("ddim", "dpm_solver++", "heun"):
        for evaluations in EVALUATIONS:
            spent = 2 * math.ceil(evaluations / 2) - 1 if sampler == "heun" else evaluations
            rows.append((f"Diffusion {sampler}", {"sampler": sampler, "steps": evaluations}, spent))
    return rows


def flow_matching_samplers() -> list[tuple[str, dict, int]]:
    rows = []
    for sampler, per_step in (("euler", 1), ("heun", 2)):
        for evaluations in EVALUATIONS:
            rows.append((f"FlowMatching {sampler}", {"sampler": sampler, "steps": evaluations // per_step},
                         evaluations))
    return rows


def checkpoint_description(paths: dict[str, Path], models: dict[str, L.LightningModule]) -> str:
    """What the two checkpoints of ``--checkpoints`` hold: network, optimizer, steps, data batch."""
    parts = []
    for family, path in paths.items():
        state = torch.load(path, map_location="cpu", weights_only=False)
        batch = state.get("datamodule_hyper_parameters", {}).get("batch_size", "?")
        hparams = models[family].hparams
        options = {key: hparams[key] for key in ("learning_rate", "warmup_steps", "lr_schedule", "ema_decay")
                   if key in hparams}
        parts.append(f"{family}: {path} (step {state['global_step']}, batch {batch}, {options}, "
                     f"U-Net {dict(hparams['unet'])})")
    return "Models from checkpoints, " + "; ".join(parts) + "."


def mnist(args: argparse.Namespace) -> None:
    from lightning_gen.metrics import extract_features, fid_kid_from_features, load_feature_network, real_features

    feature_network = args.feature_network
    if args.checkpoints:
        paths = dict(zip(("diffusion", "flow_matching"), map(Path, args.checkpoints)))
    else:
        RUNS.mkdir(parents=True, exist_ok=True)
        common = dict(unet=CPU_UNET, ema_decay=0.999, learning_rate=args.learning_rate, warmup_steps=200)
        paths = {"diffusion": RUNS / "diffusion_mnist.ckpt", "flow_matching": RUNS / "flow_matching_mnist.ckpt"}
    if not args.skip_training and not args.checkpoints:
        data = MNISTDataModule(batch_size=args.batch_size, download=False)
        record = train(Diffusion(data.data_shape, **common), data, paths["diffusion"],
                       max_time=datetime.timedelta(minutes=args.minutes))
        print(f"diffusion: {record}", flush=True)
        record = train(FlowMatching(data.data_shape, **common), data, paths["flow_matching"],
                       max_steps=record["steps"])
        print(f"flow matching: {record}", flush=True)
    models = {"diffusion": Diffusion.load_from_checkpoint(paths["diffusion"], map_location="cpu").eval(),
              "flow_matching": FlowMatching.load_from_checkpoint(paths["flow_matching"], map_location="cpu").eval()}
    network = load_feature_network(feature_network)
    test = MNISTDataModule(download=False)
    test.setup("test")
    images = torch.cat([batch[0] for batch in test.test_dataloader()])
    real = real_features(network, feature_network, images)
    rows = []
    for family, samplers in (("diffusion", diffusion_samplers()), ("flow_matching", flow_matching_samplers())):
        for label, options, evaluations in samplers:
            torch.manual_seed(2)
            start = time.perf_counter()
            fake = torch.cat([
                extract_features(network, models[family].sample(min(args.fid_batch_size, args.fid_samples - done),
                                                                **options))
                for done in range(0, args.fid_samples, args.fid_batch_size)])
            seconds = time.perf_counter() - start
            fid, _ = fid_kid_from_features(real, fake, kid_subset_size=min(1000, args.fid_samples))
            rows.append((label, options["steps"], evaluations, float(fid), seconds))
            print(rows[-1], flush=True)
    if args.checkpoints:
        described = checkpoint_description(paths, models)
    else:
        records = {family: run_record(path) for family, path in paths.items()}
        described = (
            f"Both models: the U-Net {CPU_UNET}, batch {args.batch_size}, AdamW "
            f"lr {args.learning_rate} (200 warm-up steps), EMA 0.999; diffusion T = 1000 linear, epsilon "
            f"prediction; flow matching independent coupling. Diffusion trained "
            f"{records['diffusion']['steps']} steps in {records['diffusion']['minutes']:.1f} min, flow "
            f"matching {records['flow_matching']['steps']} steps in {records['flow_matching']['minutes']:.1f} min.")
    lines = [
        f"# Flow matching and diffusion on MNIST: FID per network evaluation ({datetime.date.today()})",
        "",
        f"Hardware: {hardware()}. {described}",
        f"FID of {args.fid_samples} samples (EMA weights, seed 2) against the 10,000 test images, MNIST "
        f"feature network {feature_network}. Few samples bias FID upwards: compare rows, not papers.",
        "",
        f"    python benchmarks/flow_matching.py mnist {' '.join(sys.argv[2:])}",
        "",
        "| model and sampler | steps | network evaluations | FID | sampling seconds |",
        "|---|---:|---:|---:|---:|",
        *[f"| {label} | {steps} | {evaluations} | {fid:.2f} | {seconds:.0f} |"
          for label, steps, evaluations, fid, seconds in rows],
    ]
    write(args.results / "flow_matching_mnist.md", lines)


# -------------------------------------------------------------------------------------- toy
def build_from_config(name: str, data_shape) -> L.LightningModule:
    config = yaml.safe_load((REPO / "configs" / name).read_text())["model"]
    classes = {"lightning_gen.FlowMatching": FlowMatching, "lightning_gen.RealNVP": RealNVP}
    init_args = dict(config.get("init_args", {}))
    # A constant learning rate: a cosine schedule sized for the config's max_steps would be cut
    # short by the time budget at a different point for each model.
    init_args.pop("lr_schedule", None)
    return classes[config["class_path"]](data_shape, **init_args)


def toy(args: argparse.Namespace) -> None:
    RUNS.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in ("8gaussians", "checkerboard"):
        data = ToyDataModule(name, batch_size=256)
        data.setup("test")
        test_points = torch.cat([batch[0] for batch in data.test_dataloader()])
        for family, config in (("FlowMatching", f"flow_matching_{name}.yaml"), ("RealNVP", f"realnvp_{name}.yaml")):
            path = RUNS / f"{family}_{name}.ckpt"
            model_class = FlowMatching if family == "FlowMatching" else RealNVP
            if not args.skip_training:
                record = train(build_from_config(config, data.data_shape), data, path,
                               max_time=datetime.timedelta(minutes=args.minutes))
                print(f"{family} {name}: {record}", flush=True)
            record = run_record(path)
            model = model_class.load_from_checkpoint(path, map_location="cpu").eval()
            start = time.perf_counter()
            with torch.no_grad():
                nll = torch.cat([-model.log_prob(chunk) for chunk in test_points.split(1000)]).mean().item()
            rows.append((name, family, record["steps"], record["minutes"], nll, TOY_ENTROPY[name],
                         time.perf_counter() - start))
            print(rows[-1], flush=True)
    lines = [
        f"# Flow matching and RealNVP on 2-D data: test NLL at equal training minutes ({datetime.date.today()})",
        "",
        f"Hardware: {hardware()}. Each model: its config (configs/flow_matching_<name>.yaml, "
        f"configs/realnvp_<name>.yaml) with a constant learning rate, trained for {args.minutes} "
        "minutes; test NLL in nats per point over 5,000 held-out points (flow matching: exact "
        "divergence, 20 Heun steps, EMA weights). The true entropy is the lowest expected NLL.",
        "",
        f"    python benchmarks/flow_matching.py toy {' '.join(sys.argv[2:])}",
        "",
        "| data | model | steps | minutes | test NLL (nats) | true entropy | NLL - entropy | scoring seconds |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
        *[f"| {name} | {family} | {steps} | {minutes:.1f} | {nll:.3f} | {entropy:.3f} | {nll - entropy:.3f} | {seconds:.1f} |"
          for name, family, steps, minutes, nll, entropy, seconds in rows],
    ]
    write(args.results / "flow_matching_2d.md", lines)


def write(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("mnist", "toy"))
    parser.add_argument("--minutes", type=float, default=3.0, help="training minutes per model")
    parser.add_argument("--threads", type=count, default=None)
    parser.add_argument("--skip-training", action="store_true", help="evaluate the checkpoints in benchmarks/runs/")
    parser.add_argument("--checkpoints", nargs=2, metavar=("DIFFUSION", "FLOW_MATCHING"), default=None,
                        help="mnist: evaluate these two checkpoints of cli.py fit (e.g. the laptop presets') "
                             "instead of training")
    parser.add_argument("--batch-size", type=count, default=128)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--fid-samples", type=count, default=1000)
    parser.add_argument("--fid-batch-size", type=count, default=500)
    parser.add_argument("--feature-network", default=None)
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder of the markdown table")
    args = parser.parse_args()
    if args.minutes <= 0 or args.fid_samples < 2 or args.fid_batch_size < 1:
        parser.error("--minutes must be > 0, --fid-samples >= 2, --fid-batch-size >= 1")
    if args.checkpoints and args.what != "mnist":
        parser.error("--checkpoints applies to mnist only")
    missing = [path for path in args.checkpoints or [] if not os.path.isfile(path)]
    if missing:
        parser.error(f"no checkpoint at {', '.join(missing)}")
    if args.what == "mnist":
        args.feature_network = feature_network_file(parser, args.feature_network)
    apply_threads(args.threads)
    (mnist if args.what == "mnist" else toy)(args)


if __name__ == "__main__":
    main()
