"""Command-line value types shared by the benchmark scripts.

    parser.add_argument("--steps", type=count, default=10)

A bad value stops the script at parsing with argparse's usage line, e.g.
``error: argument --steps: must be an integer >= 1, got '0'``.
"""

from __future__ import annotations

import argparse


def count(text: str) -> int:
    """An integer of at least 1 (steps, repeats, batch size, images)."""
    return bounded_int(text, 1)


def count_or_zero(text: str) -> int:
    """An integer of at least 0 (where 0 turns a part off, or means torch's default)."""
    return bounded_int(text, 0)


def apply_threads(threads: int) -> None:
    """``--threads`` (a count_or_zero): torch's CPU threads, 0 keeping torch's default."""
    if threads:
        import torch

        torch.set_num_threads(threads)


def feature_network_file(parser: argparse.ArgumentParser, given: str | None) -> str:
    """``--feature-network`` (or the default checkpoint) if it exists; otherwise argparse's usage
    line with how to train one (``mnist_feature_network_file``)."""
    from lightning_gen.callbacks.quality import mnist_feature_network_file

    try:
        return mnist_feature_network_file(given)
    except FileNotFoundError as error:
        parser.error(str(error))


def bounded_int(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < minimum:
        raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {text!r}")
    return value
