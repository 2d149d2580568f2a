"""One prepared GPU check: every figure this project wants from a GPU, from one command.

On one H200 it finished in 452 s (2026-12-04, with the fits' 60 s that are now the default, and
before --min-timed-seconds lengthened part 1's shortest runs) and writes
``benchmarks/results/gpu_check.json`` and ``gpu_check.md``:

1. training images/s of every family (the networks of configs/*_mnist.yaml) at --batch-size
   (512), under a bare Lightning Trainer and in a plain PyTorch loop (``throughput.py``'s two
   sides), and under the Trainer ``cli.py fit`` builds (its callbacks and progress bar, a CSV
   logger: ``step_overhead.cli_trainer``), in 32-true and bf16-mixed, over --steps timed steps
   or, where those take under --min-timed-seconds in the plain loop, more (up to one epoch);
   ``--cli-without-bar`` adds that Trainer with its progress bar off (the bar reads the loss
   from the device at each redraw, ten times a second);
2. the diffusion U-Net's training images/s with ``torch.compile`` off and on (--compile-backend,
   inductor; the test uses aot_eager, which traces the same graph without generating kernels);
3. Diffusion against diffusers' ``UNet2DModel`` of the same size (training at batch 128 and 512,
   DDIM-50 sampling; ``benchmarks/diffusion.py speed``'s measurement); diffusers comes from the
   optional ``bench`` extra (``pip install -e ".[bench]"``);
4. short fits (--fit-seconds each, 60) of the VAE, the DCGAN and diffusion on device-resident
   MNIST, with FID of --fid-samples samples against the 10,000 test digits (MNIST feature
   network; trained first when ``checkpoints/mnist_features/last.ckpt`` is missing), its floor
   (as many training digits; ``mnist_fid_floor`` computes it on any machine) and the test NLL
   bound on 256 test digits where the family has one.

It fails loudly: a measurement that raises leaves a row with its traceback, the others still run
(a lent GPU may be there for one run only), and the run ends with a non-zero status naming how
many failed; the JSON and the table are rewritten after every row, so a run stopped from outside
keeps what it measured. A missing diffusers is an error before anything runs, unless
``--skip-diffusers`` says to leave part 3 out.

    python benchmarks/gpu_check.py                                   # on the GPU machine
    python benchmarks/gpu_check.py --tiny --device cpu --skip-diffusers --compile-backend aot_eager \
        --output-dir /tmp/check                                      # the test
"""

from __future__ import annotations

import argparse
import copy
import datetime
import functools
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import lightning as L
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import step_overhead  # noqa: E402
import throughput  # noqa: E402
from arguments import count  # noqa: E402
from datamodules import MNISTDataModule  # noqa: E402
from datamodules.mnist import images_to_batch  # noqa: E402

FIT_FAMILIES = ("vae", "gan", "diffusion")


def hardware(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.machine()} CPU, {torch.get_num_threads()} thread(s)"


def throughput_args(args, precision: str, batch_size: int, compile_: bool = False,
                    steps: int | None = None) -> argparse.Namespace:
    return argparse.Namespace(batch_size=batch_size, steps=steps or args.steps, warmup_steps=args.warmup_steps,
                              precision=precision, compile=compile_, compile_backend=args.compile_backend,
                              channels_last=False)


Measurement = tuple[dict, Callable[[], dict]]  # the row's key, and what measures the rest of it


def timed_step_count(steps: int, min_seconds: float, step_seconds: float, most: int) -> int:
    """``steps``, or more where that many would take under ``min_seconds`` at ``step_seconds``
    each (the plain loop's, from a short run), but no more than ``most`` (the batches of
    one epoch after the warm-up): a window of a few steps of a few milliseconds moves with every
    hiccup of the host."""
    return max(steps, min(math.ceil(min_seconds / step_seconds), most))


