"""FID and KID between generated and real images, through torchmetrics, with cached real features.

Fréchet distance (Heusel et al. 2017): FID = |mu_r - mu_g|^2 + Tr(S_r + S_g - 2 (S_r S_g)^(1/2)) of
Gaussians fitted to the features of real and generated images. Kernel distance (Bińkowski et al.
2018): KID = unbiased MMD^2 with the cubic polynomial kernel k(a, b) = (a.b / d + 1)^3, averaged
over random subsets. Both are torchmetrics' implementations; this module chooses the feature
network, runs it, and caches the real images' features on disk.

Feature networks (``feature_network``):
- ``"inception"``: torchmetrics' default Inception-v3 pool features (2048-d, the numbers papers
  report; torch-fidelity downloads its weights on first use). Grey images are repeated to RGB.
- a path to an ``MNISTClassifier`` checkpoint (``python cli.py features fit --config
  configs/mnist_features.yaml``): 128-d features of a network trained on MNIST; fast on CPU,
  no download. Numbers compare only between runs that use the same checkpoint.

The features go into torchmetrics' metrics through an identity ``feature`` module, so the real
side can come from the cache (computed once) and the generated side from any number of batches
and DDP ranks; torchmetrics sums (FID) or concatenates (KID) the states of all ranks at compute.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from torch import Tensor, nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

INCEPTION = "inception"


class InceptionFeatures(nn.Module):
    """torchmetrics' Inception-v3 (2048-d pool features) for images in [0, 1] with 1 or 3 channels."""

    def __init__(self) -> None:
        super().__init__()
        from torchmetrics.image.fid import NoTrainInceptionV3

        try:
            self.network = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"])
        except ModuleNotFoundError as error:  # torchmetrics raises it when torch-fidelity is absent
            raise ModuleNotFoundError(
                "feature_network='inception' needs torch-fidelity: pip install 'lightning-gen[inception]' "
                "(or pip install torch-fidelity). The MNIST feature network needs nothing extra: "
                "python cli.py features fit --config configs/mnist_features.yaml."
            ) from error
        except (OSError, RuntimeError) as error:  # URLError is an OSError
            raise RuntimeError(
                "feature_network='inception' needs torch-fidelity's Inception-v3 weights, which could "
                "not be loaded (they are downloaded on first use into torch.hub's cache, "
                "~/.cache/torch/hub/checkpoints). Without a network, use the MNIST feature network: "
                "python cli.py features fit --config configs/mnist_features.yaml. Cause: "
                f"{type(error).__name__}: {error}"
            ) from error
        self.num_features = 2048

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)  # (B, 3, H, W): Inception expects RGB
        # The network resizes to 299x299 itself and expects uint8 pixels.
        return self.network((x.clamp(0, 1) * 255).round().to(torch.uint8)).float()


