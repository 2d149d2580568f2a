"""Sample-quality metrics after validation and test: FID/KID for images, MMD/SW for 2-D data.

Both callbacks draw their samples in shards, one per DDP rank (rank r draws its share under seed
``seed + r``), and let torchmetrics combine the ranks' states at ``compute()``; every rank gets the
same value, so the logged number needs no further sync. Samples come from the model's
``sample()``, which uses the EMA weights in the families that keep them.

``cli.py`` adds both to every run (options ``--image_quality.*`` and ``--sample_distance.*``), each
acting only on the models it applies to, so ``cli.py test`` reports FID/KID for image models and
MMD/sliced Wasserstein for 2-D ones with no extra flags:

    python cli.py features fit --config configs/mnist_features.yaml       # the FID/KID feature network, once
    python cli.py test --config configs/vae_mnist.yaml --ckpt_path checkpoints/vae_mnist/last.ckpt
    python cli.py fit --config configs/vae_mnist.yaml --image_quality.every_n_epochs 1   # val/fid too
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from tqdm import tqdm

from lightning_gen.base import GenerativeModule
from lightning_gen.callbacks.hooks import StepFreeCallback
from lightning_gen.metrics.fid import (
    INCEPTION, extract_features, load_feature_network, make_fid_kid, real_features,
)
from lightning_gen.metrics.two_d import DEFAULT_BANDWIDTHS, MMD, SlicedWasserstein

MNIST_SHAPE = (1, 28, 28)


def _shard_size(total: int, trainer: L.Trainer) -> int:
    """This rank's share of ``total`` samples (the first ``total % world`` ranks draw one more)."""
    world, rank = trainer.world_size, trainer.global_rank
    return total // world + int(rank < total % world)


@torch.no_grad()
def _draw_samples(pl_module: L.LightningModule, count: int, batch_size: int, seed: int,
                  options: dict[str, Any]):
    """Yield ``count`` samples in batches, under ``seed``, leaving the training RNG untouched."""
    devices = [pl_module.device] if pl_module.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for start in range(0, count, batch_size):
            yield pl_module.sample(min(batch_size, count - start), **options)


# Where ``cli.py features fit --config configs/mnist_features.yaml`` writes the feature network (relative to
# the working directory, like every checkpoint of the configs); the environment variable overrides it.
DEFAULT_FEATURE_NETWORK = "checkpoints/mnist_features/last.ckpt"
FEATURE_NETWORK_ENV = "LIGHTNING_GEN_FEATURE_NETWORK"


def default_feature_network() -> str:
    """``$LIGHTNING_GEN_FEATURE_NETWORK`` or ``checkpoints/mnist_features/last.ckpt``."""
    return os.environ.get(FEATURE_NETWORK_ENV) or DEFAULT_FEATURE_NETWORK


def mnist_feature_network_file(given: str | None = None) -> str:
    """The MNIST feature network checkpoint a script scores with: ``given``, else the default
    (``default_feature_network``). FileNotFoundError, saying how to train one, when it is missing."""
    path = given or default_feature_network()
    if not Path(path).is_file():
        raise FileNotFoundError(f"no MNIST feature network at {path}: train it with python cli.py features "
                                "fit --config configs/mnist_features.yaml, or pass --feature-network")
    return path


def _is_image_model(pl_module: L.LightningModule) -> bool:
    """The contract these callbacks rely on: a GenerativeModule (``sample``, ``data_shape``) of
    images; any other LightningModule is left alone."""
    return isinstance(pl_module, GenerativeModule) and pl_module.is_image


def _is_vector_model(pl_module: L.LightningModule) -> bool:
    return isinstance(pl_module, GenerativeModule) and not pl_module.is_image


