"""Every image family trains, samples and scores on RGB and larger images with its defaults:
(3, 32, 32), (1, 32, 32) and (3, 64, 64), no option changed. Where a family cannot sensibly take a
size (the pixel transformer's attention over 12,288 values), it says so in one line."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_gen import GAN, VAE, Autoencoder, Diffusion, FlowMatching, PixelCNN, PixelTransformer, RealNVP

SHAPES = [(3, 32, 32), (1, 32, 32), (3, 64, 64)]
FAMILIES = {
    "autoencoder": Autoencoder, "vae": VAE, "gan": GAN, "pixelcnn": PixelCNN,
    "pixeltransformer": PixelTransformer, "realnvp": RealNVP, "diffusion": Diffusion,
    "flow_matching": FlowMatching,
}
# Sampling options that keep the test short; they change the number of steps, not the network.
SAMPLE_OPTIONS = {"diffusion": {"steps": 2}, "flow_matching": {"steps": 1, "sampler": "euler"}}
# Autoregressive sampling makes one network pass per value (12,288 at 3x64x64): drawn at 32x32 only.
SEQUENTIAL = {"pixelcnn", "pixeltransformer"}


@pytest.fixture(autouse=True)
def single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda shape: "x".join(map(str, shape)))
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_trains_samples_and_scores_any_image_shape(family, shape, tmp_path):
    if family == "pixeltransformer" and shape == (3, 64, 64):
        with pytest.raises(ValueError, match="12288 tokens .* max_positions=4096.*token_size"):
            PixelTransformer(shape)
        assert PixelTransformer(shape, model_dim=8, num_heads=2, token_size=4).network.num_tokens == 3072
        return
    torch.manual_seed(0)
    model = FAMILIES[family](shape)
    images = torch.rand(4, *shape)
    loader = DataLoader(TensorDataset(images, torch.zeros(4, dtype=torch.long)), batch_size=2)
    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(model, loader)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    model.eval()
    if family not in SEQUENTIAL or shape[1] == 32:
        samples = model.sample(1, **SAMPLE_OPTIONS.get(family, {}))
        assert samples.shape == (1, *shape) and torch.isfinite(samples).all()
        assert samples.min() >= 0 and samples.max() <= 1
    if hasattr(model, "log_prob") and family != "flow_matching":
        with torch.no_grad():
            log_prob = model.log_prob(images[:2])
        assert log_prob.shape == (2,) and torch.isfinite(log_prob).all()
    elif family == "flow_matching":
        model.likelihood_steps = 1
        assert torch.isfinite(model.log_prob(images[:2])).all()
