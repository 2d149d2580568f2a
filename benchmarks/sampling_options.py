"""Score sampling options of one MNIST checkpoint: which ``predict_*`` settings draw the most
recognisable digits from weights that are already trained (no training here).

Each ``--option`` is one set of the model's evaluation options (its ``EVALUATION_OPTIONS``, as
``name=value`` separated by spaces; an empty string: the model's defaults). For each set the
checkpoint is loaded with those values, ``--samples`` samples are drawn with the options
``predict`` uses (``predict_options``), under seed 0, and scored with the MNIST classifier
(``lightning_gen.metrics.digit_scores``: confidence = mean maximum softmax, with its standard
error; label entropy of the predicted-label histogram; real test digits: 0.99 and 2.29), with
their FID against the 10,000 test digits in the same network's features (as
``benchmarks/laptop.py`` scores a preset's samples):

    python benchmarks/sampling_options.py benchmarks/runs/laptop/flow_matching_mnist/checkpoints/cpu/flow_matching_mnist/last.ckpt \\
        --samples 500 --option "predict_sampler=heun predict_steps=10" --option "predict_sampler=heun predict_steps=25"

Prints a markdown table (and appends it to ``--output`` if given). The feature network defaults
to $LIGHTNING_GEN_FEATURE_NETWORK or checkpoints/mnist_features/last.ckpt.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the benchmarks' shared helpers
from arguments import apply_threads, count, count_or_zero, feature_network_file  # noqa: E402

from lightning_gen.cli import checkpoint_class, read_checkpoint, resolve_class  # noqa: E402
from laptop import samples_fid, test_digit_features  # noqa: E402

from lightning_gen.metrics import digit_scores, load_feature_network, load_mnist_classifier  # noqa: E402

BATCH = 250


def parse_option_set(text: str, allowed: tuple[str, ...]) -> dict:
    """``"a=1 b=heun"`` -> ``{"a": 1, "b": "heun"}`` (values read as YAML scalars)."""
    options = {}
    for item in text.split():
        name, equals, value = item.partition("=")
        if not equals or name not in allowed:
            raise ValueError(f"--option {text!r}: {item!r} is not name=value with a name in {allowed}")
        options[name] = yaml.safe_load(value)
    return options


def model_class(checkpoint: Path):
    """The GenerativeModule class a checkpoint of this project was saved from."""
    saved = checkpoint_class(read_checkpoint(checkpoint))
    cls = resolve_class(saved) if saved else None
    if cls is None:
        raise ValueError(f"{checkpoint} is not a checkpoint of a lightning_gen model (class: {saved!r})")
    return cls


@torch.no_grad()
def draw(model, num_samples: int) -> torch.Tensor:
    """``num_samples`` samples with predict's options, in [0, 1], under seed 0."""
    torch.manual_seed(0)
    options = model.predict_options()
    batches = [model.sample(min(BATCH, num_samples - start), **options) for start in range(0, num_samples, BATCH)]
    return torch.cat(batches).float().clamp(0, 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--option", action="append", default=None,
                        help='one set of evaluation options, e.g. "predict_steps=25" (repeatable)')
    parser.add_argument("--samples", type=count, default=500)
    parser.add_argument("--threads", type=count_or_zero, default=0, help="CPU threads (0: torch's default)")
    parser.add_argument("--feature-network", default=None)
    parser.add_argument("--output", type=Path, default=None, help="append the table to this file")
    args = parser.parse_args(argv)
    if args.samples < 2:
        parser.error("--samples must be >= 2")
    if not args.checkpoint.is_file():
        parser.error(f"no checkpoint at {args.checkpoint}")
    feature_network = feature_network_file(parser, args.feature_network)
    apply_threads(args.threads)
    cls = model_class(args.checkpoint)
    try:
        option_sets = [parse_option_set(text, cls.EVALUATION_OPTIONS) for text in args.option or [""]]
    except ValueError as error:
        parser.error(str(error))
    scorer = load_mnist_classifier(feature_network)
    features = load_feature_network(feature_network)
    real, _ = test_digit_features(features, feature_network)
    lines = [f"`{args.checkpoint}` ({cls.__name__}), {args.samples} samples, seed 0:", "",
             "| options | confidence | s.e. | label entropy | FID | seconds |", "|---|---:|---:|---:|---:|---:|"]
    for options in option_sets:
        model = cls.load_from_checkpoint(args.checkpoint, map_location="cpu", **options).eval()
        start = time.perf_counter()
        images = draw(model, args.samples)
        seconds = time.perf_counter() - start
        if tuple(images.shape[1:]) != (1, 28, 28):
            parser.error(f"{cls.__name__} draws {tuple(images.shape[1:])}, not MNIST digits (1, 28, 28)")
        scores = digit_scores(images, scorer)
        fid = samples_fid(real, features, images)
        described = " ".join(f"{name}={value}" for name, value in options.items()) or "(defaults)"
        entropy = scores.label_entropy + 0.0  # -0.0 (one label) shown as 0.000
        lines.append(f"| {described} | {scores.confidence:.3f} | {scores.confidence_standard_error:.3f} "
                     f"| {entropy:.3f} | {fid:.1f} | {seconds:.0f} |")
        print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.output is not None:
        with args.output.open("a") as handle:
            handle.write("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
