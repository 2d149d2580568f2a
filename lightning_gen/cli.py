"""The command line: LightningCLI over every model and data module.

    python cli.py fit --config configs/vae_mnist.yaml
    python cli.py fit --model VAE --data MNISTDataModule --trainer.max_epochs 5
    python cli.py predict --config configs/vae_mnist.yaml --ckpt_path checkpoints/vae_mnist/last.ckpt
    python cli.py features fit --config configs/mnist_features.yaml   # the FID/KID feature network

Every run has six callbacks whatever its config says: ``sample_logger`` (a sample grid or scatter
plot after validation, to whichever logger is set), ``prediction_writer`` (what ``predict``
writes: one PNG per sample, grid.png and samples.pt), ``image_quality`` (FID/KID of image models,
see lightning_gen.callbacks.ImageQualityMetrics), ``sample_distance`` (MMD and sliced
Wasserstein of 2-D models), ``checkpoint_on_terminate`` (last.ckpt on SIGTERM) and
``last_checkpoint`` (last.ckpt at the end of every fit, whether or not ``val/loss`` improved).
The quality metrics run after ``test`` by default, so ``cli.py test`` reports every metric that
applies to the model; ``--image_quality.every_n_epochs N`` adds them to validation. The model's
``data_shape`` is taken from the data module, so any image model runs on MNIST and any vector
model on the toy data unchanged.

What the command line guarantees (a run does what its command says, or stops):
- ``--ckpt_path`` must name a readable checkpoint of the class the config asks for; ``predict``
  needs one (without it the samples would come from an untrained model).
- Options that only change evaluation or sampling (``EVALUATION_OPTIONS`` of each model) come from
  the config and the command line, never from the checkpoint.
- SIGTERM (a scheduler's stop, ``timeout``) saves a resumable ``last.ckpt`` at the next batch
  boundary (of training, or of a validation inside the fit) and exits with status 143, naming the
  file it saved; a step that does not end within ``LIGHTNING_GEN_TERM_GRACE`` seconds (default
  60) is cut short, exiting 143 all the same.
- A mistake in the options or the data ends the run with a one-line ``error: ...`` and status 1;
  ``LIGHTNING_GEN_TRACEBACK=1`` shows the full traceback instead.
"""

from __future__ import annotations

import importlib
import os
import pickle
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

import datamodules  # noqa: F401  (registers the data modules for --data NAME)
import lightning_gen  # noqa: F401  (registers the models for --model NAME)
import lightning_gen.metrics  # noqa: F401  (registers MNISTClassifier)
from lightning_gen.base import CLASS_KEY, GenerativeModule
from lightning_gen.callbacks import (
    CheckpointOnTerminate, ImageQualityMetrics, LastCheckpointAtFitEnd, NullProfiler, PredictionWriter,
    SampleDistanceMetrics, SampleLogger, TimedProgressBar,
)

# Exit status after SIGTERM: 128 + 15, as a shell reports a process the signal ended.
SIGTERM_EXIT_STATUS = 143
# Checkpoint names that the Trainer resolves itself.
SPECIAL_CHECKPOINTS = ("last", "best", "hpc", "registry")


class CLIError(ValueError):
    """A command that cannot do what it says; the message says what to change."""


def cpu_probe(name: str) -> bool | None:
    """What torch's CPU feature probe ``torch.cpu.<name>`` says; None where this torch has none."""
    probe = getattr(torch.cpu, name, None)
    return None if probe is None else bool(probe())


BF16_PROBES = (("AMX", "_is_amx_tile_supported"), ("AVX512-BF16", "_is_avx512_bf16_supported"))


def cpu_bf16_units() -> list[str]:
    """The bf16 arithmetic this CPU's probes report ("AMX", "AVX512-BF16"; empty where neither,
    or where this torch has no probes). ``bf16_on_native_cpu`` trains in bf16-mixed where it is
    not empty: the laptop presets' training arithmetic ran 1.27-1.74x faster in bf16 on a Xeon
    with AMX and 1.28-1.76x on an AMD EPYC with AVX512-BF16 and no AMX (the pixel transformer
    0.87-0.91x on both; benchmarks/results/laptop.md)."""
    return [name for name, probe in BF16_PROBES if cpu_probe(probe)]


def cpu_has_bf16_arithmetic() -> bool:
    """Whether this CPU computes in bf16 itself (AVX512-BF16 or AMX). Without it, autocast to bf16
    emulates each op: one training step of configs/pixeltransformer_cifar10.yaml took 117 s
    bf16-mixed against 9 s in fp32 on such a CPU (2026-12-02). Unknown (a torch without these
    probes) counts as yes, so that nothing warns by mistake."""
    known = [found for found in (cpu_probe(probe) for _, probe in BF16_PROBES) if found is not None]
    return not known or any(known)


