"""Autoregressive benchmark: binarized-MNIST test NLL and sampling speed of PixelCNN and
PixelTransformer.

Each model trains on dynamically binarized MNIST (K = 2) for a wall-clock budget, then:
- test NLL: the exact -log p(x) in nats per image, on the first --test-size MNIST test digits,
  each binarized once with a fixed seed (the bars, pytorch-generative's table: PixelCNN 81.45,
  Gated PixelCNN 81.50, ImageGPT 79.17, PixelSNAIL 78.61, on the 10k test set);
- sampling speed: images/s for --num-samples images drawn in one batch (784 sequential steps),
  with the cache (PixelCNN's activations, the transformer's keys and values) and without it
  (the network over the receptive field's rows, or the whole prefix, at every step, on
  --uncached-samples images, as that is slow on a CPU).

    python benchmarks/autoregressive.py --device cuda --budget-minutes 30              # a GPU run
    python benchmarks/autoregressive.py --model pixelcnn --budget-minutes 5 --test-size 1000 \\
        --threads 2 --hidden-channels 32 --num-layers 5                                 # small CPU run

Prints a markdown table and appends it (with the command) to --output.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # sequential sampling steps on a shared CPU

import lightning as L  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the benchmarks' shared helpers
from arguments import apply_threads, count, count_or_zero  # noqa: E402

from datamodules import MNISTDataModule  # noqa: E402
from lightning_gen import PixelCNN, PixelTransformer  # noqa: E402
from lightning_gen.callbacks import image_grid  # noqa: E402
from lightning_gen.metrics import bits_per_dim  # noqa: E402

BARS = "PixelCNN 81.45, Gated PixelCNN 81.50, ImageGPT 79.17, PixelSNAIL 78.61 (pytorch-generative)"


def hardware(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(0)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def build(name: str, args: argparse.Namespace):
    if name == "pixelcnn":
        model = PixelCNN((1, 28, 28), num_levels=2, gated=True, hidden_channels=args.hidden_channels,
                         num_layers=args.num_layers, head_channels=args.head_channels,
                         learning_rate=args.learning_rate)
        description = (f"Gated PixelCNN (h={args.hidden_channels}, {args.num_layers} layers, "
                       f"head {args.head_channels})")
    else:
        model = PixelTransformer((1, 28, 28), num_levels=2, model_dim=args.model_dim,
                                 num_layers=args.transformer_layers, num_heads=args.num_heads,
                                 learning_rate=args.transformer_learning_rate, warmup_steps=args.warmup_steps)
        description = (f"PixelTransformer (d={args.model_dim}, {args.transformer_layers} layers, "
                       f"{args.num_heads} heads)")
    return model, description


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed_samples(model, count: int, device: str, **options) -> tuple[torch.Tensor, float]:
    """Samples drawn under seed 0 and the speed in images/s."""
    torch.manual_seed(0)
    synchronize(device)
    start = time.perf_counter()
    samples = model.sample(count, **options)
    synchronize(device)
    return samples, count / (time.perf_counter() - start)


def run(name: str, args: argparse.Namespace, test_binary: torch.Tensor) -> list[str]:
    L.seed_everything(0)
    model, description = build(name, args)
    data = MNISTDataModule(batch_size=args.batch_size, download=True)
    accelerator = "gpu" if args.device.startswith("cuda") else "cpu"
    trainer = L.Trainer(
        accelerator=accelerator, devices=1, precision=args.precision,
        max_time={"seconds": int(args.budget_minutes * 60)}, max_epochs=10_000,
        gradient_clip_val=1.0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        limit_val_batches=0, enable_model_summary=False,
    )
    start = time.perf_counter()
    trainer.fit(model, datamodule=data)
    train_seconds = time.perf_counter() - start

    model = model.to(args.device).eval()
    start = time.perf_counter()
    with torch.no_grad():
        nll = torch.cat([-model.log_prob(chunk.to(args.device)).cpu()
                         for chunk in test_binary.split(args.eval_batch_size)])
    eval_seconds = time.perf_counter() - start

    speeds = []
    samples, speed = timed_samples(model, args.num_samples, args.device, use_cache=True)
    speeds.append(("cached", args.num_samples, speed))
    uncached, speed = timed_samples(model, args.uncached_samples, args.device, use_cache=False)
    speeds.append(("no cache", args.uncached_samples, speed))
    # same seed and batch size, same draws: the images agree (up to float ties)
    reference, _ = timed_samples(model, args.uncached_samples, args.device, use_cache=True)
    matching = (uncached == reference).flatten(1).all(1).float().mean().item()
    speeds.append(("no-cache samples equal to cached ones", args.uncached_samples, matching))

    from torchvision.utils import save_image

    grid = args.output.parent / f"autoregressive_{name}_samples.png"
    save_image(image_grid(samples[:64].cpu(), nrow=8), grid)
    completion = args.output.parent / f"autoregressive_{name}_completions.png"
    torch.manual_seed(0)
    given = test_binary[:8].to(args.device)
    completed = model.complete(given, num_given_rows=14)
    save_image(image_grid(torch.cat([given, completed]).cpu(), nrow=8), completion)

    date = datetime.date.today().isoformat()
    sampling = "; ".join(f"{label}: {speed:.2f} img/s ({count} images)" if "equal" not in label
                         else f"{label}: {speed:.0%}" for label, count, speed in speeds)
    return [
        f"| {description} | {nll.mean():.2f} ± {nll.std() / len(nll) ** 0.5:.2f} "
        f"| {bits_per_dim(nll.mean(), 784):.4f} | {len(nll)} "
        f"| {trainer.global_step} steps (batch {args.batch_size}) | {train_seconds / 60:.1f} min "
        f"| {eval_seconds:.0f} s | {sampling} | {hardware(args.device)} | {date} |"
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["pixelcnn", "pixeltransformer", "both"], default="both")
    parser.add_argument("--budget-minutes", type=float, default=8.0, help="training budget per model")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--batch-size", type=count, default=64)
    parser.add_argument("--eval-batch-size", type=count, default=250)
    parser.add_argument("--test-size", type=count, default=10000, help="test images scored (first N)")
    parser.add_argument("--num-samples", type=count, default=64, help="images per timed sampling run")
    parser.add_argument("--uncached-samples", type=count, default=64,
                        help="images for the transformer's sampling without the cache")
    parser.add_argument("--hidden-channels", type=count, default=64)
    parser.add_argument("--num-layers", type=count, default=7)
    parser.add_argument("--head-channels", type=count, default=256)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--model-dim", type=count, default=256)
    parser.add_argument("--transformer-layers", type=count, default=6)
    parser.add_argument("--num-heads", type=count, default=8)
    parser.add_argument("--transformer-learning-rate", type=float, default=5e-4)
    parser.add_argument("--warmup-steps", type=count, default=200)
    parser.add_argument("--threads", type=count_or_zero, default=0, help="CPU threads (0: torch's default)")
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/autoregressive.md"))
    args = parser.parse_args()
    apply_threads(args.threads)

    data = MNISTDataModule(download=True)
    data.prepare_data()
    data.setup("test")
    images = data.test_set.images[: args.test_size].unsqueeze(1).float().div(255)  # (N, 1, 28, 28)
    test_binary = torch.bernoulli(images, generator=torch.Generator().manual_seed(1234))

    # the pictures go next to --output, long before the table is written
    args.output.parent.mkdir(parents=True, exist_ok=True)
    names = ["pixelcnn", "pixeltransformer"] if args.model == "both" else [args.model]
    rows = [row for name in names for row in run(name, args, test_binary)]
    header = ("| model | test NLL (nats) | bits/dim | test images | training | train time | eval time "
              "| sampling speed | hardware | date |\n|---|---|---|---|---|---|---|---|---|---|")
    table = "\n".join([header, *rows])
    print(table)
    command = "python " + " ".join(sys.argv)
    with open(args.output, "a") as handle:
        handle.write(f"\nCommand: `{command}`\n\nBars: {BARS}\n\n{table}\n")


if __name__ == "__main__":
    main()
