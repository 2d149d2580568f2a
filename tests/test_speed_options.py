"""SpeedOptions: compiled, channels_last networks compute what the plain ones do, keep their
state dict keys, and bad options raise. Every family's optimizer is the fused AdamW."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from lightning_gen import VAE
from lightning_gen.base import adamw, use_fused_adamw
from lightning_gen.callbacks.speed import SpeedOptions
from test_contract import FAMILIES, make_data, tiny_trainer


def tiny_vae() -> VAE:
    return VAE((1, 28, 28), network="conv", latent_dim=4, hidden_dims=(16,), base_channels=4,
               val_importance_samples=2)


def test_compiled_channels_last_networks_match_the_plain_ones(tmp_path):
    torch.manual_seed(0)
    model = tiny_vae()
    keys = set(model.state_dict())
    x = torch.rand(8, 1, 28, 28)
    with torch.no_grad():
        expected = model.encoder(x)
    speed = SpeedOptions(compile=True, channels_last=True, compile_backend="eager")
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=2, limit_val_batches=0,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[speed], default_root_dir=tmp_path)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.rand(32, 1, 28, 28), torch.zeros(32, dtype=torch.long)),
        batch_size=8)
    speed.setup(trainer, model, "fit")
    assert sorted(speed.compiled) == ["decoder", "encoder"]
    assert model.encoder._compiled_call_impl is not None  # nn.Module.compile's in-place wrapper
    conv_weights = [p for p in model.encoder.parameters() if p.dim() == 4]
    assert conv_weights and all(p.is_contiguous(memory_format=torch.channels_last)
                                for p in conv_weights)
    with torch.no_grad():
        torch.testing.assert_close(model.encoder(x), expected, rtol=1e-4, atol=1e-5)
    trainer.fit(model, train_dataloaders=loader)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    assert set(model.state_dict()) == keys  # in-place compilation: checkpoints unchanged
    assert sorted(speed.compiled) == ["decoder", "encoder"]  # compiled once, not again at fit


def test_bad_options_raise():
    with pytest.raises(TypeError, match="compile"):
        SpeedOptions(compile="yes")
    with pytest.raises(ValueError, match="compile_mode"):
        SpeedOptions(compile=True, compile_mode="fastest")


def test_fused_adamw_only_where_the_kernel_exists():
    cpu = torch.nn.Parameter(torch.zeros(3))
    assert use_fused_adamw([cpu])
    assert not use_fused_adamw([])
    assert not use_fused_adamw([torch.zeros(3, device="meta")])  # no fused kernel for this device
    assert not use_fused_adamw([cpu, torch.zeros(3, dtype=torch.long)])  # not all floating point
    assert adamw([cpu], lr=1e-3).defaults["fused"] is True


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_every_family_trains_with_fused_adamw(name, tmp_path, mnist_root):
    torch.manual_seed(0)
    family = FAMILIES[name]
    data = make_data(family.data, mnist_root)
    model = family.build(data.data_shape)
    trainer = tiny_trainer(tmp_path, max_steps=1, limit_val_batches=0)
    trainer.fit(model, datamodule=data)
    assert trainer.optimizers, name
    for optimizer in trainer.optimizers:
        assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["fused"] is True, name
