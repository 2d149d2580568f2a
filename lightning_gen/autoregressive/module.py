"""Autoregressive image models: PixelCNN (van den Oord et al. 2016a, "Pixel Recurrent Neural
Networks"; gated: van den Oord et al. 2016b, "Conditional Image Generation with PixelCNN
Decoders") and a decoder-only transformer over pixels (as ImageGPT, Chen et al. 2020).

An image is the sequence of its T = C * H * W values in raster order (rows, then pixels, then
channels), each quantized to one of K levels, and

    p(x) = prod_t p(x_t | x_<t),     p(x_t | x_<t) = Categorical(softmax(logits_t))

(van den Oord et al. 2016a, eq. 1-2). Training minimizes the exact negative log-likelihood
-log p(x) = sum_t CE(logits_t, x_t) (nats per image); sampling draws x_0, x_1, ... one value at a
time, each from the logits computed from the values drawn before it.

Quantization (each model does its own, so both train on MNISTDataModule as it is):
K = 2 is dynamically binarized MNIST: each pixel is 1 with probability its intensity, redrawn
every time an image is seen (binary images pass unchanged), as in the likelihood literature;
K > 2 rounds: level = round(x (K-1)), so K = 256 gives the 8-bit images exactly. With
``dynamic_binarization=False`` K = 2 rounds too (a pixel is 1 where its intensity is above 1/2):
fixed images with clean strokes, whose likelihoods do not compare with the dynamically
binarized ones of papers. Images in data space are level / (K - 1) in [0, 1].

``forward(x)`` takes images on that grid, x = level / (K - 1) (what ``quantize_images`` and
``sample`` return; for K = 256 MNIST as the data module yields it) and returns logits
(B, K, C, H, W). It accepts any x in [0, 1] and is differentiable in x, so causality can be checked
by gradient; only grid values are meaningful.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_gen.autoregressive.nets import PixelCNNCache, PixelCNNNet, PixelTransformerNet, token_count
from lightning_gen import checks
from lightning_gen.base import GenerativeModule
from lightning_gen.nn.ema import ExponentialMovingAverage

PREDICT_MODES = ("sample", "complete")


class AutoregressiveModule(GenerativeModule):
    """What PixelCNN and PixelTransformer share: quantization, the exact log-likelihood, the
    sampling loop and completion. Subclasses build their network with ``set_network`` (which adds
    its weight average when ``ema_decay`` is set) and define ``logits`` and ``next_logits``, each
    through the network they are given (the trained one or the average).

    Args:
        data_shape: (C, H, W) of the images (linked from the data module).
        num_levels: K, the number of levels per value (2: binarized; 256: 8-bit).
        dynamic_binarization: for K = 2, draw each pixel from Bernoulli(intensity) every time an
            image is seen (True) or round it (False: a pixel is 1 where the intensity is above
            1/2); only K = 2 binarizes.
        num_classes: number of labels for class conditioning; None for an unconditional model.
        predict_mode: what ``predict`` does with each test image: ``"sample"`` a new image (with
            the image's label if conditional) or ``"complete"`` keep its top
            ``predict_given_rows`` rows and sample the rest.
        predict_given_rows: rows given in ``"complete"`` mode; None: the top half.
        predict_temperature: temperature of the samples ``predict`` draws.
        ema_decay: decay of a moving average of the network's weights (Polyak averaging, as
            PixelCNN++ samples with), updated after every optimizer step; when set, sampling,
            completion, ``log_prob`` and the val/test NLL use the average (None: no average).
        predict_use_ema: whether ``predict`` samples from the average (default: when there is
            one); False samples the trained weights of the same checkpoint.
        optimizer_options: learning_rate, weight_decay, lr_schedule, warmup_steps (keywords): see
            GenerativeModule.

    The ``predict_*`` options are not saved as hyperparameters, so that
    ``cli.py predict --ckpt_path ... --model.init_args.predict_mode complete`` takes effect.
    """

    EVALUATION_OPTIONS = ("predict_mode", "predict_given_rows", "predict_temperature", "predict_use_ema")

    def __init__(
        self,
        data_shape: Sequence[int] = (1, 28, 28),
        *,
        num_levels: int = 2,
        dynamic_binarization: bool = True,
        num_classes: int | None = None,
        predict_mode: str = "sample",
        predict_given_rows: int | None = None,
        predict_temperature: float = 1.0,
        ema_decay: float | None = None,
        predict_use_ema: bool | None = None,
        **optimizer_options: Any,
    ) -> None:
        super().__init__(data_shape, **optimizer_options)
        if not self.is_image:
            raise ValueError(f"{type(self).__name__} models images (C, H, W), got data_shape "
                             f"{self.data_shape}; use a flow or VAE for vectors")
        if not isinstance(num_levels, int) or not 2 <= num_levels <= 65536:
            raise ValueError(f"num_levels must be an int in 2..65536 (2: binarized, 256: 8-bit), "
                             f"got {num_levels!r}")
        if not dynamic_binarization and num_levels != 2:
            raise ValueError(f"dynamic_binarization=False applies to num_levels=2 only (K > 2 "
                             f"always rounds), got num_levels={num_levels}")
        checks.optional_classes(num_classes)
        checks.one_of("predict_mode", predict_mode, PREDICT_MODES)
        height = self.data_shape[1]
        if predict_given_rows is not None and not 0 <= predict_given_rows <= height:
            raise ValueError(f"predict_given_rows must be in 0..{height} or None (half), "
                             f"got {predict_given_rows}")
        checks.positive(predict_temperature=predict_temperature)
        checks.average_to_predict(predict_use_ema, ema_decay, "weight")
        self.ema_decay = ema_decay
        self.predict_use_ema = predict_use_ema
        self.num_levels = num_levels
        self.dynamic_binarization = bool(dynamic_binarization)
        self.num_classes = num_classes
        self.predict_mode = predict_mode
        self.predict_given_rows = predict_given_rows
        self.predict_temperature = predict_temperature

    def set_network(self, network: nn.Module) -> None:
        """The subclass's network, and its weight average when ``ema_decay`` is set."""
        self.network = network
        self.ema = (ExponentialMovingAverage(network, self.ema_decay)
                    if self.ema_decay is not None else None)

    def averaged_network(self) -> tuple[nn.Module, ExponentialMovingAverage | None]:
        return self.network, self.ema

    # --------------------------------------------------------------------------- quantization
    def quantize(self, x: Tensor) -> Tensor:
        """Images in [0, 1] as the data module yields them -> levels, int64 (B, C, H, W).

        K = 2 with dynamic binarization: Bernoulli with the intensity as probability (0/1 images
        pass unchanged). Otherwise round(x (K - 1)).
        """
        if self.num_levels == 2 and self.dynamic_binarization:
            return torch.bernoulli(x.float()).long()
        return torch.round(x.float() * (self.num_levels - 1)).long()

    def levels_to_images(self, levels: Tensor) -> Tensor:
        """Levels (B, C, H, W) -> images on the grid, level / (K - 1) in [0, 1], float32."""
        return levels.float() / (self.num_levels - 1)

    def quantize_images(self, x: Tensor) -> Tensor:
        """Images as the data module yields them -> the model's input grid (see ``forward``)."""
        return self.levels_to_images(self.quantize(x))

    # ------------------------------------------------------------------------------ likelihood
    def forward(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """Images on the K-level grid (B, C, H, W) -> logits (B, K, C, H, W), of the trained
        network."""
        return self.logits(self.network, x, y)

    def logits(self, network: nn.Module, x: Tensor, y: Tensor | None) -> Tensor:
        """``forward`` through ``network``: the trained one or its average."""
        raise NotImplementedError

    def negative_log_likelihood(self, levels: Tensor, y: Tensor | None,
                                network: nn.Module | None = None) -> Tensor:
        """-log p(x) = sum over the C*H*W values of the cross-entropy, in nats: (B,), under
        ``network`` (default: the trained one)."""
        network = self.network if network is None else network
        logits = self.logits(network, self.levels_to_images(levels), y).float()  # (B, K, C, H, W)
        return F.cross_entropy(logits, levels, reduction="none").flatten(1).sum(1)

    @torch.no_grad()
    def log_prob(self, x: Tensor, y: Tensor | None = None, use_ema: bool | None = None) -> Tensor:
        """Exact log p(x) in nats per image, (B,), for x as the data module yields it.

        For K = 2, non-binary x is binarized once (a random draw, or rounded without dynamic
        binarization); binary x is used as is.
        Conditional models give log p(x | y) for labels y, and without y the exact marginal
        log p(x) = log (1/N) sum_y p(x | y) under the uniform label prior that ``sample`` uses
        (N network passes).
        ``use_ema``: under the weight average (default: when there is one) or the trained weights.
        """
        self.check_data(x)
        network = self.sampling_network(use_ema)
        levels = self.quantize(x)
        if self.num_classes is not None and y is None:
            per_class = [
                -self.negative_log_likelihood(levels, torch.full((len(x),), label, device=x.device),
                                              network)
                for label in range(self.num_classes)
            ]
            return torch.logsumexp(torch.stack(per_class), dim=0) - math.log(self.num_classes)
        return -self.negative_log_likelihood(levels, self.sampling_labels(y, len(x)), network)

    # -------------------------------------------------------------------------------- training
    def loss(self, batch: tuple[Tensor, Tensor], batch_idx: int, stage: str) -> tuple[Tensor, dict]:
        x, y = batch
        levels = self.quantize(x)  # (B, C, H, W)
        # validation and test score the weights that sample (the average when there is one)
        network = self.network if stage == "train" else self.sampling_network()
        nll = self.negative_log_likelihood(levels, self.batch_labels(y), network)  # (B,)
        # The loss is the exact NLL, so train/nll and train/bpd cost nothing; logged in every
        # stage, as the flow does, so likelihood panels compare the two families while training.
        return nll.mean(), {"nll": nll.detach()}

    # -------------------------------------------------------------------------------- sampling
    def start_sampling(self, network: nn.Module, batch_size: int, **options: Any) -> Any:
        """Per-run state of the sampling loop through ``network`` (a cache); None here."""
        if options:
            raise TypeError(f"unknown sampling options {sorted(options)} for {type(self).__name__}")
        return None

    def next_logits(self, network: nn.Module, images: Tensor, position: int, y: Tensor | None,
                    state: Any) -> Tensor:
        """Logits (B, K) of value ``position`` (raster index) given the values before it."""
        raise NotImplementedError

    def sample_levels(self, levels: Tensor, given: Tensor, y: Tensor | None,
                      temperature: float, use_ema: bool | None = None, **options: Any) -> Tensor:
        """Fill the values of ``levels`` (B, C, H, W) where ``given`` is False, in raster order,
        each drawn from Categorical(logits / temperature) given every value before it.

        Positions given in every image of the batch are skipped (no network call, no random
        draw); the others are drawn for the whole batch and kept where not given. ``use_ema``:
        draw from the weight average (default: when there is one) or the trained weights.
        """
        checks.positive(temperature=temperature)
        network = self.sampling_network(use_ema)
        C, H, W = self.data_shape
        levels = levels.clone()
        images = self.levels_to_images(levels)  # (B, C, H, W), the network's input
        # one host sync per call (not per position): which positions need a draw
        needed = (~given).permute(0, 2, 3, 1).flatten(1).any(0).tolist()  # (T,)
        state = self.start_sampling(network, len(levels), **options)
        for position in range(C * H * W):
            if not needed[position]:
                continue
            row, column, channel = position // (W * C), (position // C) % W, position % C
            logits = self.next_logits(network, images, position, y, state).float()  # (B, K)
            # validate_args=False: the argument check would sync with the GPU at every step
            drawn = torch.distributions.Categorical(logits=logits / temperature,
                                                    validate_args=False).sample()  # (B,)
            value = torch.where(given[:, channel, row, column], levels[:, channel, row, column], drawn)
            levels[:, channel, row, column] = value
            images[:, channel, row, column] = value.float() / (self.num_levels - 1)
        return levels

    @torch.no_grad()
    def sample(self, num_samples: int, temperature: float = 1.0, y: Tensor | None = None,
               use_ema: bool | None = None, **options: Any) -> Tensor:
        """Draw images (num_samples, C, H, W) in [0, 1] (level / (K - 1)), one value at a time.

        Args:
            temperature: the logits are divided by it (< 1: sharper, > 1: more diverse).
            y: labels for a conditional model, one int or (num_samples,); None: every class in
                turn (``GenerativeModule.sampling_labels``).
            use_ema: draw from the weight average (default: when ema_decay was set) or not.
        """
        self.check_num_samples(num_samples)
        y = self.sampling_labels(y, num_samples)
        levels = torch.zeros(num_samples, *self.data_shape, dtype=torch.long, device=self.device)
        given = torch.zeros_like(levels, dtype=torch.bool)
        return self.levels_to_images(self.sample_levels(levels, given, y, temperature, use_ema,
                                                        **options))

    def given_mask(self, x: Tensor, num_given_rows: int | None, mask: Tensor | None) -> Tensor:
        """The bool mask (B, C, H, W) of given values, from a row count or a mask."""
        C, H, W = self.data_shape
        if num_given_rows is not None and mask is not None:
            raise ValueError("pass num_given_rows or mask, not both")
        if mask is None:
            num_given_rows = H // 2 if num_given_rows is None else num_given_rows
            if not isinstance(num_given_rows, int) or not 0 <= num_given_rows <= H:
                raise ValueError(f"num_given_rows must be an int in 0..{H}, got {num_given_rows!r}")
            given = torch.zeros(len(x), C, H, W, dtype=torch.bool, device=x.device)
            given[:, :, :num_given_rows] = True
            return given
        mask = torch.as_tensor(mask, device=x.device)
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor (True = given), got {mask.dtype}")
        try:
            return mask.expand(len(x), C, H, W)
        except RuntimeError:
            raise ValueError(f"mask must broadcast to (B, C, H, W) = {(len(x), C, H, W)}, "
                             f"got {tuple(mask.shape)}") from None

    @torch.no_grad()
    def complete(self, x: Tensor, num_given_rows: int | None = None, mask: Tensor | None = None,
                 temperature: float = 1.0, y: Tensor | None = None, use_ema: bool | None = None,
                 **options: Any) -> Tensor:
        """Keep the given values of x and sample the others from p(x_t | x_<t) in raster order.

        Args:
            x: images (B, C, H, W) in [0, 1] as the data module yields them (quantized here).
            num_given_rows: the top rows are given (default: the top half), the rest sampled.
            mask: instead of rows, a bool tensor broadcastable to (B, C, H, W), True where given.
                Values after a missing one are drawn given the sampled values before them, so
                each completion is a sample of p(missing | given values before it in the order).
            temperature: see ``sample``.
            y: labels for a conditional model (one int or (B,)); None: every class in turn.
            use_ema: see ``sample``.
        Returns the completed images (B, C, H, W) in [0, 1], given values quantized.
        """
        self.check_data(x)
        given = self.given_mask(x, num_given_rows, mask)
        y = self.sampling_labels(y, len(x))
        levels = self.quantize(x.to(self.device))
        return self.levels_to_images(self.sample_levels(levels, given.to(self.device), y,
                                                        temperature, use_ema, **options))

    def predict_options(self) -> dict[str, Any]:
        return {"temperature": self.predict_temperature, "use_ema": self.predict_use_ema}

    def predict_samples(self, x: Tensor, y: Tensor | None) -> Tensor:
        """``predict_mode="complete"``: keep the top rows of the batch's images, sample the rest."""
        if self.predict_mode == "complete":
            return self.complete(x, num_given_rows=self.predict_given_rows, y=self.batch_labels(y),
                                 **self.predict_options())
        return super().predict_samples(x, y)


class PixelCNN(AutoregressiveModule):
    """PixelCNN over K-level images: masked convolutions, optionally gated stacks.

    Args:
        data_shape: (C, H, W) (linked from the data module).
        gated: gated blocks with vertical and horizontal stacks (van den Oord et al. 2016b, no blind
            spot); False: residual blocks of masked convolutions (van den Oord et al. 2016a).
        hidden_channels: h, channels of the blocks, a multiple of C (None: 64 rounded up to a
            multiple of C: 64 for grey images, 66 for RGB).
        num_layers: number of blocks.
        kernel_size: kernel of the blocks (odd).
        first_kernel_size: kernel of the first (type A) layer (odd).
        head_channels: channels of the 1x1 output layers.
        dilations: dilation of the k x k convolutions of the layers after the first, cycled over
            them ([1, 2, 4]: 1, 2, 4, 1, 2, ...): the receptive field grows by dilation * (k // 2)
            rows per layer at the same cost per step (training and cached sampling; only
            ``use_cache=False`` sampling runs on the taller field). Default [1]: undilated.
        options: as keywords, AutoregressiveModule's (num_levels, dynamic_binarization,
            num_classes: a learned bias per layer, predict_*) and GenerativeModule's optimizer
            options.

    ``sample(n, use_cache=True)`` (the default) keeps every layer's activations at the values
    drawn so far (``PixelCNNCache``), so each new value costs the layers at its own pixel (and
    each new row the gated vertical stack's row). ``use_cache=False`` runs the network once per
    value on the rows of that value's receptive field only: none below it (masks) and
    ``network.rows_above`` above it (no stack of the network's layers reaches further up), so
    the logits are those of the whole image: the reference the cache must match.
    """

    def __init__(
        self,
        data_shape: Sequence[int] = (1, 28, 28),
        gated: bool = True,
        hidden_channels: int | None = None,
        num_layers: int = 7,
        kernel_size: int = 3,
        first_kernel_size: int = 7,
        head_channels: int = 256,
        dilations: Sequence[int] = (1,),
        **options: Any,
    ) -> None:
        super().__init__(data_shape, **options)
        self.save_hyperparameters(ignore=self.EVALUATION_OPTIONS)
        channels = self.data_shape[0]
        if hidden_channels is None:
            hidden_channels = channels * math.ceil(64 / channels)
        checks.at_least(1, hidden_channels=hidden_channels, num_layers=num_layers,
                        head_channels=head_channels)
        if hidden_channels % channels:
            raise ValueError(f"hidden_channels must be a multiple of the image channels ({channels}) "
                             f"so each channel has its group of features, got {hidden_channels}")
        for name, value in [("kernel_size", kernel_size), ("first_kernel_size", first_kernel_size)]:
            if value < 1 or value % 2 == 0:
                raise ValueError(f"{name} must be a positive odd int, got {value}")
        dilations = list(dilations)
        if not dilations or not all(isinstance(d, int) and d >= 1 for d in dilations):
            raise ValueError(f"dilations must be a non-empty list of positive ints, got {dilations!r}")
        self.set_network(PixelCNNNet(channels, self.num_levels, hidden_channels, num_layers,
                                     kernel_size, first_kernel_size, head_channels, gated,
                                     self.num_classes, dilations))

    def logits(self, network: nn.Module, x: Tensor, y: Tensor | None) -> Tensor:
        return network(self.to_model_space(x), y)  # (B, K, C, H, W); the network reads [-1, 1]

    def start_sampling(self, network: nn.Module, batch_size: int, use_cache: bool = True) -> Any:
        return PixelCNNCache(network, self.to_model_space) if use_cache else None

    def next_logits(self, network: nn.Module, images: Tensor, position: int, y: Tensor | None,
                    state: Any) -> Tensor:
        if state is not None:
            return state.logits(images, position, y)
        C, H, W = self.data_shape
        row, column, channel = position // (W * C), (position // C) % W, position % C
        top = max(row - network.rows_above, 0)
        logits = self.logits(network, images[:, :, top: row + 1], y)  # (B, K, C, row + 1 - top, W)
        return logits[:, :, channel, row - top, column]


class PixelTransformer(AutoregressiveModule):
    """Decoder-only causal transformer over the C*H*W values of an image, sampled with a
    key/value cache.

    Args:
        data_shape: (C, H, W) (linked from the data module).
        model_dim: width of the residual stream (a multiple of num_heads).
        num_layers: transformer blocks.
        num_heads: attention heads.
        dropout: dropout on embeddings, attention and MLP outputs (training only).
        max_positions: the most tokens accepted (4096: a (3, 32, 32) image is 3072 tokens of
            one value; attention's time and memory grow with its square, so a (3, 64, 64) image,
            12,288 values, needs a token_size of 3 or more, or this raised on purpose).
        local_window: k > 0 adds to each position's input a linear map of the earlier values in
            the k x k pixels centred on its own (odd k; 0: none, the plain ImageGPT-style input).
        token_size: g consecutive values of the raster sequence per token (1: one value per
            token). The blocks attend over ceil(C*H*W / g) tokens, about 1/g^2 the attention
            cost, and a per-value head draws each value from its token's context and the values
            before it in its token (and its local window): ``PixelTransformerNet``. The
            likelihood stays exact over the value sequence.
        options: as keywords, AutoregressiveModule's (num_levels, dynamic_binarization,
            num_classes: a learned embedding added at every position, predict_*) and
            GenerativeModule's optimizer options.

    ``sample(n, use_cache=True)``: with the cache each new token costs one step through the
    blocks (attention over the cached keys/values) and each new value one pass of the per-value
    head; ``use_cache=False`` recomputes the whole prefix at every step (the reference the cache
    must match, and the speed baseline).
    """

    DEFAULT_LEARNING_RATE = 3e-4

    def __init__(
        self,
        data_shape: Sequence[int] = (1, 28, 28),
        model_dim: int = 256,
        num_layers: int = 4,
        num_heads: int = 4,
        dropout: float = 0.0,
        max_positions: int = 4096,
        local_window: int = 0,
        token_size: int = 1,
        **options: Any,
    ) -> None:
        super().__init__(data_shape, **options)
        self.save_hyperparameters(ignore=self.EVALUATION_OPTIONS)
        checks.at_least(1, model_dim=model_dim, num_layers=num_layers, num_heads=num_heads)
        if model_dim % num_heads:
            raise ValueError(f"model_dim ({model_dim}) must be a multiple of num_heads ({num_heads})")
        checks.fraction(dropout=dropout)
        num_tokens = token_count(self.num_dims, token_size)
        if num_tokens > max_positions:
            raise ValueError(
                f"PixelTransformer attends over {num_tokens} tokens (C*H*W = "
                f"{self.num_dims} values of {self.data_shape} images, {token_size} per token), more "
                f"than max_positions={max_positions} (attention cost grows with its square): raise "
                f"--model.init_args.token_size, use smaller images (--data.init_args.image_size) or "
                f"raise --model.init_args.max_positions")
        self.set_network(PixelTransformerNet(math.prod(self.data_shape), self.num_levels, model_dim,
                                             num_layers, num_heads, dropout, self.num_classes,
                                             self.data_shape, local_window, token_size))

    @staticmethod
    def to_sequence(x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, H * W * C) in raster order, channels of a pixel adjacent."""
        return x.permute(0, 2, 3, 1).flatten(1)

    def logits(self, network: nn.Module, x: Tensor, y: Tensor | None) -> Tensor:
        B, C, H, W = x.shape
        logits = network(self.to_sequence(x), y)  # (B, T, K)
        return logits.view(B, H, W, C, self.num_levels).permute(0, 4, 3, 1, 2)  # (B, K, C, H, W)

    def start_sampling(self, network: nn.Module, batch_size: int, use_cache: bool = True) -> Any:
        return network.new_cache() if use_cache else None

    def next_logits(self, network: nn.Module, images: Tensor, position: int, y: Tensor | None,
                    state: Any) -> Tensor:
        # With a cache, the positions not yet cached (one, or a given prefix at once) go through
        # the blocks; without, the whole prefix does.
        prefix = self.to_sequence(images)[:, : position + 1]  # (B, position + 1)
        return network(prefix, y, cache=state)[:, -1]  # (B, K)
