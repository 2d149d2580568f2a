"""A run does what its command says, or stops with a one-line error and a non-zero status.

Each test here failed before its fix: command-line evaluation options overridden by the
checkpoint, a checkpoint of another family accepted, a stale last.ckpt, DDP predict with repeated
or scrambled samples, divergence unreported, predict from untrained weights, shipped configs that
crashed at step 1, and SIGTERM exiting 0 with a resume that was not exact.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from cli_helpers import CONFIGS, QUICK, REPO, run_cli, write_cifar10
from torch.utils.data import DataLoader, TensorDataset

from lightning_gen import GAN, VAE, Autoencoder, Diffusion, FlowMatching, RealNVP
from lightning_gen.base import DivergenceError
from lightning_gen.callbacks import TimedProgressBar
from lightning_gen.diffusion import MLPDenoiserConfig

# every config, the laptop presets in configs/cpu/ included
ALL_CONFIGS = sorted(str(path.relative_to(CONFIGS)) for path in CONFIGS.rglob("*.yaml"))
TINY_FIT = ["--trainer.max_steps", "2", "--trainer.limit_val_batches", "2",
            "--trainer.num_sanity_val_steps", "0"]


def cli(*args: str, cwd: Path, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """``python cli.py ARGS`` as a user runs it (the exit status and stderr are what is tested)."""
    environment = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "offline", **(env or {})}
    return subprocess.run([sys.executable, str(REPO / "cli.py"), *args], cwd=cwd, env=environment,
                          capture_output=True, text=True, timeout=timeout)


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def error_line(result: subprocess.CompletedProcess) -> str:
    """The one-line error the CLI prints (and checks that it printed no traceback)."""
    assert result.returncode == 1, (result.returncode, result.stderr[-3000:])
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert lines, result.stderr[-3000:]
    return lines[-1]


def fit_checkpoint(config: str, run_dir: Path, *extra: str) -> Path:
    """Fit a config for two steps in this process; returns the checkpoint."""
    fitted = run_cli("fit", "--config", str(CONFIGS / config), *QUICK, *TINY_FIT,
                     "--trainer.callbacks", "[]", *extra)
    path = run_dir / f"{config}.ckpt"
    fitted.trainer.save_checkpoint(path)
    return path


def predict(config: str, checkpoint: Path, out: Path, *extra: str) -> torch.Tensor:
    run_cli("predict", "--config", str(CONFIGS / config), *QUICK, "--trainer.callbacks", "[]",
            "--ckpt_path", str(checkpoint), "--prediction_writer.output_dir", str(out), *extra)
    return torch.load(out / "samples.pt")


# -------------------------------------------------------- 1. command-line evaluation options
# (config, options of the fit, a predict option, two values that must give different samples)
PREDICT_OPTIONS = {
    "autoencoder": ("autoencoder_moons.yaml", [], "predict_temperature", ("1.0", "0.3")),
    "vae": ("vae_8gaussians.yaml", [], "predict_temperature", ("1.0", "0.3")),
    "gan": ("gan_mnist.yaml", ["--model.init_args.base_channels", "4",
                               "--data.init_args.batch_size", "8"], "predict_use_ema", ("true", "false")),
    "gan_truncation": ("gan_mnist.yaml", ["--model.init_args.base_channels", "4",
                                          "--data.init_args.batch_size", "8"],
                       "predict_truncation", ("2.0", "0.5")),
    "gan_rejection": ("gan_mnist.yaml", ["--model.init_args.base_channels", "4",
                                         "--data.init_args.batch_size", "8"],
                      "predict_rejection_gamma", ("0.0", "null")),
    "realnvp": ("realnvp_moons.yaml", [], "predict_temperature", ("1.0", "0.3")),
    "diffusion": ("diffusion_moons.yaml", [], "predict_steps", ("50", "5")),
    "flow_matching": ("flow_matching_moons.yaml", [], "predict_sampler", ("heun", "euler")),
    "pixelcnn": ("pixelcnn_mnist.yaml", ["--model.init_args.hidden_channels", "4",
                                         "--model.init_args.num_layers", "1",
                                         "--model.init_args.head_channels", "4",
                                         "--data.init_args.batch_size", "4"],
                 "predict_temperature", ("1.0", "0.2")),
    "pixeltransformer": ("pixeltransformer_mnist.yaml", ["--model.init_args.model_dim", "8",
                                                         "--model.init_args.num_layers", "1",
                                                         "--model.init_args.num_heads", "2",
                                                         "--data.init_args.batch_size", "4"],
                         "predict_temperature", ("1.0", "0.2")),
}


@pytest.mark.parametrize("family", sorted(PREDICT_OPTIONS))
def test_a_command_line_predict_option_overrides_the_checkpoint(family, run_dir, mnist_root):
    config, fit_options, option, (first, second) = PREDICT_OPTIONS[family]
    checkpoint = fit_checkpoint(config, run_dir, *fit_options)
    count = ["--data.init_args.num_predict_samples", "6", *fit_options]
    a = predict(config, checkpoint, run_dir / "a", *count, f"--model.init_args.{option}", first)
    again = predict(config, checkpoint, run_dir / "again", *count, f"--model.init_args.{option}", first)
    b = predict(config, checkpoint, run_dir / "b", *count, f"--model.init_args.{option}", second)
    assert torch.equal(a, again)  # the same seed and options draw the same samples
    assert not torch.equal(a, b), f"--model.init_args.{option} {second} was ignored"
    saved = torch.load(checkpoint, weights_only=True)["hyper_parameters"]
    assert option not in saved  # evaluation options are not part of the model


def test_ddpm_from_the_command_line_is_ddpm(run_dir):
    small = ["--model.init_args.num_timesteps", "20", "--model.init_args.predict_steps", "10"]
    checkpoint = fit_checkpoint("diffusion_moons.yaml", run_dir, *small)
    count = ["--data.init_args.num_predict_samples", "6", *small]
    ddim = predict("diffusion_moons.yaml", checkpoint, run_dir / "ddim", *count)
    ddpm = predict("diffusion_moons.yaml", checkpoint, run_dir / "ddpm", *count,
                   "--model.init_args.predict_sampler", "ddpm", "--model.init_args.predict_steps", "null")
    # predict draws its one batch under the seed seed_everything(0) and index 0 give: 0
    model = Diffusion.load_from_checkpoint(checkpoint)
    torch.manual_seed(0)
    torch.testing.assert_close(ddpm, model.sample(6, sampler="ddpm"))
    torch.manual_seed(0)
    torch.testing.assert_close(ddim, model.sample(6, sampler="ddim", steps=10))


def test_vae_test_importance_samples_from_the_command_line(run_dir):
    checkpoint = fit_checkpoint("vae_8gaussians.yaml", run_dir)
    nll = {}
    for k in ("1", "200"):
        tested = run_cli("test", "--config", str(CONFIGS / "vae_8gaussians.yaml"), *QUICK,
                         "--trainer.callbacks", "[]", "--trainer.limit_test_batches", "2",
                         "--sample_distance.on_test", "false", "--ckpt_path", str(checkpoint),
                         "--model.init_args.test_importance_samples", k)
        assert tested.model.test_importance_samples == int(k)
        nll[k] = float(tested.trainer.callback_metrics["test/nll"])
    assert nll["200"] < nll["1"]  # the IWAE bound tightens with K (Burda et al. 2016, Theorem 1)


# --------------------------------------------------------------- 2. checkpoint of another class
def test_a_checkpoint_of_another_family_is_refused(run_dir, mnist_root):
    gan = fit_checkpoint("gan_mnist.yaml", run_dir, "--model.init_args.base_channels", "4",
                         "--data.init_args.batch_size", "8")
    result = cli("predict", "--config", str(CONFIGS / "vae_mnist.yaml"), *QUICK, "--ckpt_path", str(gan),
                 "--prediction_writer.output_dir", "out", cwd=run_dir)
    message = error_line(result)
    assert "GAN" in message and "VAE" in message
    assert not (run_dir / "out").exists()
    with pytest.raises(Exception, match="GAN"):  # in Python too
        VAE.load_from_checkpoint(gan)


# ----------------------------------------------------------------- 3. last.ckpt is the latest
def test_refitting_overwrites_last_ckpt(run_dir):
    config = str(CONFIGS / "autoencoder_moons.yaml")
    quick = [*QUICK, "--trainer.num_sanity_val_steps", "0", "--trainer.limit_val_batches", "2"]
    run_cli("fit", "--config", config, *quick, "--trainer.max_steps", "2")
    run_cli("fit", "--config", config, *quick, "--trainer.max_steps", "5")
    folder = run_dir / "checkpoints" / "autoencoder_moons"
    assert sorted(path.name for path in folder.glob("last*.ckpt")) == ["last.ckpt"]
    assert torch.load(folder / "last.ckpt", weights_only=True)["global_step"] == 5


def test_last_ckpt_is_the_end_of_the_fit_when_the_monitored_value_stopped_improving(run_dir):
    """A ModelCheckpoint with a monitor (every config's) and save_last: last.ckpt holds the last
    step even when the last validations did not improve the monitored value (Lightning 2.6 then
    leaves last.ckpt at the best step), and the best checkpoint stays the best."""
    config = (CONFIGS / "autoencoder_moons.yaml").read_text()
    assert "        monitor: val/loss\n" in config
    # "epoch" with mode min improves only at the first validation, whatever the losses do.
    (run_dir / "config.yaml").write_text(config.replace(
        "        monitor: val/loss\n", "        monitor: epoch\n        mode: min\n"))
    run_cli("fit", "--config", str(run_dir / "config.yaml"), *QUICK, "--trainer.max_epochs", "3",
            "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
            "--trainer.num_sanity_val_steps", "0")
    folder = run_dir / "checkpoints" / "autoencoder_moons"
    assert sorted(path.name for path in folder.glob("*.ckpt")) == ["epoch=0-step=2.ckpt", "last.ckpt"]
    assert torch.load(folder / "last.ckpt", weights_only=True)["global_step"] == 6
    # resuming from it continues after the last step (no step trained twice)
    resumed = run_cli("fit", "--config", str(run_dir / "config.yaml"), *QUICK, "--trainer.max_epochs", "4",
                      "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
                      "--trainer.num_sanity_val_steps", "0", "--ckpt_path", "last")
    assert resumed.trainer.global_step == 8
    assert torch.load(folder / "last.ckpt", weights_only=True)["global_step"] == 8


# ------------------------------------------------------------------------------- 4. DDP predict
@pytest.mark.slow
@pytest.mark.parametrize("count, batch_size", [(11, 4), (101, 256)])
def test_two_process_predict_gives_every_sample_once_as_one_process_does(count, batch_size, run_dir):
    config = str(CONFIGS / "autoencoder_moons.yaml")
    checkpoint = fit_checkpoint("autoencoder_moons.yaml", run_dir)
    common = ["predict", "--config", config, *QUICK[:6], "--trainer.accelerator", "cpu",
              "--ckpt_path", str(checkpoint), "--data.init_args.num_predict_samples", str(count),
              "--data.init_args.batch_size", str(batch_size)]
    ok(cli(*common, "--trainer.devices", "2", "--trainer.strategy", "ddp",
           "--prediction_writer.output_dir", "two", cwd=run_dir))
    ok(cli(*common, "--trainer.devices", "1", "--prediction_writer.output_dir", "one", cwd=run_dir))
    two = torch.load(run_dir / "two" / "samples.pt")
    one = torch.load(run_dir / "one" / "samples.pt")
    assert two.shape == (count, 2)
    assert len(torch.unique(two, dim=0)) == count  # no sample drawn twice
    torch.testing.assert_close(two, one, rtol=0, atol=1e-6)  # the same draws, in the same order


# ------------------------------------------------------------------------------ 5. divergence
TOY_FAMILIES = {
    "autoencoder": lambda: Autoencoder((2,), latent_dim=2, hidden_dims=(8,), reconstruction_loss="mse"),
    "vae": lambda: VAE((2,), network="mlp", latent_dim=2, hidden_dims=(8,)),
    "gan": lambda: GAN((2,), latent_dim=2, generator_hidden_dims=(8,), discriminator_hidden_dims=(8,)),
    "realnvp": lambda: RealNVP((2,), num_layers=2, hidden_dims=(8,)),
    "diffusion": lambda: Diffusion((2,), num_timesteps=10, mlp=MLPDenoiserConfig(8, 1)),
    "flow_matching": lambda: FlowMatching((2,), mlp=MLPDenoiserConfig(8, 1)),
}


@pytest.mark.parametrize("family", sorted(TOY_FAMILIES))
def test_a_nan_batch_stops_training_with_the_step(family, tmp_path):
    x = torch.randn(64, 2)
    x[20] = float("nan")  # in the third batch of 8
    loader = DataLoader(TensorDataset(x, torch.zeros(64, dtype=torch.long)), batch_size=8)
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, log_every_n_steps=4, default_root_dir=tmp_path,
                        enable_checkpointing=False)
    with pytest.raises(DivergenceError, match="at step"):
        trainer.fit(TOY_FAMILIES[family](), loader)


def test_divergence_exits_non_zero_and_keeps_the_good_last_ckpt(run_dir):
    config = str(CONFIGS / "vae_8gaussians.yaml")
    quick = [*QUICK, "--trainer.num_sanity_val_steps", "0", "--trainer.limit_val_batches", "2"]
    ok(cli("fit", "--config", config, *quick, "--trainer.max_steps", "3", cwd=run_dir))
    last = run_dir / "checkpoints" / "vae_8gaussians" / "last.ckpt"
    good = last.read_bytes()
    result = cli("fit", "--config", config, *quick, "--trainer.max_epochs", "1",
                 "--model.init_args.learning_rate", "1e6", cwd=run_dir)
    assert "diverged" in error_line(result)
    assert last.read_bytes() == good


def test_predict_refuses_non_finite_weights_and_samples(run_dir):
    checkpoint = fit_checkpoint("vae_8gaussians.yaml", run_dir)
    state = torch.load(checkpoint, weights_only=True)
    for tensor in state["state_dict"].values():
        tensor.fill_(float("nan"))
    torch.save(state, checkpoint)
    result = cli("predict", "--config", str(CONFIGS / "vae_8gaussians.yaml"), *QUICK,
                 "--ckpt_path", str(checkpoint), "--prediction_writer.output_dir", "out", cwd=run_dir)
    assert "NaN" in error_line(result)
    assert not (run_dir / "out" / "samples.pt").exists()


# ------------------------------------------------------------------------ 6. untrained weights
def test_predict_needs_trained_weights(run_dir):
    config = str(CONFIGS / "vae_8gaussians.yaml")
    result = cli("predict", "--config", config, *QUICK, cwd=run_dir)
    assert "--ckpt_path" in error_line(result)
    result = cli("predict", "--config", config, *QUICK, "--ckpt_path", "last", cwd=run_dir)
    assert "no last" in error_line(result)


# ------------------------------------------------------------ 7. every shipped config as written
@pytest.mark.parametrize("config", ALL_CONFIGS)
def test_every_config_trains_two_steps_as_written(config, run_dir, mnist_root):
    """The config's own precision, clipping and callbacks; only the sizes of the run are cut."""
    # the FID/KID feature network, a classifier, has its own command: cli.py features fit
    features = config == "mnist_features.yaml"
    command = ["features", "fit"] if features else ["fit"]
    data = []
    if config.endswith("_cifar10.yaml"):  # a few fake CIFAR-10 images (nothing is downloaded)
        write_cifar10(run_dir / "data")
        data = ["--data.init_args.data_dir", str(run_dir / "data"), "--data.init_args.val_size", "4"]
    # bf16-mixed on a CPU without bf16 arithmetic (the pixel transformers' GPU configs) costs
    # about 13x fp32: 117 s against 9 s per CIFAR-10 training step of two images here, so those
    # train on one image a step (the batch norm of other families needs two)
    batch_size = "1" if yaml.safe_load((CONFIGS / config).read_text())["trainer"].get("precision") == "bf16-mixed" else "2"
    # (no sanity check: the validation after the two steps runs the same validation_step)
    # the progress bar a user gets stays on (no config names one: the CLI's TimedProgressBar)
    at = QUICK.index("--trainer.enable_progress_bar")
    with_bar = QUICK[:at] + QUICK[at + 2:]
    fitted = run_cli(*command, "--config", str(CONFIGS / config), *with_bar, "--trainer.max_steps", "2",
                     "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "2",
                     "--trainer.num_sanity_val_steps", "0",
                     "--data.init_args.batch_size", batch_size, *data,
                     *([] if features else ["--sample_logger.num_samples", "4"]))
    assert fitted.trainer.global_step >= 2
    if not features:
        assert type(fitted.trainer.progress_bar_callback) is TimedProgressBar
    # (a WGAN with five critic steps per generator step logs train/d_loss only, in two batches)
    trained = {key: value for key, value in fitted.trainer.callback_metrics.items()
               if key in ("train/loss", "train/d_loss", "train/loss_step")}
    assert trained and all(torch.isfinite(value) for value in trained.values()), trained


BF16_ON_NATIVE_CPU_PRESETS = [config for config in ALL_CONFIGS
                       if yaml.safe_load((CONFIGS / config).read_text()).get("bf16_on_native_cpu")]


@pytest.mark.parametrize("config", BF16_ON_NATIVE_CPU_PRESETS)
def test_presets_with_bf16_on_native_cpu_train_in_bf16_on_a_cpu_with_bf16_arithmetic(config, run_dir, mnist_root,
                                                                                     monkeypatch):
    """The test above runs these presets in the precision this machine's CPU gets; here the
    probes stand for a CPU with AVX512-BF16 and no AMX, so their bf16 path runs as written on any
    machine: the Trainer is bf16-mixed and the networks really compute in bfloat16."""
    assert BF16_ON_NATIVE_CPU_PRESETS  # the GAN, diffusion and flow matching presets set it
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    dtypes = set()
    cli = run_cli("--config", str(CONFIGS / config), *QUICK, "--trainer.max_steps", "2",
                  "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "2",
                  "--trainer.num_sanity_val_steps", "0", "--data.init_args.batch_size", "2",
                  "--sample_logger.num_samples", "4", run=False)
    assert str(cli.trainer.precision) == "bf16-mixed"
    convolutions = [module for module in cli.model.modules() if isinstance(module, torch.nn.Conv2d)]
    for module in convolutions:
        module.register_forward_hook(lambda module, inputs, output: dtypes.add(output.dtype))
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.trainer.global_step >= 2 and torch.bfloat16 in dtypes
    trained = {key: value for key, value in cli.trainer.callback_metrics.items()
               if key in ("train/loss", "train/d_loss")}
    assert trained and all(torch.isfinite(value) for value in trained.values()), trained


def test_bf16_with_gradient_clipping_trains(run_dir):
    fitted = run_cli("fit", "--config", str(CONFIGS / "realnvp_moons.yaml"), *QUICK, *TINY_FIT,
                     "--trainer.precision", "bf16-mixed", "--trainer.callbacks", "[]")
    assert fitted.trainer.gradient_clip_val == 10.0 and fitted.trainer.global_step == 2


# ------------------------------------------------------------------------------------ 8. kills
# The test process's own folder holds signal_helpers.SigtermAt, which the CLI runs load as a callback.
SIGNAL_ENV = {"PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}


def sigterm_fit_options(config: str, steps: int) -> list[str]:
    """A small, validated-every-epoch fit of ``config`` (CSV logs, CPU) for the SIGTERM tests."""
    small = {"diffusion_moons.yaml": ["--model.init_args.mlp.hidden_dim", "16",
                                      "--model.init_args.mlp.num_layers", "1"],
             "vae_8gaussians.yaml": ["--model.init_args.hidden_dims", "[16]"]}[config]
    return ["--config", str(CONFIGS / config), *QUICK, "--trainer.max_steps", str(steps),
            "--trainer.max_epochs", "-1", "--trainer.check_val_every_n_epoch", "1", *small]


@pytest.mark.slow
@pytest.mark.parametrize("config, stage", [("diffusion_moons.yaml", "train"),
                                           ("vae_8gaussians.yaml", "validation")])
def test_sigterm_saves_a_checkpoint_that_resumes_exactly(config, stage, tmp_path):
    """Stop a fit with SIGTERM after training step 100 (diffusion: data order, noise, EMA), or inside
    the first validation after step 100 (the VAE, whose validation draws latents), resume it, and
    compare the weights with an uninterrupted fit of the same number of steps: they must be equal
    bit for bit. Either way the process exits 143 and its last line names the checkpoint saved."""
    steps = 300  # epochs of 78 batches (20000 points, 256 a batch): validations at steps 78, 156, 234
    common = sigterm_fit_options(config, steps)
    name = config.removesuffix(".yaml")
    killed = tmp_path / "killed"
    killed.mkdir()
    stopped = cli("fit", *common, "--trainer.callbacks+=signal_helpers.SigtermAt",
                  "--trainer.callbacks.step", "100", "--trainer.callbacks.stage", stage,
                  cwd=killed, env=SIGNAL_ENV)
    last = killed / "checkpoints" / name / "last.ckpt"
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    assert stopped.stderr.strip().splitlines()[-1] == (
        f"error: stopped by SIGTERM; saved {last} (resume with fit --ckpt_path last)"), stopped.stderr[-3000:]
    stopped_at = torch.load(last, weights_only=True)["global_step"]
    if stage == "train":
        assert stopped_at == 100
    else:  # in the validation at the end of the epoch that holds step 100
        assert stopped_at == 156

    ok(cli("fit", *common, "--ckpt_path", "last", cwd=killed))
    whole = tmp_path / "whole"
    whole.mkdir()
    finished = ok(cli("fit", *common, cwd=whole))
    # both saves (at SIGTERM, at the end of the fit) ask for the whole state, without Lightning's
    # note about a default
    assert "`weights_only` was not set" not in stopped.stderr + finished.stderr
    resumed = torch.load(last, weights_only=True)
    uninterrupted = torch.load(whole / "checkpoints" / name / "last.ckpt", weights_only=True)
    assert resumed["global_step"] == uninterrupted["global_step"] == steps
    for key, tensor in uninterrupted["state_dict"].items():
        assert torch.equal(resumed["state_dict"][key], tensor), key


@pytest.mark.parametrize("case", ["sanity check", "callback off"])
def test_a_sigterm_that_saves_nothing_says_so(case, run_dir):
    """SIGTERM in the sanity check (before any training step), or with checkpoint_on_terminate
    off, exits 143 with a last line that says no checkpoint was saved and why."""
    common = sigterm_fit_options("vae_8gaussians.yaml", 300)
    if case == "sanity check":
        extra = ["--trainer.callbacks.stage", "sanity"]
        expected = "no checkpoint saved (the run was not training"
    else:
        extra = ["--trainer.callbacks.step", "5", "--checkpoint_on_terminate.enabled", "false"]
        expected = "no checkpoint saved: checkpoint_on_terminate is off"
    result = cli("fit", *common, "--trainer.callbacks+=signal_helpers.SigtermAt", *extra,
                 cwd=run_dir, env=SIGNAL_ENV)
    assert result.returncode == 143, result.stderr[-3000:]
    assert expected in result.stderr.strip().splitlines()[-1], result.stderr[-3000:]
    assert not (run_dir / "checkpoints" / "vae_8gaussians" / "last.ckpt").exists()


def test_a_sigterm_during_setup_exits_non_zero(run_dir):
    """A SIGTERM before the Trainer's loop runs ends the process at once with status 143."""
    process = subprocess.Popen(
        [sys.executable, "-c", "import signal, time; from lightning_gen.cli import install_termination_deadline; "
         "install_termination_deadline(); print('ready', flush=True); time.sleep(60)"],
        env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "ready"
    started = time.monotonic()
    process.send_signal(signal.SIGTERM)
    process.communicate(timeout=30)
    assert process.returncode == 143
    assert time.monotonic() - started < 20


# -------------------------------------------------------------- errors as one line (issue 14)
class Payload:
    """Unpickling this runs a shell command: what a malicious checkpoint would carry."""

    def __reduce__(self):
        return (os.system, ("touch payload_ran",))


@pytest.mark.parametrize("content", ["garbage", "empty", "pickle"])
def test_an_unreadable_checkpoint_is_named_and_never_run(content, run_dir):
    path = run_dir / "model.ckpt"
    if content == "garbage":
        path.write_text("not a checkpoint\n")
    elif content == "empty":
        path.write_bytes(b"")
    else:
        torch.save({"state_dict": {}, "payload": Payload()}, path)
    result = cli("predict", "--config", str(CONFIGS / "vae_8gaussians.yaml"), *QUICK,
                 "--ckpt_path", str(path), cwd=run_dir)
    assert f"{path} is not a readable checkpoint" in error_line(result)
    assert not (run_dir / "payload_ran").exists()


def test_a_bad_option_is_one_line_naming_it(run_dir):
    result = cli("fit", "--config", str(CONFIGS / "diffusion_moons.yaml"), *QUICK,
                 "--model.init_args.predict_eta", "-1", cwd=run_dir)
    assert error_line(result) == ("error: predict_eta must be in [0, 1] (0: deterministic DDIM, 1: "
                                  "DDPM's variance), got -1.0")
    assert len(result.stderr.strip().splitlines()) <= 3
    traced = cli("fit", "--config", str(CONFIGS / "diffusion_moons.yaml"), *QUICK,
                 "--model.init_args.predict_eta", "-1", cwd=run_dir, env={"LIGHTNING_GEN_TRACEBACK": "1"})
    assert traced.returncode != 0 and "Traceback" in traced.stderr


def test_an_unwritable_checkpoint_folder_fails_before_training(run_dir):
    (run_dir / "checkpoints").write_text("a file where the folder should be")
    result = cli("fit", "--config", str(CONFIGS / "vae_8gaussians.yaml"), *QUICK, cwd=run_dir)
    assert "checkpoints/vae_8gaussians cannot be written (Not a directory)" in error_line(result)
    assert "Epoch" not in result.stdout + result.stderr


@pytest.mark.parametrize("data, classes", [("moons", 1), ("8gaussians", 2)])
def test_fewer_model_classes_than_data_labels_fail_at_setup(data, classes, run_dir):
    result = cli("fit", "--model", "Diffusion", "--data", "ToyDataModule", "--data.name", data,
                 "--model.num_classes", str(classes), *QUICK, "--trainer.max_steps", "1", cwd=run_dir)
    assert f"built with num_classes={classes}: set --model.init_args.num_classes" in error_line(result)


def test_conditional_gan_with_fewer_classes_than_mnist_fails_at_setup(run_dir, mnist_root):
    result = cli("fit", "--config", str(CONFIGS / "gan_mnist.yaml"), *QUICK, "--model.init_args.num_classes",
                 "5", "--trainer.max_steps", "1", cwd=run_dir)
    assert "the data has 10 classes" in error_line(result)


def test_a_second_smaller_predict_leaves_no_stale_images(run_dir):
    checkpoint = fit_checkpoint("vae_mnist.yaml", run_dir, "--data.init_args.batch_size", "8")
    out = run_dir / "out"
    (out).mkdir()
    (out / "notes.txt").write_text("the user's own file")
    predict("vae_mnist.yaml", checkpoint, out, "--data.init_args.num_predict_samples", "64")
    predict("vae_mnist.yaml", checkpoint, out, "--data.init_args.num_predict_samples", "10")
    names = sorted(path.name for path in out.iterdir())
    assert names == [f"{i:06d}.png" for i in range(10)] + ["grid.png", "notes.txt", "samples.pt"]
    assert torch.load(out / "samples.pt").shape == (10, 1, 28, 28)


@pytest.mark.parametrize("eta", [-1.0, 50.0])
def test_eta_outside_zero_one_is_refused_at_construction_and_sampling(eta):
    with pytest.raises(ValueError, match=r"predict_eta must be in \[0, 1\]"):
        Diffusion((2,), num_timesteps=10, mlp=MLPDenoiserConfig(8, 1), predict_eta=eta)
    model = Diffusion((2,), num_timesteps=10, mlp=MLPDenoiserConfig(8, 1))
    with pytest.raises(ValueError, match=r"eta must be in \[0, 1\]"):
        model.sample(2, eta=eta)


def test_a_missing_checkpoint_is_named(run_dir):
    result = cli("test", "--config", str(CONFIGS / "vae_8gaussians.yaml"), *QUICK,
                 "--ckpt_path", "nowhere.ckpt", cwd=run_dir)
    assert error_line(result) == "error: checkpoint nowhere.ckpt does not exist"


def test_a_step_that_outlasts_the_grace_period_is_cut_short(run_dir):
    """While a run holds SIGTERM (as Lightning's handler does, calling ours too, then waiting for
    the batch to end), a step that never ends is cut short after LIGHTNING_GEN_TERM_GRACE seconds."""
    script = ("import signal, time\n"
              "from lightning_gen.cli import install_termination_deadline\n"
              "install_termination_deadline()\n"
              "ours = signal.getsignal(signal.SIGTERM)\n"
              "signal.signal(signal.SIGTERM, lambda signum, frame: ours(signum, frame))  # a run's handler\n"
              "print('ready', flush=True)\n"
              "time.sleep(60)  # a step that does not end\n")
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env={**os.environ, "PYTHONPATH": str(REPO),
                                               "LIGHTNING_GEN_TERM_GRACE": "1"})
    assert process.stdout.readline().strip() == "ready"
    started = time.monotonic()
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == 143 and "did not stop within 1 s" in stderr
    assert 0.9 < time.monotonic() - started < 20


# ------------------------------------------------------------------ multi-node (issue 18, item 1)
def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def two_nodes(*args: str, cwd: Path, succeed: bool = True, env: dict | None = None) -> list[str]:
    """``cli.py ARGS`` as 2 nodes x 1 process, each node started by torchrun as a cluster launcher
    would (``--nnodes 2 --node-rank R`` with a loopback master address), on a shared folder.
    Returns each node's stderr; ``succeed`` asks every node to exit 0 (else: non-zero)."""
    port = free_port()
    environment = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "offline", **(env or {})}
    nodes = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
         "--node-rank", str(rank), "--master-addr", "127.0.0.1", "--master-port", str(port),
         str(REPO / "cli.py"), *args, "--trainer.num_nodes", "2", "--trainer.devices", "1",
         "--trainer.strategy", "ddp", "--trainer.accelerator", "cpu"],
        cwd=cwd, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for rank in range(2)]
    errors = []
    for node in nodes:
        _, stderr = node.communicate(timeout=300)
        assert (node.returncode == 0) == succeed, stderr[-3000:]
        errors.append(stderr)
    return errors