def runs_on_cpu(accelerator) -> bool:
    """Whether a Trainer given ``accelerator`` (a name, or None / "auto") trains on the CPU."""
    if accelerator is None or accelerator == "auto":
        mps = getattr(torch.backends, "mps", None)
        return not (torch.cuda.is_available() or (mps is not None and mps.is_available()))
    return accelerator == "cpu"


def warn_if_cpu_emulates_bf16(trainer) -> None:
    """The GPU configs train bf16-mixed; on a CPU without bf16 arithmetic that is the slowest
    choice, so say how to change it (the run goes on: it does what was asked, slowly)."""
    from lightning.pytorch.accelerators import CPUAccelerator
    from lightning.pytorch.utilities import rank_zero_warn

    if (isinstance(trainer.accelerator, CPUAccelerator) and str(trainer.precision).startswith("bf16")
            and not cpu_has_bf16_arithmetic()):
        rank_zero_warn(f"precision {trainer.precision} on a CPU without bf16 arithmetic is emulated, "
                       "often ten times slower than fp32: pass --trainer.precision 32-true")


def default_wandb_mode() -> None:
    """Run W&B offline unless the user has logged in or chosen a mode (WANDB_MODE)."""
    if "WANDB_MODE" in os.environ or os.environ.get("WANDB_API_KEY"):
        return
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        logged_in = netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")
    except OSError:
        logged_in = False
    if not logged_in:
        os.environ["WANDB_MODE"] = "offline"


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint file with torch's weights-only unpickler (which runs no code a file
    carries); raise CLIError naming the file when it is not a readable checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise CLIError(f"checkpoint {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise CLIError(f"{path} is not a readable checkpoint: it is corrupt, or holds Python objects "
                       "other than tensors and plain values, which are never unpickled (unpickling "
                       "can run code the file carries)") from error
    except EOFError as error:
        raise CLIError(f"{path} is not a readable checkpoint: it is empty or truncated") from error
    except Exception as error:  # not a torch file at all, or damaged inside
        first_line = (str(error).splitlines() or [""])[0]
        raise CLIError(f"{path} is not a readable checkpoint ({type(error).__name__}: {first_line})") from error
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CLIError(f"{path} is not a Lightning checkpoint (it has no state_dict)")
    return checkpoint


def checkpoint_class(checkpoint: dict[str, Any]) -> str | None:
    """The class path of the model a checkpoint holds, where it says."""
    saved = checkpoint.get(CLASS_KEY)
    if saved is None:
        saved = checkpoint.get("hyper_parameters", {}).get("_class_path")
    return saved


def resolve_class(path: str) -> type | None:
    module_name, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError):
        return None


