"""Write the samples that ``predict`` generates: one PNG each, grid.png and samples.pt."""

from __future__ import annotations

import re
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torchvision.utils import save_image

from lightning_gen.callbacks.hooks import StepFreeCallback
from lightning_gen.callbacks.media import image_grid, scatter_image, to_uint8_images


# The names write_samples gives its files: only these are ever removed from an output folder.
SAMPLE_FILE = re.compile(r"^\d{6}\.png$")
OWN_FILES = ("grid.png", "scatter.png", "samples.pt")


class PredictionError(RuntimeError):
    """predict cannot write what was asked (non-finite samples, missing or repeated examples)."""


def remove_earlier_samples(output_dir: Path) -> list[Path]:
    """Delete the files an earlier ``write_samples`` left in ``output_dir`` (only the names it
    writes: NNNNNN.png, grid.png, scatter.png, samples.pt); returns them."""
    if not output_dir.is_dir():
        return []
    earlier = [path for path in output_dir.iterdir()
               if path.is_file() and (SAMPLE_FILE.match(path.name) or path.name in OWN_FILES)]
    for path in earlier:
        path.unlink()
    return earlier


def write_samples(samples: torch.Tensor, output_dir: str | Path) -> Path:
    """Write samples in data space into ``output_dir``.

    Images (N, C, H, W) in [0, 1]: ``000000.png`` ... one per sample, ``grid.png`` and
    ``samples.pt`` (uint8 (N, C, H, W)). Vectors (N, D): ``samples.pt`` (float32 (N, D)) and, for
    D = 2, ``scatter.png``. Files of an earlier prediction in the folder (those names only) are
    removed first, so the folder holds this prediction alone; other files are left alone.
    Non-finite samples are refused before anything is written.
    """
    output_dir = Path(output_dir)
    samples = samples.detach().cpu()
    if samples.dim() not in (2, 4):
        raise ValueError(f"expected images (N, C, H, W) or vectors (N, D), got {tuple(samples.shape)}")
    if samples.is_floating_point():
        bad = int((~torch.isfinite(samples)).flatten(1).any(1).sum())
        if bad:
            raise PredictionError(
                f"{bad} of {len(samples)} samples hold NaN or inf values (the model's weights have "
                f"probably diverged); nothing was written to {output_dir}. Predict from a checkpoint "
                "of a run that trained without diverging.")
    output_dir.mkdir(parents=True, exist_ok=True)
    removed = remove_earlier_samples(output_dir)
    if removed:
        rank_zero_info(f"Removed {len(removed)} files of an earlier prediction from {output_dir}")
    if samples.dim() == 4:
        images = to_uint8_images(samples)
        for index, image in enumerate(images):
            save_image(image.float() / 255, output_dir / f"{index:06d}.png")
        save_image(image_grid(images.float() / 255), output_dir / "grid.png")
        torch.save(images, output_dir / "samples.pt")
    else:
        torch.save(samples.float(), output_dir / "samples.pt")
        if samples.shape[1] == 2:
            save_image(scatter_image(samples), output_dir / "scatter.png")
    return output_dir


def order_by_index(shards: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Samples of every rank, (index (n,), samples (n, ...)) each, in the order of the global
    index; every index 0 .. N-1 must appear exactly once."""
    index = torch.cat([shard_index for shard_index, _ in shards])
    samples = torch.cat([shard_samples for _, shard_samples in shards])
    order = torch.argsort(index)
    if not torch.equal(index[order], torch.arange(len(index))):
        counts = torch.bincount(index, minlength=int(index.max()) + 1 if len(index) else 0)
        raise PredictionError(
            f"the gathered predictions do not hold each example once: {int((counts == 0).sum())} "
            f"missing and {int((counts > 1).sum())} repeated among {len(index)}")
    return samples[order]


class PredictionWriter(StepFreeCallback):
    """Gather the samples of every rank after ``predict`` and write them (see ``write_samples``).

    Each predict batch's samples are kept with the global indices of its examples: the batch's
    third element ``index`` (as the project's data modules yield it), else the indices Lightning's
    sampler reports. Rank zero writes them in index order, each example exactly once, whatever
    the number of processes and however unevenly the examples were shared out.

    Args:
        output_dir: the folder; default ``<trainer.default_root_dir>/predictions``.
    """

    def __init__(self, output_dir: str | None = None) -> None:
        super().__init__()
        self.output_dir = output_dir
        self._shards: list[tuple[torch.Tensor, torch.Tensor]] = []

    def resolve_output_dir(self, trainer: L.Trainer) -> Path:
        if self.output_dir is not None:
            return Path(self.output_dir)
        return Path(trainer.default_root_dir) / "predictions"

    def on_predict_epoch_start(self, trainer, pl_module) -> None:
        self._shards = []

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        samples = torch.as_tensor(outputs).detach().cpu()
        index = batch[2] if isinstance(batch, (tuple, list)) and len(batch) == 3 else None
        if index is None:
            index = torch.as_tensor(trainer.predict_loop.current_batch_indices, dtype=torch.long)
            if len(index) != len(samples):
                raise PredictionError("the predict batches carry no example indices (yield "
                                      "(x, y, index) or use a DataLoader with a sampler)")
        self._shards.append((torch.as_tensor(index).detach().cpu().long(), samples))

    def on_predict_epoch_end(self, trainer, pl_module) -> None:
        shards, self._shards = self._shards, []
        if trainer.world_size > 1:
            gathered: list = [None] * trainer.world_size
            torch.distributed.all_gather_object(gathered, shards)
            shards = [shard for rank_shards in gathered for shard in rank_shards]
        if not trainer.is_global_zero or not shards:
            return
        write_samples(order_by_index(shards), self.resolve_output_dir(trainer))
