"""The device-resident data path: shards, reshuffles, batches on the device, a fit through it."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import lightning as L
import pytest
import torch

from datamodules import MNISTDataModule, ToyDataModule
from datamodules.device import DeviceBatches
from lightning_gen import VAE

REPO = Path(__file__).resolve().parents[1]


def _rows(batches) -> list[int]:
    return [int(i) for batch in batches for i in batch[0].tolist()]


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_shards_are_disjoint_cover_the_data_and_have_equal_length(world_size):
    n, batch_size = 50, 4
    index = torch.arange(n)
    loaders = [DeviceBatches((index,), batch_size, shuffle=True, drop_last=True, seed=7,
                             rank=rank, world_size=world_size) for rank in range(world_size)]
    seen = [_rows(loader) for loader in loaders]
    assert len({len(loader) for loader in loaders}) == 1  # every rank the same number of batches
    assert all(len(rows) == len(loaders[0]) * batch_size for rows in seen)
    everything = [row for rows in seen for row in rows]
    assert len(set(everything)) == len(everything)  # disjoint shards
    # Only the remainder of the permutation is dropped: n // world_size // batch_size full batches.
    assert len(everything) == world_size * (n // world_size // batch_size) * batch_size


def test_evaluation_shards_cover_every_example():
    n = 11
    loaders = [DeviceBatches((torch.arange(n),), 4, shuffle=False, drop_last=False, rank=rank,
                             world_size=2) for rank in range(2)]
    seen = [_rows(loader) for loader in loaders]
    assert len(seen[0]) == len(seen[1]) == 6  # padded to equal shards, as DistributedSampler
    assert set(seen[0]) | set(seen[1]) == set(range(n))


def test_reshuffles_every_epoch_with_the_same_permutation_on_every_rank():
    def permutation(epoch, rank):
        loader = DeviceBatches((torch.arange(40),), 5, shuffle=True, drop_last=True, seed=3,
                               rank=rank, world_size=2, epoch=lambda: epoch)
        return _rows(loader)

    assert permutation(0, 0) != permutation(1, 0)
    assert permutation(1, 0) == permutation(1, 0)  # a function of (seed, epoch), not of the call
    assert not set(permutation(1, 0)) & set(permutation(1, 1))  # both ranks cut one permutation
    # Without an epoch source, each new iteration is a new epoch.
    loader = DeviceBatches((torch.arange(40),), 5, shuffle=True, drop_last=True, seed=3)
    assert _rows(loader) != _rows(loader)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="same length"):
        DeviceBatches((torch.zeros(3), torch.zeros(4)), 2, shuffle=False, drop_last=False)
    with pytest.raises(ValueError, match="rank"):
        DeviceBatches((torch.zeros(3),), 2, shuffle=False, drop_last=False, rank=2, world_size=2)
    with pytest.raises(ValueError, match="less than one batch"):
        DeviceBatches((torch.zeros(3),), 4, shuffle=True, drop_last=True)


def test_mnist_device_batches_match_the_dataloader_format(mnist_root):
    data = MNISTDataModule(data_dir=str(mnist_root), batch_size=16, download=False,
                           device_resident=True)
    data.setup("fit")
    loader = data.train_dataloader()
    assert isinstance(loader, DeviceBatches) and len(loader) == 55000 // 16
    x, y = next(iter(loader))
    assert x.shape == (16, 1, 28, 28) and x.dtype == torch.float32
    assert y.shape == (16,) and y.dtype == torch.int64
    assert 0 <= x.min() and x.max() <= 1 and x.max() > 0.99
    val_x, _ = next(iter(data.val_dataloader()))
    # Evaluation keeps the order: the first batch is the first validation images.
    assert torch.equal(val_x, data.val_set.images[:16].unsqueeze(1).float() / 255)


class _DeviceCheck(L.Callback):
    """Records the device of every training batch as the model receives it."""

    def __init__(self) -> None:
        self.devices: set[torch.device] = set()

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self.devices.add(batch[0].device)


def test_fit_through_device_batches(mnist_root):
    data = MNISTDataModule(data_dir=str(mnist_root), batch_size=16, download=False,
                           device_resident=True)
    model = VAE(data.data_shape, network="mlp", latent_dim=2, hidden_dims=(16,),
                val_importance_samples=2)
    check = _DeviceCheck()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=1, limit_train_batches=4,
                        limit_val_batches=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[check])
    trainer.fit(model, datamodule=data)
    assert trainer.global_step == 4
    assert check.devices == {trainer.strategy.root_device}
    assert torch.isfinite(trainer.callback_metrics["val/loss"])


DDP_SCRIPT = textwrap.dedent("""
    import sys
    import lightning as L
    import torch
    from datamodules import ToyDataModule

    class Recorder(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(2, 1)
            self.seen = {}

        def training_step(self, batch, batch_idx):
            x, _ = batch
            self.seen.setdefault(self.current_epoch, []).append(x.detach().clone())
            return self.layer(x).pow(2).mean()

        def on_fit_end(self):
            torch.save({epoch: torch.cat(rows) for epoch, rows in self.seen.items()},
                       f"{sys.argv[1]}/rank{self.global_rank}.pt")

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    if __name__ == "__main__":
        data = ToyDataModule("moons", num_train=64, num_val=8, num_test=8, batch_size=8,
                             device_resident=True)
        trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=2,
                            limit_val_batches=0, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False)
        trainer.fit(Recorder(), datamodule=data)
        # Leave gloo's connections closed before the interpreter exits (an open process group torn
        # down at exit can abort one rank while the other is still shutting down).
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
""")


@pytest.mark.slow
def test_two_process_ddp_shards_are_disjoint_cover_the_data_and_reshuffle(tmp_path):
    script = tmp_path / "ddp_fit.py"
    script.write_text(DDP_SCRIPT)
    result = subprocess.run([sys.executable, str(script), str(tmp_path)], cwd=REPO, timeout=300,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    train = ToyDataModule("moons", num_train=64, num_val=8, num_test=8)
    train.setup("fit")
    everything = {tuple(row) for row in train.train_set.tensors[0].tolist()}
    for epoch in (0, 1):
        first, second = ({tuple(row) for row in rank[epoch].tolist()} for rank in ranks)
        assert len(ranks[0][epoch]) == len(ranks[1][epoch]) == 32  # 4 batches of 8 per rank
        assert not first & second
        assert first | second == everything
    # A new permutation in epoch 1: rank 0 sees other points (or the same ones in another order).
    assert not torch.equal(ranks[0][0], ranks[0][1])