class GenerativeCLI(LightningCLI):
    def parse_arguments(self, parser, args) -> None:
        """Parse, then check ``--ckpt_path`` before LightningCLI lays the checkpoint's
        hyperparameters over the command line (which would also swap the model's class)."""
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        if subcommand is None:
            return
        ckpt_path = self.config[subcommand].get("ckpt_path")
        if ckpt_path is None:
            if subcommand == "predict":
                raise CLIError("predict needs trained weights: pass --ckpt_path PATH (or --ckpt_path "
                               "last, the newest last.ckpt of the config's ModelCheckpoint)")
            return
        if str(ckpt_path) in SPECIAL_CHECKPOINTS:
            return
        checkpoint = read_checkpoint(ckpt_path)
        saved = checkpoint_class(checkpoint)
        wanted = (self.config[subcommand].get("model") or {}).get("class_path")
        if saved is None or wanted is None:
            return
        saved_class, wanted_class = resolve_class(saved), resolve_class(wanted)
        if saved_class is not wanted_class:
            raise CLIError(f"checkpoint {ckpt_path} holds a {saved} model, but the command asks for "
                           f"{wanted}: use the config it was trained with (or --model "
                           f"{saved.rpartition('.')[2]})")

    def before_instantiate_classes(self) -> None:
        """``bf16_on_native_cpu``: choose the precision from the CPU before the Trainer exists, and
        write the choice into the config, so the saved config.yaml names the precision used."""
        config = self.config.get(str(self.subcommand), self.config)
        if not config.get("bf16_on_native_cpu"):
            return
        trainer = config["trainer"]
        units = cpu_bf16_units()
        if runs_on_cpu(trainer.get("accelerator")) and units:
            trainer["precision"] = "bf16-mixed"
            rank_zero_info(f"bf16_on_native_cpu: this CPU computes in bf16 ({', '.join(units)}): "
                           "trainer.precision bf16-mixed")

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        warn_if_cpu_emulates_bf16(self.trainer)  # once, whichever subcommand runs

    def instantiate_trainer(self, **kwargs: Any):
        """The Trainer, with ``TimedProgressBar`` for Lightning's default bar (see there) unless
        the config turns the bar off or names a progress bar of its own, and ``NullProfiler`` for
        Lightning's default profiler unless the config names one (callbacks/hooks.py)."""
        from lightning.pytorch.callbacks.progress import ProgressBar

        trainer = {**self._get(self.config_init, "trainer", default={}), **kwargs}
        if trainer.get("profiler") is None:
            kwargs["profiler"] = NullProfiler()
        callbacks = trainer.get("callbacks")
        callbacks = [] if callbacks is None else list(callbacks) if isinstance(callbacks, list) else [callbacks]
        if trainer.get("enable_progress_bar") is not False and not any(
                isinstance(callback, ProgressBar) for callback in callbacks):
            kwargs["callbacks"] = [*callbacks, TimedProgressBar()]
        return super().instantiate_trainer(**kwargs)

    def before_fit(self) -> None:
        """A checkpoint folder that cannot be written would fail only after the first epoch, which
        would be lost: check each one now."""
        for callback in self.trainer.checkpoint_callbacks:
            folder = getattr(callback, "dirpath", None)
            if folder is not None:
                check_writable(Path(folder))

    def before_predict(self) -> None:
        ckpt_path = self.config_init["predict"].get("ckpt_path")
        if ckpt_path == "last" and not last_checkpoints(self.trainer):
            folders = [str(callback.dirpath) for callback in self.trainer.checkpoint_callbacks]
            raise CLIError(f"--ckpt_path last: no last*.ckpt in {folders or 'any checkpoint folder'}; "
                           "fit first, or pass --ckpt_path PATH")

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument(
            "--bf16_on_native_cpu", type=bool, default=False,
            help="On a CPU with bf16 arithmetic (AMX or AVX512-BF16), run in bf16-mixed instead of "
                 "trainer.precision (the laptop presets' training arithmetic ran 1.3-1.8x faster). "
                 "Elsewhere trainer.precision stands: autocast emulates bf16 there, slower than fp32.")
        parser.link_arguments("data.data_shape", "model.init_args.data_shape", apply_on="instantiate")
        parser.add_lightning_class_args(SampleLogger, "sample_logger")
        parser.add_lightning_class_args(PredictionWriter, "prediction_writer")
        parser.add_lightning_class_args(ImageQualityMetrics, "image_quality")
        parser.add_lightning_class_args(SampleDistanceMetrics, "sample_distance")
        parser.add_lightning_class_args(CheckpointOnTerminate, "checkpoint_on_terminate")
        parser.add_lightning_class_args(LastCheckpointAtFitEnd, "last_checkpoint")
        # Sampling thousands of examples after every validation would slow every fit (PixelCNN and
        # diffusion sample step by step): by default the quality metrics run after test only.
        parser.set_defaults({"image_quality.every_n_epochs": 0, "sample_distance.every_n_epochs": 0})


