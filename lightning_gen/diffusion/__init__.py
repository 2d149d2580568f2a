"""Diffusion family: DDPM training, DDPM and DDIM sampling, U-Net and MLP denoisers."""

from lightning_gen.diffusion.module import Diffusion
from lightning_gen.diffusion.nets import MLPDenoiser, UNet
from lightning_gen.diffusion.samplers import ddim_step, ddpm_step, sampling_loop
from lightning_gen.diffusion.schedule import NoiseSchedule

__all__ = ["Diffusion", "MLPDenoiser", "NoiseSchedule", "UNet", "ddim_step", "ddpm_step", "sampling_loop"]