@pytest.mark.slow
def test_two_nodes_train_validate_and_predict_as_one_process_does(run_dir):
    config = str(CONFIGS / "autoencoder_moons.yaml")
    logs = ["--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir", "logs",
            "--trainer.enable_progress_bar", "false"]
    two_nodes("fit", "--config", config, *logs, "--trainer.logger.name", "fit", "--trainer.max_steps", "3",
              "--trainer.num_sanity_val_steps", "0", cwd=run_dir)
    folder = run_dir / "checkpoints" / "autoencoder_moons"
    assert sorted(path.name for path in folder.glob("last*.ckpt")) == ["last.ckpt"]  # one writer
    checkpoint = folder / "last.ckpt"
    assert torch.load(checkpoint, weights_only=True)["global_step"] == 3

    two_nodes("validate", "--config", config, *logs, "--trainer.logger.name", "nodes",
              "--ckpt_path", str(checkpoint), cwd=run_dir)
    ok(cli("validate", "--config", config, *logs, "--trainer.logger.name", "single", "--trainer.devices", "1",
           "--trainer.accelerator", "cpu", "--ckpt_path", str(checkpoint), cwd=run_dir))
    from test_cli import read_metrics

    nodes = read_metrics(run_dir / "logs" / "nodes" / "version_0" / "metrics.csv")["val/loss"]
    single = read_metrics(run_dir / "logs" / "single" / "version_0" / "metrics.csv")["val/loss"]
    assert nodes == pytest.approx(single, rel=1e-5)

    predict_args = ["--config", config, *logs, "--ckpt_path", str(checkpoint),
                    "--data.init_args.num_predict_samples", "11", "--data.init_args.batch_size", "4"]
    two_nodes("predict", *predict_args, "--prediction_writer.output_dir", "nodes_out", cwd=run_dir)
    ok(cli("predict", *predict_args, "--trainer.devices", "1", "--trainer.accelerator", "cpu",
           "--prediction_writer.output_dir", "single_out", cwd=run_dir))
    on_nodes = torch.load(run_dir / "nodes_out" / "samples.pt")
    assert len(torch.unique(on_nodes, dim=0)) == 11
    torch.testing.assert_close(on_nodes, torch.load(run_dir / "single_out" / "samples.pt"), rtol=0, atol=1e-6)