class FeatureNetworkCLI(LightningCLI):
    """``cli.py features {fit,validate,test,predict} --config configs/mnist_features.yaml``: the
    classifier whose features FID/KID use. It is not a generative model, so it has its own command
    and the generative one can require GenerativeModule (whose contract its callbacks rely on)."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(LastCheckpointAtFitEnd, "last_checkpoint")


def main(args: list[str] | None = None, run: bool = True) -> LightningCLI:
    """Run the CLI (``args`` default to sys.argv); ``run=False`` only instantiates the objects.
    ``features ...`` runs the feature network's CLI (FeatureNetworkCLI)."""
    default_wandb_mode()
    import lightning as L

    if (sys.argv[1:2] if args is None else args[:1]) == ["features"]:
        if args is None:  # LightningCLI reads sys.argv itself (and warns when given both)
            sys.argv = [sys.argv[0], *sys.argv[2:]]
        return FeatureNetworkCLI(L.LightningModule, L.LightningDataModule, subclass_mode_model=True,
                                 subclass_mode_data=True, save_config_kwargs={"overwrite": True},
                                 args=None if args is None else args[1:], run=run)
    return GenerativeCLI(
        GenerativeModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


def check_writable(folder: Path) -> None:
    """Create ``folder`` if needed and write a probe file into it; CLIError if that fails."""
    probe = folder / f".write_check-{os.getpid()}"  # one per process: DDP ranks check at once
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise CLIError(f"checkpoint folder {folder} cannot be written ({error.strerror or error}): "
                       "choose another dirpath for ModelCheckpoint (--trainer.callbacks...) or fix "
                       "its permissions") from error


def last_checkpoints(trainer) -> list[Path]:
    """The last*.ckpt files in the folders of the Trainer's ModelCheckpoint callbacks."""
    found = []
    for callback in trainer.checkpoint_callbacks:
        folder = getattr(callback, "dirpath", None)
        if folder is not None and Path(folder).is_dir():
            found.extend(Path(folder).glob("last*.ckpt"))
    return found


def install_termination_deadline() -> None:
    """Make SIGTERM end the process with status 143, whatever it is doing.

    While a Trainer runs, Lightning's handler (registered when the run starts, and calling this
    one too) stops the run at the next batch boundary, where CheckpointOnTerminate saves
    last.ckpt; this one gives that ``LIGHTNING_GEN_TERM_GRACE`` seconds (default 60) and then
    exits at once. Outside a run (parsing, data preparation) it exits at once."""
    grace = float(os.environ.get("LIGHTNING_GEN_TERM_GRACE", "60"))
    previous = signal.getsignal(signal.SIGTERM)

    def on_sigterm(signum, frame) -> None:
        if signal.getsignal(signal.SIGTERM) is on_sigterm:  # no Trainer is running
            sys.exit(SIGTERM_EXIT_STATUS)

        def cut_short() -> None:
            sys.stderr.write(f"error: SIGTERM: the run did not stop within {grace:g} s "
                             "(LIGHTNING_GEN_TERM_GRACE); exiting without a checkpoint\n")
            sys.stderr.flush()
            os._exit(SIGTERM_EXIT_STATUS)

        timer = threading.Timer(grace, cut_short)
        timer.daemon = True
        timer.start()
        if callable(previous):
            previous(signum, frame)

    signal.signal(signal.SIGTERM, on_sigterm)


def error_message(error: BaseException) -> str:
    """What to tell the user: the message of the project's own error in the chain (it names the
    file or option and what to change), else of the error that started the chain (jsonargparse
    wraps a model's ValueError in its own, whose text repeats the whole namespace)."""
    chain = [error]
    while chain[-1].__cause__ is not None or (chain[-1].__context__ is not None
                                              and not chain[-1].__suppress_context__):
        chain.append(chain[-1].__cause__ or chain[-1].__context__)
    own = [item for item in chain if type(item).__module__.split(".")[0] in ("lightning_gen", "datamodules")]
    chosen = own[0] if own else chain[-1]
    return str(chosen) or type(chosen).__name__


def sigterm_message(stop: SIGTERMException) -> str:
    """The last line after SIGTERM stopped a run: the checkpoint CheckpointOnTerminate saved and
    how to resume it, or why there is none."""
    saved = getattr(stop, "saved_checkpoints", None)
    if saved:
        return (f"stopped by SIGTERM; saved {', '.join(str(path) for path in saved)} "
                "(resume with fit --ckpt_path last)")
    if saved is not None:
        return ("stopped by SIGTERM; no checkpoint saved: checkpoint_on_terminate is off or no "
                "ModelCheckpoint of the fit keeps last.ckpt (set save_last: true to resume a "
                "stopped fit)")
    return ("stopped by SIGTERM; no checkpoint saved (the run was not training: a validate, "
            "test or predict run, or a fit's sanity check before its first step)")


def close_process_group() -> None:
    """Close a distributed run's process group before the interpreter exits: Lightning leaves it
    open (so a script can go on with another Trainer call), and gloo's connections torn down at
    exit can abort a rank while the others are still closing."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def console_main(args: list[str] | None = None) -> None:
    """``cli.py`` and the ``lightning-gen`` command: ``main`` with errors as one line and exit
    statuses a scheduler can trust (see the module docstring)."""
    install_termination_deadline()
    try:
        main(args)
        close_process_group()
    except SIGTERMException as stop:
        sys.stderr.write(f"error: {sigterm_message(stop)}\n")
        sys.exit(SIGTERM_EXIT_STATUS)
    except Exception as error:  # noqa: BLE001 (every failure ends as one line and status 1)
        if os.environ.get("LIGHTNING_GEN_TRACEBACK", "") not in ("", "0"):
            raise
        sys.stderr.write(f"error: {error_message(error)}\n"
                         "(set LIGHTNING_GEN_TRACEBACK=1 for the full traceback)\n")
        sys.exit(1)


if __name__ == "__main__":
    console_main()
