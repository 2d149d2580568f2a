"""Write the samples that ``predict`` generates: one PNG each, grid.png and samples.pt."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from torchvision.utils import save_image

from lightning_gen.callbacks.media import image_grid, scatter_image, to_uint8_images


def write_samples(samples: torch.Tensor, output_dir: str | Path) -> Path:
    """Write samples in data space into ``output_dir``.

    Images (N, C, H, W) in [0, 1]: ``000000.png`` ... one per sample, ``grid.png`` and
    ``samples.pt`` (uint8 (N, C, H, W)). Vectors (N, D): ``samples.pt`` (float32 (N, D)) and, for
    D = 2, ``scatter.png``.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    samples = samples.detach().cpu()
    if samples.dim() == 4:
        images = to_uint8_images(samples)
        for index, image in enumerate(images):
            save_image(image.float() / 255, output_dir / f"{index:06d}.png")
        save_image(image_grid(images.float() / 255), output_dir / "grid.png")
        torch.save(images, output_dir / "samples.pt")
    elif samples.dim() == 2:
        torch.save(samples.float(), output_dir / "samples.pt")
        if samples.shape[1] == 2:
            save_image(scatter_image(samples), output_dir / "scatter.png")
    else:
        raise ValueError(f"expected images (N, C, H, W) or vectors (N, D), got {tuple(samples.shape)}")
    return output_dir


class PredictionWriter(BasePredictionWriter):
    """Gather the samples of every rank after ``predict`` and write them (see ``write_samples``).

    Args:
        output_dir: the folder; default ``<trainer.default_root_dir>/predictions``.
    """

    def __init__(self, output_dir: str | None = None) -> None:
        super().__init__(write_interval="epoch")
        self.output_dir = output_dir

    def resolve_output_dir(self, trainer: L.Trainer) -> Path:
        if self.output_dir is not None:
            return Path(self.output_dir)
        return Path(trainer.default_root_dir) / "predictions"

    def write_on_batch_end(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError("PredictionWriter writes once per epoch")

    def write_on_epoch_end(self, trainer, pl_module, predictions, batch_indices) -> None:
        if not predictions:
            return
        samples = torch.cat([torch.as_tensor(p) for p in predictions])
        if trainer.world_size > 1:
            # DistributedSampler gives every rank the same number of examples (padding repeats a
            # few), so the gathered tensor is (world_size, N, ...).
            samples = pl_module.all_gather(samples.to(pl_module.device))
            samples = samples.transpose(0, 1).reshape(-1, *samples.shape[2:])
            dataset = getattr(trainer.predict_dataloaders, "dataset", None)
            if dataset is not None:
                samples = samples[: len(dataset)]
        if trainer.is_global_zero:
            write_samples(samples, self.resolve_output_dir(trainer))
