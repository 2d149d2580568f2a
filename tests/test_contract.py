"""One contract test, parametrized over every family (as torchvision tests every model).

Each entry of FAMILIES builds a tiny model and names its data ("mnist" or a toy distribution).
A new family adds one entry; every check below then applies to it:
- a short fit through the Trainer ends with a finite ``train/loss``;
- the training loss of the public template, ``loss(batch, batch_idx, "train")``, reaches every
  trainable parameter with a finite gradient;
- ``sample(n)`` has shape (n, *data_shape), is finite, lies in [0, 1] for images, sits on the
  model's device and is reproducible under ``torch.manual_seed``;
- ``predict_step`` returns samples;
- a checkpoint reloads with ``load_from_checkpoint(path)`` alone and samples what the original did;
- ``log_prob`` (where the family has one) is finite and of shape (B,);
- validation and test steps draw from their own seeded random state: they leave the global one as
  it was, and their metrics do not depend on it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import lightning as L
import pytest
import torch

from datamodules import MNISTDataModule, ToyDataModule
from lightning_gen import VAE, Autoencoder
from lightning_gen import PixelCNN, PixelTransformer
from lightning_gen import GAN
from lightning_gen import Diffusion
from lightning_gen.diffusion import MLPDenoiserConfig, UNetConfig
from lightning_gen import RealNVP
from lightning_gen import FlowMatching
from lightning_gen.base import GenerativeModule


@dataclass
class Family:
    build: Callable[[tuple[int, ...]], GenerativeModule]
    data: str  # "mnist" or a toy distribution name
    sample_options: dict = field(default_factory=dict)


FAMILIES: dict[str, Family] = {
    "autoencoder_mlp": Family(
        lambda shape: Autoencoder(shape, network="mlp", latent_dim=4, hidden_dims=(32,)), "mnist"),
    "autoencoder_conv": Family(
        lambda shape: Autoencoder(shape, network="conv", latent_dim=4, hidden_dims=(32,),
                                  base_channels=4), "mnist"),
    "autoencoder_toy": Family(
        lambda shape: Autoencoder(shape, latent_dim=2, hidden_dims=(16,), reconstruction_loss="mse"),
        "moons"),
    "vae_conv": Family(
        lambda shape: VAE(shape, network="conv", latent_dim=4, hidden_dims=(32,), base_channels=4,
                          val_importance_samples=4, test_importance_samples=8), "mnist"),
    "vae_mlp": Family(
        lambda shape: VAE(shape, network="mlp", latent_dim=4, hidden_dims=(32,),
                          val_importance_samples=4), "mnist"),
    "vae_toy": Family(
        lambda shape: VAE(shape, network="mlp", latent_dim=2, hidden_dims=(16,),
                          val_importance_samples=4), "8gaussians"),
    "pixelcnn_gated": Family(
        lambda shape: PixelCNN(shape, hidden_channels=4, num_layers=1, head_channels=4,
                               first_kernel_size=3), "mnist"),
    "pixelcnn_8bit_conditional": Family(
        lambda shape: PixelCNN(shape, num_levels=256, gated=False, hidden_channels=4, num_layers=1,
                               head_channels=4, first_kernel_size=3, num_classes=10), "mnist"),
    "pixeltransformer": Family(
        lambda shape: PixelTransformer(shape, model_dim=8, num_layers=1, num_heads=2), "mnist"),
    "pixeltransformer_8bit_conditional": Family(
        lambda shape: PixelTransformer(shape, num_levels=256, model_dim=8, num_layers=1, num_heads=2,
                                       num_classes=10), "mnist"),
    "gan_dcgan": Family(
        lambda shape: GAN(shape, network="dcgan", latent_dim=8, base_channels=4, ema_decay=0.9),
        "mnist"),
    "gan_conditional": Family(
        lambda shape: GAN(shape, network="mlp", latent_dim=8, generator_hidden_dims=(32,),
                          discriminator_hidden_dims=(32,), num_classes=10, loss="hinge",
                          spectral_norm=True), "mnist", sample_options={"y": 3}),
    "gan_toy": Family(
        lambda shape: GAN(shape, network="mlp", latent_dim=2, generator_hidden_dims=(16,),
                          discriminator_hidden_dims=(16,), loss="wgan_gp", r1_weight=1.0),
        "8gaussians"),
    "diffusion_unet": Family(
        lambda shape: Diffusion(shape, num_timesteps=20, ema_decay=0.9, unet=UNetConfig(
            base_channels=4, channel_multipliers=(1, 2), num_res_blocks=1, attention_levels=(1,), num_heads=1)),
        "mnist", sample_options={"steps": 4}),
    "diffusion_unet_conditional_ddpm": Family(
        lambda shape: Diffusion(shape, num_timesteps=8, unet=UNetConfig(
            base_channels=4, channel_multipliers=(1, 2), num_res_blocks=1, attention_levels=(), num_heads=1),
                                prediction="v", num_classes=10, guidance_scale=2.0), "mnist",
        sample_options={"sampler": "ddpm", "y": 3}),
    "diffusion_toy": Family(
        lambda shape: Diffusion(shape, num_timesteps=20, prediction="v", mlp=MLPDenoiserConfig(16, 1)),
        "moons", sample_options={"steps": 5, "eta": 1.0}),
    "flow_matching_unet_ot": Family(
        lambda shape: FlowMatching(shape, coupling="ot", ema_decay=0.9, likelihood_steps=2, unet=UNetConfig(
            base_channels=4, channel_multipliers=(1, 2), num_res_blocks=1, attention_levels=(1,), num_heads=1)),
        "mnist", sample_options={"steps": 3, "sampler": "midpoint"}),
    "flow_matching_unet_conditional": Family(
        lambda shape: FlowMatching(shape, num_classes=10, guidance_scale=2.0, likelihood_steps=2,
                                   unet=UNetConfig(base_channels=4, channel_multipliers=(1, 2),
                                                   num_res_blocks=1, attention_levels=(), num_heads=1)),
        "mnist", sample_options={"steps": 2, "y": 3}),
    "flow_matching_toy": Family(
        lambda shape: FlowMatching(shape, mlp=MLPDenoiserConfig(16, 1), likelihood_steps=4), "moons",
        sample_options={"steps": 5, "sampler": "euler"}),
    "realnvp_toy": Family(
        lambda shape: RealNVP(shape, num_layers=2, hidden_dims=(16,)), "8gaussians",
        sample_options={"temperature": 0.8}),
    "realnvp_mnist": Family(
        lambda shape: RealNVP(shape, num_scales=2, couplings_per_scale=1, hidden_channels=4,
                              num_blocks=1), "mnist"),
}


def make_data(name: str, mnist_root) -> L.LightningDataModule:
    if name == "mnist":
        return MNISTDataModule(data_dir=str(mnist_root), batch_size=8, download=False,
                               num_predict_samples=8)
    return ToyDataModule(name, num_train=64, num_val=32, num_test=32, batch_size=16,
                         num_predict_samples=8)


class RandomStateWatch(L.Callback):
    """Records whether any validation or test step changed the global random state."""

    def __init__(self) -> None:
        self.changed: list[int] = []
        self.before: torch.Tensor | None = None

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self.before = torch.get_rng_state()

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if not torch.equal(torch.get_rng_state(), self.before):
            self.changed.append(batch_idx)

    on_test_batch_start = on_validation_batch_start
    on_test_batch_end = on_validation_batch_end


def tiny_trainer(root, **overrides) -> L.Trainer:
    settings = dict(accelerator="cpu", devices=1, max_steps=2, limit_val_batches=1,
                    limit_test_batches=1, num_sanity_val_steps=0, logger=False,
                    enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, default_root_dir=str(root))
    settings.update(overrides)
    return L.Trainer(**settings)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_family_contract(name, tmp_path, mnist_root):
    family = FAMILIES[name]
    torch.manual_seed(0)
    data = make_data(family.data, mnist_root)
    model = family.build(data.data_shape)
    assert isinstance(model, GenerativeModule)

    # 1. The training loss reaches every trainable parameter (before any Trainer is attached,
    #    so the model's self.log calls are no-ops).
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    loss, _ = model.loss(batch, 0, "train")  # the GAN's: D's and G's losses summed
    loss.backward()
    for parameter_name, parameter in model.named_parameters():
        if parameter.requires_grad:
            assert parameter.grad is not None, f"no gradient reaches {parameter_name}"
            assert torch.isfinite(parameter.grad).all(), f"non-finite gradient at {parameter_name}"
    model.zero_grad(set_to_none=True)

    # 2. A short fit through the Trainer gives a finite training loss.
    trainer = tiny_trainer(tmp_path)
    trainer.fit(model, datamodule=data)
    loss = trainer.callback_metrics.get("train/loss")
    assert loss is not None, "every family logs train/loss"
    assert torch.isfinite(loss)

    # 3. Sampling: shape, range, device, reproducibility.
    model.eval()
    torch.manual_seed(123)
    samples = model.sample(5, **family.sample_options)
    torch.manual_seed(123)
    again = model.sample(5, **family.sample_options)
    assert samples.shape == (5, *model.data_shape)
    assert samples.device == model.device
    assert torch.isfinite(samples).all()
    if model.is_image:
        assert samples.min() >= 0 and samples.max() <= 1
    torch.testing.assert_close(samples, again)

    # 4. predict_step returns one sample per example of the batch.
    data.setup("predict")
    predict_batch = next(iter(data.predict_dataloader()))
    with torch.no_grad():
        predicted = model.predict_step(predict_batch, 0)
    assert predicted.shape == (len(predict_batch[0]), *model.data_shape)

    # 5. Reload from the checkpoint; the reloaded model samples the same. The checkpoint holds the
    #    model; the evaluation options (guidance scale, predict_*) are not in it by design, so they
    #    are given again, as the command line gives them at predict --ckpt_path.
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    evaluation = {name: getattr(model, name) for name in model.EVALUATION_OPTIONS}
    reloaded = type(model).load_from_checkpoint(path, map_location="cpu", **evaluation).eval()
    torch.manual_seed(7)
    expected = model.sample(3, **family.sample_options)
    torch.manual_seed(7)
    torch.testing.assert_close(reloaded.sample(3, **family.sample_options), expected)

    # 6. log_prob, where the family has a likelihood.
    if hasattr(model, "log_prob"):
        x = batch[0][:4]
        log_prob = model.log_prob(x)
        assert log_prob.shape == (4,)
        assert torch.isfinite(log_prob).all()

    # 7. Evaluation draws (noise, time steps, latents, dequantization) are the batch's own: the
    #    global random state is left as it was (so validating inside a fit changes nothing the
    #    training draws, and a fit stopped inside a validation resumes exactly), and two
    #    evaluations of the same weights measure the same numbers whatever the global state.
    watch = RandomStateWatch()
    evaluator = tiny_trainer(tmp_path, callbacks=[watch], limit_val_batches=2, limit_test_batches=2)
    measured = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        (validated,) = evaluator.validate(model, datamodule=data, verbose=False)
        (tested,) = evaluator.test(model, datamodule=data, verbose=False)
        measured.append({**validated, **tested})
    assert measured[0] and measured[0] == measured[1]
    assert watch.changed == []
