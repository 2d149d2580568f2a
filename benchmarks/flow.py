"""RealNVP benchmark: test NLL on 2-D toy data and test bits/dim on MNIST after a time budget.

Toy (``--task toy``): for moons, 8gaussians and checkerboard (definitions in datamodules/toy.py),
train the vector RealNVP on the ToyDataModule's 20k training points, then report the mean test
NLL in nats over its 5k test points next to the distribution's differential entropy where it is
known (the NLL of the true density: a perfect model reaches it on average). Writes one PNG per
data set: data, learned density exp(log_prob) on a grid, and samples.

MNIST (``--task mnist``): train the multi-scale image RealNVP, then report test bits/dim of the
8-bit images (uniform dequantization with one fixed noise draw per test image, the logit
transform's log-det included): bars RealNVP 1.06 (Dinh et al. 2017), Glow 1.05.

    python benchmarks/flow.py --task all --device cuda --budget-minutes 60        # a GPU run
    python benchmarks/flow.py --task toy --budget-minutes 6 --threads 2           # small CPU run
    python benchmarks/flow.py --task mnist --budget-minutes 8 --threads 2 --hidden-channels 32 \\
        --num-blocks 1 --couplings-per-scale 2 --test-size 1000

Prints markdown tables and appends them (with the command) to --output.
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

# Spinning OpenMP threads make small-op loops many times slower on a shared CPU; set before torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import lightning as L  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the benchmarks' shared helpers
from arguments import apply_threads, count, count_or_zero  # noqa: E402

from datamodules import MNISTDataModule, ToyDataModule  # noqa: E402
from datamodules.toy import TOY_ENTROPY  # noqa: E402
from lightning_gen import RealNVP  # noqa: E402
from lightning_gen.callbacks import image_grid  # noqa: E402
from lightning_gen.metrics import bits_per_dim  # noqa: E402

TOY_SETS = ("moons", "8gaussians", "checkerboard")


def hardware(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(0)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def make_trainer(args, budget_seconds: float, max_steps: int) -> L.Trainer:
    return L.Trainer(
        accelerator="gpu" if args.device.startswith("cuda") else "cpu", devices=1,
        precision=args.precision, max_time={"seconds": int(budget_seconds)}, max_steps=max_steps,
        max_epochs=-1, gradient_clip_val=args.gradient_clip, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
    )


@torch.no_grad()
def evaluate_nll(model: RealNVP, x: torch.Tensor, device: str, chunk: int) -> torch.Tensor:
    return torch.cat([-model.log_prob(part.to(device)).cpu() for part in x.split(chunk)])


def plot_toy(model: RealNVP, name: str, test_x: torch.Tensor, device: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    limit = float(test_x.abs().max()) * 1.1
    axis = torch.linspace(-limit, limit, 300)
    grid = torch.stack(torch.meshgrid(axis, axis, indexing="xy"), -1).reshape(-1, 2)
    with torch.no_grad():
        density = torch.cat([model.log_prob(part.to(device)).exp().cpu() for part in grid.split(20000)])
        torch.manual_seed(0)
        samples = model.sample(len(test_x)).cpu()
    figure, axes = plt.subplots(1, 3, figsize=(10.5, 3.5))
    axes[0].scatter(test_x[:, 0], test_x[:, 1], s=1, c="0.3")
    axes[0].set_title(f"{name}: test data")
    axes[1].imshow(density.view(300, 300), origin="lower", extent=(-limit, limit, -limit, limit), cmap="magma")
    axes[1].set_title("RealNVP density")
    axes[2].scatter(samples[:, 0], samples[:, 1], s=1, c="tab:blue")
    axes[2].set_title("RealNVP samples")
    for ax in axes:
        ax.set_xlim(-limit, limit)
        ax.set_ylim(-limit, limit)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=70)
    plt.close(figure)


def run_toy(args) -> str:
    rows = []
    budget = args.budget_minutes * 60 / len(TOY_SETS)
    for name in TOY_SETS:
        L.seed_everything(0)
        data = ToyDataModule(name, batch_size=args.toy_batch_size)
        model = RealNVP(data.data_shape, num_layers=args.num_layers, hidden_dims=args.hidden_dims,
                        learning_rate=args.learning_rate)
        trainer = make_trainer(args, budget, args.toy_max_steps)
        start = time.perf_counter()
        trainer.fit(model, datamodule=data)
        train_seconds = time.perf_counter() - start
        model = model.to(args.device).eval()
        data.setup("test")
        test_x = data.test_set.tensors[0]
        nll = evaluate_nll(model, test_x, args.device, 5000)
        entropy = TOY_ENTROPY.get(name)
        plot_toy(model, name, test_x, args.device, args.figure_dir / f"flow_{name}.png")
        rows.append(
            f"| {name} | {nll.mean():.3f} ± {nll.std() / math.sqrt(len(nll)):.3f} | "
            f"{f'{entropy:.3f}' if entropy is not None else 'not known in closed form'} | "
            f"{trainer.global_step} steps | {train_seconds / 60:.1f} min | {hardware(args.device)} |")
        print(rows[-1], flush=True)
    header = ("| data | test NLL (nats, 5000 points, ± s.e.) | true entropy (nats) | training | train time "
              "| hardware |\n|---|---|---|---|---|---|")
    return header + "\n" + "\n".join(rows)


def run_mnist(args) -> str:
    L.seed_everything(0)
    data = MNISTDataModule(batch_size=args.mnist_batch_size, download=True)
    model = RealNVP(data.data_shape, num_scales=args.num_scales, couplings_per_scale=args.couplings_per_scale,
                    hidden_channels=args.hidden_channels, num_blocks=args.num_blocks,
                    learning_rate=args.learning_rate)
    num_parameters = sum(parameter.numel() for parameter in model.parameters())
    trainer = make_trainer(args, args.budget_minutes * 60, args.mnist_max_steps)
    start = time.perf_counter()
    trainer.fit(model, datamodule=data)
    train_seconds = time.perf_counter() - start
    model = model.to(args.device).eval()
    data.setup("test")
    images = data.test_set.images[: args.test_size].unsqueeze(1).float().div(255)  # (N, 1, 28, 28)
    torch.manual_seed(1234)  # one fixed dequantization draw of the test set
    nll = evaluate_nll(model, images, args.device, 500)
    bpd = bits_per_dim(nll, 784)
    from torchvision.utils import save_image

    torch.manual_seed(0)
    args.figure_dir.mkdir(parents=True, exist_ok=True)
    save_image(image_grid(model.sample(64, temperature=1.0).cpu(), nrow=8), args.figure_dir / "flow_mnist_samples.png")
    torch.manual_seed(0)
    save_image(image_grid(model.sample(64, temperature=0.7).cpu(), nrow=8),
               args.figure_dir / "flow_mnist_samples_t07.png")
    epochs = trainer.global_step / max(trainer.num_training_batches, 1)
    row = (f"| RealNVP ({args.num_scales} scales, {args.couplings_per_scale} couplings/scale, "
           f"{args.hidden_channels} ch x {args.num_blocks} blocks, {num_parameters / 1e6:.2f}M params) "
           f"| {bpd.mean():.3f} ± {bpd.std() / math.sqrt(len(bpd)):.3f} | {len(bpd)} "
           f"| {trainer.global_step} steps ({epochs:.2f} epochs, batch {args.mnist_batch_size}) "
           f"| {train_seconds / 60:.1f} min | {hardware(args.device)} |")
    header = ("| model | test bits/dim (± s.e.) | test images | training | train time | hardware |\n"
              "|---|---|---|---|---|---|")
    print(row, flush=True)
    return header + "\n" + row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=("toy", "mnist", "all"), default="all")
    parser.add_argument("--budget-minutes", type=float, default=8.0,
                        help="training wall-clock budget per task (toy: split over the 3 data sets)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default="32-true", help="e.g. bf16-mixed on a GPU")
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--gradient-clip", type=float, default=100.0)
    parser.add_argument("--threads", type=count_or_zero, default=0, help="CPU threads (0: torch's default)")
    # toy
    parser.add_argument("--num-layers", type=count, default=8)
    parser.add_argument("--hidden-dims", type=count, nargs="+", default=[128, 128])
    parser.add_argument("--toy-batch-size", type=count, default=256)
    parser.add_argument("--toy-max-steps", type=count, default=20000)
    # mnist
    parser.add_argument("--num-scales", type=count, default=3)
    parser.add_argument("--couplings-per-scale", type=count, default=3)
    parser.add_argument("--hidden-channels", type=count, default=64)
    parser.add_argument("--num-blocks", type=count, default=4)
    parser.add_argument("--mnist-batch-size", type=count, default=64)
    parser.add_argument("--mnist-max-steps", type=int, default=-1)
    parser.add_argument("--test-size", type=count, default=10000, help="test images scored (first N)")
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/flow.md"))
    parser.add_argument("--figure-dir", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    apply_threads(args.threads)

    tables = []
    if args.task in ("toy", "all"):
        tables.append(run_toy(args))
    if args.task in ("mnist", "all"):
        tables.append(run_mnist(args))
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    text = f"\nCommand: `python {' '.join(sys.argv)}` ({date})\n\n" + "\n\n".join(tables) + "\n"
    print(text)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    with open(args.output, "a") as handle:
        handle.write(text)


if __name__ == "__main__":
    main()