@pytest.mark.slow
def test_two_nodes_stopped_by_sigterm_inside_a_validation_resume_exactly(tmp_path):
    """SIGTERM reaches every process of a 2-node fit (as SLURM's --signal does) inside the first
    validation after step 20: each process exits 143 naming last.ckpt, rank 0 has written it at
    the last training step, and the 2-node fit resumed from it ends with the weights of an
    uninterrupted 2-node fit, bit for bit."""
    common = sigterm_fit_options("vae_8gaussians.yaml", 120)
    killed = tmp_path / "killed"
    killed.mkdir()
    errors = two_nodes("fit", *common, "--trainer.callbacks+=signal_helpers.SigtermAt",
                       "--trainer.callbacks.step", "20", "--trainer.callbacks.stage", "validation",
                       cwd=killed, succeed=False, env=SIGNAL_ENV)
    last = killed / "checkpoints" / "vae_8gaussians" / "last.ckpt"
    for stderr in errors:  # each worker's own last line, then torchrun's report of its exit status
        assert f"error: stopped by SIGTERM; saved {last} (resume with fit --ckpt_path last)" in stderr
        assert "exitcode  : 143" in stderr, stderr[-3000:]
    # 20000 points in 256-point batches on 2 processes: 39 steps an epoch, validated at its end.
    assert torch.load(last, weights_only=True)["global_step"] == 39

    two_nodes("fit", *common, "--ckpt_path", "last", cwd=killed)
    whole = tmp_path / "whole"
    whole.mkdir()
    two_nodes("fit", *common, cwd=whole)
    resumed = torch.load(last, weights_only=True)
    uninterrupted = torch.load(whole / "checkpoints" / "vae_8gaussians" / "last.ckpt", weights_only=True)
    assert resumed["global_step"] == uninterrupted["global_step"] == 120
    for key, tensor in uninterrupted["state_dict"].items():
        assert torch.equal(resumed["state_dict"][key], tensor), key

