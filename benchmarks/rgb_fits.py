"""One short fit per image family on 32x32 RGB images, through the ordinary command line.

For each ``configs/<family>_cifar10.yaml`` this runs, in subprocesses from the repository root,
what a user runs to train on a folder of their own images (README, "Train on your own images"):

    python cli.py fit --config configs/<family>_cifar10.yaml --data datamodules.ImageFolderDataModule \\
        --data.init_args.root <folder> --data.init_args.image_size 32 ... --trainer.max_steps N
    python cli.py predict --config configs/<family>_cifar10.yaml ... --ckpt_path <scratch>/checkpoints/last.ckpt

then copies the ``grid.png`` that predict writes to ``<output folder>/rgb_fits_<family>.png`` and
writes a markdown table (time per step, images/s, predict time, the grids) to ``--output``.

Everything a run writes goes to ``--scratch`` (default ``benchmarks/runs/rgb_fits/``, ignored by
git), never to the repository's ``checkpoints/``, ``outputs/`` or ``logs/``: the config's
ModelCheckpoint list is passed again with its ``dirpath`` moved there (the command line cannot
change one element of a list of callbacks), and ``prediction_writer.output_dir`` and
``trainer.default_root_dir`` point there too. ``--trainer.logger false`` (and WANDB_MODE=offline)
keep W&B out.

Time per step: ``StepTimer`` (below, appended to the callbacks) records the time of every
``on_train_batch_end``; a step's time is the interval between consecutive ones (the whole loop:
fetching the batch, forward, backward, optimizer step(s), hooks), the first ``--warmup-steps``
intervals are dropped and the median of the rest is reported. Start-up (imports, decoding or
reading the image cache, building the model) and the validation at the end are outside it; the
fit command's wall time, which includes them, is reported beside it. One step is one training
batch: for the GAN, whose ``max_steps`` counts every optimizer step under manual optimization
(discriminator and generator: 2 per batch with n_critic 1), the script passes ``2 * steps``.

A family whose fit or predict fails stops the script with exit status 1 and a message naming the
family, the command and the tail of its stderr (``LIGHTNING_GEN_TRACEBACK=1`` is set, so that
tail is a traceback); nothing is skipped.

    python benchmarks/rgb_fits.py --steps 20 --output benchmarks/results/rgb_fits.md
    python benchmarks/rgb_fits.py --families vae gan --steps 5 --output /tmp/rgb_fits.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import lightning as L

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the benchmarks' shared helpers
from arguments import count, count_or_zero  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
FAMILIES = ("autoencoder_conv", "vae", "gan", "pixelcnn", "pixeltransformer", "realnvp", "diffusion",
            "flow_matching")
LOADER_IMAGES = 5000  # the loader benchmark's folder (benchmarks/loader.py), reused by default

# What this 2-core CPU needs for a fit of a few minutes, per family. batch: the training batch
# (None: the config's); predict: samples predict draws (in one batch); predict_options: more
# predict options; why: the reason, printed in the results.
CPU_SETTINGS: dict[str, dict] = {
    "autoencoder_conv": {"batch": None, "predict": 64},
    "vae": {"batch": None, "predict": 64},
    "gan": {"batch": None, "predict": 64},
    "pixelcnn": {
        "batch": 8, "predict": 4,
        "predict_options": ["--model.init_args.predict_mode", "complete",
                            "--model.init_args.predict_given_rows", "28"],
        "why": "config batch 64: a 16-image step took 3-6 s here. Sampling a whole 32x32x3 image takes 3072 "
               "network passes (about 0.04-0.09 s each at batch 1-4 here, so 2-4 minutes for 4 images): "
               "predict completes the bottom 4 rows of 4 test images instead (384 passes)"},
    "pixeltransformer": {
        "batch": 2, "predict": 4,
        "why": "config batch 32: a 16-image step took 70-85 s here in float32 (attention over 3072 "
               "positions), a 1-image step 1.8 s in float32 and 1.1 s under bf16 autocast (the config's "
               "bf16-mixed, kept)"},
    "realnvp": {"batch": 16, "predict": 64, "why": "config batch 64: a 16-image step took 2.3 s here"},
    "diffusion": {"batch": 16, "predict": 16,
                  "why": "config batch 128 (38M-parameter U-Net): a 16-image step took 2.2-3.7 s here; "
                         "DDIM-50 sampling is 50 passes"},
    "flow_matching": {"batch": 16, "predict": 16,
                      "why": "same U-Net as diffusion; Heun-25 sampling is 49 passes"},
}


class StepTimer(L.Callback):
    """Record when every training batch ends, how long the fit and predict loops take, the batch
    sizes and torch's thread count, and write them as JSON to ``path`` at the end of a fit or a
    predict (benchmarks/rgb_fits.py reads it)."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path
        self.record: dict = {"batch_ends": [], "batch_sizes": []}

    def _write(self) -> None:
        import torch

        self.record["threads"] = torch.get_num_threads()
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        Path(self.path).write_text(json.dumps(self.record))

    def on_train_start(self, trainer, pl_module) -> None:
        self.record["train_start"] = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.record["batch_ends"].append(time.perf_counter())
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        self.record["batch_sizes"].append(len(x))

    def on_train_end(self, trainer, pl_module) -> None:
        self.record["train_end"] = time.perf_counter()
        self.record["global_step"] = trainer.global_step
        self._write()

    def on_predict_start(self, trainer, pl_module) -> None:
        self.record["predict_start"] = time.perf_counter()

    def on_predict_end(self, trainer, pl_module) -> None:
        self.record["predict_end"] = time.perf_counter()
        self._write()


