"""LightningDataModules: MNIST, Fashion-MNIST, CIFAR-10, a folder of images, 2-D synthetic data."""

from datamodules.image_folder import ImageFolderDataModule
from datamodules.mnist import MNISTDataModule
from datamodules.torchvision_sets import CIFAR10DataModule, FashionMNISTDataModule
from datamodules.toy import TOY_DISTRIBUTIONS, ToyDataModule, sample_toy

__all__ = ["CIFAR10DataModule", "FashionMNISTDataModule", "ImageFolderDataModule", "MNISTDataModule",
           "TOY_DISTRIBUTIONS", "ToyDataModule", "sample_toy"]
