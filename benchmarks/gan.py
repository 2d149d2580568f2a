"""GAN benchmark: DCGAN on MNIST and WGAN-GP on the eight Gaussians, each for a time budget.

    python benchmarks/gan.py mnist --budget-minutes 3 --device cuda     # the issue's H100 scale
    python benchmarks/gan.py toy --budget-minutes 5 --device cuda
    python benchmarks/gan.py mnist --budget-minutes 8 --threads 1       # a small CPU run
    python benchmarks/gan.py toy --budget-minutes 4 --threads 1

mnist: trains the DCGAN of configs/gan_mnist.yaml (non-saturating loss, Adam 2e-4 / (0.5, 0.999),
EMA 0.999) and reports the training time, steps, and the energy distance (the model's
``val/loss``, pixel space in [0, 1]) between --eval-size EMA samples and as many test digits, next
to the same distance between training and test digits (what a perfect model would score). It saves
a sample grid. With --feature-network (default: the project's MNIST feature network,
checkpoints/mnist_features/last.ckpt, trained by ``python cli.py features fit --config
configs/mnist_features.yaml``) it also reports the FID of the EMA samples, of the raw generator's
samples and of training digits (the floor) against the first --eval-size test digits, in the
feature space of that network (numbers compare only between runs with the same checkpoint).

toy: trains the WGAN-GP of configs/gan_8gaussians.yaml and draws --eval-size samples:
- "within 3 std": the share of samples whose distance to the nearest of the 8 centres is below
  3 * EIGHT_GAUSSIANS_STD (the data itself: 1 - exp(-4.5) = 98.9 %);
- "within 1 std": the same below 1 std (the data: 39.3 %), which shows bridges between modes
  that the 3-std share barely sees (neighbouring centres are only ~6 std apart);
- "modes covered": centres that hold at least --mode-threshold (default 1 %) of all samples
  within 3 std of them (a fair share is 12.5 %).

Prints a markdown table and appends it, with the command, to --output.
"""

from __future__ import annotations

import argparse
import datetime
import math
import platform
import sys
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the benchmarks' shared helpers
from arguments import apply_threads, count, count_or_zero  # noqa: E402

from datamodules import MNISTDataModule, ToyDataModule  # noqa: E402
from datamodules.toy import EIGHT_GAUSSIANS_RADIUS, EIGHT_GAUSSIANS_STD, sample_toy  # noqa: E402
from lightning_gen import GAN  # noqa: E402
from lightning_gen.callbacks import image_grid, scatter_image  # noqa: E402
from lightning_gen.gan.losses import energy_distance  # noqa: E402
from lightning_gen.metrics import (  # noqa: E402
    extract_features, fid_kid_from_features, load_feature_network, real_features,
)

RESULTS = Path(__file__).resolve().parent / "results"
FEATURE_NETWORK = Path(__file__).resolve().parents[1] / "checkpoints" / "mnist_features" / "last.ckpt"


class BatchCounter(Callback):
    def __init__(self) -> None:
        self.batches = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.batches += 1