class FitFailed(RuntimeError):
    pass


def shown(path: Path) -> str:
    """A path as the results show it: relative to the repository when inside it."""
    resolved = Path(path).resolve()
    try:
        return str(resolved.relative_to(REPO))
    except ValueError:
        return str(resolved)  # absolute: the commands run from the repository root


def config_callbacks(config: Path, dirpath: Path) -> list[dict]:
    """The config's trainer callbacks, with every ModelCheckpoint's dirpath set to ``dirpath``."""
    import yaml

    callbacks = yaml.safe_load(config.read_text())["trainer"].get("callbacks") or []
    moved = []
    for callback in callbacks:
        callback = json.loads(json.dumps(callback))  # a copy
        if callback["class_path"].rsplit(".", 1)[-1] == "ModelCheckpoint":
            callback.setdefault("init_args", {})["dirpath"] = str(dirpath)
        moved.append(callback)
    if not any(c["class_path"].endswith("ModelCheckpoint") for c in moved):
        raise FitFailed(f"{config} has no ModelCheckpoint callback: predict would have no last.ckpt to read")
    return moved


def run_command(family: str, what: str, command: list[str], log_dir: Path, env: dict, timeout: float) -> float:
    """Run ``command`` from the repository root, stdout and stderr into ``log_dir``; returns its wall
    time. Raises FitFailed (naming the family, the command and the stderr tail) when it fails."""
    stdout_path, stderr_path = log_dir / f"{what}.stdout.log", log_dir / f"{what}.stderr.log"
    start = time.perf_counter()
    with open(stdout_path, "w") as stdout, open(stderr_path, "w") as stderr:
        try:
            returncode = subprocess.run(command, cwd=REPO, env=env, stdout=stdout, stderr=stderr,
                                        timeout=timeout, check=False).returncode
        except subprocess.TimeoutExpired:
            returncode = f"timeout after {timeout:g} s"
    seconds = time.perf_counter() - start
    if returncode != 0:
        tail = stderr_path.read_text(errors="replace")[-4000:]
        raise FitFailed(f"{family}: {what} failed (exit status {returncode}) after {seconds:.0f} s\n"
                        f"command: {shlex.join(command)}\n"
                        f"stderr tail ({stderr_path}):\n{tail}")
    return seconds


