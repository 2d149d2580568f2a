from lightning_gen.autoencoder.module import Autoencoder

__all__ = ["Autoencoder"]
