"""Training and sampling throughput of every family: the LightningModule under the Trainer against
a plain PyTorch loop over the same network, batch, optimizer and data path.

For each family, in one run:
- Lightning: ``Trainer.fit`` for ``--warmup-steps + --steps`` steps; images/s over the last
  ``--steps`` (timed by a callback from the end of the warm-up to the end of the last step).
- plain PyTorch: a fresh copy of the same model (same initial weights), the optimizer its
  ``configure_optimizers`` returns, the loss its training step computes, the same
  ``DeviceBatches`` data path; ``zero_grad / backward / step`` in a Python loop.
- ratio = Lightning images/s / plain images/s (1.0: the Trainer costs nothing); each is the
  median of ``--repeats`` runs, the two alternating.
- sampling images/s of ``sample(--sample-count)``: diffusion with DDIM-50, the pixel transformer
  with its key/value cache, the others with their single sampler.

``--compile`` / ``--channels-last`` apply ``SpeedOptions`` to both sides (the warm-up steps then
include the compilation; ``--compile-backend aot_eager`` captures the graphs without generating
kernels, for a quick check on a CPU). ``--size small`` builds small networks (CPU-sized); ``--size config`` the ones of configs/*.yaml.

    python benchmarks/throughput.py --size small --batch-size 32 --steps 10 --threads 1   # CPU
    python benchmarks/throughput.py --size config --batch-size 512 --steps 50 --device cuda
"""

from __future__ import annotations

import argparse
import copy
import datetime
import importlib
import platform
import statistics
import sys
import time
from pathlib import Path

import lightning as L
import torch
import yaml

from datamodules import MNISTDataModule
from datamodules.device import DeviceBatches
from datamodules.mnist import images_to_batch
from lightning_gen.callbacks import SpeedOptions

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the benchmarks' shared helpers
from arguments import apply_threads, count, count_or_zero  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

# family: (config file, small init_args, sampling options)
FAMILIES = {
    "autoencoder": ("autoencoder_conv_mnist.yaml",
                    dict(network="conv", latent_dim=16, hidden_dims=(128,), base_channels=16), {}),
    "vae": ("vae_mnist.yaml",
            dict(network="conv", latent_dim=16, hidden_dims=(128,), base_channels=16), {}),
    "gan": ("gan_mnist.yaml", dict(network="dcgan", latent_dim=32, base_channels=16), {}),
    "pixelcnn": ("pixelcnn_mnist.yaml",
                 dict(hidden_channels=16, num_layers=3, head_channels=16), {}),
    "pixeltransformer": ("pixeltransformer_mnist.yaml",
                         dict(model_dim=32, num_layers=2, num_heads=2), {"use_cache": True}),
    "realnvp": ("realnvp_mnist.yaml",
                dict(num_scales=2, couplings_per_scale=2, hidden_channels=16, num_blocks=1), {}),
    "diffusion": ("diffusion_mnist.yaml",
                  dict(unet=dict(base_channels=16, channel_multipliers=(1, 2), num_res_blocks=1,
                                 attention_levels=(), num_heads=1)),
                  {"sampler": "ddim", "steps": 50}),
    "flow_matching": ("flow_matching_mnist.yaml",
                      dict(unet=dict(base_channels=16, channel_multipliers=(1, 2), num_res_blocks=1,
                                     attention_levels=(), num_heads=1)),
                      {"sampler": "heun", "steps": 25}),
}