def fit_and_predict(family: str, args: argparse.Namespace, root: Path, env: dict) -> dict:
    """Fit and predict one family; returns its row's numbers and commands."""
    config = REPO / "configs" / f"{family}_cifar10.yaml"
    if not config.is_file():
        raise FitFailed(f"{family}: no config {config}")
    settings = CPU_SETTINGS[family]
    scratch = args.scratch / family
    if scratch.exists():
        shutil.rmtree(scratch)  # this family's earlier run (the image cache, one level up, stays)
    scratch.mkdir(parents=True)
    checkpoints, predictions = scratch / "checkpoints", scratch / "predictions"
    batch = args.batch_size or settings["batch"]
    predict_samples = args.predict_samples or settings["predict"]
    # A GAN step (one batch) is two optimizer steps, and max_steps counts optimizer steps.
    max_steps = args.steps * 2 if family == "gan" else args.steps
    data = ["--data", "datamodules.ImageFolderDataModule", "--data.init_args.root", shown(root),
            "--data.init_args.image_size", "32", "--data.init_args.cache_dir", shown(args.scratch / "cache")]
    common = ["--trainer.logger", "false", "--trainer.default_root_dir", shown(scratch)]
    callbacks = json.dumps(config_callbacks(config, Path(shown(checkpoints))), separators=(",", ":"))

    def timer(name: str) -> list[str]:
        return ["--trainer.callbacks+=benchmarks.rgb_fits.StepTimer",
                f"--trainer.callbacks.init_args.path={shown(scratch / name)}"]

    fit = [sys.executable, "cli.py", "fit", "--config", shown(config), *data,
           *(["--data.init_args.batch_size", str(batch)] if batch else []),
           "--trainer.max_steps", str(max_steps), "--trainer.val_check_interval", str(args.steps),
           "--trainer.check_val_every_n_epoch", "null", "--trainer.limit_val_batches", str(args.val_batches),
           "--trainer.num_sanity_val_steps", "0", "--sample_logger.every_n_epochs", "0", *common,
           f"--trainer.callbacks={callbacks}", *timer("fit_times.json")]
    print(f"[{family}] fit: {shlex.join(fit)}", flush=True)
    fit_seconds = run_command(family, "fit", fit, scratch, env, args.timeout)
    last = checkpoints / "last.ckpt"
    fit_times = scratch / "fit_times.json"
    if not last.is_file() or not fit_times.is_file():
        raise FitFailed(f"{family}: fit exited 0 but wrote no {'last.ckpt' if not last.is_file() else 'step times'} "
                        f"({last}, {fit_times}); see {scratch}/fit.stderr.log")
    record = json.loads(fit_times.read_text())
    ends = record["batch_ends"]
    if len(ends) != args.steps:
        raise FitFailed(f"{family}: asked for {args.steps} training batches, the fit ran {len(ends)}")
    warmup = min(args.warmup_steps, len(ends) - 1)
    # interval i: from the end of batch i - 1 to the end of batch i (the first batch has no start
    # of its own here: it is always among the warm-up ones when there is more than one step).
    intervals = [b - a for a, b in zip([record["train_start"], *ends[:-1]], ends)][warmup:]
    step_seconds = statistics.median(intervals)
    fit_batch = statistics.median(record["batch_sizes"])

    predict = [sys.executable, "cli.py", "predict", "--config", shown(config), *data,
               "--data.init_args.batch_size", str(predict_samples),
               "--data.init_args.num_predict_samples", str(predict_samples),
               *settings.get("predict_options", []), *common,
               "--prediction_writer.output_dir", shown(predictions),
               f"--trainer.callbacks={callbacks}", *timer("predict_times.json"),
               "--ckpt_path", shown(last)]
    print(f"[{family}] predict: {shlex.join(predict)}", flush=True)
    predict_seconds = run_command(family, "predict", predict, scratch, env, args.timeout)
    grid = predictions / "grid.png"
    if not grid.is_file():
        raise FitFailed(f"{family}: predict exited 0 but wrote no {grid}; see {scratch}/predict.stderr.log")
    predict_record = json.loads((scratch / "predict_times.json").read_text())
    target = args.output.parent / f"rgb_fits_{family}.png"
    shutil.copyfile(grid, target)
    row = {
        "family": family, "config": shown(config), "batch": int(fit_batch), "steps": len(ends),
        "max_steps": max_steps, "timed_steps": len(intervals), "step_s": step_seconds,
        "step_s_min": min(intervals), "step_s_max": max(intervals),
        "images_per_s": fit_batch / step_seconds,
        "fit_loop_s": record["train_end"] - record["train_start"], "fit_command_s": fit_seconds,
        "predict_samples": predict_samples,
        "predict_loop_s": predict_record["predict_end"] - predict_record["predict_start"],
        "predict_command_s": predict_seconds, "threads": record["threads"], "grid": target.name,
        "batch_override": batch, "predict_options": settings.get("predict_options", []),
        "why": settings.get("why", ""), "fit_command": fit, "predict_command": predict,
    }
    print(f"[{family}] median {step_seconds:.3f} s/step ({row['images_per_s']:.1f} img/s), fit command "
          f"{fit_seconds:.0f} s, predict {seconds(row['predict_loop_s'])} s (command {predict_seconds:.0f} s) -> "
          f"{shown(target)}", flush=True)
    return row


