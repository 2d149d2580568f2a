"""Are generated MNIST samples recognisable digits? Two numbers from the MNIST classifier.

FID says how far the sample distribution is from the real one, but not in words a first user
reads off a grid. These two are:

- ``confidence``: the mean over samples of the classifier's largest softmax probability. 1,000
  real test digits score 0.992 with ``configs/mnist_features.yaml``'s network; blobs and broken
  strokes score lower. Off its data the classifier can be confidently wrong: uniform noise scored
  1.0, every image called an 8.
- ``label_entropy``: the entropy (nats) of the histogram of predicted labels. Ten equally
  frequent digits give log(10) = 2.303; a model that draws one digit gives 0. Confident samples
  of a collapsed model, and the noise above, fail here: both numbers are needed.
- ``confidence_standard_error``: the standard error of that mean (the samples' standard deviation
  over the square root of their number): how far the confidence of another draw of as many
  samples from the same model can fall. Generated digits' maximum softmax spreads with a standard
  deviation of about 0.16, so 1,000 samples give about 0.005: two draws from one checkpoint can
  differ by 0.01, and a score within a standard error or two of 0.9 does not say on which side
  the model lies.
- ``label_agreement`` (class-conditional samples, when their labels are given): the fraction of
  samples the classifier reads as the digit they were drawn for. A conditional model's label
  entropy is set by the labels it was asked for; agreement says whether it drew those digits
  (real test digits with their own labels: 0.99; with shuffled labels: about 0.1).

Both use the classifier FID uses (``MNISTClassifier`` checkpoint), so the numbers compare only
with numbers of the same checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_gen.metrics.features import MNISTClassifier, MNISTFeatureNet

@dataclass(frozen=True)
class DigitScores:
    """Recognisability of a set of digit images (see the module docstring)."""

    confidence: float
    label_entropy: float
    label_counts: tuple[int, ...]
    confidence_standard_error: float
    label_agreement: float | None = None

    def recognisable(self, min_confidence: float = 0.9, min_label_entropy: float = 2.2) -> bool:
        return self.confidence >= min_confidence and self.label_entropy >= min_label_entropy


def load_mnist_classifier(checkpoint_path: str) -> MNISTFeatureNet:
    """The classifier of an ``MNISTClassifier`` checkpoint, frozen, in eval mode, on the CPU."""
    network = MNISTClassifier.load_from_checkpoint(checkpoint_path, map_location="cpu").network
    return network.eval().requires_grad_(False)


@torch.no_grad()
def digit_scores(images: Tensor, classifier: MNISTFeatureNet, batch_size: int = 500,
                 labels: Tensor | None = None) -> DigitScores:
    """Score images (N, 1, 28, 28): float in [0, 1], or uint8 in 0..255 as ``predict`` saves them.
    ``labels`` (N,): the digits class-conditional samples were drawn for (adds ``label_agreement``)."""
    if images.dim() != 4 or tuple(images.shape[1:]) != (1, 28, 28):
        raise ValueError(f"expected MNIST-shaped images (N, 1, 28, 28), got {tuple(images.shape)}")
    if len(images) == 0:
        raise ValueError("no images to score")
    if labels is not None and tuple(labels.shape) != (len(images),):
        raise ValueError(f"expected one label per image ({len(images)},), got {tuple(labels.shape)}")
    if images.dtype == torch.uint8:
        images = images.float() / 255
    elif not images.is_floating_point():
        raise TypeError(f"images must be float in [0, 1] or uint8, got {images.dtype}")
    if not torch.isfinite(images).all():
        raise ValueError("images hold NaN or inf values")
    if images.min() < 0 or images.max() > 1:
        raise ValueError(f"float images must lie in [0, 1], got [{images.min():.3g}, {images.max():.3g}]")
    classifier = classifier.eval()
    device = next(classifier.parameters()).device
    probabilities = torch.cat([
        classifier(chunk.to(device)).float().softmax(dim=1).cpu()
        for chunk in images.split(batch_size)
    ])  # (N, 10)
    confidence, predicted = probabilities.max(dim=1)
    counts = torch.bincount(predicted, minlength=probabilities.shape[1])
    frequencies = counts[counts > 0].double() / len(predicted)
    entropy = float((frequencies * frequencies.log()).sum().neg().clamp(min=0))
    agreement = None if labels is None else float((predicted == labels.cpu().long()).double().mean())
    # the standard error needs two samples at least: one has no spread to estimate
    standard_error = float(confidence.std() / len(confidence) ** 0.5) if len(confidence) > 1 else float("nan")
    return DigitScores(float(confidence.mean()), entropy, tuple(int(c) for c in counts), standard_error, agreement)
