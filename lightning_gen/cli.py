"""The command line: LightningCLI over every model and data module.

    python cli.py fit --config configs/vae_mnist.yaml
    python cli.py fit --model VAE --data MNISTDataModule --trainer.max_epochs 5
    python cli.py predict --config configs/vae_mnist.yaml --ckpt_path checkpoints/vae_mnist/last.ckpt

Every run has four callbacks whatever its config says: ``sample_logger`` (a sample grid or scatter
plot after validation, to whichever logger is set), ``prediction_writer`` (what ``predict``
writes: one PNG per sample, grid.png and samples.pt), ``image_quality`` (FID/KID of image models,
see lightning_gen.callbacks.ImageQualityMetrics) and ``sample_distance`` (MMD and sliced
Wasserstein of 2-D models). The last two run after ``test`` by default, so ``cli.py test`` reports
every metric that applies to the model; ``--image_quality.every_n_epochs N`` adds them to
validation. The model's ``data_shape`` is taken from the data module, so any image model runs on
MNIST and any vector model on the toy data unchanged.
"""

from __future__ import annotations

import os
from pathlib import Path

from lightning.pytorch.cli import LightningCLI

import datamodules  # noqa: F401  (registers the data modules for --data NAME)
import lightning_gen  # noqa: F401  (registers the models for --model NAME)
import lightning_gen.metrics  # noqa: F401  (registers MNISTClassifier)
from lightning_gen.callbacks import (
    ImageQualityMetrics, PredictionWriter, SampleDistanceMetrics, SampleLogger,
)


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


class GenerativeCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.data_shape", "model.init_args.data_shape", apply_on="instantiate")
        parser.add_lightning_class_args(SampleLogger, "sample_logger")
        parser.add_lightning_class_args(PredictionWriter, "prediction_writer")
        parser.add_lightning_class_args(ImageQualityMetrics, "image_quality")
        parser.add_lightning_class_args(SampleDistanceMetrics, "sample_distance")
        # Sampling thousands of examples after every validation would slow every fit (PixelCNN and
        # diffusion sample step by step): by default the quality metrics run after test only.
        parser.set_defaults({"image_quality.every_n_epochs": 0, "sample_distance.every_n_epochs": 0})


def main(args: list[str] | None = None, run: bool = True) -> GenerativeCLI:
    """Run the CLI (``args`` default to sys.argv); ``run=False`` only instantiates the objects."""
    default_wandb_mode()
    import lightning as L

    # The base class is LightningModule, not GenerativeModule, so that the FID/KID feature network
    # (lightning_gen.metrics.MNISTClassifier, a classifier that draws no samples) trains through the
    # same command: python cli.py fit --config configs/mnist_features.yaml. Every model is still
    # found by name (--model VAE); a module without sample() must set sample_logger.every_n_epochs 0.
    return GenerativeCLI(
        L.LightningModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


if __name__ == "__main__":
    main()
