"""Running the command line inside the test process (fast) and checking what it writes."""

from __future__ import annotations

from pathlib import Path

from lightning_gen.cli import main

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"

# Keep CLI tests small and quiet: CSV logs instead of W&B, no progress bars, CPU.
# Note: pass batch limits as integers >= 2 ("1" parses as the float 1.0, i.e. 100% of the batches).
QUICK = ["--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir", "logs",
         "--trainer.enable_progress_bar", "false", "--trainer.accelerator", "cpu", "--trainer.devices", "1"]


def run_cli(*args: str, run: bool = True):
    """``python cli.py ARGS`` in this process; returns the LightningCLI object (``run=False``:
    instantiated, not run)."""
    return main(list(args), run=run)


def fit_and_predict(config: str, work_dir: Path, *extra: str, predict_extra: tuple[str, ...] = ()) -> Path:
    """fit a config for two steps, then predict from the saved checkpoint; returns the output folder."""
    config_path = str(CONFIGS / config)
    checkpoint = work_dir / "model.ckpt"
    cli = run_cli("fit", "--config", config_path, *QUICK, "--trainer.max_steps", "2",
                  "--trainer.limit_val_batches", "2", "--trainer.num_sanity_val_steps", "0",
                  "--trainer.callbacks", "[]", *extra)
    cli.trainer.save_checkpoint(checkpoint)
    output_dir = work_dir / "predictions"
    run_cli("predict", "--config", config_path, *QUICK, "--trainer.callbacks", "[]",
            "--ckpt_path", str(checkpoint), "--prediction_writer.output_dir", str(output_dir),
            *extra, *predict_extra)
    return output_dir
