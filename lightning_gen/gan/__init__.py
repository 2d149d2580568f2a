from lightning_gen.gan.module import GAN

__all__ = ["GAN"]
