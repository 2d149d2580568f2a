"""Autoencoder: a deterministic encoder/decoder trained to reconstruct its input.

An autoencoder has no prior over its codes, so to generate we fit one: a full-covariance Gaussian
N(mean, cov) to the codes of the training data, accumulated over each training epoch (sums of z
and z z^T, all-reduced across DDP ranks) and stored in buffers, so it travels with checkpoints.
``sample`` decodes draws from that Gaussian.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_gen import checks
from lightning_gen.base import GenerativeModule
from lightning_gen.nn.encoders import build_decoder, build_encoder

RECONSTRUCTION_LOSSES = ("bce", "mse")


class Autoencoder(GenerativeModule):
    """Encoder -> code z -> decoder, trained with a BCE or MSE reconstruction loss.

    Args:
        data_shape: (C, H, W) images in [0, 1] or (D,) vectors (linked from the data module).
        network: ``"mlp"`` (the classic 784 -> 512 -> 256 -> latent) or ``"conv"`` (images only).
        latent_dim: size of the code z.
        hidden_dims: MLP widths from the data towards the code (conv: the first is the width of
            the linear layer after the convolutions).
        base_channels: channels of the first convolution (conv only).
        reconstruction_loss: ``"bce"`` (images in [0, 1]; decoder outputs logits) or ``"mse"``.
            Both are summed over dimensions and averaged over the batch.
        predict_temperature: temperature of the samples ``predict`` draws (see ``sample``); not
            saved as a hyperparameter, so the command line sets it at ``predict --ckpt_path``.
        optimizer_options: learning_rate (default ``DEFAULT_LEARNING_RATE``), weight_decay,
            lr_schedule, warmup_steps, as keywords: see GenerativeModule.
    """

    EVALUATION_OPTIONS = ("predict_temperature",)

    def __init__(
        self,
        data_shape: Sequence[int] = (1, 28, 28),
        network: str = "mlp",
        latent_dim: int = 16,
        hidden_dims: Sequence[int] = (512, 256),
        base_channels: int = 32,
        reconstruction_loss: str = "bce",
        predict_temperature: float = 1.0,
        **optimizer_options: Any,
    ) -> None:
        super().__init__(data_shape, **optimizer_options)
        self.save_hyperparameters(ignore=self.EVALUATION_OPTIONS)
        checks.positive(predict_temperature=predict_temperature)
        self.predict_temperature = predict_temperature
        checks.at_least(1, latent_dim=latent_dim)
        if not hidden_dims:
            raise ValueError("hidden_dims must name at least one width")
        checks.one_of("reconstruction_loss", reconstruction_loss, RECONSTRUCTION_LOSSES)
        if reconstruction_loss == "bce" and not self.is_image:
            raise ValueError("reconstruction_loss='bce' needs data in [0, 1] (images); use 'mse' for vectors")
        self.latent_dim = latent_dim
        self.reconstruction_loss = reconstruction_loss
        self.encoder = build_encoder(network, self.data_shape, latent_dim, hidden_dims, base_channels)
        self.decoder = build_decoder(network, latent_dim, self.data_shape, 1, hidden_dims, base_channels)
        # The Gaussian fitted to the training codes (identity until the first epoch ends).
        self.register_buffer("latent_mean", torch.zeros(latent_dim))
        self.register_buffer("latent_scale_tril", torch.eye(latent_dim))
        # Running sums over the current epoch, float64 so 50k outer products stay accurate.
        self.register_buffer("_code_count", torch.zeros((), dtype=torch.float64), persistent=False)
        self.register_buffer("_code_sum", torch.zeros(latent_dim, dtype=torch.float64), persistent=False)
        self.register_buffer("_code_outer_sum", torch.zeros(latent_dim, latent_dim, dtype=torch.float64),
                             persistent=False)

    # ------------------------------------------------------------------------------- networks
    def encode(self, x: Tensor) -> Tensor:
        """(B, *data_shape) -> codes (B, latent_dim)."""
        return self.encoder(x)

    def decoder_output(self, z: Tensor) -> Tensor:
        """Logits (bce) or values (mse), (B, *data_shape)."""
        return self.decoder(z)[:, 0]

    def decode(self, z: Tensor) -> Tensor:
        """Codes (B, latent_dim) -> reconstructions in data space (B, *data_shape)."""
        output = self.decoder_output(z)
        return torch.sigmoid(output) if self.reconstruction_loss == "bce" else output

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))

    # ------------------------------------------------------------------------------- training
    def reconstruction_error(self, x: Tensor, output: Tensor) -> Tensor:
        """Per-example reconstruction loss, summed over dimensions: (B,)."""
        if self.reconstruction_loss == "bce":
            error = F.binary_cross_entropy_with_logits(output.float(), x.float(), reduction="none")
        else:
            prediction = torch.sigmoid(output) if self.is_image else output
            error = F.mse_loss(prediction.float(), x.float(), reduction="none")
        return error.flatten(1).sum(1)

    def loss(self, batch: tuple[Tensor, Tensor], batch_idx: int, stage: str) -> tuple[Tensor, dict]:
        x, _ = batch  # (B, *data_shape)
        z = self.encode(x)  # (B, latent_dim)
        if stage == "train":
            self._accumulate_codes(z.detach())
        return self.reconstruction_error(x, self.decoder_output(z)).mean(), {}

    # ------------------------------------------------------------------ the fitted latent prior
    def _accumulate_codes(self, z: Tensor) -> None:
        # In place (add_, not +=): an augmented assignment to a buffer goes through
        # nn.Module.__setattr__ and register_buffer, about 7 µs each, every training step.
        z = z.double()
        self._code_count.add_(len(z))
        self._code_sum.add_(z.sum(0))
        self._code_outer_sum.add_(z.T @ z)

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        self._code_count.zero_()
        self._code_sum.zero_()
        self._code_outer_sum.zero_()

    def on_train_epoch_end(self) -> None:
        super().on_train_epoch_end()
        count = self.trainer.strategy.reduce(self._code_count, reduce_op="sum")
        code_sum = self.trainer.strategy.reduce(self._code_sum, reduce_op="sum")
        outer_sum = self.trainer.strategy.reduce(self._code_outer_sum, reduce_op="sum")
        if count < 2:
            return
        self.fit_latent_gaussian(count, code_sum, outer_sum)

    @torch.no_grad()
    def fit_latent_gaussian(self, count: Tensor, code_sum: Tensor, outer_sum: Tensor) -> None:
        """Set the sampling Gaussian from sums of codes: mean = S/n, cov = (Q - n mean mean^T)/(n-1)."""
        mean = code_sum / count
        covariance = (outer_sum - count * torch.outer(mean, mean)) / (count - 1)
        jitter = 1e-6 * covariance.diagonal().mean().clamp_min(1e-12)
        eye = torch.eye(self.latent_dim, dtype=covariance.dtype, device=covariance.device)
        self.latent_mean.copy_(mean.float())
        self.latent_scale_tril.copy_(torch.linalg.cholesky(covariance + jitter * eye).float())

    # ------------------------------------------------------------------------------- sampling
    @torch.no_grad()
    def sample(self, num_samples: int, temperature: float = 1.0) -> Tensor:
        """Decode codes drawn from the Gaussian fitted to the training codes (scaled by temperature)."""
        self.check_num_samples(num_samples)
        checks.positive(temperature=temperature)
        eps = torch.randn(num_samples, self.latent_dim, device=self.device)  # (N, latent_dim)
        z = self.latent_mean + temperature * eps @ self.latent_scale_tril.T
        return self.decode(z)

    def predict_options(self) -> dict[str, Any]:
        return {"temperature": self.predict_temperature}