def load_text() -> str:
    """`uptime`'s output, else the load averages."""
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=10, check=False).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "load average: " + ", ".join(f"{value:.2f}" for value in os.getloadavg())


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def seconds(value: float) -> str:
    """Seconds with 2 significant digits below 1 s (a fast predict takes milliseconds), else 0.1 s."""
    return f"{value:.2g}" if value < 1 else f"{value:.1f}"


def display(command: list[str]) -> str:
    return shlex.join(["python", *command[1:]])


def report(rows: list[dict], args: argparse.Namespace, started: str, load_before: str, load_after: str,
           wall: float, root: Path) -> str:
    import torch

    threads = sorted({row["threads"] for row in rows})
    own_command = "python benchmarks/rgb_fits.py " + shlex.join(args.argv)
    lines = [
        "# One short fit per family on 32x32 RGB images (CPU)",
        "",
        (f"{started}, {cpu_name()}, {os.cpu_count()} core(s), torch {torch.__version__} with "
         f"{'/'.join(map(str, threads))} thread(s) in the fit processes, no GPU, "
         f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'PASSIVE')}. Whole run: {wall / 60:.1f} minutes."),
        "",
        "Command:",
        "",
        f"    {own_command.strip()}",
        "",
        f"`uptime` before: `{load_before}`  ",
        f"`uptime` after: `{load_after}`",
        "",
        ("Caveats: the machine is shared with other jobs (load average above), so each time can be off by "
         "tens of %. The data are synthetic (the loader benchmark's folder of "
         f"smooth random colour blobs, `{shown(root)}`, 10 class sub-folders), and each family trains "
         f"for {args.steps} steps with its config's optimizer: the grids show what a few steps learn, "
         "not the quality a family reaches. The diffusion and flow-matching configs warm the learning "
         "rate up over 5000 steps and sample from an EMA (0.9999) of the weights, the pixel transformer "
         "warms up over 1000 and RealNVP over 500 steps, so after a few steps their samples come from "
         "(nearly) untrained weights."),
        "",
        ("Every fit (`python cli.py fit --config configs/<family>_cifar10.yaml ...`, from the repository "
         "root) has these options beyond the config, besides the family's own in the table:"),
        "",
        (f"- data: `--data datamodules.ImageFolderDataModule --data.init_args.root {shown(root)} "
         f"--data.init_args.image_size 32 --data.init_args.cache_dir {shown(args.scratch / 'cache')}` "
         "(decoded once, then read from the cache);"),
        (f"- length: `--trainer.max_steps {args.steps}` (the GAN: `{2 * args.steps}`, as its max_steps counts "
         f"the discriminator's and the generator's optimizer steps), then validation once on "
         f"{args.val_batches} batch(es): `--trainer.val_check_interval {args.steps} "
         f"--trainer.check_val_every_n_epoch null --trainer.limit_val_batches {args.val_batches} "
         "--trainer.num_sanity_val_steps 0` (validation gives ModelCheckpoint its monitored metric);"),
        ("- no sampling after validation: `--sample_logger.every_n_epochs 0` (with no logger its grid "
         "goes nowhere; predict draws the samples);"),
        (f"- output in the scratch folder `{shown(args.scratch)}/<family>/`: `--trainer.logger false "
         "--trainer.default_root_dir <scratch>/<family>`, and `--trainer.callbacks=[...]`: the "
         "config's callbacks with ModelCheckpoint's dirpath set to `<scratch>/<family>/checkpoints` "
         "(the command line cannot change one element of a list), plus "
         "`--trainer.callbacks+=benchmarks.rgb_fits.StepTimer` (the timer)."),
        "",
        ("Every predict: the same data, logger, root dir and callbacks options, "
         "`--data.init_args.num_predict_samples N --data.init_args.batch_size N` (N in the table: one "
         "batch), `--prediction_writer.output_dir <scratch>/<family>/predictions`, `--ckpt_path "
         "<scratch>/<family>/checkpoints/last.ckpt`; its `grid.png` is copied here."),
        "",
        (f"s/step: median of the intervals between consecutive `on_train_batch_end` hooks (batch fetch, "
         f"forward, backward, optimizer step(s), hooks), the first {args.warmup_steps} dropped; img/s = "
         "batch / median s/step. fit cmd s: wall time of the whole fit command (Python start-up, imports, "
         "reading the image cache, building the model, the steps, the validation, the checkpoint). "
         "predict s: the predict loop (sampling and writing the files) / the whole predict command."),
        "",
        ("| family | config | overrides (beyond the above) | steps | batch | median s/step (min-max) | img/s "
         "| fit cmd s | predict samples | predict s (loop / cmd) | grid |"),
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        overrides = []
        if row["batch_override"]:
            overrides.append(f"`--data.init_args.batch_size {row['batch_override']}`")
        if row["predict_options"]:
            overrides.append("predict: `" + " ".join(row["predict_options"]) + "`")
        lines.append(
            f"| {row['family']} | `{row['config']}` | {', '.join(overrides) or 'none'} | {row['steps']} "
            f"| {row['batch']} | {row['step_s']:.3f} ({row['step_s_min']:.3f}-{row['step_s_max']:.3f}) "
            f"| {row['images_per_s']:.1f} | {row['fit_command_s']:.0f} | {row['predict_samples']} "
            f"| {seconds(row['predict_loop_s'])} / {row['predict_command_s']:.0f} | [png]({row['grid']}) |")
    reasons = [f"- {row['family']}: {row['why']}." for row in rows if row["why"]]
    if reasons:
        lines += ["", "Why the overrides (single measurements on this CPU before the run):", "", *reasons]
    if args.batch_size:
        lines += ["", f"`--batch-size {args.batch_size}` set every family's training batch."]
    lines += ["", "## Sample grids", ""]
    for row in rows:
        what = ("completions (top 28 rows given)" if "complete" in row["predict_options"] else "samples")
        lines += [f"### {row['family']}: {row['predict_samples']} {what} after {row['steps']} steps", "",
                  f"![{row['family']} {what}]({row['grid']})", ""]
    lines += ["## Exact commands", ""]
    for row in rows:
        lines += [f"{row['family']}:", "", f"    {display(row['fit_command'])}", "",
                  f"    {display(row['predict_command'])}", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20, help="training batches per family")
    parser.add_argument("--families", nargs="+", choices=FAMILIES, default=list(FAMILIES))
    parser.add_argument("--batch-size", type=count, default=None,
                        help="training batch of every family (default: the per-family CPU_SETTINGS)")
    parser.add_argument("--predict-samples", type=count, default=None,
                        help="samples predict draws, every family (default: the per-family CPU_SETTINGS)")
    parser.add_argument("--warmup-steps", type=count_or_zero, default=3, help="step times dropped before the median")
    parser.add_argument("--val-batches", type=int, default=2, help="validation batches at the end of the fit")
    parser.add_argument("--root", type=Path, default=None,
                        help=f"the image folder (default: the loader benchmark's {LOADER_IMAGES}-image folder "
                             "under benchmarks/runs/loader/, generated if missing)")
    parser.add_argument("--scratch", type=Path, default=REPO / "benchmarks" / "runs" / "rgb_fits",
                        help="folder for checkpoints, predictions, logs and the image cache")
    parser.add_argument("--output", type=Path, default=REPO / "benchmarks" / "results" / "rgb_fits.md",
                        help="the markdown results (overwritten); the grids go beside it")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds each command may take")
    args = parser.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else argv
    # The command line reads "1" for val_check_interval and limit_val_batches as the float 1.0
    # (a whole epoch, all the batches), so both start at 2.
    for name in ("steps", "val_batches"):
        if getattr(args, name) < 2:
            parser.error(f"--{name.replace('_', '-')} must be >= 2 (the Trainer would read 1 as 100%)")

    started_at = time.perf_counter()
    started = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    if args.root is None:
        sys.path.insert(0, str(REPO))
        from benchmarks.loader import make_folder

        root = make_folder(REPO / "benchmarks" / "runs" / "loader", LOADER_IMAGES)
    else:
        root = args.root
    args.scratch = args.scratch.resolve()
    args.output = args.output.resolve()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "WANDB_MODE": "offline", "LIGHTNING_GEN_TRACEBACK": "1"}
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    load_before = load_text()
    print(f"image folder {root}; {load_before}", flush=True)
    rows = []
    try:
        for family in args.families:
            rows.append(fit_and_predict(family, args, root, env))
    except FitFailed as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        sys.exit(1)
    load_after = load_text()
    text = report(rows, args, started, load_before, load_after, time.perf_counter() - started_at, root)
    args.output.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
