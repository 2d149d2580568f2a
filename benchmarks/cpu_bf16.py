"""Does bf16-mixed pay on this CPU? Times a training step's arithmetic (the training loss's forward
and backward, ``model.loss(batch, 0, "train")``) of each laptop preset's model, built from
``configs/cpu/<family>.yaml`` with the preset's batch size, in float32 and under bf16 autocast
(what ``--trainer.precision bf16-mixed`` runs), the two alternating; prints a markdown table of
medians and the CPU's bf16 features (what ``cli.py --bf16_on_native_cpu`` looks at: AMX).

    python benchmarks/cpu_bf16.py                                          # gan and diffusion presets
    ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16 python benchmarks/cpu_bf16.py      # as on a CPU without AMX
    ONEDNN_MAX_CPU_ISA=AVX512_CORE python benchmarks/cpu_bf16.py           # ... without any bf16

(oneDNN, which runs the convolutions and matrix products, reads ONEDNN_MAX_CPU_ISA at start-up
and uses no instructions beyond the set named; torch's own probes still describe the CPU.)
The GAN's loss draws a fresh generated batch for each of its two terms, as its training step
does without ``reuse_fake_batch``. ``--channels-last`` stores the networks' convolution weights
channels_last first, as ``lightning_gen.callbacks.SpeedOptions(channels_last=True)`` does in a fit.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from arguments import count  # noqa: E402

FAMILIES = ("gan_mnist", "diffusion_mnist")


def cpu_features() -> str:
    from lightning_gen.cli import cpu_probe

    probes = {"AMX": "_is_amx_tile_supported", "AVX512-BF16": "_is_avx512_bf16_supported"}
    found = [name for name, probe in probes.items() if cpu_probe(probe)]
    limit = os.environ.get("ONEDNN_MAX_CPU_ISA")
    return (", ".join(found) or "no bf16 instructions") + (f"; ONEDNN_MAX_CPU_ISA={limit}" if limit else "")


def preset_model(family: str, batch_size: int | None):
    """The preset's model (as ``cli.py fit --config`` builds it) and a batch of its size."""
    from lightning_gen.cli import main

    preset = REPO / "configs" / "cpu" / f"{family}.yaml"
    if not preset.is_file():
        raise SystemExit(f"no preset {preset}")
    cli = main(["--config", str(preset), "--trainer.logger", "false", "--trainer.callbacks", "[]"], run=False)
    size = batch_size or cli.datamodule.batch_size
    images = torch.rand(size, *cli.model.data_shape)  # (B, C, H, W) in [0, 1], as the data module gives
    return cli.model.train(), (images, torch.zeros(size, dtype=torch.long))


def step_ms(model, batch, steps: int, bf16: bool) -> float:
    """Milliseconds per training-loss forward and backward, mean of ``steps`` after one warm-up."""
    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss, _ = model.loss(batch, 0, "train")
        loss.backward()
        model.zero_grad(set_to_none=True)

    step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps * 1e3


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", nargs="+", default=list(FAMILIES))
    parser.add_argument("--steps", type=count, default=5, help="timed steps per measurement")
    parser.add_argument("--repeats", type=count, default=3, help="alternating fp32 / bf16 measurements")
    parser.add_argument("--batch-size", type=count, default=None, help="default: the preset's")
    parser.add_argument("--threads", type=count, default=None, help="default: torch's")
    parser.add_argument("--channels-last", action="store_true",
                        help="convolution weights channels_last (SpeedOptions(channels_last=True))")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = []
    for family in args.families:
        model, batch = preset_model(family, args.batch_size)
        if args.channels_last:
            from lightning_gen.callbacks import SpeedOptions

            SpeedOptions(channels_last=True).setup(None, model, "fit")
        times = {False: [], True: []}
        for _ in range(args.repeats):
            for bf16 in (False, True):
                times[bf16].append(step_ms(model, batch, args.steps, bf16))
        fp32, bf16 = statistics.median(times[False]), statistics.median(times[True])
        rows.append({"family": family, "batch": len(batch[0]), "fp32_ms": fp32, "bf16_ms": bf16,
                     "speedup": fp32 / bf16})
    print(f"CPU: {cpu_features()}; {torch.get_num_threads()} threads; torch {torch.__version__}"
          + ("; channels_last weights" if args.channels_last else ""))
    print("| preset | batch | fp32 ms | bf16 ms | bf16 speed-up |")
    print("|---|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['family']} | {row['batch']} | {row['fp32_ms']:.1f} | {row['bf16_ms']:.1f} | "
              f"{row['speedup']:.2f} |")
    return rows


if __name__ == "__main__":
    main()
