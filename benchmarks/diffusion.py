"""Diffusion benchmarks: speed against diffusers' UNet2DModel, and sample quality after a budget.

speed: training images/s and DDIM-50 sampling images/s of our U-Net (base 32, widths (32, 64, 128),
2 residual blocks per level, attention at the lowest level, the timestep as a scale and shift of
each block's second GroupNorm: 4,116,897 parameters at 1 channel) beside diffusers' UNet2DModel with
block_out_channels (32, 64, 128), layers_per_block 2, (DownBlock2D, DownBlock2D, AttnDownBlock2D)
and resnet_time_scale_shift="scale_shift" - 4,116,641 parameters (diffusers 0.42.1) - on 32x32 inputs,
at each --batch-sizes. Ours runs with the options given (--bf16, --channels-last, --compile);
diffusers runs as a plain loop (fp32, DDPMScheduler.add_noise, DDIMScheduler.step), as in the
issue's reference numbers, unless --diffusers-same-options. A training step is: random t, q_sample,
forward, MSE, backward, AdamW step (no EMA for either). Sampling: 50 DDIM steps, eta = 0.

    python benchmarks/diffusion.py speed --device cuda --bf16 --channels-last --compile      # GPU
    python benchmarks/diffusion.py speed --device cpu --batch-sizes 16 --train-steps 3 --threads 1

quality: train ``Diffusion`` on MNIST (or a toy set) for --budget-minutes with the Lightning
Trainer, then write a DDIM-50 sample grid and a denoising strip (MNIST) or a scatter plot and the
energy distance to held-out points (toy). On MNIST it also reports FID and KID of --fid-samples
DDIM-50 samples against the 10,000 test images through the project's MNIST feature network
(lightning_gen.metrics; --feature-network, default $LIGHTNING_GEN_FEATURE_NETWORK or
checkpoints/mnist_features/last.ckpt, trained by python cli.py features fit --config configs/mnist_features.yaml).

    python benchmarks/diffusion.py quality --data mnist --device cuda --budget-minutes 5 --bf16
    python benchmarks/diffusion.py quality --data moons --device cpu --budget-minutes 3 --threads 1

Prints a markdown table.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the benchmarks' shared helpers
from arguments import apply_threads, count, count_or_zero  # noqa: E402

from lightning_gen import Diffusion  # noqa: E402
from lightning_gen.diffusion import MLPDenoiserConfig, UNetConfig  # noqa: E402


def hardware(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(0)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def autocast(device: str, bf16: bool):
    return torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16, enabled=bf16)


# ------------------------------------------------------------------------------------- speed
def ours(args, channels_last: bool):
    model = Diffusion((1, args.image_size, args.image_size), ema_decay=None, unet=UNetConfig(
        base_channels=32, channel_multipliers=(1, 2, 4), num_res_blocks=2, attention_levels=(2,),
        num_heads=4)).to(args.device)
    if channels_last:
        model.network.to(memory_format=torch.channels_last)
    trained = model.network
    if args.compile:
        model.network = torch.compile(model.network, mode=args.compile_mode)
    optimizer = torch.optim.AdamW(trained.parameters(), lr=1e-4, fused=args.device.startswith("cuda"))

    def train_step(x0: torch.Tensor) -> None:
        with autocast(args.device, args.bf16):
            loss = model.diffusion_loss(x0, None)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def sample(batch_size: int, steps: int) -> torch.Tensor:
        with autocast(args.device, args.bf16):
            return model.sample(batch_size, sampler="ddim", steps=steps)

    return sum(p.numel() for p in trained.parameters()), train_step, sample


def diffusers_model(args, same_options: bool):
    from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel

    unet = UNet2DModel(sample_size=args.image_size, in_channels=1, out_channels=1,
                       block_out_channels=(32, 64, 128), layers_per_block=2,
                       down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
                       resnet_time_scale_shift="scale_shift").to(args.device)
    bf16 = args.bf16 and same_options
    channels_last = args.channels_last and same_options
    if channels_last:
        unet.to(memory_format=torch.channels_last)
    network = torch.compile(unet, mode=args.compile_mode) if args.compile and same_options else unet
    training_scheduler = DDPMScheduler(num_train_timesteps=1000)
    sampling_scheduler = DDIMScheduler(num_train_timesteps=1000)
    # The same optimizer as ours (fused on a GPU): the comparison is of the networks and samplers.
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4, fused=args.device.startswith("cuda"))

    def train_step(x0: torch.Tensor) -> None:
        noise = torch.randn_like(x0)
        t = torch.randint(0, 1000, (len(x0),), device=x0.device)
        x_t = training_scheduler.add_noise(x0, noise, t)
        with autocast(args.device, bf16):
            loss = F.mse_loss(network(x_t, t).sample.float(), noise)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    @torch.no_grad()
    def sample(batch_size: int, steps: int) -> torch.Tensor:
        sampling_scheduler.set_timesteps(steps)
        x = torch.randn(batch_size, 1, args.image_size, args.image_size, device=args.device)
        for t in sampling_scheduler.timesteps:
            with autocast(args.device, bf16):
                eps = network(x, t).sample.float()
            x = sampling_scheduler.step(eps, t, x, eta=0.0).prev_sample
        return x

    return sum(p.numel() for p in unet.parameters()), train_step, sample


def measure(name, parameters, train_step, sample, args, batch_size: int) -> dict:
    x0 = torch.rand(batch_size, 1, args.image_size, args.image_size, device=args.device) * 2 - 1
    if args.channels_last:
        x0 = x0.contiguous(memory_format=torch.channels_last)
    for _ in range(args.warmup_steps):
        train_step(x0)
    synchronize(args.device)
    start = time.perf_counter()
    for _ in range(args.train_steps):
        train_step(x0)
    synchronize(args.device)
    train_rate = args.train_steps * batch_size / (time.perf_counter() - start)
    sample(batch_size, 2)  # warm-up (compilation) with the same batch size
    synchronize(args.device)
    start = time.perf_counter()
    for _ in range(args.sample_runs):
        sample(batch_size, args.sampling_steps)
    synchronize(args.device)
    sample_rate = args.sample_runs * batch_size / (time.perf_counter() - start)
    row = {"model": name, "parameters": parameters, "batch": batch_size,
           "train": train_rate, "sample": sample_rate}
    print(f"| {name} | {parameters:,} | {batch_size} | {train_rate:,.1f} | {sample_rate:,.2f} |", flush=True)
    return row


def speed(args) -> None:
    options = [name for name, on in [("bf16", args.bf16), ("channels_last", args.channels_last),
                                     ("torch.compile", args.compile)] if on] or ["fp32"]
    print(f"\n{datetime.date.today()}, {hardware(args.device)}, torch {torch.__version__}; "
          f"ours: {', '.join(options)}; {args.image_size}x{args.image_size}x1 inputs; DDIM-{args.sampling_steps}\n")
    print("| model | parameters | batch | train images/s | DDIM sampling images/s |")
    print("|---|---:|---:|---:|---:|")
    try:
        import diffusers  # noqa: F401
        have_diffusers = True
    except ImportError:
        have_diffusers = False
        print("(diffusers is not installed: only our U-Net is measured)")
    for batch_size in args.batch_sizes:
        torch.manual_seed(0)
        measure(f"ours ({', '.join(options)})", *ours(args, args.channels_last), args, batch_size)
        if have_diffusers:
            label = ", ".join(options) if args.diffusers_same_options else "plain fp32"
            measure(f"diffusers UNet2DModel ({label})", *diffusers_model(args, args.diffusers_same_options),
                    args, batch_size)


# ----------------------------------------------------------------------------------- quality
def energy_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    """2 E|X - Y| - E|X - X'| - E|Y - Y'| (Szekely & Rizzo): 0 iff the distributions are equal."""
    return (2 * torch.cdist(x, y).mean() - torch.cdist(x, x).mean() - torch.cdist(y, y).mean()).item()


def mnist_fid(model, args) -> str:
    """FID and KID (MNIST feature network) of ``args.fid_samples`` DDIM-50 samples vs the test set."""
    from datamodules import MNISTDataModule
    from lightning_gen.callbacks.quality import default_feature_network
    from lightning_gen.metrics import (
        extract_features, fid_kid_from_features, load_feature_network, real_features,
    )

    feature_network = args.feature_network or default_feature_network()
    if args.fid_samples == 0:
        return "no FID (--fid-samples 0)"
    if not (feature_network == "inception" or os.path.isfile(feature_network)):
        if args.feature_network:  # asked for by name: a typo must not pass as "no FID"
            raise ValueError(f"--feature-network: no file at {feature_network!r}")
        return f"no FID (no feature network at {feature_network})"
    network = load_feature_network(feature_network).to(model.device)
    test = MNISTDataModule()
    test.setup("test")
    real = real_features(network, feature_network, test.test_set.images.unsqueeze(1).float() / 255.0)
    torch.manual_seed(2)
    start = time.perf_counter()
    fake = torch.cat([
        extract_features(network, model.sample(min(args.fid_batch_size, args.fid_samples - done),
                                               sampler="ddim", steps=50).clamp(0, 1))
        for done in range(0, args.fid_samples, args.fid_batch_size)])
    seconds = time.perf_counter() - start
    fid, kid = fid_kid_from_features(real, fake, kid_subset_size=min(1000, args.fid_samples))
    return (f"FID {float(fid):.2f}, KID {float(kid):.4f} ({args.fid_samples} DDIM-50 samples, drawn in "
            f"{seconds:.0f} s, vs 10,000 test images; feature network {feature_network})")


def quality(args) -> None:
    import lightning as L
    from lightning.pytorch.callbacks import Timer
    from torchvision.utils import save_image

    from datamodules import MNISTDataModule, ToyDataModule, sample_toy
    from lightning_gen.callbacks import image_grid, scatter_image

    L.seed_everything(0)
    if args.data == "mnist":
        data = MNISTDataModule(batch_size=args.batch_sizes[0], download=True)
        model = Diffusion(data.data_shape, num_timesteps=1000, ema_decay=args.ema_decay, unet=UNetConfig(
                          base_channels=args.base_channels, channel_multipliers=(1, 2, 4),
                          num_res_blocks=args.num_res_blocks, attention_levels=(2,)), learning_rate=args.learning_rate,
                          lr_schedule="constant", warmup_steps=200)
    else:
        data = ToyDataModule(args.data, batch_size=args.batch_sizes[0])
        model = Diffusion(data.data_shape, num_timesteps=1000, beta_schedule="cosine", prediction="v",
                          mlp=MLPDenoiserConfig(hidden_dim=128, num_layers=3), ema_decay=args.ema_decay,
                          learning_rate=args.learning_rate, warmup_steps=200)
    timer = Timer(duration=datetime.timedelta(minutes=args.budget_minutes), interval="step")
    trainer = L.Trainer(accelerator="gpu" if args.device.startswith("cuda") else "cpu", devices=1,
                        precision="bf16-mixed" if args.bf16 else "32-true", max_steps=10**7,
                        callbacks=[timer], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(model, datamodule=data)
    train_seconds = timer.time_elapsed("train")
    steps = trainer.global_step
    images_seen = steps * args.batch_sizes[0]
    model.eval()
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(1)
    start = time.perf_counter()
    if args.data == "mnist":
        num_samples = 64
        trajectory = model.sample_trajectory(num_samples, sampler="ddim", steps=50)
        samples = trajectory["states"][-1]
        save_image(image_grid(samples, nrow=8), output / "diffusion_mnist_samples.png")
        # Denoising strip: 8 samples (rows) at 11 of the 51 states x_T .. x_0 (columns).
        columns = torch.linspace(0, 50, 11).round().long()
        strip = trajectory["states"][columns, :8].transpose(0, 1).reshape(-1, 1, 28, 28)
        save_image(image_grid(strip, nrow=len(columns)), output / "diffusion_mnist_denoising_strip.png")
        extra = mnist_fid(model, args)
    else:
        samples = model.sample(2000, sampler="ddim", steps=50)
        reference = sample_toy(args.data, 2000, seed=1000)[0]
        floor = sample_toy(args.data, 2000, seed=1001)[0]
        save_image(scatter_image(samples, reference), output / f"diffusion_{args.data}_samples.png")
        extra = (f"energy distance to 2000 fresh data points: {energy_distance(samples.cpu(), reference):.4f} "
                 f"(two fresh data sets of 2000: {energy_distance(floor, reference):.4f})")
    sample_seconds = time.perf_counter() - start
    print(f"\n{datetime.date.today()}, {hardware(args.device)}; data {args.data}; "
          f"{sum(p.numel() for p in model.network.parameters()):,} parameters\n")
    print("| data | training time | steps | images seen | sampling | result |")
    print("|---|---:|---:|---:|---|---|")
    print(f"| {args.data} | {train_seconds / 60:.1f} min | {steps} | {images_seen:,} | DDIM-50 "
          f"({sample_seconds:.0f} s) | {extra} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["speed", "quality"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-sizes", type=count, nargs="+", default=[128, 512])
    parser.add_argument("--threads", type=count_or_zero, default=0, help="CPU threads (0: torch's default)")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (ours; quality: bf16-mixed)")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true", help="torch.compile the U-Net")
    parser.add_argument("--compile-mode", default=None, help="e.g. max-autotune, reduce-overhead")
    parser.add_argument("--diffusers-same-options", action="store_true",
                        help="run diffusers with our bf16 / channels_last / compile options too")
    parser.add_argument("--image-size", type=count, default=32)
    parser.add_argument("--warmup-steps", type=count, default=5)
    parser.add_argument("--train-steps", type=count, default=50)
    parser.add_argument("--sample-runs", type=count, default=2, help="timed DDIM runs per batch size")
    parser.add_argument("--sampling-steps", type=count, default=50)
    parser.add_argument("--data", default="mnist", help="quality: mnist or a toy distribution name")
    parser.add_argument("--budget-minutes", type=float, default=5.0)
    parser.add_argument("--base-channels", type=count, default=32)
    parser.add_argument("--num-res-blocks", type=count, default=2)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--ema-decay", type=float, default=0.999)
    parser.add_argument("--output-dir", default="benchmarks/results")
    parser.add_argument("--feature-network", default=None,
                        help="quality on MNIST: 'inception' or an MNISTClassifier checkpoint "
                             "(default: $LIGHTNING_GEN_FEATURE_NETWORK or checkpoints/mnist_features/last.ckpt)")
    parser.add_argument("--fid-samples", type=count_or_zero, default=10000, help="quality on MNIST: 0 for no FID")
    parser.add_argument("--fid-batch-size", type=count, default=500)
    args = parser.parse_args()
    if args.fid_samples == 1:
        parser.error("--fid-samples must be 0 (no FID) or >= 2")
    apply_threads(args.threads)
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    print(" ".join(["python", *sys.argv]))
    speed(args) if args.mode == "speed" else quality(args)


if __name__ == "__main__":
    main()
