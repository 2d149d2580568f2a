from lightning_gen.autoregressive.module import AutoregressiveModule, PixelCNN, PixelTransformer

__all__ = ["AutoregressiveModule", "PixelCNN", "PixelTransformer"]
