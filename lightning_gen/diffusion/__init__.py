"""Diffusion family: DDPM training, DDPM, DDIM, DPM-Solver++(2M) and Heun sampling, the variational
bound, U-Net and MLP denoisers."""

from lightning_gen.diffusion.module import Diffusion
from lightning_gen.diffusion.likelihood import variational_bound
from lightning_gen.diffusion.samplers import SAMPLERS, ddim_step, ddpm_step, sampling_loop
from lightning_gen.diffusion.schedule import NoiseSchedule
from lightning_gen.nn.denoisers import MLPDenoiser, MLPDenoiserConfig, UNet, UNetConfig

__all__ = ["Diffusion", "MLPDenoiser", "MLPDenoiserConfig", "NoiseSchedule", "SAMPLERS", "UNet", "UNetConfig",
           "ddim_step", "ddpm_step", "sampling_loop", "variational_bound"]