def _check_common(num_samples: int, batch_size: int, every_n_epochs: int) -> None:
    if num_samples < 2:
        raise ValueError(f"num_samples must be >= 2, got {num_samples}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if every_n_epochs < 0:
        raise ValueError(f"every_n_epochs must be >= 0 (0 = never at validation), got {every_n_epochs}")


class ImageQualityMetrics(StepFreeCallback):
    """FID and KID of ``num_samples`` generated images against the test images of the data the
    model was trained on (the Trainer's data module's ``test_dataloader``).

    Logged as ``val/fid`` and ``val/kid`` after validation (every ``every_n_epochs`` epochs, not
    during the sanity check) and ``test/fid``, ``test/kid`` after ``cli.py test``. The features of
    the real images are computed once per feature network and data and cached on disk (see
    ``lightning_gen.metrics.fid.real_features``). Without a feature network the callback warns
    once and does nothing, so every run can carry it before the network is trained. On 2-D data
    and on models without ``sample()`` it does nothing (use ``SampleDistanceMetrics`` for 2-D).

    The feature network, when none is given, is the data module's ``fid_feature_network``: the
    project's MNIST classifier for MNIST, torchmetrics' Inception-v3 for any other data (the
    ``inception`` extra; its weights are downloaded on first use). The cache of real features is
    keyed by the feature network, the images' contents and their number.

    Args:
        feature_network: ``"inception"`` (torchmetrics' Inception-v3; downloads its weights on
            first use) or the path of an ``MNISTClassifier`` checkpoint (``cli.py features fit --config
            configs/mnist_features.yaml``). None: ``$LIGHTNING_GEN_FEATURE_NETWORK`` or
            ``checkpoints/mnist_features/last.ckpt`` (relative to the working directory), and
            FID/KID are skipped with a warning while that file does not exist.
        num_samples: generated images per evaluation, shared out over the DDP ranks.
        batch_size: images per ``sample()`` call.
        num_real: real test images compared with (None: the whole test split).
        every_n_epochs: evaluate after every n-th validation epoch; 0: never at validation.
        on_test: evaluate after ``cli.py test``.
        cache_dir: where real features are cached (default ``$LIGHTNING_GEN_CACHE`` or
            ~/.cache/lightning-gen, then ``fid/``).
        kid_subset_size: KID subset size (capped at the number of samples).
        kid_subsets: KID subsets averaged.
        seed: seed of the sampling noise (rank r uses ``seed + r``) and of the KID subsets.
        sample_options: keyword arguments for ``sample()`` (e.g. ``{"steps": 50}``).
    """

    def __init__(
        self,
        feature_network: str | None = None,
        num_samples: int = 1000,
        batch_size: int = 250,
        num_real: int | None = None,
        every_n_epochs: int = 1,
        on_test: bool = True,
        cache_dir: str | None = None,
        kid_subset_size: int = 1000,
        kid_subsets: int = 100,
        seed: int = 0,
        sample_options: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        _check_common(num_samples, batch_size, every_n_epochs)
        if num_real is not None and num_real < 2:
            raise ValueError(f"num_real must be >= 2 (test images compared with) or None (all), got {num_real}")
        if kid_subset_size < 2 or kid_subsets < 1:
            raise ValueError(f"kid_subset_size must be >= 2 and kid_subsets >= 1, got "
                             f"{kid_subset_size}, {kid_subsets}")
        if feature_network is not None and feature_network != INCEPTION:
            if not isinstance(feature_network, (str, os.PathLike)) or not Path(feature_network).is_file():
                raise ValueError(
                    f"feature_network must be {INCEPTION!r}, the path of an MNISTClassifier "
                    f"checkpoint (train one with: python cli.py features fit --config "
                    f"configs/mnist_features.yaml) or None (the default path); no file at "
                    f"{feature_network!r}"
                )
            feature_network = str(feature_network)
        self.feature_network = feature_network
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.num_real = num_real
        self.every_n_epochs = every_n_epochs
        self.on_test = on_test
        self.cache_dir = cache_dir
        self.kid_subset_size = kid_subset_size
        self.kid_subsets = kid_subsets
        self.seed = seed
        self.sample_options = dict(sample_options or {})
        self._network = None
        self._real: Tensor | None = None
        self._warned = False

    # ------------------------------------------------------------------------------ the real side
    def _real_images(self, trainer: L.Trainer) -> Tensor:
        """The first ``num_real`` test images of the Trainer's data module (the data the model
        was trained on), (N, C, H, W) in [0, 1] on the CPU."""
        data = trainer.datamodule
        data.setup("test")
        images, count = [], 0
        for batch in data.test_dataloader():
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            images.append(x.detach().float().cpu())
            count += len(x)
            if self.num_real is not None and count >= self.num_real:
                break
        return torch.cat(images)[: self.num_real]

    def _real_features(self, trainer: L.Trainer) -> Tensor:
        """Rank zero computes (or reads) the cached features first; the others then read them."""
        if self._real is None:
            images = self._real_images(trainer)
            name = type(trainer.datamodule).__name__
            if trainer.is_global_zero:
                self._real = real_features(self._network, self.feature_network, images, self.cache_dir,
                                           name=name)
            trainer.strategy.barrier("real_features")
            if self._real is None:
                self._real = real_features(self._network, self.feature_network, images, self.cache_dir,
                                           name=name)
        return self._real

    # ------------------------------------------------------------------------------- evaluation
    def _skip(self, trainer: L.Trainer, pl_module: L.LightningModule) -> bool:
        if not _is_image_model(pl_module):
            return True
        data = trainer.datamodule
        if data is None or not hasattr(data, "test_dataloader"):
            if not self._warned:
                rank_zero_warn("ImageQualityMetrics: FID/KID compare with the test images of the "
                               "Trainer's data module, and this run has none; skipped.")
                self._warned = True
            return True
        if self.feature_network is None and getattr(data, "fid_feature_network", INCEPTION) != "mnist":
            self.feature_network = INCEPTION  # data other than MNIST: Inception's features
        if self.feature_network not in (None, INCEPTION) and tuple(pl_module.data_shape) != MNIST_SHAPE:
            raise ValueError(
                f"the MNIST feature network {self.feature_network!r} scores {MNIST_SHAPE} images, "
                f"not this model's {tuple(pl_module.data_shape)}: set --image_quality.feature_network "
                f"{INCEPTION} (pip install 'lightning-gen[inception]')")
        if self.feature_network is None:
            # Looked up at each evaluation, so a network trained meanwhile is picked up.
            path = default_feature_network()
            if Path(path).is_file():
                self.feature_network = path
                return False
            if not self._warned:
                rank_zero_warn(
                    f"ImageQualityMetrics: no feature network at {path!r} (the default path, or "
                    f"${FEATURE_NETWORK_ENV}); FID/KID skipped. Train one with: python cli.py features fit "
                    f"--config configs/mnist_features.yaml, or set --image_quality.feature_network "
                    f"to a checkpoint or to 'inception'."
                )
                self._warned = True
            return True
        return False

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule,
                 stage: str = "val") -> tuple[Tensor, Tensor]:
        """FID and KID (mean over subsets), synced over the ranks; the same on every rank."""
        device = pl_module.device
        if self._network is None:
            self._network = load_feature_network(self.feature_network)
        self._network.to(device)
        real = self._real_features(trainer)
        # Each rank feeds its shard of the real features and of the generated ones; torchmetrics
        # sums (FID) and concatenates (KID) the states of all ranks at compute().
        real_shard = real[trainer.global_rank :: trainer.world_size].to(device)
        subset_size = min(self.kid_subset_size, self.num_samples, len(real))
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
            fid, kid = make_fid_kid(real.shape[1], subset_size, self.kid_subsets)
        fid, kid = fid.to(device), kid.to(device)
        fid.update(real_shard, real=True)
        kid.update(real_shard, real=True)
        count = _shard_size(self.num_samples, trainer)
        seed = self.seed + trainer.global_rank
        # Sampling can take long (an autoregressive model makes 784 network passes per batch), so
        # rank zero shows its progress whenever the Trainer shows a progress bar.
        show = trainer.is_global_zero and trainer.progress_bar_callback is not None
        with tqdm(total=count, desc=f"{stage}/fid: sampling", unit="img", disable=not show,
                  leave=False, dynamic_ncols=True) as progress:
            for x in _draw_samples(pl_module, count, self.batch_size, seed, self.sample_options):
                features = extract_features(self._network, x.clamp(0, 1)).to(device)  # (b, F)
                fid.update(features, real=False)
                kid.update(features, real=False)
                progress.update(len(x))
        fid_value = fid.compute()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)  # the same KID subsets on every rank
            kid_value, _ = kid.compute()
        return fid_value, kid_value

    def _run(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._skip(trainer, pl_module):
            return
        fid_value, kid_value = self.evaluate(trainer, pl_module, stage)
        pl_module.log(f"{stage}/fid", fid_value.float())
        pl_module.log(f"{stage}/kid", kid_value.float())

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if (trainer.sanity_checking or self.every_n_epochs == 0
                or (trainer.current_epoch + 1) % self.every_n_epochs != 0):
            return
        self._run(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.on_test:
            self._run(trainer, pl_module, "test")


class SampleDistanceMetrics(StepFreeCallback):
    """MMD (Gaussian kernel) and sliced Wasserstein-2 between samples and held-out 2-D points.

    The held-out points are the validation (or test) batches the trainer runs, up to
    ``max_points`` per rank; ``num_samples`` samples are drawn after the epoch. Logged as
    ``val/mmd``, ``val/sliced_wasserstein`` and ``test/...``. Does nothing on image data and on
    models without ``sample()``.

    Args:
        num_samples: samples drawn per evaluation, shared out over the DDP ranks.
        batch_size: samples per ``sample()`` call.
        max_points: held-out points kept per rank.
        bandwidths: Gaussian kernel bandwidths (data units) whose kernels are averaged.
        num_projections: random directions of the sliced Wasserstein distance.
        every_n_epochs: evaluate after every n-th validation epoch; 0: never at validation.
        on_test: evaluate after ``cli.py test``.
        seed: seed of the sampling noise (rank r uses ``seed + r``) and of the directions.
        sample_options: keyword arguments for ``sample()``.
    """

    def __init__(
        self,
        num_samples: int = 2000,
        batch_size: int = 2000,
        max_points: int = 2000,
        bandwidths: Sequence[float] = DEFAULT_BANDWIDTHS,
        num_projections: int = 256,
        every_n_epochs: int = 1,
        on_test: bool = True,
        seed: int = 0,
        sample_options: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        _check_common(num_samples, batch_size, every_n_epochs)
        if max_points < 2:
            raise ValueError(f"max_points must be >= 2, got {max_points}")
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.max_points = max_points
        self.every_n_epochs = every_n_epochs
        self.on_test = on_test
        self.seed = seed
        self.sample_options = dict(sample_options or {})
        self.mmd = MMD(bandwidths)
        self.sliced_wasserstein = SlicedWasserstein(num_projections, seed)
        self._active = False
        self._kept = 0

    def _start(self, pl_module: L.LightningModule, active: bool) -> None:
        self._active = active and _is_vector_model(pl_module)
        self._kept = 0
        for metric in (self.mmd, self.sliced_wasserstein):
            metric.reset()
            metric.to(pl_module.device)

    def _collect(self, batch: Any) -> None:
        if not self._active or self._kept >= self.max_points:
            return
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        x = x[: self.max_points - self._kept].detach()
        self._kept += len(x)
        self.mmd.update(x, real=True)
        self.sliced_wasserstein.update(x, real=True)

    def _finish(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not self._active:
            return
        count = _shard_size(self.num_samples, trainer)
        seed = self.seed + trainer.global_rank
        for x in _draw_samples(pl_module, count, self.batch_size, seed, self.sample_options):
            self.mmd.update(x, real=False)
            self.sliced_wasserstein.update(x, real=False)
        pl_module.log(f"{stage}/mmd", self.mmd.compute())
        pl_module.log(f"{stage}/sliced_wasserstein", self.sliced_wasserstein.compute())
        self._active = False

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        active = (not trainer.sanity_checking and self.every_n_epochs > 0
                  and (trainer.current_epoch + 1) % self.every_n_epochs == 0)
        self._start(pl_module, active)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self._collect(batch)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._finish(trainer, pl_module, "val")

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start(pl_module, self.on_test)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self._collect(batch)

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._finish(trainer, pl_module, "test")
