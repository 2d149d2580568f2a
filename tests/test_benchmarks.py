"""The benchmark scripts run at a tiny size, so an API change cannot leave them broken."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest

from cli_helpers import REPO, load_benchmark


def test_throughput_script_measures_every_family(mnist_root):
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "throughput.py"), "--size", "small", "--batch-size", "4",
         "--steps", "1", "--warmup-steps", "1", "--repeats", "1", "--sample-count", "2", "--threads", "1"],
        env={**os.environ, "PYTHONPATH": str(REPO), "LIGHTNING_GEN_DATA": str(mnist_root)},
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line.split("|")[1:-1] for line in result.stdout.splitlines()
            if line.startswith("| ") and not line.startswith("| family")]
    # (the script prints its table as it goes, then whole)
    assert {row[0].strip() for row in rows} == {
        "autoencoder", "vae", "gan", "pixelcnn", "pixeltransformer", "realnvp", "diffusion", "flow_matching"}
    for row in rows:  # Lightning img/s, plain img/s, ratio, sampling img/s: all measured
        assert all(float(cell) > 0 for cell in row[2:]), row


def test_hook_costs_script_times_each_bookkeeping_path():
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "hook_costs.py"), "--calls", "1000",
                             "--log-calls", "10", "--ema-calls", "10"],
                            env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    timed = dict(line.rsplit(": ", 1) for line in result.stdout.splitlines())
    assert list(timed) == ["nn.Module.__setattr__ of _current_fx_name",
                           "GenerativeModule.__setattr__ of _current_fx_name",
                           "GenerativeModule.__setattr__ of another attribute",
                           "with PassThroughProfiler().profile(name)", "with NullProfiler().profile(name)",
                           "self.log of a progress-bar step value in a training step",
                           "weight-average update, tiny U-Net (146 tensors)",
                           "weight-average update, the config's U-Net (246 tensors)"]
    assert all(value.endswith(" us") and float(value.removesuffix(" us")) > 0 for value in timed.values())


@pytest.mark.parametrize("channels_last", [False, True])
def test_cpu_bf16_script_times_both_precisions_of_the_laptop_presets(tmp_path, channels_last):
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "cpu_bf16.py"), "--families", "gan_mnist", "diffusion_mnist",
         "--batch-size", "2", "--steps", "1", "--repeats", "1", "--threads", "1"]
        + (["--channels-last"] if channels_last else []),
        env={**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "offline"}, cwd=tmp_path,
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("CPU: ")
    assert ("channels_last weights" in result.stdout.splitlines()[0]) == channels_last
    rows = [line.split("|")[1:-1] for line in result.stdout.splitlines()
            if line.startswith("| ") and not line.startswith("| preset")]
    assert [row[0].strip() for row in rows] == ["gan_mnist", "diffusion_mnist"]
    for row in rows:  # batch, fp32 ms, bf16 ms, speed-up: all measured
        assert int(row[1]) == 2 and all(float(cell) > 0 for cell in row[2:]), row


def test_loader_script_measures_the_cache_and_torchvision(tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "loader.py"), "--num-images", "40", "--image-size", "8",
         "--batch-size", "8", "--workers", "0", "--threads", "1", "--scratch", str(tmp_path),
         "--output", str(tmp_path / "loader.md")],
        env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line.split("|")[1:-1] for line in (tmp_path / "loader.md").read_text().splitlines()
            if line.startswith("| ") and not line.startswith("| loader")]
    assert [row[0].strip() for row in rows] == ["ImageFolderDataModule (uint8 cache)",
                                                "torchvision ImageFolder + DataLoader"]
    for row in rows:  # epoch 1 and 2 img/s (and, for the data module, from the cache): measured
        assert all(float(cell) > 0 for cell in row[2:] if cell.strip() != "-"), row
    assert len(list(tmp_path.glob("images_40_v1/class_*/*"))) == 40  # the generated folder
    assert len(list((tmp_path / "cache").glob("imagefolder-*.pt"))) == 1


def test_transformer_tokens_script_times_every_token_size(tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "transformer_tokens.py"), "--token-sizes", "1", "4",
         "--batch-size", "2", "--steps", "1", "--repeats", "1", "--sample-count", "1", "--threads", "1",
         "--output", str(tmp_path / "tokens.md")],
        env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line.split("|")[1:-1] for line in (tmp_path / "tokens.md").read_text().splitlines()
            if line.startswith("| ") and not line.startswith("| token_size")]
    assert [(row[0].strip(), row[1].strip()) for row in rows] == [("1", "784"), ("4", "196")]
    for row in rows:  # training and sampling ms per image: measured
        assert float(row[3]) > 0 and float(row[4]) > 0, row


def test_gpu_check_runs_every_part_at_a_tiny_size(tmp_path, mnist_root):
    """The prepared GPU command, at a tiny size on the CPU: every part measured, the JSON and the
    table written; a missing diffusers stops it before anything runs unless it is skipped."""
    environment = {**os.environ, "PYTHONPATH": str(REPO), "LIGHTNING_GEN_DATA": str(mnist_root),
                   "OMP_NUM_THREADS": "1"}
    script = str(REPO / "benchmarks" / "gpu_check.py")
    if importlib.util.find_spec("diffusers") is None:
        refused = subprocess.run([sys.executable, script, "--tiny", "--device", "cpu", "--output-dir", str(tmp_path)],
                                 env=environment, capture_output=True, text=True, timeout=120)
        assert refused.returncode != 0 and "pip install -e '.[bench]'" in refused.stderr
        assert not (tmp_path / "gpu_check.json").exists()
    result = subprocess.run(
        [sys.executable, script, "--tiny", "--device", "cpu", "--skip-diffusers", "--compile-backend", "aot_eager",
         "--output-dir", str(tmp_path)],
        env=environment, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "gpu_check.json").read_text())
    assert not [row for part in ("throughput", "compile", "fits") for row in results[part] if "error" in row]
    measured = {(row["family"], row["precision"]) for row in results["throughput"]}
    assert measured == {(family, precision) for family in
                        ("autoencoder", "vae", "gan", "pixelcnn", "pixeltransformer", "realnvp", "diffusion",
                         "flow_matching") for precision in ("32-true", "bf16-mixed")}
    assert all(row["lightning_images_per_s"] > 0 and row["plain_images_per_s"] > 0
               and row["cli_trainer_images_per_s"] > 0 for row in results["throughput"])
    assert [(row["compile"], row["backend"]) for row in results["compile"]] == [(False, "-"), (True, "aot_eager")]
    assert [row["family"] for row in results["fits"]] == ["vae", "gan", "diffusion"]
    assert all(row["steps"] > 0 and math.isfinite(row["fid"]) and math.isfinite(row["fid_floor"])
               for row in results["fits"])
    assert len({row["fid_floor"] for row in results["fits"]}) == 1  # the data's, computed once
    assert all(math.isfinite(row["test_nll_nats"]) and row["test_nll_nats"] > 0  # a bound on -log p
               for row in results["fits"] if row["family"] != "gan")
    table = (tmp_path / "gpu_check.md").read_text()
    assert "| flow_matching | bf16-mixed |" in table and "cli.py's Trainer img/s" in table


def test_gpu_check_times_the_cli_trainer_without_its_bar_when_asked(tmp_path, mnist_root):
    """--cli-without-bar: part 1 has a fourth side, cli.py's Trainer with the progress bar off,
    in the JSON and as two more columns of the table."""
    environment = {**os.environ, "PYTHONPATH": str(REPO), "LIGHTNING_GEN_DATA": str(mnist_root),
                   "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--tiny", "--device", "cpu", "--skip-diffusers",
         "--parts", "throughput", "--families", "vae", "--cli-without-bar", "--output-dir", str(tmp_path)],
        env=environment, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads((tmp_path / "gpu_check.json").read_text())["throughput"]
    assert [(row["family"], row["precision"]) for row in rows] == [("vae", "32-true"), ("vae", "bf16-mixed")]
    for row in rows:
        assert row["cli_no_bar_images_per_s"] > 0 and len(row["cli_no_bar_runs_images_per_s"]) == 1
        assert row["cli_no_bar_ratio"] == pytest.approx(row["cli_no_bar_images_per_s"] / row["plain_images_per_s"])
    table = (tmp_path / "gpu_check.md").read_text()
    assert "same, no progress bar, img/s" in table
    line = next(line for line in table.splitlines() if line.startswith("| vae | 32-true |"))
    assert line.count("|") == 11 and f"{rows[0]['cli_no_bar_ratio']:.3f}" in line


def test_step_overhead_rows_without_the_weight_average():
    """--without-ema adds diffusion and flow matching built without their average, the same
    network otherwise, after the other rows."""
    step_overhead = load_benchmark("step_overhead")
    assert step_overhead.row_names(["vae", "diffusion", "flow_matching"], no_bare=True, without_ema=True) == [
        "vae", "diffusion", "flow_matching", "diffusion without EMA", "flow_matching without EMA"]
    assert step_overhead.row_names(["gan"], without_ema=True) == [*step_overhead.BARE, "gan"]
    for family in ("diffusion", "flow_matching"):
        averaged = step_overhead.build_model(family, "tiny")
        plain = step_overhead.build_model(family + step_overhead.WITHOUT_EMA, "tiny")
        assert averaged.ema is not None and plain.ema is None
        assert [p.shape for p in averaged.network.parameters()] == [p.shape for p in plain.network.parameters()]


def test_gpu_check_keeps_measuring_after_a_failure_and_saves_every_row():
    """One broken measurement leaves a row with its traceback and costs no other figure; a part
    that cannot set up leaves one such row; the results are saved after every row; past the
    deadline the rest are rows that say so."""
    gpu_check = load_benchmark("gpu_check")

    def broken():
        raise ValueError("the bf16 kernel is missing")

    def no_setup():
        raise ImportError("no module named diffusers")

    parts = {"throughput": lambda: [({"family": "vae"}, lambda: {"ratio": 0.9}),
                                    ({"family": "gan"}, broken),
                                    ({"family": "diffusion"}, lambda: {"ratio": 0.8})],
             "diffusers": no_setup,
             "fits": lambda: [({"family": "vae"}, lambda: {"fid": 12.0})]}
    results, saved = {}, []
    failures = gpu_check.run_parts(parts, results, lambda r: saved.append(json.loads(json.dumps(r))))
    assert failures == 2
    assert [row.get("ratio") for row in results["throughput"]] == [0.9, None, 0.8]
    assert results["throughput"][1]["family"] == "gan"
    assert "ValueError: the bf16 kernel is missing" in results["throughput"][1]["error"]
    assert len(results["diffusers"]) == 1 and "no module named diffusers" in results["diffusers"][0]["error"]
    assert results["fits"] == [{"family": "vae", "fid": 12.0}]
    assert [len(state.get("throughput", [])) for state in saved] == [1, 2, 3, 3, 3]

    results = {}
    failures = gpu_check.run_parts(parts, results, lambda r: None, deadline=0.0)
    assert failures == 5 and all(row["error"] == "not measured: the run reached --time-limit"
                                 for part in ("throughput", "fits") for row in results[part])


def test_gpu_check_times_enough_steps_but_no_more_than_an_epoch_holds():
    gpu_check = load_benchmark("gpu_check")
    assert gpu_check.timed_step_count(20, 0.5, 0.050, 100) == 20  # 20 steps of 50 ms: 1 s already
    assert gpu_check.timed_step_count(20, 0.5, 0.003, 200) == 167  # 3 ms steps: 0.5 s needs 167
    assert gpu_check.timed_step_count(20, 0.5, 0.001, 112) == 112  # capped at the epoch's batches
    assert gpu_check.timed_step_count(20, 0.0, 0.001, 112) == 20


def test_gpu_check_exits_non_zero_with_the_failed_rows_in_its_table(tmp_path, mnist_root):
    """Past --time-limit nothing more is measured: every row says so, in the JSON and the
    table, and the command fails naming how many."""
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--tiny", "--device", "cpu",
         "--skip-diffusers", "--time-limit", "0", "--output-dir", str(tmp_path)],
        env={**os.environ, "PYTHONPATH": str(REPO), "LIGHTNING_GEN_DATA": str(mnist_root)},
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert "gpu_check: 21 measurement(s) failed" in result.stderr  # 16 throughput, 2 compile, 3 fits
    results = json.loads((tmp_path / "gpu_check.json").read_text())
    assert sum(len(results[part]) for part in ("throughput", "compile", "fits")) == 21
    table = (tmp_path / "gpu_check.md").read_text()
    assert "**Failed: 21 measurement(s)**" in table
    assert "| realnvp | bf16-mixed | | failed: not measured: the run reached --time-limit |" in table


def test_gpu_check_repeats_the_chosen_part_and_families_with_the_order_reversed(tmp_path, mnist_root):
    """--parts, --families and --repeats: only the throughput of the named family, each side run
    --repeats times, the median in the table and every run in the JSON."""
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--tiny", "--device", "cpu",
         "--parts", "throughput", "--families", "autoencoder", "--repeats", "3", "--min-timed-seconds", "0.02",
         "--output-dir", str(tmp_path)],
        env={**os.environ, "PYTHONPATH": str(REPO), "LIGHTNING_GEN_DATA": str(mnist_root), "OMP_NUM_THREADS": "1"},
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "gpu_check.json").read_text())
    assert not {"diffusers", "fits", "compile"} & set(results)
    assert [(row["family"], row["precision"]) for row in results["throughput"]] == [
        ("autoencoder", "32-true"), ("autoencoder", "bf16-mixed")]
    for row in results["throughput"]:
        assert row["timed_steps"] >= 1
        for side in ("lightning", "plain", "cli_trainer"):
            runs = row[f"{side}_runs_images_per_s"]
            assert len(runs) == 3 and all(rate > 0 for rate in runs)
            assert row[f"{side}_images_per_s"] == sorted(runs)[1]
        assert row["ratio"] == row["lightning_images_per_s"] / row["plain_images_per_s"]
    assert "medians of 3 runs of each side" in (tmp_path / "gpu_check.md").read_text()


def test_rgb_fits_script_fits_and_predicts_through_the_command_line(tmp_path):
    """The RGB fit benchmark for one cheap family: 2 steps on a 40-image generated folder, the
    table row written and the predict grid copied beside it, a real image with varying pixels."""
    import numpy as np
    from PIL import Image

    loader = load_benchmark("loader")
    root = loader.make_folder(tmp_path / "images", 40)  # 32 train, 4 val, 4 test images
    output = tmp_path / "results" / "rgb_fits.md"
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "rgb_fits.py"), "--families", "vae", "--steps", "2",
         "--batch-size", "8", "--predict-samples", "4", "--root", str(root), "--scratch", str(tmp_path / "scratch"),
         "--output", str(output)],
        env={**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "offline"},
        capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line.split("|")[1:-1] for line in output.read_text().splitlines()
            if line.startswith("| ") and not line.startswith("| family")]
    assert len(rows) == 1
    family, config, overrides, steps, batch, step_s, images_per_s, fit_s, samples, predict_s, grid = (
        cell.strip() for cell in rows[0])
    assert (family, config, steps, batch, samples) == ("vae", "`configs/vae_cifar10.yaml`", "2", "8", "4")
    assert "--data.init_args.batch_size 8" in overrides
    assert float(step_s.split()[0]) > 0 and float(images_per_s) > 0 and float(fit_s) > 0
    assert all(float(part) > 0 for part in predict_s.split("/"))
    assert grid == "[png](rgb_fits_vae.png)"
    with Image.open(tmp_path / "results" / "rgb_fits_vae.png") as image:
        image.verify()
    with Image.open(tmp_path / "results" / "rgb_fits_vae.png") as image:
        pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    tile = pixels[2:34, 2:34]  # the first sample (the grid pads with 2 white pixels)
    assert tile.shape == (32, 32, 3) and tile.std() > 0
    assert (tmp_path / "scratch" / "vae" / "checkpoints" / "last.ckpt").is_file()


def test_count_options_refuse_zero_and_non_integers_at_parsing():
    import argparse

    sys.path.insert(0, str(REPO / "benchmarks"))
    from arguments import count, count_or_zero

    assert count("3") == 3 and count_or_zero("0") == 0
    for bad, parse in (("0", count), ("-1", count_or_zero), ("2.5", count), ("x", count_or_zero)):
        try:
            parse(bad)
        except argparse.ArgumentTypeError as error:
            assert repr(bad) in str(error)
        else:
            raise AssertionError(f"{parse.__name__}({bad!r}) was accepted")


def test_a_benchmark_script_stops_at_a_zero_count_with_a_usage_line():
    """The shared type in use: the script exits 2 before measuring anything, naming the option."""
    for script, mode, option, value, minimum in (("transformer_tokens.py", [], "--steps", "0", 1),
                                                 ("loader.py", [], "--workers", "-1", 0),
                                                 ("gan.py", ["mnist"], "--batch-size", "0", 1),
                                                 ("diffusion.py", ["speed"], "--threads", "-1", 0),
                                                 ("flow.py", [], "--num-layers", "2.5", 1),
                                                 ("vae.py", [], "--test-size", "0", 1)):
        result = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *mode, option, value],
                                env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
                                timeout=120)
        assert result.returncode == 2, result.stderr[-2000:]
        assert result.stderr.splitlines()[-1].endswith(
            f"argument {option}: must be an integer >= {minimum}, got '{value}'"), result.stderr[-2000:]


def test_scoring_scripts_without_the_feature_network_say_how_to_train_it(tmp_path, capsys):
    """laptop.py, flow_matching.py and sampling_options.py check the MNIST classifier through
    arguments.feature_network_file before any fit or sampling: argparse's usage line (exit 2)
    naming the command that trains it. laptop.py runs as a user would (one process start: the
    other two scripts cost 15 s each here for the same call); the helper in-process."""
    import argparse

    sys.path.insert(0, str(REPO / "benchmarks"))
    from arguments import feature_network_file

    missing = tmp_path / "no_features.ckpt"
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "laptop.py"), "--families", "vae_mnist",
                             "--scratch", str(tmp_path / "scratch"), "--feature-network", str(missing)],
                            env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.splitlines()[-1]
    assert f"no MNIST feature network at {missing}" in last and "features fit" in last, last
    assert not (tmp_path / "scratch").exists()  # nothing was fitted

    parser = argparse.ArgumentParser(prog="script.py")
    try:
        feature_network_file(parser, str(missing))
    except SystemExit as stop:
        assert stop.code == 2
    else:
        raise AssertionError("a missing feature network was accepted")
    assert f"no MNIST feature network at {missing}" in capsys.readouterr().err
    present = tmp_path / "features.ckpt"
    present.write_bytes(b"")
    assert feature_network_file(parser, str(present)) == str(present)


def step_segments(mnist_root, family: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "step_segments.py"), "--family", family, "--size", "tiny",
         "--batch-size", "2", "--steps", "3", "--warmup-steps", "1", "--threads", "1"],
        env={**os.environ, "PYTHONPATH": str(REPO), "LIGHTNING_GEN_DATA": str(mnist_root)},
        capture_output=True, text=True, timeout=300)


def test_step_segments_script_splits_both_steps_into_parts_that_add_up(mnist_root):
    result = step_segments(mnist_root, "vae")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {cells[0]: cells[1:] for cells in (
        [cell.strip() for cell in line.split("|")[1:-1]] for line in result.stdout.splitlines()
        if line.startswith("| ") and not line.startswith("| segment"))}
    assert len(rows) == 11 and "whole step" in rows
    parts = [cells for name, cells in rows.items() if name != "whole step"]
    trainer_total, plain_total = float(rows["whole step"][0]), float(rows["whole step"][1])
    # each cell is rounded to the µs: the ten Trainer parts and five plain parts, within that
    assert sum(float(cells[0]) for cells in parts) == pytest.approx(trainer_total, abs=5.01)
    assert sum(float(cells[1]) for cells in parts if cells[1] != "-") == pytest.approx(plain_total, abs=2.51)
    assert float(rows["loss()"][0]) > 0 and float(rows["backward (and its hooks)"][1]) > 0
    assert "minor page faults per step: Trainer" in result.stdout and "self.log:" in result.stdout


def test_step_segments_script_refuses_manual_optimization_in_one_line(mnist_root):
    result = step_segments(mnist_root, "gan")
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1].startswith("error: gan steps its optimizers by hand")
