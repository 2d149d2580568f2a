"""Pictures from samples, and logging them through whichever logger the Trainer has.

W&B gets ``wandb.Image`` media, TensorBoard gets ``add_image``, and any other logger (CSV, none)
gets PNG files in ``<log_dir>/media/``, so every family's sample grids show up in every set-up.
"""

from __future__ import annotations

import io
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor
from torchvision.utils import make_grid, save_image


def to_uint8_images(x: Tensor) -> Tensor:
    """Images in [0, 1] (N, C, H, W) -> uint8 (N, C, H, W), rounded to the nearest level."""
    return x.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8).cpu()


def image_grid(x: Tensor, nrow: int | None = None, padding: int = 2) -> Tensor:
    """Images in [0, 1] (N, C, H, W) -> one float grid image (3, H', W') in [0, 1]."""
    if nrow is None:
        nrow = max(int(len(x) ** 0.5), 1)
    return make_grid(x.detach().float().clamp(0, 1).cpu(), nrow=nrow, padding=padding, pad_value=1.0)


def figure_to_image(figure) -> Tensor:
    """A matplotlib figure -> float image (3, H, W) in [0, 1]; closes the figure."""
    import matplotlib.pyplot as plt
    from PIL import Image

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=80, bbox_inches="tight")
    plt.close(figure)
    buffer.seek(0)
    rgb = Image.open(buffer).convert("RGB")
    return torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8).view(
        rgb.height, rgb.width, 3).permute(2, 0, 1).float() / 255


def scatter_image(points: Tensor, reference: Tensor | None = None, title: str = "") -> Tensor:
    """2-D points (N, 2) (and optional reference points in grey) -> image (3, H, W) in [0, 1]."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(4, 4))
    if reference is not None:
        reference = reference.detach().float().cpu()
        axis.scatter(reference[:, 0], reference[:, 1], s=2, c="0.75", label="data")
    points = points.detach().float().cpu()
    axis.scatter(points[:, 0], points[:, 1], s=2, c="tab:blue", label="samples")
    axis.set_aspect("equal")
    axis.set_title(title)
    if reference is not None:
        axis.legend(loc="upper right", markerscale=4)
    return figure_to_image(figure)


def samples_image(samples: Tensor, reference: Tensor | None = None) -> Tensor:
    """Samples in data space -> a picture: a grid for images, a scatter plot for 2-D vectors."""
    if samples.dim() == 4:
        return image_grid(samples)
    if samples.dim() == 2 and samples.shape[1] == 2:
        return scatter_image(samples, reference)
    raise ValueError(f"can draw images (N, C, H, W) or 2-D points (N, 2), got {tuple(samples.shape)}")


def media_dir(trainer: L.Trainer, logger) -> Path:
    log_dir = getattr(logger, "log_dir", None) or trainer.default_root_dir
    return Path(log_dir) / "media"


@rank_zero_only
def log_image(trainer: L.Trainer, key: str, image: Tensor) -> None:
    """Log a float image (3, H, W) in [0, 1] under ``key`` to every logger of the trainer.

    Loggers that take no images (CSV, or none) get ``<log_dir>/media/<key>_step<N>.png``.
    """
    step = trainer.global_step
    loggers = trainer.loggers
    if not loggers:
        path = media_dir(trainer, None) / f"{key.replace('/', '_')}_step{step:07d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_image(image, path)
        return
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            logger.log_image(key=key, images=[image.permute(1, 2, 0).numpy()], step=step)
        elif isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image(key, image, global_step=step)
        else:
            path = media_dir(trainer, logger) / f"{key.replace('/', '_')}_step{step:07d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            save_image(image, path)
