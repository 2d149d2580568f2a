"""VAE benchmark: train the conv VAE on MNIST for a time budget, then report the test NLL.

The NLL is the importance-weighted bound with K importance samples (K = 1000 in the literature),
in nats, on dynamically binarized MNIST test digits (each test image binarized once, with a fixed
seed). The bar: pytorch-generative's VAE, 86.77 nats.

    python benchmarks/vae.py --budget-minutes 30 --device cuda          # a GPU run
    python benchmarks/vae.py --budget-minutes 8 --test-size 1000        # a small CPU run

Prints a markdown table row and writes it (with the command) to --output.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
import time
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the benchmarks' shared helpers
from arguments import apply_threads, count, count_or_zero  # noqa: E402

from datamodules import MNISTDataModule  # noqa: E402
from lightning_gen import VAE  # noqa: E402
from lightning_gen.callbacks import image_grid  # noqa: E402
from lightning_gen.metrics import bits_per_dim  # noqa: E402


def hardware(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(0)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget-minutes", type=float, default=8.0, help="training wall-clock budget")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=count, default=128)
    parser.add_argument("--latent-dim", type=count, default=32)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--importance-samples", type=count, default=1000)
    parser.add_argument("--test-size", type=count, default=10000, help="test images scored (first N)")
    parser.add_argument("--threads", type=count_or_zero, default=0, help="CPU threads (0: torch's default)")
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/vae.md"))
    parser.add_argument("--grid", type=Path, default=Path("benchmarks/results/vae_samples.png"))
    args = parser.parse_args()
    apply_threads(args.threads)

    L.seed_everything(0)
    data = MNISTDataModule(batch_size=args.batch_size, download=True)
    model = VAE(data.data_shape, network="conv", latent_dim=args.latent_dim, hidden_dims=(512,),
                learning_rate=args.learning_rate, val_importance_samples=16)
    trainer = L.Trainer(
        accelerator="gpu" if args.device.startswith("cuda") else "cpu", devices=1,
        max_time={"seconds": int(args.budget_minutes * 60)}, max_epochs=10_000,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, limit_val_batches=0,
    )
    start = time.perf_counter()
    trainer.fit(model, datamodule=data)
    train_seconds = time.perf_counter() - start

    model = model.to(args.device).eval()
    data.setup("test")
    images = data.test_set.images[: args.test_size].unsqueeze(1).float().div(255)  # (N, 1, 28, 28)
    generator = torch.Generator().manual_seed(1234)
    binary = torch.bernoulli(images, generator=generator)  # one fixed binarization of the test set
    start = time.perf_counter()
    nll, elbo = [], []
    with torch.no_grad():
        for chunk in binary.split(100):
            chunk = chunk.to(args.device)
            nll.append(-model.log_prob(chunk, num_samples=args.importance_samples).cpu())
            elbo.append(-model.log_prob(chunk, num_samples=1).cpu())
    eval_seconds = time.perf_counter() - start
    nll, elbo = torch.cat(nll), torch.cat(elbo)

    torch.manual_seed(0)
    from torchvision.utils import save_image

    args.grid.parent.mkdir(parents=True, exist_ok=True)
    save_image(image_grid(model.sample(64).cpu(), nrow=8), args.grid)

    date = datetime.date.today().isoformat()
    command = "python " + " ".join(sys.argv)
    row = (f"| conv VAE (latent {args.latent_dim}) | {nll.mean():.2f} ± {nll.std() / len(nll) ** 0.5:.2f} "
           f"| {bits_per_dim(nll.mean(), 784):.4f} | {elbo.mean():.2f} | {args.importance_samples} "
           f"| {len(nll)} | {trainer.global_step} steps ({trainer.global_step / trainer.num_training_batches:.1f} epochs) "
           f"| {train_seconds / 60:.1f} min | {eval_seconds / 60:.1f} min | {hardware(args.device)} | {date} |")
    header = ("| model | test NLL (nats, IWAE) | bits/dim | -ELBO (nats, K=1) | K | test images "
              "| training | train time | eval time | hardware | date |\n"
              "|---|---|---|---|---|---|---|---|---|---|---|")
    print(header)
    print(row)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    with open(args.output, "a") as handle:
        handle.write(f"\nCommand: `{command}`\n\n{header}\n{row}\n")


if __name__ == "__main__":
    main()