def hardware(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(0)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def train(model: GAN, data, args) -> tuple[float, int]:
    counter = BatchCounter()
    trainer = L.Trainer(
        accelerator="gpu" if args.device.startswith("cuda") else "cpu", devices=1,
        precision=args.precision, max_time={"seconds": int(args.budget_minutes * 60)},
        max_epochs=10_000, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, callbacks=[counter],
    )
    start = time.perf_counter()
    trainer.fit(model, datamodule=data)
    return time.perf_counter() - start, counter.batches


def eight_gaussians_quality(x: torch.Tensor, threshold: float) -> tuple[int, float, float, list[float]]:
    """(modes covered, share within 3 std of the nearest centre, share within 1 std, per-mode
    shares) of (N, 2) points. Neighbouring centres are 2.16 apart, about 6 std: a point halfway
    between two is 3.06 std from both, so "within 3 std" barely penalizes bridges between modes;
    "within 1 std" (the data: 1 - exp(-0.5) = 39.3 %) shows how sharp the modes are."""
    angle = torch.arange(8) * (math.pi / 4)
    centers = EIGHT_GAUSSIANS_RADIUS * torch.stack([angle.cos(), angle.sin()], dim=1)  # (8, 2)
    distance, nearest = torch.cdist(x.float().cpu(), centers).min(dim=1)  # (N,), (N,)
    close = distance < 3 * EIGHT_GAUSSIANS_STD
    shares = torch.bincount(nearest[close], minlength=8).float() / len(x)  # (8,)
    sharp = (distance < EIGHT_GAUSSIANS_STD).float().mean().item()
    return int((shares >= threshold).sum()), close.float().mean().item(), sharp, shares.tolist()


def run_mnist(args) -> tuple[str, str]:
    L.seed_everything(0)
    data = MNISTDataModule(batch_size=args.batch_size, download=True)
    model = GAN(data.data_shape, network="dcgan", loss="non_saturating", latent_dim=100,
                base_channels=args.base_channels, ema_decay=0.999, generator_learning_rate=2e-4,
                discriminator_learning_rate=2e-4, generator_betas=(0.5, 0.999),
                discriminator_betas=(0.5, 0.999))
    seconds, batches = train(model, data, args)
    model = model.to(args.device).eval()
    data.setup("test")
    test = data.test_set.images[: args.eval_size].unsqueeze(1).float().div(255)  # (N, 1, 28, 28)
    train_images = data.train_set.images[: args.eval_size].unsqueeze(1).float().div(255)
    torch.manual_seed(0)
    samples = torch.cat([model.sample(len(chunk)).cpu() for chunk in test.split(500)])
    raw = torch.cat([model.sample(len(chunk), use_ema=False).cpu() for chunk in test.split(500)])
    distances = [energy_distance(s, test).item() for s in (samples, raw, train_images)]
    if args.feature_network is None:
        fids = ["not computed"] * 3
    else:
        network = load_feature_network(str(args.feature_network)).to(args.device)
        test_features = real_features(network, str(args.feature_network), test)
        fids = [f"{fid_kid_from_features(test_features, extract_features(network, s), kid_subsets=1)[0]:.2f}"
                for s in (samples, raw, train_images)]

    from torchvision.utils import save_image

    grid = args.grid or RESULTS / "gan_mnist_samples.png"
    grid.parent.mkdir(parents=True, exist_ok=True)
    save_image(image_grid(samples[:64], nrow=8), grid)
    save_image(image_grid(raw[:64], nrow=8), grid.with_name(grid.stem + "_no_ema.png"))
    header = ("| model | training | train time | energy distance to test (EMA) | without EMA "
              "| train vs test digits | FID (EMA) | FID without EMA | FID train vs test digits "
              "| hardware | date |\n|---|---|---|---|---|---|---|---|---|---|---|")
    row = (f"| DCGAN (c={args.base_channels}, non-saturating, EMA 0.999) | {batches} batches of "
           f"{args.batch_size} ({batches * args.batch_size / 55000:.2f} epochs) | {seconds / 60:.1f} min "
           f"| {distances[0]:.3f} | {distances[1]:.3f} | {distances[2]:.3f} | {fids[0]} | {fids[1]} | {fids[2]} "
           f"| {hardware(args.device)} | {datetime.date.today().isoformat()} |")
    return header, row


def run_toy(args) -> tuple[str, str]:
    L.seed_everything(0)
    data = ToyDataModule("8gaussians", batch_size=args.batch_size)
    model = GAN(data.data_shape, network="mlp", loss="wgan_gp", latent_dim=2,
                generator_hidden_dims=(args.hidden_dim,) * 3, discriminator_hidden_dims=(args.hidden_dim,) * 3,
                n_critic=5, gradient_penalty_weight=0.1, generator_learning_rate=args.learning_rate,
                discriminator_learning_rate=args.learning_rate, generator_betas=(0.5, 0.9),
                discriminator_betas=(0.5, 0.9))
    seconds, batches = train(model, data, args)
    model = model.to(args.device).eval()
    torch.manual_seed(0)
    samples = model.sample(args.eval_size).cpu()
    modes, within, sharp, shares = eight_gaussians_quality(samples, args.mode_threshold)
    data_modes, data_within, data_sharp, _ = eight_gaussians_quality(
        sample_toy("8gaussians", args.eval_size, seed=5)[0], args.mode_threshold)
    reference = sample_toy("8gaussians", args.eval_size, seed=6)[0]
    distance = energy_distance(samples, reference).item()

    from torchvision.utils import save_image

    picture = args.grid or RESULTS / "gan_8gaussians_samples.png"
    picture.parent.mkdir(parents=True, exist_ok=True)
    save_image(scatter_image(samples[:2000], reference[:2000], title="WGAN-GP samples (blue)"), picture)
    header = ("| model | training | train time | modes covered (of 8) | within 3 std | within 1 std "
              "| per-mode share within 3 std (%) | energy distance | the data itself | hardware | date |\n"
              "|---|---|---|---|---|---|---|---|---|---|---|")
    row = (f"| WGAN-GP MLP 3x{args.hidden_dim} (n_critic 5, lr {args.learning_rate:g}) | {batches} batches of "
           f"{args.batch_size} ({batches // 5} G steps) | {seconds / 60:.1f} min | {modes} "
           f"| {100 * within:.1f} % | {100 * sharp:.1f} % | {' '.join(f'{100 * s:.1f}' for s in shares)} "
           f"| {distance:.4f} | {data_modes} modes, {100 * data_within:.1f} %, {100 * data_sharp:.1f} % "
           f"| {hardware(args.device)} "
           f"| {datetime.date.today().isoformat()} |")
    return header, row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("task", choices=["mnist", "toy"])
    parser.add_argument("--budget-minutes", type=float, default=8.0, help="training wall-clock budget")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default="32-true", help="Trainer precision, e.g. bf16-mixed")
    parser.add_argument("--batch-size", type=count, default=None, help="default: 128 (mnist), 256 (toy)")
    parser.add_argument("--base-channels", type=count, default=64, help="DCGAN width (mnist)")
    parser.add_argument("--hidden-dim", type=count, default=256, help="MLP width (toy)")
    parser.add_argument("--learning-rate", type=float, default=1e-4, help="both networks (toy)")
    parser.add_argument("--eval-size", type=count, default=None, help="default: 2000 (mnist), 10000 (toy)")
    parser.add_argument("--mode-threshold", type=float, default=0.01)
    parser.add_argument("--feature-network", default=str(FEATURE_NETWORK),
                        help="MNISTClassifier checkpoint for the FID (mnist); 'none' skips the FID")
    parser.add_argument("--threads", type=count_or_zero, default=0, help="CPU threads (0: torch's default)")
    parser.add_argument("--grid", type=Path, default=None, help="where the picture goes")
    parser.add_argument("--output", type=Path, default=RESULTS / "gan.md", help="the table is appended here")
    args = parser.parse_args()
    apply_threads(args.threads)
    if args.feature_network.lower() == "none":
        args.feature_network = None
    elif args.task == "mnist" and not Path(args.feature_network).is_file():
        # checked before training, not after the budget is spent
        raise ValueError(f"--feature-network: no checkpoint at {args.feature_network} (train it with "
                         "python cli.py features fit --config configs/mnist_features.yaml, or pass 'none')")
    if args.batch_size is None:
        args.batch_size = 128 if args.task == "mnist" else 256
    if args.eval_size is None:
        args.eval_size = 2000 if args.task == "mnist" else 10000
    header, row = run_mnist(args) if args.task == "mnist" else run_toy(args)
    command = "python " + " ".join(sys.argv)
    print(header)
    print(row)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    with open(args.output, "a") as handle:
        handle.write(f"\nCommand: `{command}`\n\n{header}\n{row}\n")


if __name__ == "__main__":
    main()