def training_throughput(args, device, images, labels) -> list[Measurement]:
    accelerator = device.type if device.type != "cuda" else "gpu"

    def timed_steps(model, precision: str) -> int:
        if args.min_timed_seconds <= 0:
            return args.steps
        # a short run (the warm-up and 3 steps) is enough to tell 3 ms steps from 1 s ones
        plain_rate = throughput.plain_throughput(copy.deepcopy(model), images, labels,
                                                 throughput_args(args, precision, args.batch_size,
                                                                 steps=min(3, args.steps)), device)
        return timed_step_count(args.steps, args.min_timed_seconds, args.batch_size / plain_rate,
                                len(images) // args.batch_size - args.warmup_steps)

    def measure(family: str, precision: str) -> dict:
        L.seed_everything(0, verbose=False)
        model = throughput.build(family, "small" if args.tiny else "config")
        steps = timed_steps(model, precision)
        options = throughput_args(args, precision, args.batch_size, steps=steps)
        cli_options = argparse.Namespace(batch_size=args.batch_size, steps=steps, warmup_steps=args.warmup_steps,
                                         log_every_n_steps=50)
        def cli_rate(progress_bar: bool) -> float:
            make_trainer = functools.partial(step_overhead.cli_trainer, accelerator=accelerator, precision=precision,
                                             progress_bar=progress_bar)
            return args.batch_size / step_overhead.trainer_step_seconds(copy.deepcopy(model), images, labels,
                                                                        cli_options, device, make_trainer)

        sides = {
            "lightning": lambda: throughput.lightning_throughput(copy.deepcopy(model), images, labels, options, device),
            "plain": lambda: throughput.plain_throughput(copy.deepcopy(model), images, labels, options, device),
            "cli_trainer": functools.partial(cli_rate, True)}
        if args.cli_without_bar:
            sides["cli_no_bar"] = functools.partial(cli_rate, False)
        runs = {side: [] for side in sides}
        for repeat in range(args.repeats):
            # Reversed every other repeat: a side measured first (clocks rising, caches cold)
            # is not always the same one.
            for side in (list(sides) if repeat % 2 == 0 else list(sides)[::-1]):
                runs[side].append(sides[side]())
        rates = {side: statistics.median(values) for side, values in runs.items()}
        return {"timed_steps": steps, "lightning_images_per_s": rates["lightning"], "plain_images_per_s": rates["plain"],
                "ratio": rates["lightning"] / rates["plain"], "cli_trainer_images_per_s": rates["cli_trainer"],
                "cli_ratio": rates["cli_trainer"] / rates["plain"],
                **({"cli_no_bar_images_per_s": rates["cli_no_bar"], "cli_no_bar_ratio": rates["cli_no_bar"] / rates["plain"]}
                   if "cli_no_bar" in rates else {}),
                **{f"{side}_runs_images_per_s": values for side, values in runs.items()}}

    return [({"family": family, "precision": precision}, functools.partial(measure, family, precision))
            for family in args.families for precision in ("32-true", "bf16-mixed")]


def compile_comparison(args, device, images, labels) -> list[Measurement]:
    precision = "bf16-mixed" if device.type == "cuda" else "32-true"

    def measure(compile_: bool) -> dict:
        L.seed_everything(0, verbose=False)
        model = throughput.build("diffusion", "small" if args.tiny else "config")
        options = throughput_args(args, precision, args.batch_size, compile_)
        return {"lightning_images_per_s": throughput.lightning_throughput(model, images, labels, options, device)}

    return [({"compile": compile_, "backend": args.compile_backend if compile_ else "-", "precision": precision},
             functools.partial(measure, compile_)) for compile_ in (False, True)]


def diffusers_comparison(args, device) -> list[Measurement]:
    import diffusion as diffusion_benchmark

    options = argparse.Namespace(
        device=str(device), image_size=32, bf16=False, channels_last=False, compile=False,
        compile_mode="default", warmup_steps=args.warmup_steps, train_steps=args.steps,
        sample_runs=1, sampling_steps=2 if args.tiny else 50)
    models = {"ours": diffusion_benchmark.ours, "diffusers UNet2DModel": diffusion_benchmark.diffusers_model}

    def measure(name: str, batch_size: int) -> dict:
        torch.manual_seed(0)
        return diffusion_benchmark.measure(name, *models[name](options, False), options, batch_size)

    return [({"model": name, "batch": batch_size}, functools.partial(measure, name, batch_size))
            for batch_size in ((4,) if args.tiny else (128, 512)) for name in models]


def feature_network_path(args, device) -> str:
    """The MNIST feature network for FID: the default checkpoint, or one trained now."""
    from lightning_gen.callbacks.quality import default_feature_network
    from lightning_gen.metrics.features import MNISTClassifier

    path = default_feature_network()
    if os.path.isfile(path) and not args.tiny:
        return path
    path = str(Path(args.output_dir) / "mnist_features.ckpt")
    classifier = MNISTClassifier(base_channels=4, feature_dim=16) if args.tiny else MNISTClassifier()
    data = MNISTDataModule(batch_size=256, download=False, device_resident=True)
    trainer = L.Trainer(accelerator=device.type if device.type != "cuda" else "gpu", devices=1,
                        max_epochs=1, max_steps=2 if args.tiny else -1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, limit_val_batches=0)
    trainer.fit(classifier, datamodule=data)
    trainer.save_checkpoint(path)
    return path


def mnist_test_digits() -> torch.Tensor:
    """The 10,000 MNIST test digits, (N, 1, 28, 28) in [0, 1]."""
    data = MNISTDataModule(download=False)
    data.setup("test")
    return images_to_batch((data.test_set.images, data.test_set.labels))[0]


def fid_floor(network, real: torch.Tensor, training_images: torch.Tensor) -> float:
    """FID of training digits (uint8, as many as the samples scored) against the real features
    ``real``: what a model that drew the data itself would score (FID is biased upward at finite N)."""
    from lightning_gen.metrics import extract_features, fid_kid_from_features

    digits, _ = images_to_batch((training_images, torch.zeros(len(training_images))))
    fid, _ = fid_kid_from_features(real.cpu(), extract_features(network, digits).cpu(),
                                   kid_subset_size=min(1000, len(training_images)))
    return float(fid)


def mnist_fid_floor(samples: int, feature_network: str | None = None) -> float:
    """The FID floor of the fits' table on this machine's CPU: ``samples`` training digits
    against the 10,000 test digits, through the default MNIST feature network.

        python -c "import sys; sys.path[:0] = ['.', 'benchmarks']; import gpu_check; print(gpu_check.mnist_fid_floor(5000))"
    """
    from lightning_gen.callbacks.quality import default_feature_network
    from lightning_gen.metrics import load_feature_network, real_features

    path = feature_network or default_feature_network()
    network = load_feature_network(path)
    data = MNISTDataModule(download=False)
    data.setup("fit")
    return fid_floor(network, real_features(network, path, mnist_test_digits(), name="MNISTDataModule"),
                     data.train_set.images[:samples])


def short_fits(args, device, images) -> list[Measurement]:
    import yaml

    from lightning_gen.metrics import extract_features, fid_kid_from_features, load_feature_network, real_features

    test_digits = mnist_test_digits()

    @functools.cache  # trained (when missing) and loaded once, for the first fit that needs it
    def scoring():
        """The feature network, the test digits' features and the FID floor at --fid-samples."""
        path = feature_network_path(args, device)
        network = load_feature_network(path).to(device)
        real = real_features(network, path, test_digits, name="MNISTDataModule")
        return network, real, fid_floor(network, real, images[: args.fid_samples])

    def measure(family: str) -> dict:
        network, real, floor = scoring()
        L.seed_everything(0, verbose=False)
        model = throughput.build(family, "small" if args.tiny else "config")
        config = yaml.safe_load((REPO / "configs" / throughput.FAMILIES[family][0]).read_text())
        data = MNISTDataModule(batch_size=config["data"]["init_args"].get("batch_size", 128),
                               download=False, device_resident=True)
        limits = {"max_steps": 3} if args.tiny else {"max_time": datetime.timedelta(seconds=args.fit_seconds)}
        trainer = L.Trainer(accelerator=device.type if device.type != "cuda" else "gpu", devices=1,
                            precision="bf16-mixed" if device.type == "cuda" else "32-true",
                            logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            limit_val_batches=0, num_sanity_val_steps=0, max_epochs=-1, **limits)
        start = time.perf_counter()
        trainer.fit(model, datamodule=data)
        seconds = time.perf_counter() - start
        model = model.to(device).eval()
        torch.manual_seed(2)
        options = throughput.FAMILIES[family][2]
        fake = torch.cat([extract_features(network, model.sample(min(500, args.fid_samples - done), **options).clamp(0, 1))
                          for done in range(0, args.fid_samples, 500)])
        fid, _ = fid_kid_from_features(real.cpu(), fake.cpu(), kid_subset_size=min(1000, args.fid_samples))
        row = {"steps": trainer.global_step, "seconds": seconds, "fid": float(fid), "fid_samples": args.fid_samples,
               "fid_floor": floor}
        x, y = test_digits[:256].to(device), None
        with torch.no_grad():
            if family == "vae":
                # log_prob is the importance-weighted lower bound on log p(x): its negative bounds the NLL
                row["test_nll_nats"] = -model.log_prob(x, num_samples=16 if args.tiny else 100).mean().item()
            elif family == "diffusion":
                row["test_nll_nats"] = model.variational_bound(x, y, timesteps=4 if args.tiny else 64).mean().item()
        return row

    return [({"family": family}, functools.partial(measure, family)) for family in FIT_FAMILIES]


def run_parts(parts: dict[str, Callable[[], list[Measurement]]], results: dict, save: Callable[[dict], None],
              deadline: float | None = None) -> int:
    """Runs every measurement of every part, in order, into ``results[part]``; returns how many
    failed. A measurement that raises leaves a row with its traceback under "error" and the rest
    still run (one lent GPU may be all there is: a break in one family must not cost the others'
    figures); past ``deadline`` (``time.perf_counter()``) the rest are rows that say so. The
    results are saved after every row, so a run killed from outside keeps what it measured."""
    failures = 0
    for name, make_measurements in parts.items():
        rows = results.setdefault(name, [])
        started = time.perf_counter()
        try:
            measurements = make_measurements()
        except Exception:  # the part could not even set up: one row says why
            measurements = [({"error": traceback.format_exc()}, None)]
        for key, measure in measurements:
            if measure is None:
                row = key
            elif deadline is not None and time.perf_counter() > deadline:
                row = {**key, "error": "not measured: the run reached --time-limit"}
            else:
                try:
                    row = {**key, **measure()}
                except Exception:
                    row = {**key, "error": traceback.format_exc()}
            rows.append(row)
            results[f"{name}_seconds"] = time.perf_counter() - started
            if "error" in row:
                failures += 1
                print(f"FAILED {name} {key}:\n{row['error']}", file=sys.stderr, flush=True)
            else:
                print(f"{name} {row}", flush=True)
            save(results)
    return failures


def failure(row: dict) -> str:
    return "failed: " + row["error"].strip().splitlines()[-1].replace("|", "/")


def markdown(results: dict) -> str:
    lines = [f"# GPU check ({results['date']}, {results['hardware']}, torch {results['torch']}, "
             f"lightning {results['lightning']})", "", f"    {results['command']}", "",
             f"fp32 matrix products: torch.get_float32_matmul_precision() = '{results['float32_matmul_precision']}', "
             f"cuDNN TF32 {results['cudnn_allow_tf32']} (PyTorch's defaults).", ""]
    failed = [(part, row) for part in PARTS for row in results.get(part, []) if "error" in row]
    if failed:
        lines += [f"**Failed: {len(failed)} measurement(s)**; the rows below say which, the JSON has the tracebacks.", ""]
    if results.get("throughput"):
        if results.get("repeats", 1) > 1:
            lines += [f"Training images/s: medians of {results['repeats']} runs of each side, the order of the "
                      "sides reversed every other run (the JSON has every run).", ""]
        without_bar = any("cli_no_bar_ratio" in r for r in results["throughput"])
        lines += ["| family | precision | timed steps | Lightning img/s | plain img/s | ratio | cli.py's Trainer img/s "
                  "| ratio |" + (" same, no progress bar, img/s | ratio |" if without_bar else ""),
                  "|---|---|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if without_bar else "")]
        lines += [f"| {r['family']} | {r['precision']} | | {failure(r)} | | | | |" + (" | |" if without_bar else "")
                  if "error" in r else
                  f"| {r['family']} | {r['precision']} | {r.get('timed_steps', '')} | {r['lightning_images_per_s']:.1f} | "
                  f"{r['plain_images_per_s']:.1f} | {r['ratio']:.3f} | {r['cli_trainer_images_per_s']:.1f} | "
                  f"{r['cli_ratio']:.3f} |"
                  + (f" {r['cli_no_bar_images_per_s']:.1f} | {r['cli_no_bar_ratio']:.3f} |" if without_bar else "")
                  for r in results["throughput"]]
        lines.append("")
    if results.get("compile"):
        lines += ["| diffusion U-Net | backend | precision | Lightning img/s |", "|---|---|---|---:|"]
        lines += [f"| compile {r.get('compile')} | {r.get('backend')} | {r.get('precision')} | "
                  + (failure(r) if "error" in r else f"{r['lightning_images_per_s']:.1f}") + " |"
                  for r in results["compile"]]
        lines.append("")
    if results.get("diffusers"):
        lines += ["| model | parameters | batch | train img/s | DDIM sampling img/s |", "|---|---:|---:|---:|---:|"]
        lines += [f"| {r.get('model')} | | {r.get('batch')} | {failure(r)} | |" if "error" in r else
                  f"| {r['model']} | {r['parameters']:,} | {r['batch']} | {r['train']:.1f} | {r['sample']:.2f} |"
                  for r in results["diffusers"]]
        lines.append("")
    if results.get("fits"):
        lines += ["| family | steps | seconds | FID | FID floor | test NLL (nats) |", "|---|---:|---:|---:|---:|---:|"]
        lines += [f"| {r.get('family')} | {failure(r)} | | | | |" if "error" in r else
                  f"| {r['family']} | {r['steps']} | {r['seconds']:.0f} | {r['fid']:.2f} | "
                  f"{r.get('fid_floor', float('nan')):.2f} | {r.get('test_nll_nats', float('nan')):.2f} |" for r in results["fits"]]
    return "\n".join(lines) + "\n"


PARTS = ("throughput", "diffusers", "fits", "compile")  # the order they run in


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="small networks, few steps (the test)")
    parser.add_argument("--batch-size", type=count, default=None, help="default 512 (tiny: 8)")
    parser.add_argument("--steps", type=count, default=None, help="timed steps (default 20, tiny 1)")
    parser.add_argument("--warmup-steps", type=count, default=None, help="default 5 (tiny 1)")
    parser.add_argument("--fit-seconds", type=float, default=60.0,
                        help="seconds of each fit (default 60: the whole run took 452 s on an H200)")
    parser.add_argument("--fid-samples", type=count, default=None, help="default 5000 (tiny 20)")
    parser.add_argument("--skip-diffusers", action="store_true")
    parser.add_argument("--compile-backend", default="inductor", choices=("inductor", "aot_eager"),
                        help="torch.compile backend of part 2; aot_eager skips kernel generation "
                             "(about 100 s of C++ compilation on a 2-core CPU)")
    parser.add_argument("--time-limit", type=float, default=None,
                        help="seconds: measurements not started by then are rows that say so (a "
                             "failure), so a lease that ends keeps the rest of the run's files")
    parser.add_argument("--min-timed-seconds", type=float, default=None,
                        help="part 1: more timed steps than --steps where those would take less than this "
                             "in the plain loop, up to one epoch's batches (default 0.5; tiny 0)")
    parser.add_argument("--repeats", type=count, default=1,
                        help="part 1: runs of each side, their order reversed every other run; the table "
                             "gives medians, the JSON every run")
    parser.add_argument("--families", nargs="+", default=list(throughput.FAMILIES), choices=list(throughput.FAMILIES),
                        help="part 1's families (default all)")
    parser.add_argument("--cli-without-bar", action="store_true",
                        help="part 1 also times cli.py's Trainer without its progress bar, whose redraws "
                             "(10 a second) read the loss from the device")
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS, help="the parts to run (default all)")
    parser.add_argument("--output-dir", default=str(REPO / "benchmarks" / "results"))
    args = parser.parse_args()
    started = time.perf_counter()
    defaults = {"batch_size": (512, 8), "steps": (20, 1), "warmup_steps": (5, 1), "fid_samples": (5000, 20),
                "min_timed_seconds": (0.5, 0.0)}
    for name, (full, tiny) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, tiny if args.tiny else full)
    if not args.skip_diffusers and "diffusers" in args.parts:
        try:  # checked before anything runs: a missing extra must not cost the other parts' time
            import diffusers  # noqa: F401
        except ImportError:
            parser.error("diffusers is not installed: pip install -e '.[bench]', or pass "
                         "--skip-diffusers to leave the comparison out")
    device = torch.device(args.device)
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    results = {"date": str(datetime.date.today()), "hardware": hardware(device), "torch": torch.__version__,
               "lightning": L.__version__, "command": "python benchmarks/gpu_check.py " + " ".join(sys.argv[1:]),
               "float32_matmul_precision": torch.get_float32_matmul_precision(),
               "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32, "repeats": args.repeats}

    def save(results: dict) -> None:
        (output / "gpu_check.json").write_text(json.dumps(results, indent=2) + "\n")
        (output / "gpu_check.md").write_text(markdown(results))

    data = MNISTDataModule(download=False)
    data.setup("fit")
    images, labels = data.train_set.images, data.train_set.labels
    # The compilation last: its time is the hardest to foresee, and under --time-limit the parts
    # before it keep theirs.
    parts = {"throughput": lambda: training_throughput(args, device, images, labels)}
    if not args.skip_diffusers:
        parts["diffusers"] = lambda: diffusers_comparison(args, device)
    parts["fits"] = lambda: short_fits(args, device, images)
    parts["compile"] = lambda: compile_comparison(args, device, images, labels)
    parts = {name: part for name, part in parts.items() if name in args.parts}
    deadline = None if args.time_limit is None else started + args.time_limit
    failures = run_parts(parts, results, save, deadline)
    results["seconds"] = time.perf_counter() - started
    save(results)
    print(markdown(results))
    if failures:
        sys.exit(f"gpu_check: {failures} measurement(s) failed; their rows in {output / 'gpu_check.md'} say which")


if __name__ == "__main__":
    main()
