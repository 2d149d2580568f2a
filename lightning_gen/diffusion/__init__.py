"""Diffusion family: DDPM training, DDPM and DDIM sampling, U-Net and MLP denoisers."""

from lightning_gen.diffusion.module import Diffusion
from lightning_gen.diffusion.samplers import ddim_step, ddpm_step, sampling_loop
from lightning_gen.diffusion.schedule import NoiseSchedule
from lightning_gen.nn.denoisers import MLPDenoiser, MLPDenoiserConfig, UNet, UNetConfig

__all__ = ["Diffusion", "MLPDenoiser", "MLPDenoiserConfig", "NoiseSchedule", "UNet", "UNetConfig", "ddim_step", "ddpm_step", "sampling_loop"]