class PrecomputedFeatures(nn.Module):
    """The identity, as torchmetrics' ``feature`` module: the metrics receive features, not images."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, features: Tensor) -> Tensor:
        return features


def load_feature_network(feature_network: str) -> nn.Module:
    """``"inception"`` or the path of an MNISTClassifier checkpoint -> a frozen feature network.

    The result maps images in [0, 1], (B, C, H, W), to features (B, num_features).
    """
    if not isinstance(feature_network, str) or not feature_network:
        raise ValueError(
            f"feature_network must be {INCEPTION!r} or the path of an MNISTClassifier checkpoint, "
            f"got {feature_network!r}"
        )
    if feature_network == INCEPTION:
        return InceptionFeatures().eval()
    if not Path(feature_network).is_file():
        raise ValueError(
            f"feature_network must be {INCEPTION!r} or the path of an MNISTClassifier checkpoint "
            f"(train one with: python cli.py features fit --config configs/mnist_features.yaml); "
            f"no file at {feature_network!r}"
        )
    from lightning_gen.metrics.features import load_mnist_feature_extractor

    return load_mnist_feature_extractor(feature_network)


def network_fingerprint(feature_network: str) -> str:
    """A hash that changes when the feature network does: the checkpoint's bytes (or the Inception
    weights' name and the torchmetrics version)."""
    digest = hashlib.sha256()
    if feature_network == INCEPTION:
        import torchmetrics

        digest.update(f"inception-v3-compat-2048-torchmetrics-{torchmetrics.__version__}".encode())
    else:
        with open(feature_network, "rb") as file:
            for block in iter(lambda: file.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def data_fingerprint(images: Tensor) -> str:
    """A hash of the real images themselves (so a different split, subset or N changes the key)."""
    images = images.detach().cpu().contiguous()
    digest = hashlib.sha256(str((tuple(images.shape), str(images.dtype))).encode())
    digest.update(images.numpy().tobytes())
    return digest.hexdigest()[:16]


def default_cache_dir() -> Path:
    """``$LIGHTNING_GEN_CACHE`` or ``~/.cache/lightning-gen``; real features go in ``fid/`` under it."""
    return Path(os.environ.get("LIGHTNING_GEN_CACHE", Path.home() / ".cache" / "lightning-gen")) / "fid"


@torch.no_grad()
def extract_features(network: nn.Module, images: Tensor, batch_size: int = 500) -> Tensor:
    """Features of ``images`` (N, C, H, W) in [0, 1], in batches, on the network's device: (N, F)."""
    device = next(network.parameters()).device
    chunks = [network(images[start:start + batch_size].to(device)).float().cpu()
              for start in range(0, len(images), batch_size)]
    return torch.cat(chunks)


def real_features(network: nn.Module, feature_network: str, images: Tensor,
                  cache_dir: str | Path | None = None, batch_size: int = 500, name: str = "") -> Tensor:
    """The features of real ``images``, read from the cache or computed once and written there.

    The file name is ``[<name>-]<network hash>-<data hash>-<N>.pt`` (``name``: the data set's, so
    a reader of the cache folder sees what each file holds): it changes when the checkpoint, the
    images (split, order, subset) or their number does. Written atomically (temporary file, then
    rename), so concurrent processes never read half a file.
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = f"{network_fingerprint(feature_network)}-{data_fingerprint(images)}-{len(images)}"
    if name:
        key = f"{name}-{key}"
    path = cache_dir / f"{key}.pt"
    if path.is_file():
        return torch.load(path, map_location="cpu", weights_only=True)
    features = extract_features(network, images, batch_size)
    cache_dir.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{os.getpid()}.partial")
    torch.save(features, partial)
    partial.replace(path)
    return features


def make_fid_kid(num_features: int, kid_subset_size: int = 1000, kid_subsets: int = 100
                 ) -> tuple[FrechetInceptionDistance, KernelInceptionDistance]:
    """torchmetrics' FID and KID over precomputed features of dimension ``num_features``."""
    fid = FrechetInceptionDistance(feature=PrecomputedFeatures(num_features))
    kid = KernelInceptionDistance(feature=PrecomputedFeatures(num_features), subsets=kid_subsets,
                                  subset_size=kid_subset_size)
    return fid, kid


def fid_kid_from_features(real: Tensor, fake: Tensor, kid_subset_size: int = 1000,
                          kid_subsets: int = 100, seed: int = 0) -> tuple[Tensor, Tensor]:
    """FID and KID (mean over subsets) between two feature sets (N, F) and (M, F), in one process.

    The KID subset size is capped at the smaller set; its subsets are drawn under ``seed`` without
    touching the global random state.
    """
    if real.dim() != 2 or fake.dim() != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"expected two feature sets (N, F), (M, F), got {tuple(real.shape)}, "
                         f"{tuple(fake.shape)}")
    fid, kid = make_fid_kid(real.shape[1], min(kid_subset_size, len(real), len(fake)), kid_subsets)
    for metric in (fid, kid):
        metric.update(real, real=True)
        metric.update(fake, real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        kid_mean, _ = kid.compute()
    return fid.compute(), kid_mean


def frechet_distance(real_images: Tensor, fake_images: Tensor, network: nn.Module) -> Tensor:
    """FID between two image sets (N, C, H, W) in [0, 1] through ``network`` (no cache)."""
    fid, _ = fid_kid_from_features(extract_features(network, real_images),
                                   extract_features(network, fake_images), kid_subsets=1)
    return fid
