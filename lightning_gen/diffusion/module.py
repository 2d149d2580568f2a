"""Denoising diffusion probabilistic model (Ho et al. 2020) with DDIM (Song et al. 2021),
DPM-Solver++(2M) (Lu et al. 2022) and Heun (Karras et al. 2022) sampling, classifier-free guidance
(Ho & Salimans 2021) and the variational bound (Ho et al. 2020, eq. 5) as ``test/nll``.

Forward process: q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I), drawn in closed form
(Ho et al. 2020, eq. 4) for a timestep t ~ Uniform{0 .. T-1} drawn per example.
Training (Ho et al. 2020, Algorithm 1 / eq. 14, the "simple" loss):
    loss = E_{x_0, t, eps} || eps - eps_theta(sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps, t) ||^2
(mean over dimensions), or with ``prediction="v"`` the same MSE on v = sqrt(alpha_bar_t) eps -
sqrt(1 - alpha_bar_t) x_0 (Salimans & Ho 2022). With ``min_snr_gamma`` each example's MSE is weighted by the Min-SNR-gamma
strategy (Hang et al. 2023): the weight of the x_0 error is min(SNR_t, gamma), which for the two
targets is
    epsilon: min(SNR_t, gamma) / SNR_t        v: min(SNR_t, gamma) / (SNR_t + 1)
(||eps - eps_hat||^2 = SNR_t ||x_0 - x0_hat||^2 and ||v - v_hat||^2 = (SNR_t + 1) ||x_0 - x0_hat||^2),
so the nearly noise-free timesteps, whose gradients conflict with the rest, stop dominating.
``val/loss`` and ``test/loss`` are the same (weighted) MSE (computed with the EMA weights when they
exist, with fixed noise per batch so epochs compare).

Sampling: ancestral DDPM over all T steps (Ho et al. 2020, Algorithm 2), DDIM over a sub-sequence
of ``steps`` timesteps with noise scale ``eta`` (Song et al. 2021, eqs. 12 and 16), or one of two
second-order solvers of the probability-flow ODE: DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2)
and Heun (Karras et al. 2022, Algorithm 1); ``steps`` counts network evaluations for each; see
``samplers.py``. Images are scaled from [0, 1] to [-1, 1] for the network (Ho et al. 2020, sec. 3.3)
and back for ``sample``; vectors are used in data coordinates.

Class conditioning with classifier-free guidance (Ho & Salimans 2021): in training the label is
replaced by a null label with probability ``label_dropout``, so one network learns both
eps(x_t, t, y) and eps(x_t, t); sampling uses
    eps_guided = eps(x_t, t) + guidance_scale (eps(x_t, t, y) - eps(x_t, t)),
where guidance_scale = 1 is the plain conditional model and larger values trade diversity for
fidelity (the paper's w is guidance_scale - 1).

An exponential moving average of the weights (``ema_decay``) is kept after every optimizer step
and used for validation, sampling and ``predict``; it is part of the module, so checkpoints save it.

Likelihood: ``variational_bound(x)`` is the variational bound L >= -log p(x) (Ho et al. 2020,
eq. 5, with the posterior's variance beta_tilde_t and, for images, the discretized Gaussian decoder
of 8-bit levels; see ``likelihood.py``) in nats per example. It is a bound, not ``log_prob``: the
exact likelihood of the model needs the probability-flow ODE's change of variables (Song et al.
2021b), which is not implemented. ``test`` logs it as ``test/nll`` and ``test/bpd`` (estimated with
``test_vlb_timesteps`` timesteps per example); validation logs only ``val/loss`` unless
``val_vlb_timesteps`` asks for the bound there too.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_gen import checks
from lightning_gen.base import GenerativeModule
from lightning_gen.diffusion.likelihood import quantize_images, variational_bound
from lightning_gen.diffusion.samplers import ODE_SAMPLERS, SAMPLERS, check_eta, sampling_loop
from lightning_gen.diffusion.schedule import NoiseSchedule
from lightning_gen.nn.denoisers import MLPDenoiserConfig, UNetConfig, time_network
from lightning_gen.nn.ema import ExponentialMovingAverage
from lightning_gen.nn.guidance import check_guidance, drop_labels, guided

PREDICTIONS = ("epsilon", "v")


class Diffusion(GenerativeModule):
    """DDPM / DDIM with a U-Net for images (C, H, W) or an MLP denoiser for vectors (D,).

    Args:
        data_shape: (C, H, W) images in [0, 1] or (D,) vectors (linked from the data module).
        num_timesteps: T, the number of diffusion steps.
        beta_schedule: ``"linear"`` (Ho et al. 2020) or ``"cosine"`` (Nichol & Dhariwal 2021).
        prediction: what the network predicts: ``"epsilon"`` (the noise) or ``"v"``.
        min_snr_gamma: gamma of the Min-SNR-gamma loss weights (Hang et al. 2023; the paper uses
            5), or None for the unweighted simple loss.
        unet: the U-Net for images (``UNetConfig``: base_channels, channel_multipliers,
            num_res_blocks, attention_levels, num_heads, norm_groups, dropout), a nested group:
            ``unet: {base_channels: 64}`` in a config, ``--model.init_args.unet.base_channels 64``.
        mlp: the residual MLP for vectors (``MLPDenoiserConfig``: hidden_dim, num_layers).
        num_classes: number of labels for a class-conditional model (None: unconditional).
        label_dropout: probability of training with the null label (classifier-free guidance).
        guidance_scale: default guidance scale of ``sample`` for conditional models (1: none).
        ema_decay: decay of the weight average used for sampling and validation (None: no EMA).
        clip_denoised: clip the predicted x_0 to [-1, 1] while sampling (default: True for images,
            False for vectors, whose range is not bounded).
        predict_sampler, predict_steps, predict_eta: what ``predict`` (and the default ``sample``)
            uses: the sampler, ``"ddim"`` (default), ``"ddpm"``, ``"dpm_solver++"`` (2M) or
            ``"heun"``; ``predict_steps`` network evaluations (None: 50, or T when T < 50; DDPM
            walks all T; Heun visits ceil(steps / 2) timesteps for 2 ceil(steps / 2) - 1
            evaluations); DDIM's eta in [0, 1] (0: deterministic, 1: the DDPM posterior's
            variance; the ODE solvers need 0).
        test_vlb_timesteps: how ``test/nll`` (the variational bound) sums its T - 1 denoising
            terms: None: all of them (T - 1 network evaluations of each batch); k: an unbiased
            estimate from k timesteps drawn per example (k evaluations; seeded by the batch index,
            so a test is reproducible); 0: no ``test/nll``. Default 16.
        val_vlb_timesteps: the same for ``val/nll`` (default 0: validation logs only the loss).

    ``guidance_scale``, ``clip_denoised`` and the ``predict_*`` options change sampling only: they
    are not saved as hyperparameters, so ``cli.py predict --ckpt_path ...`` takes them from the
    config and the command line, and ``load_from_checkpoint(path, guidance_scale=2.0)`` sets them.
        optimizer_options: learning_rate (default ``DEFAULT_LEARNING_RATE``), weight_decay,
            lr_schedule, warmup_steps, as keywords: see GenerativeModule.
    """

    DEFAULT_LEARNING_RATE = 2e-4
    EVALUATION_OPTIONS = ("guidance_scale", "clip_denoised", "predict_sampler", "predict_steps",
                          "predict_eta", "test_vlb_timesteps", "val_vlb_timesteps")

    def __init__(
        self,
        data_shape: Sequence[int] = (1, 28, 28),
        num_timesteps: int = 1000,
        beta_schedule: str = "linear",
        prediction: str = "epsilon",
        min_snr_gamma: float | None = None,
        unet: UNetConfig = UNetConfig(),
        mlp: MLPDenoiserConfig = MLPDenoiserConfig(),
        num_classes: int | None = None,
        label_dropout: float = 0.1,
        guidance_scale: float = 1.0,
        ema_decay: float | None = 0.999,
        clip_denoised: bool | None = None,
        predict_sampler: str = "ddim",
        predict_steps: int | None = None,
        predict_eta: float = 0.0,
        test_vlb_timesteps: int | None = 16,
        val_vlb_timesteps: int | None = 0,
        **optimizer_options: Any,
    ) -> None:
        super().__init__(data_shape, **optimizer_options)
        self.save_hyperparameters(ignore=self.EVALUATION_OPTIONS)
        checks.one_of("prediction", prediction, PREDICTIONS)
        if min_snr_gamma is not None and (isinstance(min_snr_gamma, bool) or not min_snr_gamma > 0):
            raise ValueError(f"min_snr_gamma must be None (no weighting) or > 0 (the paper's 5), "
                             f"got {min_snr_gamma!r}")
        checks.one_of("predict_sampler", predict_sampler, SAMPLERS)
        checks.fraction(label_dropout=label_dropout)
        check_guidance(num_classes, label_dropout, guidance_scale)
        check_eta(predict_eta, "predict_eta")
        for name, value in (("test_vlb_timesteps", test_vlb_timesteps), ("val_vlb_timesteps", val_vlb_timesteps)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                raise ValueError(f"{name} must be None (all T timesteps), 0 (no bound) or a number "
                                 f"of timesteps >= 1, got {value!r}")
        self.prediction = prediction
        self.min_snr_gamma = min_snr_gamma
        self.num_classes = checks.optional_classes(num_classes)
        self.label_dropout = label_dropout
        self.guidance_scale = guidance_scale
        self.clip_denoised = self.is_image if clip_denoised is None else clip_denoised
        self.predict_sampler = predict_sampler
        self.predict_steps = predict_steps
        self.predict_eta = predict_eta
        self.test_vlb_timesteps = test_vlb_timesteps
        self.val_vlb_timesteps = val_vlb_timesteps
        self.schedule = NoiseSchedule(num_timesteps, beta_schedule)
        self.network, groups = time_network(self.data_shape, unet, mlp, num_classes)
        self.hparams.update(groups)  # plain dicts: a checkpoint stays loadable weights-only
        self.ema = ExponentialMovingAverage(self.network, ema_decay) if ema_decay is not None else None
        # The sampling defaults are checked now rather than at the end of a long fit.
        if predict_steps is not None and not 1 <= predict_steps <= num_timesteps:
            raise ValueError(f"predict_steps must be None or in 1..{num_timesteps}, got {predict_steps}")
        if predict_sampler == "ddpm" and predict_steps not in (None, num_timesteps):
            raise ValueError("predict_sampler='ddpm' walks all T steps: set predict_steps to null "
                             f"(or {num_timesteps}), or use predict_sampler='ddim' with predict_eta=1.0")
        if predict_sampler in ODE_SAMPLERS and predict_eta != 0:
            raise ValueError(f"predict_sampler={predict_sampler!r} is deterministic: set predict_eta "
                             "to 0, or use predict_sampler='ddim' for eta > 0")

    # ------------------------------------------------------------------------------- training
    @property
    def num_timesteps(self) -> int:
        return self.schedule.num_timesteps

    def target(self, x0: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """What the network regresses: eps, or v (Salimans & Ho 2022)."""
        return eps if self.prediction == "epsilon" else self.schedule.velocity(x0, t, eps)

    def loss_weights(self, t: Tensor) -> Tensor:
        """Min-SNR-gamma weights (B,) of the per-example MSE of ``target`` at timesteps t."""
        snr = self.schedule.snr(t)
        if self.prediction == "epsilon":
            # min(SNR, gamma) / SNR as min(1, gamma / SNR): no 0 / 0 where SNR is 0 (cosine's last t).
            return (self.min_snr_gamma / snr).clamp(max=1.0)
        return snr.clamp(max=self.min_snr_gamma) / (snr + 1.0)

    def diffusion_loss(self, x0: Tensor, y: Tensor | None, network: nn.Module | None = None,
                       generator: torch.Generator | None = None) -> Tensor:
        """The simple loss (Ho et al. 2020, eq. 14) of x_0 in model space (B, ...), weighted by
        ``loss_weights`` when ``min_snr_gamma`` is set: a scalar."""
        network = network if network is not None else self.network
        t = torch.randint(0, self.num_timesteps, (len(x0),), device=x0.device, generator=generator)
        eps = torch.randn(x0.shape, device=x0.device, generator=generator)
        x_t = self.schedule.q_sample(x0, t, eps)  # (B, ...)
        output = network(x_t, t, y)
        if self.min_snr_gamma is None:
            return F.mse_loss(output.float(), self.target(x0, t, eps))
        errors = (output.float() - self.target(x0, t, eps)).pow(2).flatten(1).mean(dim=1)  # (B,)
        return (self.loss_weights(t) * errors).mean()

    def loss(self, batch: tuple[Tensor, Tensor], batch_idx: int, stage: str) -> tuple[Tensor, dict]:
        x, y = batch
        x0 = self.to_model_space(x)  # (B, ...)
        if stage == "train":
            return self.diffusion_loss(x0, drop_labels(y, self.num_classes, self.label_dropout)), {}
        # The same t and noise for a batch at every validation (seeded by its index), so that
        # successive epochs measure the same thing; the labels are kept (the conditional loss).
        generator = torch.Generator(device=x0.device).manual_seed(batch_idx)
        loss = self.diffusion_loss(x0, self.batch_labels(y), self.sampling_network(), generator)
        timesteps = self.test_vlb_timesteps if stage == "test" else self.val_vlb_timesteps
        if timesteps == 0:
            return loss, {}
        # Its own generator, so the loss above stays what it was without the bound.
        generator = torch.Generator(device=x0.device).manual_seed(batch_idx)
        return loss, {"nll": self.variational_bound(x, y, timesteps, generator)}

    @torch.no_grad()
    def variational_bound(self, x: Tensor, y: Tensor | None = None, timesteps: int | None = None,
                          generator: torch.Generator | None = None) -> Tensor:
        """The variational bound L >= -log p(x) (Ho et al. 2020, eq. 5) in nats per example (B,),
        for ``x`` as the data module yields it; see ``likelihood.py``.

        Images are quantized to 8 bits (round(255 x) / 255) and scored with the discretized
        Gaussian decoder, so L / (D ln 2) is the bits/dim of the discrete data; vectors get a
        Gaussian decoder density (a bound on the continuous negative log density). The averaged
        network is used (``sampling_network``) without guidance: a conditional model is scored
        given the labels ``y``.

        Args:
            timesteps: None: the sum over all T - 1 denoising terms (T network evaluations with
                the decoder's); k >= 1: an unbiased estimate of it from k uniformly drawn
                timesteps per example (k + 1 evaluations).
            generator: the noise (and timesteps) source, for a reproducible estimate.
        """
        if tuple(x.shape[1:]) != self.data_shape:  # the shape only: a range check would sync
            raise ValueError(f"x must have shape (B, {', '.join(map(str, self.data_shape))}), got {tuple(x.shape)}")
        x0 = self.to_model_space(quantize_images(x) if self.is_image else x).float()
        network, labels = self.sampling_network(), self.batch_labels(y)
        if self.num_classes is not None and labels is None:
            raise ValueError("a class-conditional model's bound needs the labels y of x")

        def eps_prediction(x_t: Tensor, t: Tensor) -> Tensor:
            output = network(x_t, t, labels).float()
            return self.schedule.model_predictions(x_t, t, output, self.prediction)[0]

        return variational_bound(self.schedule, eps_prediction, x0, discrete=self.is_image,
                                 timesteps=timesteps, clip_denoised=self.clip_denoised,
                                 generator=generator)

    def averaged_network(self) -> tuple[nn.Module, ExponentialMovingAverage | None]:
        return self.network, self.ema

    # ------------------------------------------------------------------------------- sampling
    def denoiser(self, network: nn.Module, y: Tensor | None, guidance_scale: float):
        """``(x_t, t) -> eps``: the network's noise prediction with classifier-free guidance."""

        def eps_prediction(x_t: Tensor, t: Tensor, labels: Tensor | None) -> Tensor:
            output = network(x_t, t, labels).float()
            return self.schedule.model_predictions(x_t, t, output, self.prediction)[0]

        return guided(eps_prediction, y, self.num_classes, guidance_scale)

    @torch.no_grad()
    def sample_trajectory(self, num_samples: int, **options: Any) -> dict[str, Tensor]:
        """The whole denoising trajectory, in data space; takes ``sample``'s arguments.

        Returns a dict with ``"states"``: (S + 1, N, *data_shape), x_T, ..., x_0 for S sampler
        steps, and ``"denoised"``: (S, N, *data_shape), the network's x_0 estimate at each step.
        Images are mapped to [0, 1] (and clamped) like ``sample``'s output.
        """
        return self._generate(num_samples, record=True, **options)

    @torch.no_grad()
    def sample(
        self,
        num_samples: int,
        sampler: str | None = None,
        steps: int | None = None,
        eta: float | None = None,
        y: Tensor | int | Sequence[int] | None = None,
        guidance_scale: float | None = None,
        use_ema: bool | None = None,
        x_T: Tensor | None = None,
    ) -> Tensor:
        """Draw samples in data space: images (N, C, H, W) in [0, 1] or vectors (N, D).

        Args:
            num_samples: N.
            sampler: ``"ddim"``, ``"ddpm"``, ``"dpm_solver++"`` (DPM-Solver++(2M), Lu et al.
                2022) or ``"heun"`` (Karras et al. 2022) (default: ``predict_sampler``, DDIM).
            steps: the number of network evaluations, whatever the sampler (default
                ``predict_steps``, None: 50, or T when T < 50). DDIM and DPM-Solver++ visit
                ``steps`` timesteps; Heun costs 2 evaluations per step but 1 for its last, so it
                visits N = ceil(steps / 2) timesteps for 2 N - 1 evaluations (``steps`` when odd,
                one fewer when even); DDPM walks all T.
            eta: DDIM noise scale (default ``predict_eta``, 0: deterministic given x_T); the
                deterministic ODE solvers (DPM-Solver++, Heun) take only 0.
            y: labels of a conditional model: one int, or N of them (default: cycle 0..K-1).
            guidance_scale: classifier-free guidance scale (default: the model's).
            use_ema: sample with the averaged weights (default: when there are some).
            x_T: the starting noise (N, *data_shape) (default: drawn from N(0, I)).
        """
        return self._generate(num_samples, sampler, steps, eta, y, guidance_scale, use_ema, x_T)["x0"]

    def _generate(self, num_samples: int, sampler: str | None = None, steps: int | None = None,
                  eta: float | None = None, y: Tensor | int | Sequence[int] | None = None,
                  guidance_scale: float | None = None, use_ema: bool | None = None,
                  x_T: Tensor | None = None, record: bool = False) -> dict[str, Tensor]:
        self.check_num_samples(num_samples)
        if sampler is None:
            sampler = self.predict_sampler
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
        if steps is None and sampler != "ddpm":
            steps = self.predict_steps  # None: 50 (or T when T < 50)
        if eta is None:  # predict_eta is DDIM's; the ODE solvers are deterministic
            eta = 0.0 if sampler in ODE_SAMPLERS else self.predict_eta  # checked by the sampling loop
        guidance_scale = self.guidance_scale if guidance_scale is None else guidance_scale
        check_guidance(self.num_classes, self.label_dropout, guidance_scale)
        labels = self.sampling_labels(y, num_samples)
        x_T = self.starting_noise(x_T, num_samples, "x_T")
        denoise = self.denoiser(self.sampling_network(use_ema), labels, guidance_scale)
        x0, states, denoised = sampling_loop(denoise, self.schedule, x_T,
                                             sampler, steps, eta, self.clip_denoised, record)
        result = {"x0": self.from_model_space(x0).float()}
        if record:
            result["states"] = self.from_model_space(torch.stack(states)).float()
            result["denoised"] = self.from_model_space(torch.stack(denoised)).float()
        return result

    def predict_options(self) -> dict[str, Any]:
        return {"sampler": self.predict_sampler, "steps": self.predict_steps, "eta": self.predict_eta}
