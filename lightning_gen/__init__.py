"""lightning-gen: deep generative models as PyTorch Lightning modules."""

from lightning_gen.autoencoder import Autoencoder
from lightning_gen.autoregressive import PixelCNN, PixelTransformer
from lightning_gen.base import GenerativeModule
from lightning_gen.diffusion import Diffusion
from lightning_gen.flow import RealNVP
from lightning_gen.flow_matching import FlowMatching
from lightning_gen.gan import GAN
from lightning_gen.vae import VAE

__all__ = ["Autoencoder", "Diffusion", "FlowMatching", "GAN", "GenerativeModule", "PixelCNN", "PixelTransformer", "RealNVP", "VAE"]
