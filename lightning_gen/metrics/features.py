"""The MNIST feature network for FID/KID, and the LightningModule that trains it.

FID and KID compare two sets of images through the features of a network trained on real images.
Inception-v3 (trained on ImageNet) is the standard for natural images but sees 28x28 digits
upsampled to 299x299; a small classifier trained on MNIST itself gives features that separate
digits, is fast on CPU and needs no download. Its numbers compare only with numbers computed with
the same checkpoint (the cache key of the real statistics includes a hash of its bytes).

    python cli.py features fit --config configs/mnist_features.yaml     # >= 99% test accuracy

Reading order: ``MNISTFeatureNet`` (plain nn.Module: features, then logits), ``MNISTClassifier``
(trains it), ``FeatureExtractor`` (a frozen wrapper with the interface torchmetrics expects).
"""

from __future__ import annotations

from collections.abc import Sequence

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn


class MNISTFeatureNet(nn.Module):
    """A small CNN: two conv blocks, then a ``feature_dim`` penultimate layer, then 10 logits.

    ``features(x)`` returns the penultimate activations (after ReLU) used by FID/KID; ``forward``
    returns class logits. Input: images in [0, 1], (B, 1, 28, 28).
    """

    def __init__(self, base_channels: int = 32, feature_dim: int = 128, dropout: float = 0.25,
                 num_classes: int = 10) -> None:
        super().__init__()
        c = base_channels
        self.body = nn.Sequential(
            nn.Conv2d(1, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(),
            nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(),
            nn.MaxPool2d(2),  # (B, c, 14, 14)
            nn.Conv2d(c, 2 * c, 3, padding=1), nn.BatchNorm2d(2 * c), nn.ReLU(),
            nn.Conv2d(2 * c, 2 * c, 3, padding=1), nn.BatchNorm2d(2 * c), nn.ReLU(),
            nn.MaxPool2d(2),  # (B, 2c, 7, 7)
            nn.Flatten(),
            nn.Dropout(dropout),
            nn.Linear(2 * c * 7 * 7, feature_dim), nn.ReLU(),
        )
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(feature_dim, num_classes))
        self.feature_dim = feature_dim

    def features(self, x: Tensor) -> Tensor:
        # Centre the [0, 1] pixels (MNIST mean 0.1307, std 0.3081) so the first layer sees unit scale.
        return self.body((x - 0.1307) / 0.3081)  # (B, feature_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))  # (B, num_classes)


class MNISTClassifier(L.LightningModule):
    """Trains ``MNISTFeatureNet`` on MNISTDataModule; logs ``{stage}/loss`` and ``{stage}/accuracy``.

    Not a generative model: it is the feature network of FID/KID (``lightning_gen.metrics.fid``
    loads its checkpoint by path). Runs through ``cli.py`` like the models.

    Args:
        data_shape: linked from the data module by the CLI; must be (1, 28, 28).
        base_channels: channels of the first conv block (the second has twice as many).
        feature_dim: size of the feature vector FID/KID compare.
        dropout: dropout before the feature layer and before the classifier head.
        learning_rate: AdamW learning rate (cosine decay to 0 over the fit).
        weight_decay: AdamW weight decay.
    """

    def __init__(
        self,
        data_shape: Sequence[int] = (1, 28, 28),
        base_channels: int = 32,
        feature_dim: int = 128,
        dropout: float = 0.25,
        learning_rate: float = 2e-3,
        weight_decay: float = 1e-4,
    ) -> None:
        super().__init__()
        data_shape = tuple(int(size) for size in data_shape)
        if data_shape != (1, 28, 28):
            raise ValueError(f"MNISTClassifier needs MNIST images (1, 28, 28), got {data_shape}")
        if base_channels < 1 or feature_dim < 1:
            raise ValueError(
                f"base_channels and feature_dim must be >= 1, got {base_channels}, {feature_dim}"
            )
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if learning_rate <= 0 or weight_decay < 0:
            raise ValueError(
                f"learning_rate must be > 0 and weight_decay >= 0, got {learning_rate}, {weight_decay}"
            )
        self.save_hyperparameters()
        self.data_shape = data_shape
        self.network = MNISTFeatureNet(base_channels, feature_dim, dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.network(x)

    def _shared_step(self, batch: tuple[Tensor, Tensor], stage: str) -> Tensor:
        x, y = batch  # (B, 1, 28, 28), (B,)
        logits = self.network(x)  # (B, 10)
        loss = F.cross_entropy(logits, y)
        accuracy = (logits.argmax(dim=1) == y).float().mean()
        sync = stage != "train"
        self.log(f"{stage}/loss", loss, on_epoch=True, prog_bar=True, sync_dist=sync, batch_size=len(x))
        self.log(f"{stage}/accuracy", accuracy, on_epoch=True, on_step=False, prog_bar=True,
                 sync_dist=sync, batch_size=len(x))
        return loss

    def training_step(self, batch, batch_idx):
        return self._shared_step(batch, "train")

    def validation_step(self, batch, batch_idx):
        self._shared_step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._shared_step(batch, "test")

    def predict_step(self, batch, batch_idx):
        # Class probabilities (B, 10): what PredictionWriter saves as a float (N, 10) samples.pt.
        return self.network(batch[0]).softmax(dim=1)

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.hparams.learning_rate,
                                      weight_decay=self.hparams.weight_decay)
        total_steps = max(int(self.trainer.estimated_stepping_batches), 1)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, total_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class FeatureExtractor(nn.Module):
    """A frozen feature network with torchmetrics' interface: ``num_features`` and eval mode always.

    ``forward`` takes images in [0, 1] as the data module yields them, (B, 1, 28, 28), and returns
    float32 features (B, num_features).
    """

    def __init__(self, network: MNISTFeatureNet) -> None:
        super().__init__()
        self.network = network.eval()
        self.network.requires_grad_(False)
        self.num_features = network.feature_dim

    def train(self, mode: bool = True) -> FeatureExtractor:
        return super().train(False)  # BatchNorm/dropout must never switch to training statistics

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        return self.network.features(x.float()).float()


def load_mnist_feature_extractor(checkpoint_path: str) -> FeatureExtractor:
    """The feature network of an ``MNISTClassifier`` checkpoint (from ``cli.py fit``), on the CPU."""
    classifier = MNISTClassifier.load_from_checkpoint(checkpoint_path, map_location="cpu")
    return FeatureExtractor(classifier.network)
