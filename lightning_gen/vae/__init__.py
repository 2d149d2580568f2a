from lightning_gen.vae.module import VAE

__all__ = ["VAE"]
