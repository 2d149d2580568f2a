"""Laptop presets (configs/cpu/) and how their samples are scored (metrics.digit_scores).

The presets train two steps as written in test_reliability.test_every_config_trains_two_steps_as_written
(its config list includes configs/cpu/); here: what the presets promise (they stop on time by
themselves, on the CPU), the scoring on real digits and on non-digits, and benchmarks/laptop.py
end to end at a tiny size.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
import yaml

from cli_helpers import CONFIGS, REPO
from datamodules import MNISTDataModule
from lightning_gen.metrics import MNISTClassifier, digit_scores

PRESETS = sorted((CONFIGS / "cpu").glob("*.yaml"))


@pytest.fixture(scope="module")
def classifier(mnist_root) -> MNISTClassifier:
    """A small MNIST classifier trained for 250 steps here (~96% test accuracy), in eval mode."""
    torch.manual_seed(0)
    model = MNISTClassifier(base_channels=8, feature_dim=32, dropout=0.1)
    data = MNISTDataModule(batch_size=128, download=False)
    data.setup("fit")
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step, (x, y) in enumerate(data.train_dataloader()):
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step == 250:
            break
    return model.eval()


@pytest.fixture(scope="module")
def test_digits(mnist_root) -> tuple[torch.Tensor, torch.Tensor]:
    data = MNISTDataModule(download=False)
    data.setup("test")
    return data.test_set.images[:1000].unsqueeze(1), data.test_set.labels[:1000]  # uint8, int


def test_presets_cover_every_image_family_and_stop_on_time_on_the_cpu():
    families = {path.stem: yaml.safe_load(path.read_text()) for path in PRESETS}
    assert set(families) == {"gan_mnist", "diffusion_mnist", "flow_matching_mnist", "pixelcnn_mnist",
                             "pixeltransformer_mnist", "vae_mnist"}
    for name, config in families.items():
        trainer = config["trainer"]
        assert trainer["max_time"] == "00:00:10:00" and trainer["max_epochs"] == -1, name
        assert trainer["accelerator"] == "cpu", name
        # fp32 unless the CPU computes in bf16 (bf16_on_native_cpu): elsewhere bf16 is emulated
        assert trainer["precision"] == "32-true", name
        assert config.get("bf16_on_native_cpu", False) in (True, False), name
        # no max_steps: a schedule sized by a step count would be cut at a machine-dependent
        # point, so a cosine follows the time spent (GenerativeModule.configure_optimizers)
        assert "max_steps" not in trainer, name
        assert config["model"]["init_args"].get("lr_schedule", "constant") in ("constant", "cosine"), name
        assert config["data"]["class_path"] == "datamodules.MNISTDataModule", name
    # diffusion and flow matching are compared with the same network and budget
    networks = [families[name]["model"]["init_args"]["unet"] for name in ("diffusion_mnist", "flow_matching_mnist")]
    assert networks[0] == networks[1]


def test_digit_scores_are_high_on_real_digits(classifier, test_digits):
    images, labels = test_digits
    scores = digit_scores(images, classifier.network)
    assert scores.confidence >= 0.9 and scores.label_entropy >= 2.2
    assert scores.recognisable()
    assert sum(scores.label_counts) == 1000
    # the histogram is of predicted labels: close to the true one for a good classifier
    true_counts = torch.bincount(labels, minlength=10)
    assert (torch.tensor(scores.label_counts) - true_counts).abs().sum() < 150
    # float images in [0, 1] score as their uint8 form does
    assert digit_scores(images.float() / 255, classifier.network) == scores


def test_digit_scores_are_low_on_non_digits(classifier, test_digits):
    images, _ = test_digits
    generator = torch.Generator().manual_seed(0)
    noise = torch.rand(1000, 1, 28, 28, generator=generator)
    blank = torch.zeros(1000, 1, 28, 28)
    blurred = F.avg_pool2d(images.float() / 255, 7, stride=1, padding=3)
    one_digit = images[:1].expand(1000, -1, -1, -1)  # a collapsed model: one confident digit
    real = digit_scores(images, classifier.network)
    for name, fake in [("noise", noise), ("blank", blank), ("blurred", blurred), ("one digit", one_digit)]:
        scores = digit_scores(fake, classifier.network)
        assert not scores.recognisable(), (name, scores)
        assert scores.confidence < real.confidence or scores.label_entropy < 1.0, (name, scores)
    assert digit_scores(one_digit, classifier.network).label_entropy == 0.0
    assert digit_scores(noise, classifier.network).label_entropy < 1.5
    assert digit_scores(blurred, classifier.network).confidence < real.confidence - 0.1


def test_the_confidence_standard_error_is_the_spread_of_the_mean_between_draws(classifier, test_digits):
    images, _ = test_digits
    blurred = F.avg_pool2d(images.float() / 255, 5, stride=1, padding=2)  # a spread of confidences, as samples have
    scores = digit_scores(blurred, classifier.network)
    assert 0.003 < scores.confidence_standard_error < 0.03
    # bootstrap: the means of 200 resamples (with replacement) of the 1,000 images' largest softmax
    # (the classifier run once; a resample's confidence is the mean of its images' values) spread
    # by the standard error
    with torch.no_grad():
        largest = classifier.network.eval()(blurred).softmax(dim=1).max(dim=1).values
    assert float(largest.mean()) == pytest.approx(scores.confidence, abs=1e-6)
    generator = torch.Generator().manual_seed(0)
    means = torch.stack([largest[torch.randint(len(largest), (len(largest),), generator=generator)].mean()
                         for _ in range(200)])
    assert float(means.std()) == pytest.approx(scores.confidence_standard_error, rel=0.2)
    # one image has no spread to estimate
    assert math.isnan(digit_scores(blurred[:1], classifier.network).confidence_standard_error)


def test_label_agreement_says_whether_conditional_samples_are_the_digits_asked_for(classifier, test_digits):
    images, labels = test_digits
    asked = digit_scores(images, classifier.network, labels=labels)
    # the fraction of images the classifier reads as their label: its accuracy on them (about 0.97
    # after the fixture's 250 steps, which vary with the CPU's arithmetic and thread count)
    with torch.no_grad():
        read = classifier.network(images.float() / 255).argmax(1)
    assert asked.label_agreement == pytest.approx(float((read == labels).float().mean()), abs=1e-6)
    assert asked.label_agreement > 0.9
    # the same images drawn "for" other digits: the model ignored its labels
    shuffled = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))]
    assert digit_scores(images, classifier.network, labels=shuffled).label_agreement < 0.2
    # confidence and entropy do not depend on the labels
    unlabelled = digit_scores(images, classifier.network)
    assert unlabelled.label_agreement is None  # no labels given
    assert (asked.confidence, asked.label_entropy) == (unlabelled.confidence, unlabelled.label_entropy)
    with pytest.raises(ValueError, match="one label per image"):
        digit_scores(images, classifier.network, labels=labels[:10])


def test_label_entropy_of_a_uniform_histogram_is_log_ten(classifier, test_digits):
    images, labels = test_digits
    predicted = classifier.network(images.float() / 255).argmax(1)
    # 50 correctly classified images of each digit: a uniform histogram
    chosen = torch.cat([torch.nonzero((labels == d) & (predicted == d))[:50, 0] for d in range(10)])
    scores = digit_scores(images[chosen], classifier.network)
    assert scores.label_counts == (50,) * 10
    assert math.isclose(scores.label_entropy, math.log(10), rel_tol=1e-9)


def test_digit_scores_refuse_what_is_not_a_set_of_digits(classifier):
    with pytest.raises(ValueError, match=r"\(N, 1, 28, 28\)"):
        digit_scores(torch.rand(4, 3, 32, 32), classifier.network)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        digit_scores(torch.rand(4, 1, 28, 28) * 2, classifier.network)
    with pytest.raises(ValueError, match="no images"):
        digit_scores(torch.rand(0, 1, 28, 28), classifier.network)
    with pytest.raises(ValueError, match="NaN"):
        digit_scores(torch.full((2, 1, 28, 28), float("nan")), classifier.network)


def test_laptop_benchmark_fits_predicts_and_scores_a_preset(classifier, mnist_root, tmp_path):
    checkpoint = tmp_path / "classifier.ckpt"
    torch.save({"state_dict": classifier.state_dict(), "hyper_parameters": dict(classifier.hparams),
                "pytorch-lightning_version": L.__version__}, checkpoint)
    output = tmp_path / "results" / "laptop.md"
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "laptop.py"), "--families", "vae_mnist",
         "--minutes", "0.1", "--num-samples", "20", "--feature-network", str(checkpoint),
         "--scratch", str(tmp_path / "runs"), "--output", str(output)],
        env={**os.environ, "LIGHTNING_GEN_DATA": str(mnist_root), "LIGHTNING_GEN_CACHE": str(tmp_path / "cache")},
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line.split("|")[1:-1] for line in output.read_text().splitlines() if line.startswith("| vae_mnist")]
    assert len(rows) == 1
    (family, steps, fit_minutes, predict_seconds, confidence, standard_error, entropy, agreement, fid, met, load,
     gflops, stolen, precision) = (c.strip() for c in rows[0])
    assert precision == "32-true"  # the VAE preset as written
    assert float(load) >= 0 and float(gflops) > 0
    if Path("/proc/stat").exists():
        assert 0 <= float(stolen.rstrip("%")) <= 100
    else:
        assert stolen == "-"
    assert int(steps) >= 1 and 0 < float(fit_minutes) < 3 and float(predict_seconds) > 0
    assert agreement == "-"  # an unconditional preset: no labels to agree with
    assert 0.1 <= float(confidence) <= 1 and 0 <= float(entropy) <= math.log(10) + 1e-6
    assert 0 < float(standard_error) < 0.2  # 20 samples of max softmax in [0.1, 1]
    assert float(fid) > 0 and met in ("yes", "no")
    assert "max_time overridden to 0.1 minutes" in output.read_text()
    grid = Path(output.parent / "laptop_vae_mnist.png")
    from torchvision.io import read_image

    pixels = read_image(str(grid))
    assert pixels.shape[1] > 28 and pixels.float().std() > 0

    # --predict-only: the same checkpoint, predicted again with another option, no fit
    first_samples = torch.load(tmp_path / "runs" / "vae_mnist" / "outputs" / "cpu" / "vae_mnist" / "samples.pt")
    again = tmp_path / "again" / "laptop.md"
    script = [sys.executable, str(REPO / "benchmarks" / "laptop.py"), "--families", "vae_mnist",
              "--num-samples", "20", "--feature-network", str(checkpoint), "--scratch", str(tmp_path / "runs")]
    environment = {**os.environ, "LIGHTNING_GEN_DATA": str(mnist_root), "LIGHTNING_GEN_CACHE": str(tmp_path / "cache")}
    result = subprocess.run(script + ["--predict-only", "--predict-args=--model.init_args.predict_temperature 0.5",
                                      "--output", str(again)], env=environment, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    row = next(line.split("|")[1:-1] for line in again.read_text().splitlines() if line.startswith("| vae_mnist"))
    row = [c.strip() for c in row]
    assert row[1] == steps and row[2] == "-" and float(row[3]) > 0  # the earlier fit's steps; no fit here
    assert row[10:] == ["-", "-", "-", "-"]  # no fit: no load, speed, stolen share or fit precision
    assert "predict only" in again.read_text() and "predict_temperature 0.5" in again.read_text()
    second_samples = torch.load(tmp_path / "runs" / "vae_mnist" / "outputs" / "cpu" / "vae_mnist" / "samples.pt")
    assert second_samples.shape == first_samples.shape and not torch.equal(second_samples, first_samples)
    missing = subprocess.run(script[:-1] + [str(tmp_path / "elsewhere"), "--predict-only", "--output", str(again)],
                             env=environment, capture_output=True, text=True, timeout=300)
    assert missing.returncode == 1 and "--predict-only: no checkpoint" in missing.stderr
    both = subprocess.run(script + ["--predict-only", "--minutes", "1"], capture_output=True, text=True, timeout=120)
    assert both.returncode == 2 and "--predict-only runs no fit" in both.stderr


def test_laptop_benchmark_measures_the_machines_speed(monkeypatch, tmp_path):
    sys.path.insert(0, str(REPO / "benchmarks"))
    import laptop

    assert laptop.stolen_share((100, 1000), (400, 2000)) == 0.3  # 300 of 1,000 ticks stolen
    assert laptop.stolen_share(None, (400, 2000)) is None and laptop.stolen_share((1, 5), (1, 5)) is None
    assert laptop.reference_gflops(size=64, products=2, repeats=3) > 0
    # /proc/stat's first line: user nice system idle iowait irq softirq steal guest guest_nice
    stat = tmp_path / "stat"
    stat.write_text("cpu  100 0 50 800 10 0 5 35 0 0\ncpu0 50 0 25 400 5 0 2 17 0 0\n")
    real_path = laptop.Path
    monkeypatch.setattr(laptop, "Path", lambda name: stat if name == "/proc/stat" else real_path(name))
    assert laptop.cpu_times() == (35, 1000)
    stat.unlink()
    assert laptop.cpu_times() is None  # no /proc/stat (macOS, Windows): the column says '-'


def test_laptop_benchmark_refuses_an_unknown_preset(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "laptop.py"), "--families", "gan_cifar10"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "no preset configs/cpu/<name>.yaml for ['gan_cifar10']" in result.stderr


def test_sampling_options_scores_each_option_set_of_a_checkpoint(classifier, mnist_root, tmp_path):
    """benchmarks/sampling_options.py loads a fitted checkpoint once per option set and scores
    predict's samples with those options: the averaged and the trained generator of a GAN draw
    different samples, so their scores differ; an option the model does not have is refused."""
    from lightning_gen import GAN

    feature_network = tmp_path / "classifier.ckpt"
    torch.save({"state_dict": classifier.state_dict(), "hyper_parameters": dict(classifier.hparams),
                "pytorch-lightning_version": L.__version__}, feature_network)
    model = GAN(network="dcgan", base_channels=8, ema_decay=0.5)
    data = MNISTDataModule(batch_size=16, download=False)
    trainer = L.Trainer(max_steps=6, limit_val_batches=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    trainer.fit(model, datamodule=data)
    checkpoint = tmp_path / "gan.ckpt"
    trainer.save_checkpoint(checkpoint)
    output = tmp_path / "options.md"
    script = [sys.executable, str(REPO / "benchmarks" / "sampling_options.py"), str(checkpoint),
              "--feature-network", str(feature_network)]
    result = subprocess.run(script + ["--samples", "64", "--option", "predict_use_ema=true",
                                      "--option", "predict_use_ema=false", "--output", str(output)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line.split("|")[1:-1] for line in output.read_text().splitlines() if line.startswith("| predict_")]
    assert [row[0].strip() for row in rows] == ["predict_use_ema=True", "predict_use_ema=False"]
    scores = [(float(row[1]), float(row[2]), float(row[3])) for row in rows]
    assert all(0.1 <= confidence <= 1 and 0 < standard_error < 0.2 and 0 <= entropy <= math.log(10) + 1e-6
               for confidence, standard_error, entropy in scores)
    assert all(float(row[4]) > 0 for row in rows)  # FID against the test digits: measured, never 0
    # the option reaches the samples (scores of a six-step GAN may coincide; its samples may not)
    sys.path.insert(0, str(REPO / "benchmarks"))
    import sampling_options

    cls = sampling_options.model_class(checkpoint)
    samples = [sampling_options.draw(cls.load_from_checkpoint(checkpoint, map_location="cpu", **options).eval(), 16)
               for options in (sampling_options.parse_option_set(f"predict_use_ema={value}", cls.EVALUATION_OPTIONS)
                               for value in ("true", "false"))]
    assert cls is GAN and samples[0].shape == (16, 1, 28, 28) and not torch.equal(samples[0], samples[1])
    refused = subprocess.run(script + ["--option", "predict_temperature=0.5"], capture_output=True, text=True,
                             timeout=300)
    assert refused.returncode == 2 and "'predict_temperature=0.5' is not name=value with a name in" in refused.stderr
