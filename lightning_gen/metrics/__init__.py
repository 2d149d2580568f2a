"""Metrics shared by every family: likelihood units, FID/KID on MNIST, digit recognisability, 2-D sample distances."""

from lightning_gen.metrics.digits import DigitScores, digit_scores, load_mnist_classifier
from lightning_gen.metrics.features import (
    FeatureExtractor, MNISTClassifier, MNISTFeatureNet, load_mnist_feature_extractor,
)
from lightning_gen.metrics.fid import (
    extract_features, fid_kid_from_features, frechet_distance, load_feature_network, real_features,
)
from lightning_gen.metrics.likelihood import bits_per_dim
from lightning_gen.metrics.two_d import MMD, SlicedWasserstein, mmd, sliced_wasserstein

__all__ = [
    "DigitScores", "MMD", "FeatureExtractor", "MNISTClassifier", "MNISTFeatureNet", "SlicedWasserstein",
    "bits_per_dim", "digit_scores", "extract_features", "fid_kid_from_features", "frechet_distance",
    "load_feature_network", "load_mnist_classifier", "load_mnist_feature_extractor", "mmd", "real_features",
    "sliced_wasserstein",
]
