"""Variational autoencoder (Kingma & Welling 2014) with the importance-weighted bound of
Burda et al. 2016.

Model: p(z) = N(0, I), p(x | z) Bernoulli (dynamically binarized images, the default for images)
or Gaussian with a per-dimension mean and log-variance (the default for vectors).
Encoder: q(z | x) = N(mu(x), diag(exp(logvar(x)))), sampled by reparameterization
z = mu + exp(logvar / 2) * eps, eps ~ N(0, I) (Kingma & Welling 2014, eq. 10).

Training minimizes the negative ELBO (Kingma & Welling 2014, eq. 10 / Appendix B):
    loss = -E_q[log p(x | z)] + beta_t * KL(q(z | x) || p(z)),
    KL = 1/2 sum_j (mu_j^2 + exp(logvar_j) - 1 - logvar_j),
with beta_t rising linearly from 0 to ``beta`` over ``kl_warmup_steps`` (Bowman et al. 2016).

``log_prob(x, num_samples=K)`` is the IWAE bound (Burda et al. 2016, eq. 8)
    log p(x) >= E[ log 1/K sum_k p(x, z_k) / q(z_k | x) ],  z_k ~ q(z | x),
which tightens as K grows; with K = 1000 it is the standard "test NLL" of the literature.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_gen import checks
from lightning_gen.base import GenerativeModule
from lightning_gen.nn.encoders import build_decoder, build_encoder

LIKELIHOODS = ("bernoulli", "gaussian")
LOG_2PI = math.log(2 * math.pi)


def gaussian_kl_to_standard_normal(mu: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) in closed form, summed over the last dim: (B,)."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(-1)


def diagonal_gaussian_log_density(x: Tensor, mean: Tensor, logvar: Tensor) -> Tensor:
    """log N(x; mean, diag(exp(logvar))), summed over the last dim."""
    return -0.5 * (LOG_2PI + logvar + (x - mean).pow(2) * torch.exp(-logvar)).sum(-1)


class VAE(GenerativeModule):
    """Variational autoencoder with MLP or conv networks.

    Args:
        data_shape: (C, H, W) images in [0, 1] or (D,) vectors (linked from the data module).
        network: ``"mlp"`` or ``"conv"`` (images only).
        latent_dim: size of z.
        hidden_dims: MLP widths from the data towards z (conv: the width of the linear layer).
        base_channels: channels of the first convolution (conv only).
        likelihood: ``"bernoulli"`` (images, dynamically binarized: each pixel is 1 with
            probability its intensity, redrawn every time an image is seen) or ``"gaussian"``
            (per-dimension mean and log-variance). Default: bernoulli for images, gaussian for
            vectors.
        beta: weight of the KL term (beta-VAE, Higgins et al. 2017); 1 is the ELBO.
        kl_warmup_steps: steps over which the KL weight rises linearly from 0 to ``beta``.
        val_importance_samples: K of the IWAE bound logged as ``val/nll``.
        test_importance_samples: K of the IWAE bound logged as ``test/nll`` (1000 in the literature).
        importance_chunk_size: importance samples decoded at once (bounds memory).
        predict_temperature: temperature of the samples ``predict`` draws (see ``sample``).
        optimizer_options: learning_rate (default ``DEFAULT_LEARNING_RATE``), weight_decay,
            lr_schedule, warmup_steps, as keywords: see GenerativeModule.

    The importance-sample counts and ``predict_temperature`` change evaluation only: they are not
    saved as hyperparameters, so ``cli.py test/predict --ckpt_path ...`` takes them from the config
    and the command line.
    """

    EVALUATION_OPTIONS = ("val_importance_samples", "test_importance_samples",
                          "importance_chunk_size", "predict_temperature")

    def __init__(
        self,
        data_shape: Sequence[int] = (1, 28, 28),
        network: str = "conv",
        latent_dim: int = 32,
        hidden_dims: Sequence[int] = (512, 256),
        base_channels: int = 32,
        likelihood: str | None = None,
        beta: float = 1.0,
        kl_warmup_steps: int = 0,
        val_importance_samples: int = 16,
        test_importance_samples: int = 1000,
        importance_chunk_size: int = 100,
        predict_temperature: float = 1.0,
        **optimizer_options: Any,
    ) -> None:
        super().__init__(data_shape, **optimizer_options)
        self.save_hyperparameters(ignore=self.EVALUATION_OPTIONS)
        if likelihood is None:
            likelihood = "bernoulli" if self.is_image else "gaussian"
        checks.one_of("likelihood", likelihood, LIKELIHOODS)
        if likelihood == "bernoulli" and not self.is_image:
            raise ValueError("likelihood='bernoulli' needs data in [0, 1] (images); use 'gaussian' for vectors")
        checks.at_least(1, latent_dim=latent_dim, val_importance_samples=val_importance_samples,
                        test_importance_samples=test_importance_samples,
                        importance_chunk_size=importance_chunk_size)
        checks.at_least(0, beta=beta, kl_warmup_steps=kl_warmup_steps)
        if not hidden_dims:
            raise ValueError("hidden_dims must name at least one width")
        self.latent_dim = latent_dim
        self.likelihood = likelihood
        self.beta = beta
        self.kl_warmup_steps = kl_warmup_steps
        self.val_importance_samples = val_importance_samples
        self.test_importance_samples = test_importance_samples
        self.importance_chunk_size = importance_chunk_size
        checks.positive(predict_temperature=predict_temperature)
        self.predict_temperature = predict_temperature
        outputs_per_dim = 1 if likelihood == "bernoulli" else 2
        self.encoder = build_encoder(network, self.data_shape, 2 * latent_dim, hidden_dims, base_channels)
        self.decoder = build_decoder(network, latent_dim, self.data_shape, outputs_per_dim,
                                     hidden_dims, base_channels)

    # ------------------------------------------------------------------------------- networks
    def preprocess(self, x: Tensor) -> Tensor:
        """Dynamic binarization for the Bernoulli likelihood (binary x passes unchanged)."""
        return torch.bernoulli(x) if self.likelihood == "bernoulli" else x

    def posterior(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """q(z | x): mean and log-variance, each (B, latent_dim)."""
        mu, logvar = self.encoder(x).float().chunk(2, dim=1)
        return mu, logvar

    def encode(self, x: Tensor) -> Tensor:
        """The posterior mean of z, (B, latent_dim): the code used for interpolation and plots."""
        return self.posterior(x)[0]

    def decode(self, z: Tensor) -> Tensor:
        """z (B, latent_dim) -> the mean of p(x | z) in data space, (B, *data_shape)."""
        output = self.decoder(z)  # (B, 1 or 2, *data_shape)
        return torch.sigmoid(output[:, 0]) if self.likelihood == "bernoulli" else output[:, 0]

    def log_likelihood(self, x: Tensor, z: Tensor) -> Tensor:
        """log p(x | z) summed over dimensions: (B,)."""
        output = self.decoder(z).float()  # (B, 1 or 2, *data_shape)
        if self.likelihood == "bernoulli":
            log_px = -F.binary_cross_entropy_with_logits(output[:, 0], x.float(), reduction="none")
        else:
            mean, logvar = output[:, 0], output[:, 1]
            log_px = -0.5 * (LOG_2PI + logvar + (x - mean).pow(2) * torch.exp(-logvar))
        return log_px.flatten(1).sum(1)

    @staticmethod
    def reparameterize(mu: Tensor, logvar: Tensor) -> Tensor:
        return mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)

    # ------------------------------------------------------------------------------- training
    def kl_weight(self) -> float:
        if self.kl_warmup_steps == 0:
            return self.beta
        return self.beta * min(1.0, self.global_step / self.kl_warmup_steps)

    def negative_elbo_terms(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Per-example -E_q[log p(x|z)] (one z sample) and KL(q || p), each (B,); x preprocessed."""
        mu, logvar = self.posterior(x)
        z = self.reparameterize(mu, logvar)  # (B, latent_dim)
        return -self.log_likelihood(x, z), gaussian_kl_to_standard_normal(mu, logvar)

    def loss(self, batch: tuple[Tensor, Tensor], batch_idx: int, stage: str) -> tuple[Tensor, dict]:
        x = self.preprocess(batch[0])  # (B, *data_shape)
        reconstruction, kl = self.negative_elbo_terms(x)
        weight = self.kl_weight() if stage == "train" else 1.0
        metrics = {"reconstruction": reconstruction.mean(), "kl": kl.mean()}
        if stage == "train":
            metrics["kl_weight"] = torch.as_tensor(weight)
        else:
            importance_samples = (self.val_importance_samples if stage == "val"
                                  else self.test_importance_samples)
            metrics["nll"] = -self.log_prob(x, num_samples=importance_samples)
        return (reconstruction + weight * kl).mean(), metrics

    # ----------------------------------------------------------------------------- likelihood
    @torch.no_grad()
    def log_prob(self, x: Tensor, num_samples: int = 1000, chunk_size: int | None = None) -> Tensor:
        """The importance-weighted lower bound on log p(x), in nats per example: (B,).

        For the Bernoulli likelihood, non-binary x is binarized once (the same binary image for
        all K samples); binary x is used as is. ``num_samples=1`` gives the ELBO (one sample).
        """
        self.check_data(x)
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        chunk_size = chunk_size or self.importance_chunk_size
        x = self.preprocess(x)
        mu, logvar = self.posterior(x)  # (B, latent_dim) each
        log_weights = []
        for start in range(0, num_samples, chunk_size):
            k = min(chunk_size, num_samples - start)
            z = mu + torch.exp(0.5 * logvar) * torch.randn(k, *mu.shape, device=mu.device)  # (k, B, L)
            log_pz = diagonal_gaussian_log_density(z, torch.zeros_like(z), torch.zeros_like(z))
            log_qz = diagonal_gaussian_log_density(z, mu, logvar)  # (k, B)
            x_repeated = x.expand(k, *x.shape).flatten(0, 1)  # (k * B, *data_shape)
            log_px = self.log_likelihood(x_repeated, z.flatten(0, 1)).view(k, len(x))
            log_weights.append(log_px + log_pz - log_qz)
        log_weights = torch.cat(log_weights)  # (K, B)
        return torch.logsumexp(log_weights, dim=0) - math.log(num_samples)

    # ------------------------------------------------------------------------------- sampling
    @torch.no_grad()
    def sample(self, num_samples: int, temperature: float = 1.0) -> Tensor:
        """Decode z ~ N(0, temperature^2 I); returns the mean of p(x | z) (pixel probabilities)."""
        self.check_num_samples(num_samples)
        checks.positive(temperature=temperature)
        z = temperature * torch.randn(num_samples, self.latent_dim, device=self.device)
        return self.decode(z).float()

    def predict_options(self) -> dict[str, Any]:
        return {"temperature": self.predict_temperature}
