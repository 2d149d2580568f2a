"""RealNVP: a normalizing flow with exact likelihood (Dinh, Sohl-Dickstein & Bengio 2017).

A bijection f maps data x to latents z = f(x) with the prior p(z) = N(0, I); by the change of
variables formula (Dinh et al. 2017, eq. 3)

    log p(x) = log N(f(x); 0, I) + log|det df/dx|,

and f is a stack of affine coupling layers y = b*x + (1-b)*(x*exp(s(b*x)) + t(b*x)) whose
log|det| = sum((1-b) * s(b*x)) is cheap (Dinh et al. 2017, eq. 10). Training minimizes the exact
negative log-likelihood; sampling inverts z ~ N(0, T^2 I).

- Vectors, ``data_shape = (D,)``: ``VectorRealNVP``: MLP s/t nets, alternating or random masks,
  optional ActNorm. No preprocessing: the density is over data coordinates.
- Images, ``data_shape = (C, H, W)``: ``MultiScaleRealNVP`` (checkerboard and channel-wise masks,
  squeeze, factored-out latents, ResNet s/t nets) after ``DequantizeLogit``: uniform
  dequantization of the 8-bit levels round(255 x) and a logit transform, whose log-det is
  included, so ``log_prob`` is the dequantized density on [0, 256)^D, the standard estimate of the
  log-probability of the discrete image and the literature's bits/dim (RealNVP 1.06 on MNIST).

The interface (data space both ways, preprocessing included):
- ``forward(x, dequantize=True) -> (z, log_det)``: z flat (B, D); log_det float32 (B,) is
  log|det dz/dx| for vectors and log|det dz/dv| for images, where v = 256 u in [0, 256)^D is the
  dequantized image (u the dequantized image in [0, 1]), i.e. log|det dz/du| - D log 256.
  ``dequantize=False`` (images) skips the rounding and noise and takes u = x as it is.
- ``inverse(z) -> x``: vectors: the data point; images: the continuous image u in [0, 1], so
  ``inverse(forward(x, dequantize=False)[0]) == x`` and, with noise,
  ``quantize(inverse(forward(x)[0])) == x`` for 8-bit images.
- ``log_prob(x, dequantize=True) = log N(z; 0, I) + log_det`` in nats per example.
- ``sample(n, temperature=1.0)``: z ~ N(0, temperature^2 I), inverted; images are quantized to
  the 8-bit levels k / 255 (the data module's values).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_gen import checks
from lightning_gen.base import GenerativeModule
from lightning_gen.flow.layers import DequantizeLogit
from lightning_gen.flow.nets import VECTOR_MASKS, MultiScaleRealNVP, VectorRealNVP

LOG_2PI = math.log(2 * math.pi)


def standard_normal_log_density(z: Tensor) -> Tensor:
    """log N(z; 0, I) summed over the features, in float32: (B, D) -> (B,)."""
    return -0.5 * (LOG_2PI + z.float().pow(2)).sum(1)


class RealNVP(GenerativeModule):
    """RealNVP on vectors (data coordinates) or 8-bit images (dequantized, logit space).

    Args:
        data_shape: (D,) vectors or (C, H, W) images in [0, 1] (linked from the data module).
        num_layers: vectors: coupling layers.
        hidden_dims: vectors: widths of each s/t MLP.
        mask: vectors: ``"alternating"`` or ``"random"`` (see VectorRealNVP).
        num_scales: images: scales of the multi-scale architecture (H, W divisible by
            2^(num_scales - 1)).
        couplings_per_scale: images: couplings per mask type and scale (3 in the paper).
        hidden_channels: images: width of the ResNet s/t networks.
        num_blocks: images: residual blocks per s/t network.
        actnorm: an ActNorm (data-initialized per-feature affine map) before each coupling.
        logit_alpha: images: alpha of the logit transform logit(alpha + (1 - 2 alpha) u).
        predict_temperature: temperature of the samples ``predict`` draws (see ``sample``); not
            saved as a hyperparameter, so the command line sets it at ``predict --ckpt_path``.
        optimizer_options: learning_rate (default ``DEFAULT_LEARNING_RATE``), weight_decay,
            lr_schedule, warmup_steps, as keywords: see GenerativeModule.
    """

    EVALUATION_OPTIONS = ("predict_temperature",)

    def __init__(
        self,
        data_shape: Sequence[int] = (2,),
        num_layers: int = 8,
        hidden_dims: Sequence[int] = (128, 128),
        mask: str = "alternating",
        num_scales: int = 2,
        couplings_per_scale: int = 3,
        hidden_channels: int = 64,
        num_blocks: int = 4,
        actnorm: bool = True,
        logit_alpha: float = 0.05,
        predict_temperature: float = 1.0,
        **optimizer_options: Any,
    ) -> None:
        super().__init__(data_shape, **optimizer_options)
        self.save_hyperparameters(ignore=self.EVALUATION_OPTIONS)
        checks.positive(predict_temperature=predict_temperature)
        self.predict_temperature = predict_temperature
        checks.at_least(1, num_layers=num_layers)
        checks.one_of("mask", mask, VECTOR_MASKS)
        if not hidden_dims or any(width < 1 for width in hidden_dims):
            raise ValueError(f"hidden_dims must be one or more positive widths, got {hidden_dims}")
        if self.is_image:
            self.preprocessing = DequantizeLogit(logit_alpha)
            self.flow = MultiScaleRealNVP(self.data_shape, num_scales, couplings_per_scale,
                                          hidden_channels, num_blocks, actnorm)
        else:
            self.preprocessing = None
            self.flow = VectorRealNVP(self.num_dims, num_layers, hidden_dims, mask, actnorm)

    # ------------------------------------------------------------------------------- the flow
    def forward(self, x: Tensor, dequantize: bool = True) -> tuple[Tensor, Tensor]:
        """Data (B, *data_shape) -> z (B, D) and log_det (B,) float32 (see the module docstring)."""
        self.check_data(x)
        if not torch.isfinite(x).all():
            raise ValueError("x has NaN or infinite values")
        return self._forward(x, dequantize)

    def _forward(self, x: Tensor, dequantize: bool = True) -> tuple[Tensor, Tensor]:
        # forward() without the input checks, which sync with the device: the training steps use
        # it on batches of the data module.
        if self.preprocessing is None:
            return self.flow(x.float())
        y, log_det = self.preprocessing(x, dequantize=dequantize)  # (B, C, H, W) logit space
        z, flow_log_det = self.flow(y)
        return z, log_det + flow_log_det

    def inverse(self, z: Tensor) -> Tensor:
        """z (B, D) -> data space (B, *data_shape); images: the continuous image in [0, 1]."""
        if z.dim() != 2 or z.shape[1] != self.num_dims:
            raise ValueError(f"z must have shape (B, {self.num_dims}), got {tuple(z.shape)}")
        x, _ = self.flow.inverse(z.float())
        if self.preprocessing is not None:
            x, _ = self.preprocessing.inverse(x)
        return x

    def quantize(self, u: Tensor) -> Tensor:
        """Images: continuous u in [0, 1] -> the 8-bit level k / 255 of the cell [k, k+1) / 256."""
        if self.preprocessing is None:
            raise ValueError("quantize applies to images only; vectors are continuous")
        return self.preprocessing.quantize(u)

    # ------------------------------------------------------------------------------ likelihood
    def log_prob(self, x: Tensor, dequantize: bool = True) -> Tensor:
        """log N(z; 0, I) + log_det in nats per example (B,). Images: the density of the
        dequantized 8-bit image on [0, 256)^D at one noise draw, an unbiased estimate of a lower
        bound on log P(discrete image); -log_prob / (D ln 2) is bits/dim."""
        z, log_det = self(x, dequantize=dequantize)
        return standard_normal_log_density(z) + log_det

    # ------------------------------------------------------------------------------- training
    def loss(self, batch: tuple[Tensor, Tensor], batch_idx: int, stage: str) -> tuple[Tensor, dict]:
        z, log_det = self._forward(batch[0])
        nll = -(standard_normal_log_density(z) + log_det)  # (B,) nats, as log_prob
        return nll.mean(), {"nll": nll}

    # ------------------------------------------------------------------------------- sampling
    @torch.no_grad()
    def sample(self, num_samples: int, temperature: float = 1.0) -> Tensor:
        """Invert z ~ N(0, temperature^2 I): (num_samples, *data_shape) in data space; images are
        quantized to the 8-bit levels k / 255 in [0, 1]."""
        self.check_num_samples(num_samples)
        checks.positive(temperature=temperature)
        z = temperature * torch.randn(num_samples, self.num_dims, device=self.device)
        x = self.inverse(z)
        return self.quantize(x) if self.preprocessing is not None else x

    def predict_options(self) -> dict[str, Any]:
        return {"temperature": self.predict_temperature}