def build(family: str, size: str, overrides: dict | None = None) -> L.LightningModule:
    """The family's model of configs/*.yaml (``size="config"``) or with the small init_args of
    ``FAMILIES`` laid over it (``"small"``); ``overrides`` (init_args) are laid over either."""
    config_name, small_args, _ = FAMILIES[family]
    model_config = yaml.safe_load((REPO / "configs" / config_name).read_text())["model"]
    module_name, class_name = model_config["class_path"].rsplit(".", 1)
    model_class = getattr(importlib.import_module(module_name), class_name)
    init_args = dict(model_config.get("init_args", {}))
    if size == "small":
        init_args.update(small_args)
    init_args.update(overrides or {})
    # A constant learning rate: the plain loop has no Trainer to size a schedule with, and both
    # sides then do the same optimizer work.
    init_args.pop("lr_schedule", None)
    init_args.pop("warmup_steps", None)
    return model_class(MNISTDataModule.data_shape, **init_args)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepTimer(L.Callback):
    """Wall time from the end of the warm-up steps to the end of the last of ``batches`` training
    steps. It waits for the device only at those two points, as the plain loop does: waiting after
    every step would stop the host from queueing the next step while the GPU runs this one, and
    charge the Trainer for a stall the plain loop does not have."""

    def __init__(self, warmup_batches: int, batches: int) -> None:
        if batches <= warmup_batches:
            raise ValueError(f"StepTimer needs more batches ({batches}) than warm-up batches ({warmup_batches})")
        self.warmup_batches, self.batches = warmup_batches, batches
        self.start = self.end = None
        self.timed_batches = 0

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if batch_idx + 1 == self.warmup_batches:
            synchronize(module.device)
            self.start = time.perf_counter()
        elif batch_idx + 1 > self.warmup_batches:
            self.timed_batches += 1
            if batch_idx + 1 == self.batches:
                synchronize(module.device)
                self.end = time.perf_counter()

    def seconds(self) -> float:
        if self.end is None or self.timed_batches != self.batches - self.warmup_batches:
            raise RuntimeError(f"the fit ran {self.warmup_batches + self.timed_batches} of the "
                               f"{self.batches} batches StepTimer was to time")
        return self.end - self.start


def device_batches(images, labels, batch_size, device) -> DeviceBatches:
    return DeviceBatches((images, labels), batch_size, shuffle=True, drop_last=True, seed=0,
                         device=device, transform=images_to_batch)


def lightning_throughput(model, images, labels, args, device) -> float:
    batches = args.warmup_steps + args.steps
    timer = StepTimer(args.warmup_steps, batches)
    # The GAN counts an optimizer step per network: max_steps bounds optimizer steps, so bound
    # the batches with limit_train_batches instead.
    trainer = L.Trainer(accelerator=device.type if device.type != "cuda" else "gpu", devices=1,
                        max_epochs=1, limit_train_batches=batches, limit_val_batches=0,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[timer, speed_options(args)],
                        precision=args.precision)
    loader = device_batches(images, labels, args.batch_size, device)
    trainer.fit(model, train_dataloaders=loader)
    return timer.timed_batches * args.batch_size / timer.seconds()


def speed_options(args) -> SpeedOptions:
    return SpeedOptions(compile=args.compile, channels_last=args.channels_last,
                        compile_backend=args.compile_backend)


def plain_step(model, args, device):
    """One training step of the plain PyTorch loop, as a function of the batch: ``model`` moved
    to ``device`` in training mode, the optimizer(s) its ``configure_optimizers`` returns, the
    loss its training step computes; for the GAN a discriminator step, then a generator step."""
    model = model.to(device).train()
    speed_options(args).setup(None, model, "fit")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16,
                              enabled=args.precision == "bf16-mixed")
    if hasattr(model, "discriminator_step_loss"):  # the GAN: a D step, then a G step
        optimizer_g, optimizer_d = model.configure_optimizers()

        def step(batch):
            x, y = batch
            y = model.batch_labels(y)
            with autocast:
                d_loss, _ = model.discriminator_step_loss(model.to_model_space(x), y)
            optimizer_d.zero_grad(set_to_none=True)
            d_loss.backward()
            optimizer_d.step()
            with autocast:
                g_loss = model.generator_step_loss(len(x), y)
            optimizer_g.zero_grad(set_to_none=True)
            g_loss.backward()
            optimizer_g.step()
    else:
        optimizer = model.configure_optimizers()

        def step(batch):
            with autocast:
                loss = model.loss(batch, 0, "train")[0]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return step


