"""Every family logs the same keys to W&B, so one dashboard compares runs across families.

For one model of each family (from the contract test's registry), a short offline W&B fit (with a
validation after two steps) and a test, then the offline run's own record file (``run-*.wandb``,
what ``wandb sync`` uploads) is read back: its history must hold the shared keys under their exact
names, and the sample picture's entry must name PNG files that exist under ``files/media/images``.
"""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

import pytest
import torch
from lightning.pytorch.loggers import WandbLogger

from lightning_gen.callbacks import SampleLogger
from test_contract import FAMILIES, make_data, tiny_trainer

# One registry entry per family; toy data where the family has a 2-D model (faster).
FAMILY_ENTRIES = {
    "autoencoder": "autoencoder_conv",
    "vae": "vae_conv",
    "gan": "gan_toy",
    "pixelcnn": "pixelcnn_gated",
    "pixeltransformer": "pixeltransformer",
    "realnvp": "realnvp_toy",
    "diffusion": "diffusion_toy",
}
LIKELIHOOD_FAMILIES = {"vae", "pixelcnn", "pixeltransformer", "realnvp"}

SHARED_KEYS = ["train/loss", "train/loss_epoch", "val/loss", "test/loss", "epoch",
               "trainer/global_step"]
LIKELIHOOD_KEYS = ["val/nll", "val/bpd", "test/nll", "test/bpd"]
# The families whose training loss is the exact NLL also log it per step.
EXACT_LIKELIHOOD_FAMILIES = {"pixelcnn", "pixeltransformer", "realnvp"}
EXACT_LIKELIHOOD_KEYS = ["train/nll", "train/bpd"]
SAMPLES_KEY = "val/samples"


def offline_run_dir(save_dir: Path) -> Path:
    runs = sorted((save_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, f"expected one offline run in {save_dir / 'wandb'}, found {runs}"
    return runs[0]


def read_wandb_records(path: Path) -> list[bytes]:
    """The records of a ``.wandb`` file: a 7-byte header (":W&B", magic 0xBEE1, version), then a
    LevelDB-style log of 32 KiB blocks whose records have a 7-byte header (CRC-32, length, kind:
    1 full, 2 first, 3 middle, 4 last piece of a record split over blocks). W&B's service may
    still be writing the file: a piece whose bytes are not all there yet ends the list."""
    data = path.read_bytes()
    ident, magic, _ = struct.unpack("<4sHB", data[:7])
    assert ident == b":W&B" and magic == 0xBEE1, f"{path} is not a W&B record file"
    block_size, header_size = 32768, 7
    records, pending, position = [], b"", header_size
    while position + header_size <= len(data):
        left_in_block = block_size - position % block_size
        if left_in_block < header_size:  # a block's tail too short for a header is padding
            position += left_in_block
            continue
        _, length, kind = struct.unpack("<IHB", data[position: position + header_size])
        position += header_size
        if position + length > len(data):  # being written
            break
        chunk = data[position: position + length]
        position += length
        if kind == 0:
            break
        if kind == 1:
            records.append(chunk)
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            records.append(pending + chunk)
    return records


def read_run_records(run_dir: Path, timeout: float = 30.0) -> list:
    """The parsed records of a finished offline run. ``finish()`` can return before W&B's service
    process has written the last records, so wait (up to ``timeout`` seconds) for the exit record;
    a record that does not parse yet (caught while its bytes were being written) is read again."""
    from google.protobuf.message import DecodeError
    from wandb.proto import wandb_internal_pb2

    (record_file,) = run_dir.glob("run-*.wandb")
    deadline = time.monotonic() + timeout
    while True:
        records, unreadable = [], None
        for raw in read_wandb_records(record_file):
            record = wandb_internal_pb2.Record()
            try:
                record.ParseFromString(raw)
            except DecodeError as error:
                unreadable = error
                break
            records.append(record)
        if unreadable is None and any(record.WhichOneof("record_type") == "exit" for record in records):
            return records
        if time.monotonic() > deadline:
            if unreadable is not None:
                raise AssertionError(f"{record_file} still holds an unreadable record after {timeout} s") \
                    from unreadable
            raise AssertionError(f"{record_file} has no exit record after {timeout} s")
        time.sleep(0.2)


def read_history(run_dir: Path) -> list[dict]:
    """The history rows (what ``wandb.log`` / the WandbLogger logged) of a finished offline run."""
    rows = []
    for record in read_run_records(run_dir):
        if record.WhichOneof("record_type") != "history":
            continue
        row: dict = {}
        for item in record.history.item:
            value = json.loads(item.value_json)
            if item.key:
                row[item.key] = value
            else:  # media are logged as nested dicts: ("val/samples", "filenames") -> [...]
                *parents, leaf = item.nested_key
                node = row
                for parent in parents:
                    node = node.setdefault(parent, {})
                node[leaf] = value
        rows.append(row)
    return rows


@pytest.mark.parametrize("family", sorted(FAMILY_ENTRIES))
def test_offline_wandb_run_has_the_shared_keys_and_samples(family, tmp_path, mnist_root, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    entry = FAMILIES[FAMILY_ENTRIES[family]]
    torch.manual_seed(0)
    data = make_data(entry.data, mnist_root)
    model = entry.build(data.data_shape)

    logger = WandbLogger(project="lightning-gen-test", name=family, save_dir=str(tmp_path),
                         offline=True)
    samples = SampleLogger(num_samples=4, sample_options=entry.sample_options)
    # Two training batches then one validation (the GAN's two optimizers make two steps a batch).
    trainer = tiny_trainer(tmp_path, logger=logger, callbacks=[samples], max_steps=-1,
                           max_epochs=1, limit_train_batches=2, limit_val_batches=2,
                           limit_test_batches=2, log_every_n_steps=1)
    try:
        trainer.fit(model, datamodule=data)
        trainer.test(model, datamodule=data, verbose=False)
    finally:
        logger.experiment.finish()

    run_dir = offline_run_dir(tmp_path)
    history = read_history(run_dir)
    logged = {key for row in history for key in row}

    expected = (SHARED_KEYS + (LIKELIHOOD_KEYS if family in LIKELIHOOD_FAMILIES else [])
                + (EXACT_LIKELIHOOD_KEYS if family in EXACT_LIKELIHOOD_FAMILIES else []))
    missing = [key for key in expected if key not in logged]
    assert not missing, f"{family}: keys missing from the W&B history: {missing}; has {sorted(logged)}"
    for row in history:
        for key in set(expected) & set(row):
            assert isinstance(row[key], (int, float)) and row[key] == row[key], (key, row[key])
    # Lightning's own "<name>_step" suffix must not replace the contract's names.
    assert not [key for key in logged if key.endswith("_step")
                and key not in ("trainer/global_step", "_step")]

    pictures = [row[SAMPLES_KEY] for row in history if SAMPLES_KEY in row]
    assert pictures, f"{family}: no {SAMPLES_KEY} media in the W&B history"
    for picture in pictures:
        assert picture["_type"] == "images/separated" and picture["format"] == "png", picture
        assert picture["filenames"], picture
        for name in picture["filenames"]:
            path = run_dir / "files" / name
            assert path.is_relative_to(run_dir / "files" / "media" / "images"), path
            assert path.is_file() and path.stat().st_size > 0, path
