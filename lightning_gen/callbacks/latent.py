"""Pictures of a latent-variable model's latent space: interpolations and, for 2-D latents, a map.

Works with any module that has ``encode(x) -> z`` (B, latent_dim) and ``decode(z) -> x`` in data
space (the Autoencoder and the VAE).
"""

from __future__ import annotations

import lightning as L
import torch
from torch import Tensor

from lightning_gen.callbacks.hooks import StepFreeCallback
from lightning_gen.callbacks.media import figure_to_image, image_grid, log_image


@torch.no_grad()
def interpolate(model, x_start: Tensor, x_end: Tensor, num_steps: int = 10) -> Tensor:
    """Decode straight lines between the codes of ``x_start`` and ``x_end`` (both (P, *data)).

    Returns (P, num_steps, *data): row p goes from x_start[p]'s reconstruction to x_end[p]'s.
    """
    if num_steps < 2:
        raise ValueError(f"num_steps must be >= 2, got {num_steps}")
    z_start, z_end = model.encode(x_start), model.encode(x_end)  # (P, latent_dim)
    weights = torch.linspace(0, 1, num_steps, device=z_start.device)  # (S,)
    z = torch.lerp(z_start[:, None], z_end[:, None], weights[None, :, None])  # (P, S, latent_dim)
    decoded = model.decode(z.flatten(0, 1))  # (P * S, *data)
    return decoded.view(len(x_start), num_steps, *decoded.shape[1:])


@torch.no_grad()
def latent_map_image(model, x: Tensor, y: Tensor, grid_size: int = 15) -> Tensor:
    """For a 2-D latent: encoded points coloured by label, and decoded images over a grid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    z = model.encode(x).float().cpu()  # (N, 2)
    figure, axes = plt.subplots(1, 2, figsize=(9, 4.5))
    scatter = axes[0].scatter(z[:, 0], z[:, 1], c=y.cpu(), cmap="tab10", s=3)
    figure.colorbar(scatter, ax=axes[0])
    axes[0].set_title("encoded validation data")
    low, high = z.quantile(0.02, dim=0), z.quantile(0.98, dim=0)
    ticks_0 = torch.linspace(float(low[0]), float(high[0]), grid_size)
    ticks_1 = torch.linspace(float(high[1]), float(low[1]), grid_size)
    grid = torch.stack(torch.meshgrid(ticks_1, ticks_0, indexing="ij")[::-1], dim=-1).view(-1, 2)
    decoded = model.decode(grid.to(model.device)).float().cpu()
    if decoded.dim() == 4:
        axes[1].imshow(image_grid(decoded, nrow=grid_size, padding=0).permute(1, 2, 0))
        axes[1].set_title("decoded latent grid")
        axes[1].axis("off")
    else:
        axes[1].scatter(decoded[:, 0], decoded[:, 1], s=3)
        axes[1].set_title("decoded latent grid")
    return figure_to_image(figure)


class LatentInterpolation(StepFreeCallback):
    """After validation, log interpolations between pairs of validation examples (images), and a
    map of the latent space when it is 2-D.

    Args:
        num_pairs: rows of the interpolation grid.
        num_steps: images per row.
        every_n_epochs: log after every n-th validation epoch.
    """

    def __init__(self, num_pairs: int = 8, num_steps: int = 10, every_n_epochs: int = 1) -> None:
        super().__init__()
        if num_pairs < 1 or num_steps < 2 or every_n_epochs < 1:
            raise ValueError("need num_pairs >= 1, num_steps >= 2 and every_n_epochs >= 1")
        self.num_pairs = num_pairs
        self.num_steps = num_steps
        self.every_n_epochs = every_n_epochs
        self._batch: tuple[Tensor, Tensor] | None = None

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if batch_idx == 0 and trainer.is_global_zero:
            x, y = batch
            self._batch = (x.detach(), y.detach())

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if (trainer.sanity_checking or not trainer.is_global_zero or self._batch is None
                or (trainer.current_epoch + 1) % self.every_n_epochs):
            return
        for method in ("encode", "decode"):
            if not hasattr(pl_module, method):
                raise TypeError(f"LatentInterpolation needs a model with {method}(); "
                                f"{type(pl_module).__name__} has none")
        x, y = self._batch
        if x.dim() == 4 and len(x) >= 2:
            pairs = min(self.num_pairs, len(x) // 2)
            rows = interpolate(pl_module, x[:pairs], x[pairs: 2 * pairs], self.num_steps)
            log_image(trainer, "val/interpolation", image_grid(rows.flatten(0, 1), nrow=self.num_steps))
        if getattr(pl_module, "latent_dim", None) == 2:
            log_image(trainer, "val/latent_space", latent_map_image(pl_module, x, y))
        self._batch = None
