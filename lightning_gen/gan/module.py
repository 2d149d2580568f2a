"""Generative adversarial networks (Goodfellow et al. 2014) with manual optimization.

A generator G maps noise z ~ N(0, I) (and, when class-conditional, a label y) to data; a
discriminator D scores data as real or generated. Each training batch takes one discriminator
step and, every ``n_critic``-th batch, one generator step (Gulrajani et al. 2017, Algorithm 1):

    D step: minimize L_D(D(x), D(G(z))) + lambda_GP E[(||grad D(x_hat)|| - 1)^2]
                                          + gamma / 2 E[||grad D(x)||^2]           (R1)
    G step: minimize L_G(D(G(z')))   with fresh noise z' (or z itself: reuse_fake_batch)

with the non-saturating, hinge or WGAN losses of ``losses.py``. Images are scaled to [-1, 1]
(the generator ends in tanh); ``sample`` maps them back to [0, 1]. Toy vectors are used as they
come, in data coordinates. With ``ema_decay`` set, an exponential moving average of the
generator's weights (Karras et al. 2018; Yazici et al. 2019) is what ``sample``, ``predict`` and
the validation metric use.

Metrics (the same names as every family where they mean the same thing):
- ``train/d_loss``: the discriminator's loss including penalties; ``train/g_loss``: the
  generator's loss; ``train/loss`` is ``train/g_loss`` (logged on generator steps).
- ``train/d_real``, ``train/d_fake``: the mean of D(x) and D(G(z)) in the D step, as
  probabilities for the non-saturating loss (sigmoid of the logit, as in the DCGAN tutorial's
  D(x), D(G(z))), as raw scores for hinge and WGAN; ``train/gradient_penalty``, ``train/r1``.
- ``val/loss`` (and ``test/loss``): the energy distance (Székely & Rizzo 2013) between a batch of
  held-out data and as many samples, in data space ([0, 1] pixels, or data coordinates). It is
  an unbiased estimate of a distance between the model's and the data's distributions: zero
  in expectation only when they match, lower is better, independent of the discriminator (whose
  losses rise and fall as the two networks play), so it can drive checkpointing and compare
  runs. ``val/d_loss``, ``val/d_real``, ``val/d_fake`` come from the current discriminator.

Distributed training: Lightning wraps the whole module in DDP, and DDP (with
find_unused_parameters=False, the default) expects every backward to reach every parameter. A D
step's loss never touches G (the fake batch is drawn without a graph), so, when the run has more
than one process, it adds ``zero_gradient_term(G's parameters)`` (0 * their sum), which gives G a
zero gradient and changes no update (two small operations per parameter, left out of
single-process steps); the G step's loss reaches D through D(G(z)). This is also why the steps do not use ``toggle_optimizer``: it turns off
``requires_grad`` on the other network, whose parameters then never report a gradient, and
2-process DDP fails with "Expected to have finished reduction in the prior iteration" (Lightning
issues #20328, #20866). Each optimizer zeroes its own gradients before its backward, so the
other step's leftovers never reach an update.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_gen import checks
from lightning_gen.base import GenerativeModule, adamw, learning_rate_factor, schedule_horizon
from lightning_gen.gan.losses import (
    check_loss,
    discriminator_loss,
    energy_distance,
    generator_loss,
    gradient_penalty,
    interpolate,
    r1_penalty,
)
from lightning_gen.gan.nets import build_networks
from lightning_gen.nn.ema import ExponentialMovingAverage


def _check_betas(name: str, betas: Sequence[float]) -> tuple[float, float]:
    betas = tuple(float(beta) for beta in betas)
    if len(betas) != 2 or not all(0.0 <= beta < 1.0 for beta in betas):
        raise ValueError(f"{name} must be two numbers in [0, 1) (Adam's beta1, beta2), got {betas}")
    return betas


def check_truncation(truncation: float | None, name: str) -> None:
    if truncation is not None and not (math.isfinite(truncation) and truncation > 0):
        raise ValueError(f"{name} must be None (no truncation) or a positive number of standard "
                         f"deviations, got {truncation}")


def check_rejection_gamma(gamma: float | None, loss: str, name: str) -> None:
    if gamma is None:
        return
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not math.isfinite(gamma):
        raise ValueError(f"{name} must be None (no rejection) or a finite number, got {gamma!r}")
    if loss != "non_saturating":
        raise ValueError(f"{name} needs loss='non_saturating', whose discriminator logit estimates "
                         f"log p_data / p_model; got loss={loss!r}")


#: Proposals whose largest discriminator logit starts the rejection sampler's bound (Azadi et al.
#: 2019's burn-in phase; as in theirs, the bound rises whenever a larger logit is seen), drawn
#: in chunks of REJECTION_CHUNK to bound the memory.
REJECTION_BURN_IN = 2048
REJECTION_CHUNK = 256
#: Rounds of proposals (one per position still empty) before the sampler gives up.
REJECTION_MAX_ROUNDS = 1000
#: Their epsilon: keeps log(1 - exp(logit - bound - epsilon)) finite at the bound.
REJECTION_EPSILON = 1e-6


def rejection_acceptance(logits: Tensor, bound: Tensor, gamma: float) -> Tensor:
    """Discriminator rejection sampling's acceptance probability (Azadi et al. 2019, eq. 8):
    sigmoid(F), F = D~ - D~_M - log(1 - exp(D~ - D~_M - epsilon)) - gamma, for logits
    D~ <= bound D~_M. With gamma = 0 it is exp(D~ - D~_M) to within epsilon: the density ratio
    p_data / p_model that an optimal discriminator's logit gives, divided by its largest value,
    i.e. exact rejection sampling from p_model towards p_data. gamma > 0 accepts fewer (the
    highest logits), gamma < 0 more."""
    gap = logits.float() - bound.float()  # <= 0; float32 (MPS has no float64) resolves epsilon
    f = gap - torch.log1p(-torch.exp(gap - REJECTION_EPSILON)) - gamma
    return torch.sigmoid(f)


def zero_gradient_term(parameters) -> Tensor:
    """0 * sum of the parameters: a loss term that gives each of them a zero gradient (see the
    module docstring: it keeps DDP's reducer complete without changing any update)."""
    return sum(parameter.sum() for parameter in parameters) * 0.0


class GAN(GenerativeModule):
    """GAN with an MLP pair, a DCGAN pair (Radford et al. 2016; images
    with H, W divisible by 4) or an MLP pair for 2-D data.

    Args:
        data_shape: (C, H, W) images in [0, 1] or (D,) vectors (linked from the data module).
        network: ``"dcgan"`` (images with H, W divisible by 4) or ``"mlp"``; default: dcgan for
            images, mlp for vectors.
        loss: ``"non_saturating"``, ``"hinge"`` or ``"wgan_gp"``.
        latent_dim: size of z (100, as in Radford et al. 2016).
        generator_hidden_dims: MLP generator widths from z towards the data (256, 512, 1024).
        discriminator_hidden_dims: MLP discriminator widths from the data towards the score
            (1024, 512, 256).
        base_channels: channels of the DCGAN pair's full-resolution layer (doubled below it).
        num_classes: set to make both networks class-conditional (labels from the data module's
            ``y``): label embedding concatenated to z, projection discriminator.
        n_critic: discriminator steps per generator step (5 in WGAN-GP).
        gradient_penalty_weight: lambda of the WGAN-GP penalty; default 10 for ``wgan_gp`` and 0
            (off) for the other losses, to which it applies too when set.
        r1_weight: gamma of the R1 penalty gamma / 2 E||grad D(x)||^2 on real data (0: off).
        spectral_norm: spectral normalization of every discriminator weight (Miyato et al. 2018).
        ema_decay: decay of the generator's weight average used for sampling (None: off).
        generator_extra_layers: DCGAN only: 3x3 convolutions (batch norm, ReLU) added to the
            generator at H/4 and again at H/2 (0: Radford et al.'s two transposed
            convolutions alone).
        discriminator_extra_layers: DCGAN only: 3x3 convolutions (LeakyReLU) added to the
            discriminator after each strided convolution, at H/2 and at H/4 (0: Radford et al.'s).
        reuse_fake_batch: the G step scores the batch the D step generated (z' = z, as the
            PyTorch DCGAN tutorial does) instead of generating a fresh one: one generator
            forward pass less per G step, the largest part of a step when the generator is the
            bigger network. The discriminator has been updated in between, so the G step still
            scores the batch anew.
        generator_learning_rate, discriminator_learning_rate: Adam learning rates (the DCGAN
            paper's 2e-4 for both).
        generator_betas, discriminator_betas: Adam's (beta1, beta2) (DCGAN: 0.5, 0.999;
            WGAN-GP: 0.5, 0.9 or 0.0, 0.9).
        weight_decay: decoupled weight decay of both optimizers (AdamW; 0 gives Adam exactly).
        lr_schedule, warmup_steps: as in GenerativeModule, applied to both optimizers, counted in
            each optimizer's own steps.
        predict_use_ema: whether ``predict`` samples from the averaged generator (default: when
            ema_decay is set); not saved as a hyperparameter, so the command line sets it at
            ``predict --ckpt_path``.
        predict_truncation: the truncation of the noise ``predict`` draws (see ``sample``; None:
            none); like predict_use_ema, not saved, so it can be set at ``predict --ckpt_path``.
        predict_rejection_gamma: discriminator rejection sampling in ``predict`` (see ``sample``;
            None: off, 0: the density-ratio acceptance itself); not saved either.
    """

    EVALUATION_OPTIONS = ("predict_use_ema", "predict_truncation", "predict_rejection_gamma")

    def __init__(
        self,
        data_shape: Sequence[int] = (1, 28, 28),
        network: str | None = None,
        loss: str = "non_saturating",
        latent_dim: int = 100,
        generator_hidden_dims: Sequence[int] = (256, 512, 1024),
        discriminator_hidden_dims: Sequence[int] = (1024, 512, 256),
        base_channels: int = 64,
        num_classes: int | None = None,
        n_critic: int = 1,
        gradient_penalty_weight: float | None = None,
        r1_weight: float = 0.0,
        spectral_norm: bool = False,
        ema_decay: float | None = None,
        generator_extra_layers: int = 0,
        discriminator_extra_layers: int = 0,
        reuse_fake_batch: bool = False,
        *,
        generator_learning_rate: float = 2e-4,
        discriminator_learning_rate: float = 2e-4,
        generator_betas: Sequence[float] = (0.5, 0.999),
        discriminator_betas: Sequence[float] = (0.5, 0.999),
        weight_decay: float = 0.0,
        lr_schedule: str = "constant",
        warmup_steps: int = 0,
        predict_use_ema: bool | None = None,
        predict_truncation: float | None = None,
        predict_rejection_gamma: float | None = None,
    ) -> None:
        super().__init__(data_shape, learning_rate=generator_learning_rate, weight_decay=weight_decay,
                         lr_schedule=lr_schedule, warmup_steps=warmup_steps)
        self.save_hyperparameters(ignore=self.EVALUATION_OPTIONS)
        self.automatic_optimization = False
        if network is None:
            network = "dcgan" if self.is_image else "mlp"
        check_loss(loss)
        checks.at_least(1, latent_dim=latent_dim, base_channels=base_channels, n_critic=n_critic)
        checks.at_least(0, generator_extra_layers=generator_extra_layers,
                        discriminator_extra_layers=discriminator_extra_layers)
        for name, value in (("generator_extra_layers", generator_extra_layers),
                            ("discriminator_extra_layers", discriminator_extra_layers)):
            if value and network != "dcgan":
                raise ValueError(f"{name} applies to network='dcgan' only, got network={network!r}")
        if not generator_hidden_dims or not discriminator_hidden_dims:
            raise ValueError("generator_hidden_dims and discriminator_hidden_dims must name at least one width")
        if gradient_penalty_weight is None:
            gradient_penalty_weight = 10.0 if loss == "wgan_gp" else 0.0
        checks.at_least(0, gradient_penalty_weight=gradient_penalty_weight, r1_weight=r1_weight)
        if discriminator_learning_rate <= 0:
            raise ValueError(f"discriminator_learning_rate must be > 0, got {discriminator_learning_rate}")
        self.architecture = network
        self.adversarial_loss = loss
        self.latent_dim = latent_dim
        self.num_classes = checks.optional_classes(num_classes, minimum=2)
        self.n_critic = n_critic
        self.gradient_penalty_weight = gradient_penalty_weight
        self.r1_weight = r1_weight
        self.reuse_fake_batch = reuse_fake_batch
        self.generator_learning_rate = generator_learning_rate
        self.discriminator_learning_rate = discriminator_learning_rate
        self.generator_betas = _check_betas("generator_betas", generator_betas)
        self.discriminator_betas = _check_betas("discriminator_betas", discriminator_betas)
        self.generator, self.discriminator = build_networks(
            network, self.data_shape, latent_dim, generator_hidden_dims, discriminator_hidden_dims,
            base_channels, num_classes, spectral_norm, generator_extra_layers, discriminator_extra_layers)
        # The average is a submodule: it moves with .to(), and is saved in and restored from
        # checkpoints with the rest of the state dict.
        self.generator_ema = (ExponentialMovingAverage(self.generator, ema_decay)
                              if ema_decay is not None else None)
        checks.average_to_predict(predict_use_ema, ema_decay, "generator")
        self.predict_use_ema = predict_use_ema
        check_truncation(predict_truncation, "predict_truncation")
        self.predict_truncation = predict_truncation
        check_rejection_gamma(predict_rejection_gamma, loss, "predict_rejection_gamma")
        self.predict_rejection_gamma = predict_rejection_gamma

    # ----------------------------------------------------------------------------------- noise
    def noise(self, num_samples: int, truncation: float | None = None) -> Tensor:
        """z ~ N(0, I): (num_samples, latent_dim); with ``truncation`` t, each component drawn
        from the normal truncated to [-t, t] (inverse-CDF sampling, one draw per component)."""
        z = torch.empty(num_samples, self.latent_dim, device=self.device)  # (B, latent_dim)
        if truncation is None:
            return z.normal_()
        return nn.init.trunc_normal_(z, mean=0.0, std=1.0, a=-truncation, b=truncation)

    # -------------------------------------------------------------------------------- losses
    def discriminator_step_loss(self, real: Tensor, y: Tensor | None,
                                fake: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """The D step's loss on a preprocessed real batch (B, *data_shape), and what to log;
        ``fake``: the generated batch to score (default: a fresh one); no gradient reaches G."""
        if fake is None:
            with torch.no_grad():
                fake = self.generator(self.noise(len(real)), y)  # (B, *data_shape)
        fake = fake.detach()
        if self.r1_weight > 0:
            real = real.detach().requires_grad_(True)
        real_scores = self.discriminator(real, y)  # (B,)
        fake_scores = self.discriminator(fake, y)  # (B,)
        loss = discriminator_loss(self.adversarial_loss, real_scores, fake_scores)
        if self._trainer is not None and self.trainer.world_size > 1:  # for DDP: see the module docstring
            loss = loss + zero_gradient_term(self.generator.parameters())
        logs = {"d_real": self.score_summary(real_scores), "d_fake": self.score_summary(fake_scores)}
        if self.gradient_penalty_weight > 0:
            penalty = gradient_penalty(lambda x_hat: self.discriminator(x_hat, y), interpolate(real, fake))
            loss = loss + self.gradient_penalty_weight * penalty
            logs["gradient_penalty"] = penalty
        if self.r1_weight > 0:
            r1 = r1_penalty(real_scores, real)
            loss = loss + 0.5 * self.r1_weight * r1
            logs["r1"] = r1
        logs["d_loss"] = loss
        return loss, logs

    def generator_step_loss(self, num_samples: int, y: Tensor | None, fake: Tensor | None = None) -> Tensor:
        """The G step's loss on ``num_samples`` fresh samples (with labels y when conditional), or
        on ``fake``, a generated batch that still carries its graph into G."""
        if fake is None:
            fake = self.generator(self.noise(num_samples), y)  # (B, *data_shape)
        return generator_loss(self.adversarial_loss, self.discriminator(fake, y))

    def score_summary(self, scores: Tensor) -> Tensor:
        """Mean D output: a probability for the non-saturating loss, the raw score otherwise."""
        scores = scores.detach().float()
        return torch.sigmoid(scores).mean() if self.adversarial_loss == "non_saturating" else scores.mean()

    # ------------------------------------------------------------------------------ training
    def loss(self, batch: tuple[Tensor, Tensor], batch_idx: int, stage: str) -> tuple[Tensor | None, dict]:
        """Training: D's and G's losses summed, without stepping (reaches every trainable
        parameter; ``training_step`` takes the two steps separately). Validation and test: the
        energy distance between the batch and as many samples (None for a batch of one), with
        the current discriminator's loss and mean scores on the sampling generator's output."""
        x, y = batch
        y = self.batch_labels(y)
        real = self.to_model_space(x)  # (B, *data_shape)
        if stage == "train":
            d_loss, _ = self.discriminator_step_loss(real, y)
            return d_loss + self.generator_step_loss(len(x), y), {}
        fake = self.generate(len(x), y)  # (B, *data_shape), the sampling generator's
        real_scores, fake_scores = self.discriminator(real, y), self.discriminator(fake, y)
        metrics = {"d_loss": discriminator_loss(self.adversarial_loss, real_scores, fake_scores),
                   "d_real": self.score_summary(real_scores), "d_fake": self.score_summary(fake_scores)}
        if len(x) < 2:  # the energy distance needs two points per side
            return None, metrics
        return energy_distance(self.from_model_space(fake), x), metrics

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        """Manual optimization: a D step on every batch, a G step every n_critic-th."""
        x, y = batch
        y = self.batch_labels(y)
        real = self.to_model_space(x)  # (B, *data_shape)
        optimizer_g, optimizer_d = self.optimizers()
        scheduler_g, scheduler_d = self.learning_rate_schedulers()
        generator_step = (batch_idx + 1) % self.n_critic == 0
        # With reuse_fake_batch, the batch is generated once, with its graph, for both steps.
        fake = (self.generator(self.noise(len(x)), y)
                if self.reuse_fake_batch and generator_step else None)  # (B, *data_shape)

        d_loss, logs = self.discriminator_step_loss(real, y, fake)
        self.watch_loss(d_loss)
        optimizer_d.zero_grad(set_to_none=True)  # also drops what the G step left in D
        self.manual_backward(d_loss)
        optimizer_d.step()
        if scheduler_d is not None:
            scheduler_d.step()
        for name, value in logs.items():
            self.log_metric("train", name, value, batch_size=len(x), prog_bar=name == "d_loss")

        if generator_step:
            g_loss = self.generator_step_loss(len(x), y, fake)
            self.watch_loss(g_loss)
            optimizer_g.zero_grad(set_to_none=True)
            self.manual_backward(g_loss)
            optimizer_g.step()
            if scheduler_g is not None:
                scheduler_g.step()
            self.update_average()
            self.log_metric("train", "g_loss", g_loss, batch_size=len(x))
            self.log_loss("train", g_loss.detach(), len(x))
        self.log_step_metrics()

    def learning_rate_schedulers(self) -> tuple:
        """(generator's, discriminator's) schedulers, or (None, None); stepped by hand, as manual
        optimization requires, each after its own optimizer's step."""
        schedulers = self.lr_schedulers()
        if schedulers is None:
            return None, None
        return tuple(schedulers)

    # ------------------------------------------------------------------------------ optimizer
    def configure_optimizers(self):
        optimizer_g = adamw(self.generator.parameters(), trainer=self._trainer, lr=self.generator_learning_rate,
                            betas=self.generator_betas, weight_decay=self.weight_decay)
        optimizer_d = adamw(self.discriminator.parameters(), trainer=self._trainer, lr=self.discriminator_learning_rate,
                            betas=self.discriminator_betas, weight_decay=self.weight_decay)
        if self.lr_schedule == "constant" and self.warmup_steps == 0:
            return [optimizer_g, optimizer_d]
        total_batches = self.total_training_batches()  # inf for a fit with no step bound
        schedulers = [
            torch.optim.lr_scheduler.LambdaLR(optimizer, learning_rate_factor(
                self.lr_schedule, self.warmup_steps,
                *schedule_horizon(self.trainer, self.lr_schedule, steps)))
            for optimizer, steps in [(optimizer_g, total_batches // self.n_critic
                                      if math.isfinite(total_batches) else math.inf),
                                     (optimizer_d, total_batches)]
        ]
        return [optimizer_g, optimizer_d], schedulers

    def total_training_batches(self) -> float:
        """Training batches in the whole fit (inf when no step or epoch count bounds it). Under
        manual optimization the Trainer's step count (max_steps, global_step) counts every
        optimizer step: 1 + 1 / n_critic per batch."""
        trainer = self.trainer
        if trainer.max_steps > 0:
            return max(math.ceil(trainer.max_steps / (1 + 1 / self.n_critic)), 1)
        return max(trainer.estimated_stepping_batches, 1)

    # ------------------------------------------------------------------------------- sampling
    def averaged_network(self) -> tuple[nn.Module, ExponentialMovingAverage | None]:
        return self.generator, self.generator_ema

    def generate(self, num_samples: int, y: Tensor | None, use_ema: bool | None = None,
                 truncation: float | None = None) -> Tensor:
        """Generator output (network space) for fresh noise, with batch norm in inference mode
        (samples do not depend on each other nor change the running statistics)."""
        generator = self.sampling_network(use_ema)
        was_training = generator.training
        generator.eval()
        try:
            return generator(self.noise(num_samples, truncation), y)
        finally:
            generator.train(was_training)

    def rejection_generate(self, num_samples: int, y: Tensor | None, use_ema: bool | None,
                           truncation: float | None, gamma: float) -> Tensor:
        """Discriminator rejection sampling (Azadi et al. 2019): generator proposals kept with
        probability ``rejection_acceptance`` of their discriminator logit, until every one of
        the ``num_samples`` positions (each with its label, when conditional) holds an accepted
        sample. The bound D~_M starts at the largest logit of ``REJECTION_BURN_IN`` proposals and
        rises with any larger logit seen. The discriminator was trained against the trained
        generator; with the averaged one it scores a nearby distribution (an approximation).
        Output in network space, like ``generate``."""
        discriminator = self.discriminator
        was_training = discriminator.training
        discriminator.eval()  # spectral norm's power iteration must not move while scoring
        try:
            burn_in_labels = self.sampling_labels(None, REJECTION_BURN_IN)
            bound = torch.tensor(-math.inf, device=self.device)
            for start in range(0, REJECTION_BURN_IN, REJECTION_CHUNK):
                labels = None if burn_in_labels is None else burn_in_labels[start:start + REJECTION_CHUNK]
                chunk = self.generate(min(REJECTION_CHUNK, REJECTION_BURN_IN - start), labels, use_ema, truncation)
                bound = torch.maximum(bound, discriminator(chunk, labels).float().max())
            samples = torch.empty(num_samples, *self.data_shape, device=self.device)
            empty = torch.arange(num_samples, device=self.device)  # positions still to fill
            for _ in range(REJECTION_MAX_ROUNDS):
                labels = None if y is None else y[empty]
                proposals = self.generate(len(empty), labels, use_ema, truncation)  # (n, *data_shape)
                scores = discriminator(proposals, labels).float()  # (n,) logits
                bound = torch.maximum(bound, scores.max())
                accepted = torch.rand(len(empty), device=self.device) < rejection_acceptance(scores, bound, gamma)
                samples[empty[accepted]] = proposals[accepted].to(samples.dtype)
                empty = empty[~accepted]  # boolean indexing waits for the device: once a round
                if len(empty) == 0:
                    return samples
        finally:
            discriminator.train(was_training)
        raise RuntimeError(f"discriminator rejection sampling filled {num_samples - len(empty)} of "
                           f"{num_samples} samples in {REJECTION_MAX_ROUNDS} rounds of proposals: "
                           f"lower rejection_gamma (now {gamma}) to accept more")

    @torch.no_grad()
    def sample(self, num_samples: int, y: Tensor | int | Sequence[int] | None = None,
               use_ema: bool | None = None, truncation: float | None = None,
               rejection_gamma: float | None = None) -> Tensor:
        """Draw samples in data space: (num_samples, *data_shape), images in [0, 1].

        Args:
            y: labels for a class-conditional model (see ``GenerativeModule.sampling_labels``:
                one int, num_samples labels, or by default every class in turn).
            use_ema: sample from the averaged generator (default: when ema_decay was set).
            truncation: the truncation trick (Brock et al. 2019, section 3.1): noise from
                N(0, I) truncated to [-t, t] in every component. Smaller t draws samples nearer
                the generator's typical output: less varied, and clearer only where that output
                is (BigGAN's; the MNIST DCGAN's digits grow less recognisable, see
                benchmarks/results/laptop.md). None (the default): the training noise.
            rejection_gamma: discriminator rejection sampling (Azadi et al. 2019, see
                ``rejection_generate``; non-saturating loss only): proposals are kept with
                probability ``rejection_acceptance``, about exp(D~(x) - D~_M) at gamma = 0, so
                the samples move from the generator's distribution towards the data's as far as
                the discriminator's logit estimates log p_data / p_model. Larger gamma keeps
                fewer and draws longer. None (the default): every proposal is kept. On the
                laptop GAN preset's checkpoints it did not raise the digits' scores
                (benchmarks/results/laptop.md, run AU).
        """
        self.check_num_samples(num_samples)
        check_truncation(truncation, "truncation")
        check_rejection_gamma(rejection_gamma, self.adversarial_loss, "rejection_gamma")
        labels = self.sampling_labels(y, num_samples)
        if rejection_gamma is None:
            generated = self.generate(num_samples, labels, use_ema, truncation)
        else:
            generated = self.rejection_generate(num_samples, labels, use_ema, truncation, float(rejection_gamma))
        return self.from_model_space(generated).float()

    def predict_options(self) -> dict[str, Any]:
        return {"use_ema": self.predict_use_ema, "truncation": self.predict_truncation,
                "rejection_gamma": self.predict_rejection_gamma}
