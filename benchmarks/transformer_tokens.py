"""What ``PixelTransformer(token_size=g)`` buys: training and sampling time per image of the
pixel transformer of a config, for several token sizes, on this machine.

For each token size the config's model is built with ``token_size`` set to it (everything else as
written) on MNIST-shaped binary images; a training step is the model's own loss, backward and an
AdamW step. The sizes are timed in turn, ``--repeats`` times (alternating, so that a change in the
machine's load reaches every size alike), and the medians are kept. Sampling times the cached
``sample(--sample-count)``.

    python benchmarks/transformer_tokens.py --token-sizes 1 4 7 --batch-size 32 --threads 2 \\
        --output benchmarks/results/autoregressive.md
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the benchmarks' shared helpers
from arguments import apply_threads, count, count_or_zero  # noqa: E402

from lightning_gen import PixelTransformer  # noqa: E402


def build(config: Path, token_size: int) -> PixelTransformer:
    with open(config) as f:
        model = yaml.safe_load(f)["model"]
    if not model["class_path"].endswith("PixelTransformer"):
        raise ValueError(f"{config} does not configure a PixelTransformer ({model['class_path']})")
    options = {**model["init_args"], "token_size": token_size}
    return PixelTransformer((1, 28, 28), **options)


def seconds_per_step(model: PixelTransformer, images: torch.Tensor, steps: int) -> float:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    labels = torch.zeros(len(images), dtype=torch.long)

    def step() -> None:
        loss = model.loss((images, labels), 0, "train")[0]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    step()  # warm-up: allocations, first-call dispatch
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def seconds_to_sample(model: PixelTransformer, count: int) -> float:
    model.eval()
    start = time.perf_counter()
    model.sample(count)
    model.train()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "cpu" / "pixeltransformer_mnist.yaml")
    parser.add_argument("--token-sizes", type=count, nargs="+", default=[1, 4, 7])
    parser.add_argument("--batch-size", type=count, default=32)
    parser.add_argument("--steps", type=count, default=5, help="timed training steps per repeat")
    parser.add_argument("--repeats", type=count, default=3)
    parser.add_argument("--sample-count", type=count_or_zero, default=16, help="images sampled per repeat (0: no sampling)")
    parser.add_argument("--threads", type=count_or_zero, default=0, help="CPU threads (0: torch's default)")
    parser.add_argument("--output", type=Path, default=None, help="append the table to this file")
    args = parser.parse_args()
    apply_threads(args.threads)

    torch.manual_seed(0)
    images = (torch.rand(args.batch_size, 1, 28, 28) > 0.8).float()
    models = {g: build(args.config, g) for g in args.token_sizes}
    train: dict[int, list[float]] = {g: [] for g in models}
    sample: dict[int, list[float]] = {g: [] for g in models}
    for _ in range(args.repeats):
        for g, model in models.items():
            train[g].append(seconds_per_step(model, images, args.steps))
            if args.sample_count:
                sample[g].append(seconds_to_sample(model, args.sample_count))

    lines = [f"`{args.config.relative_to(REPO) if args.config.is_relative_to(REPO) else args.config}`, "
             f"batch {args.batch_size}, {torch.get_num_threads()} threads, medians of {args.repeats} "
             f"alternating repeats ({args.steps} steps; {args.sample_count} samples):", "",
             "| token_size | tokens | parameters | train ms/image | sample ms/image |",
             "|---:|---:|---:|---:|---:|"]
    for g, model in models.items():
        train_ms = statistics.median(train[g]) / args.batch_size * 1000
        sample_ms = (f"{statistics.median(sample[g]) / args.sample_count * 1000:.0f}"
                     if args.sample_count else "-")
        parameters = sum(p.numel() for p in model.parameters())
        lines.append(f"| {g} | {model.network.num_tokens} | {parameters:,} | {train_ms:.1f} | {sample_ms} |")
    table = "\n".join(lines) + "\n"
    print(table)
    if args.output:
        with open(args.output, "a") as f:
            f.write("\n" + table)


if __name__ == "__main__":
    main()
