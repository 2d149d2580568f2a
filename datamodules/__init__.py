"""LightningDataModules for MNIST and 2-D synthetic data."""

from datamodules.mnist import MNISTDataModule
from datamodules.toy import TOY_DISTRIBUTIONS, ToyDataModule, sample_toy

__all__ = ["MNISTDataModule", "ToyDataModule", "TOY_DISTRIBUTIONS", "sample_toy"]
