"""The command line: fit -> checkpoint -> predict -> reload, every subcommand, DDP and bf16."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli_helpers import CONFIGS, QUICK, REPO, fit_and_predict, run_cli

from lightning_gen import VAE, Autoencoder

FOUNDATION_CONFIGS = ["vae_mnist.yaml", "vae_mnist_2d.yaml", "vae_8gaussians.yaml",
                      "autoencoder_mnist.yaml", "autoencoder_conv_mnist.yaml", "autoencoder_moons.yaml"]


def read_metrics(path: Path) -> dict[str, float]:
    """The last value of every column of a CSVLogger metrics.csv."""
    values: dict[str, float] = {}
    with open(path) as handle:
        for row in csv.DictReader(handle):
            values.update({key: float(value) for key, value in row.items() if value not in ("", None)})
    return values


def test_fit_checkpoint_predict_and_reload_vae(run_dir, mnist_root):
    output = fit_and_predict("vae_mnist.yaml", run_dir, "--data.init_args.num_predict_samples", "12")
    names = sorted(path.name for path in output.iterdir())
    assert names == [f"{i:06d}.png" for i in range(12)] + ["grid.png", "samples.pt"]
    samples = torch.load(output / "samples.pt")
    assert samples.dtype == torch.uint8 and samples.shape == (12, 1, 28, 28)
    assert samples.float().std() > 0  # not a blank image
    model = VAE.load_from_checkpoint(run_dir / "model.ckpt")
    assert tuple(model.hparams.data_shape) == (1, 28, 28)  # linked from the data module, saved
    assert model.sample(3).shape == (3, 1, 28, 28)


def test_predict_on_toy_data_writes_float_samples_and_scatter(run_dir):
    output = fit_and_predict("vae_8gaussians.yaml", run_dir, "--data.init_args.num_predict_samples", "50")
    assert sorted(path.name for path in output.iterdir()) == ["samples.pt", "scatter.png"]
    samples = torch.load(output / "samples.pt")
    assert samples.dtype == torch.float32 and samples.shape == (50, 2)


@pytest.mark.parametrize("config", FOUNDATION_CONFIGS)
def test_every_config_fits_validates_tests_and_predicts(config, run_dir, mnist_root):
    # Batch limits of "1" would parse as the float 1.0 (all batches): use 2 small batches.
    common = [*QUICK, "--trainer.limit_val_batches", "2", "--trainer.limit_test_batches", "2",
              "--trainer.limit_predict_batches", "2", "--trainer.callbacks", "[]",
              "--data.init_args.batch_size", "16"]
    # With --ckpt_path, LightningCLI takes the model's hyperparameters from the checkpoint, so a
    # cheap test-time K must be chosen when fitting.
    cheap_test = ["--model.init_args.test_importance_samples", "4"] if "vae" in config else []
    cli = run_cli("fit", "--config", str(CONFIGS / config), *common, "--trainer.max_steps", "1",
                  "--trainer.num_sanity_val_steps", "0", *cheap_test)
    checkpoint = run_dir / "last.ckpt"
    cli.trainer.save_checkpoint(checkpoint)
    run_cli("validate", "--config", str(CONFIGS / config), *common, "--ckpt_path", str(checkpoint))
    tested = run_cli("test", "--config", str(CONFIGS / config), *common, "--ckpt_path", str(checkpoint))
    assert torch.isfinite(tested.trainer.callback_metrics["test/loss"])
    if "vae" in config:  # the likelihood metrics of the contract
        assert {"test/nll", "test/bpd"} <= set(tested.trainer.callback_metrics)
    if "mnist" not in config:  # 2-D data: the sample distances, with no extra flag
        assert {"test/mmd", "test/sliced_wasserstein"} <= set(tested.trainer.callback_metrics)
    run_cli("predict", "--config", str(CONFIGS / config), *common, "--ckpt_path", str(checkpoint),
            "--prediction_writer.output_dir", str(run_dir / "out"))
    assert (run_dir / "out" / "samples.pt").is_file()


def test_model_and_data_by_name_without_config(run_dir, mnist_root):
    cli = run_cli("fit", "--model", "VAE", "--data", "MNISTDataModule", *QUICK,
                  "--model.network", "mlp", "--model.hidden_dims", "[32]",
                  "--trainer.fast_dev_run", "2")
    assert isinstance(cli.model, VAE)
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])
    cli = run_cli("fit", "--model", "Autoencoder", "--data", "ToyDataModule", "--data.name", "moons",
                  "--model.reconstruction_loss", "mse", *QUICK, "--trainer.fast_dev_run", "1")
    assert cli.model.data_shape == (2,)  # linked from the data module


def test_print_config_shows_every_option(capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli("fit", "--config", str(CONFIGS / "vae_mnist.yaml"), "--print_config")
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    for option in ["latent_dim:", "likelihood:", "kl_warmup_steps:", "batch_size:", "val_size:",
                   "sample_logger:", "prediction_writer:", "precision:", "strategy:"]:
        assert option in printed, option


def test_unknown_option_value_is_an_error(capsys):
    with pytest.raises((SystemExit, ValueError)):
        run_cli("fit", "--config", str(CONFIGS / "vae_mnist.yaml"), "--model.init_args.likelihood",
                "poisson", *QUICK, "--trainer.fast_dev_run", "1")


def test_bf16_mixed_precision_run(run_dir, mnist_root):
    cli = run_cli("--config", str(CONFIGS / "vae_mnist.yaml"), *QUICK, "--trainer.callbacks", "[]",
                  "--trainer.precision", "bf16-mixed", "--trainer.fast_dev_run", "2", run=False)
    dtypes = set()
    cli.model.decoder.register_forward_hook(lambda module, inputs, output: dtypes.add(output.dtype))
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert torch.bfloat16 in dtypes  # autocast really ran the decoder in bf16
    for key in ("train/loss", "val/loss", "val/nll"):
        assert torch.isfinite(cli.trainer.callback_metrics[key]), key


def _cli_subprocess(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "offline"}
    result = subprocess.run([sys.executable, str(REPO / "cli.py"), *args], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_two_process_ddp_fit_and_synced_validation(run_dir):
    config = str(CONFIGS / "autoencoder_moons.yaml")
    csv_logger = ["--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir",
                  "logs", "--trainer.enable_progress_bar", "false", "--trainer.accelerator", "cpu"]
    ddp = ["--trainer.devices", "2", "--trainer.strategy", "ddp"]
    # A 2-process fit; ModelCheckpoint (from the config) writes checkpoints/autoencoder_moons/last.ckpt.
    _cli_subprocess("fit", "--config", config, *csv_logger, *ddp, "--trainer.max_steps", "3",
                    "--trainer.logger.name", "fit", "--trainer.num_sanity_val_steps", "0", cwd=run_dir)
    checkpoint = run_dir / "checkpoints" / "autoencoder_moons" / "last.ckpt"
    assert checkpoint.is_file()
    fitted = read_metrics(run_dir / "logs" / "fit" / "version_0" / "metrics.csv")
    assert fitted["step"] >= 2 and "train/loss_epoch" in fitted

    # Validate the same checkpoint with 2 processes and with 1: the synced mean over both ranks'
    # halves must equal the single-process mean over the whole validation set.
    _cli_subprocess("validate", "--config", config, *csv_logger, *ddp, "--ckpt_path", str(checkpoint),
                    "--trainer.logger.name", "ddp", cwd=run_dir)
    _cli_subprocess("validate", "--config", config, *csv_logger, "--trainer.devices", "1",
                    "--ckpt_path", str(checkpoint), "--trainer.logger.name", "single", cwd=run_dir)
    ddp_loss = read_metrics(run_dir / "logs" / "ddp" / "version_0" / "metrics.csv")["val/loss"]
    single_loss = read_metrics(run_dir / "logs" / "single" / "version_0" / "metrics.csv")["val/loss"]
    assert ddp_loss == pytest.approx(single_loss, rel=1e-5)

    # A 2-process predict gathers both ranks' samples: 11 requested (the sampler pads to 12).
    _cli_subprocess("predict", "--config", config, *csv_logger, *ddp, "--ckpt_path", str(checkpoint),
                    "--data.init_args.num_predict_samples", "11", "--data.init_args.batch_size", "4",
                    "--prediction_writer.output_dir", "ddp_predictions", cwd=run_dir)
    assert torch.load(run_dir / "ddp_predictions" / "samples.pt").shape == (11, 2)

    # The check can fail: rank 0's half alone (DistributedSampler: indices 0, 2, 4, ...) differs.
    from datamodules import ToyDataModule

    model = Autoencoder.load_from_checkpoint(checkpoint)
    data = ToyDataModule("moons")
    data.setup("validate")
    x = data.val_set.tensors[0]
    with torch.no_grad():
        half = model.reconstruction_error(x[0::2], model.decoder_output(model.encode(x[0::2]))).mean()
        full = model.reconstruction_error(x, model.decoder_output(model.encode(x))).mean()
    assert float(full) == pytest.approx(single_loss, rel=1e-4)
    assert abs(float(half) - single_loss) > 1e-3 * single_loss


def test_wandb_runs_offline_unless_the_user_logged_in(monkeypatch, tmp_path):
    from lightning_gen.cli import default_wandb_mode

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    monkeypatch.delenv("WANDB_MODE", raising=False)
    default_wandb_mode()
    assert os.environ["WANDB_MODE"] == "offline"

    monkeypatch.setenv("WANDB_MODE", "online")  # the user's choice is kept
    default_wandb_mode()
    assert os.environ["WANDB_MODE"] == "online"

    monkeypatch.delenv("WANDB_MODE")
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password key\n")
    default_wandb_mode()  # logged in with `wandb login`: W&B decides (online)
    assert "WANDB_MODE" not in os.environ


@pytest.mark.parametrize("precision, bf16_hardware, warned", [
    ("bf16-mixed", False, True), ("bf16-mixed", True, False), ("32-true", False, False)])
def test_bf16_on_a_cpu_without_bf16_arithmetic_warns_how_to_change_it(precision, bf16_hardware, warned, run_dir,
                                                                      monkeypatch, recwarn):
    """The GPU configs train bf16-mixed; on a CPU that emulates bf16 every command says to pass
    --trainer.precision 32-true, and runs as asked. The CPU's probes are replaced to stand for
    either kind of CPU."""
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        monkeypatch.setattr(torch.cpu, probe, lambda: bf16_hardware)
    cli = run_cli("fit", "--model", "Autoencoder", "--data", "ToyDataModule", "--data.name", "moons",
                  "--model.reconstruction_loss", "mse", *QUICK, "--trainer.precision", precision,
                  "--trainer.fast_dev_run", "1")
    assert cli.trainer.state.finished
    messages = [str(warning.message) for warning in recwarn if "bf16 arithmetic" in str(warning.message)]
    assert len(messages) == (1 if warned else 0), messages
    if warned:
        assert messages[0] == ("precision bf16-mixed on a CPU without bf16 arithmetic is emulated, often ten "
                               "times slower than fp32: pass --trainer.precision 32-true")


@pytest.mark.parametrize("option, amx, avx512_bf16, expected", [
    ("true", True, True, "bf16-mixed"), ("true", False, True, "bf16-mixed"), ("true", False, False, "32-true"),
    ("false", True, True, "32-true")])
def test_bf16_on_native_cpu_chooses_bf16_only_on_a_cpu_with_bf16_arithmetic(option, amx, avx512_bf16, expected,
                                                                           run_dir, monkeypatch):
    """The laptop presets' option: bf16-mixed where the CPU computes in bf16 (AMX units, or
    AVX512-BF16 alone as on AMD's Zen 4), the config's precision elsewhere; the saved config.yaml
    names the precision the run used. The probes are replaced to stand for each kind of CPU."""
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    cli = run_cli("fit", "--model", "Autoencoder", "--data", "ToyDataModule", "--data.name", "moons",
                  "--model.reconstruction_loss", "mse", *QUICK, "--trainer.precision", "32-true",
                  "--trainer.max_steps", "1", "--trainer.limit_val_batches", "2",
                  "--bf16_on_native_cpu", option)
    assert cli.trainer.state.finished
    assert str(cli.trainer.precision) == expected
    saved = (Path(cli.trainer.log_dir) / "config.yaml").read_text()
    assert f"precision: {expected}" in saved


def test_runs_on_cpu_follows_the_accelerator_and_what_auto_finds(monkeypatch):
    from lightning_gen.cli import runs_on_cpu

    assert runs_on_cpu("cpu") and not runs_on_cpu("cuda") and not runs_on_cpu("gpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert runs_on_cpu("auto") and runs_on_cpu(None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert not runs_on_cpu("auto") and not runs_on_cpu(None)