def plain_throughput(model, images, labels, args, device) -> float:
    step = plain_step(model, args, device)
    loader = iter(device_batches(images, labels, args.batch_size, device))
    for _ in range(args.warmup_steps):
        step(next(loader))
    synchronize(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        step(next(loader))
    synchronize(device)
    return args.steps * args.batch_size / (time.perf_counter() - start)


def sampling_throughput(model, family, args, device) -> float:
    model = model.to(device).eval()
    options = FAMILIES[family][2]
    model.sample(2, **options)  # warm-up
    synchronize(device)
    start = time.perf_counter()
    model.sample(args.sample_count, **options)
    synchronize(device)
    return args.sample_count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--size", choices=("small", "config"), default="small")
    parser.add_argument("--batch-size", type=count, default=32)
    parser.add_argument("--steps", type=count, default=10, help="timed training steps")
    parser.add_argument("--warmup-steps", type=count, default=3)
    parser.add_argument("--repeats", type=count, default=3, help="alternating timings; medians kept")
    parser.add_argument("--sample-count", type=count, default=16)
    parser.add_argument("--compile", action="store_true", help="torch.compile the networks (SpeedOptions)")
    parser.add_argument("--compile-backend", default="inductor", choices=("inductor", "aot_eager"),
                        help="torch.compile's backend with --compile (aot_eager: graph capture without "
                             "generating kernels, which on a CPU takes minutes)")
    parser.add_argument("--channels-last", action="store_true", help="channels_last weights (SpeedOptions)")
    parser.add_argument("--precision", default="32-true", choices=("32-true", "bf16-mixed"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=count_or_zero, default=0, help="CPU threads (0: torch's default)")
    parser.add_argument("--output", type=Path, default=None, help="append the table to this file")
    args = parser.parse_args()
    apply_threads(args.threads)
    device = torch.device(args.device)

    data = MNISTDataModule(download=True)
    data.setup("fit")
    images, labels = data.train_set.images, data.train_set.labels

    hardware = (torch.cuda.get_device_name(device) if device.type == "cuda"
                else f"{platform.machine()} CPU, {torch.get_num_threads()} thread(s)")
    rows = []
    for family in args.families:
        L.seed_everything(0, verbose=False)
        model = build(family, args.size)
        twin = copy.deepcopy(model)  # same initial weights for the plain loop
        # Alternate the two, --repeats times, and keep the medians: on a shared machine the load
        # changes between runs, and alternation spreads it over both.
        lightning_rates, plain_rates = [], []
        for _ in range(args.repeats):
            lightning_rates.append(lightning_throughput(model, images, labels, args, device))
            plain_rates.append(plain_throughput(twin, images, labels, args, device))
        lightning_rate, plain_rate = statistics.median(lightning_rates), statistics.median(plain_rates)
        sample_rate = sampling_throughput(model, family, args, device)
        parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
        rows.append(f"| {family} | {parameters / 1e6:.2f} M | {lightning_rate:.1f} | {plain_rate:.1f} "
                    f"| {lightning_rate / plain_rate:.3f} | {sample_rate:.2f} |")
        print(rows[-1], flush=True)

    header = (f"\n{datetime.date.today()}, {hardware}, size {args.size}, batch {args.batch_size}, "
              f"{args.steps} timed steps after {args.warmup_steps} warm-up (median of {args.repeats} "
              f"alternating runs), {args.precision}, "
              f"compile {f'{args.compile} ({args.compile_backend})' if args.compile else False}, "
              f"channels_last {args.channels_last}, "
              f"sampling {args.sample_count} images\n\n"
              "| family | parameters | Lightning train img/s | plain PyTorch train img/s "
              "| ratio | sampling img/s |\n|---|---|---|---|---|---|\n")
    table = header + "\n".join(rows) + "\n"
    print(table)
    if args.output is not None:
        with open(args.output, "a") as stream:
            stream.write(table)


if __name__ == "__main__":
    main()
