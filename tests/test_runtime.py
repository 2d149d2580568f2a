"""lightning_gen.runtime: the NVML probe that Lightning's import switches on is dropped only where
it cannot succeed, and then an optimizer step stops opening a library it cannot find."""

from __future__ import annotations

import ctypes
import os

import pytest
import torch

import lightning_gen  # noqa: F401  (its import is what drops the variable)
from lightning_gen import runtime
from lightning_gen.base import adamw

NVML_OPENS = runtime.nvml_can_be_opened()


def library_opens_per_step(monkeypatch, steps: int = 3) -> float:
    """``ctypes.CDLL`` calls per step of the project's AdamW on one parameter."""
    opened = []
    real_cdll = ctypes.CDLL

    def counting_cdll(name, *args, **kwargs):
        opened.append(name)
        return real_cdll(name, *args, **kwargs)

    parameter = torch.nn.Parameter(torch.zeros(4))
    optimizer = adamw([parameter], lr=1e-3)
    parameter.grad = torch.ones(4)
    optimizer.step()
    monkeypatch.setattr(ctypes, "CDLL", counting_cdll)
    for _ in range(steps):
        optimizer.step()
    monkeypatch.setattr(ctypes, "CDLL", real_cdll)
    return len(opened) / steps


@pytest.fixture
def variable_set(monkeypatch):
    monkeypatch.setenv(runtime.NVML_CHECK_VARIABLE, "1")  # as Lightning's import sets it


def test_the_variable_is_dropped_where_nvml_cannot_be_opened(monkeypatch, variable_set):
    monkeypatch.setattr(runtime, "nvml_can_be_opened", lambda: False)
    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: True)
    monkeypatch.setattr(torch.version, "hip", None)
    assert runtime.skip_nvml_probe_without_driver()
    assert runtime.NVML_CHECK_VARIABLE not in os.environ


@pytest.mark.parametrize("case", ["nvml opens", "cpu-only torch", "rocm torch"])
def test_the_variable_is_kept_where_the_probe_can_succeed_or_is_not_made(monkeypatch, variable_set, case):
    monkeypatch.setattr(runtime, "nvml_can_be_opened", lambda: case == "nvml opens")
    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: case != "cpu-only torch")
    monkeypatch.setattr(torch.version, "hip", "6.0" if case == "rocm torch" else None)
    assert not runtime.skip_nvml_probe_without_driver()
    assert os.environ[runtime.NVML_CHECK_VARIABLE] == "1"


def test_a_variable_the_user_set_otherwise_is_left_alone(monkeypatch):
    monkeypatch.setenv(runtime.NVML_CHECK_VARIABLE, "0")
    monkeypatch.setattr(runtime, "nvml_can_be_opened", lambda: False)
    assert not runtime.skip_nvml_probe_without_driver()
    assert os.environ[runtime.NVML_CHECK_VARIABLE] == "0"


def test_torch_answers_the_same_with_and_without_the_variable(monkeypatch, variable_set):
    with_probe = (torch.cuda.is_available(), torch.cuda.device_count())
    monkeypatch.delenv(runtime.NVML_CHECK_VARIABLE)
    assert (torch.cuda.is_available(), torch.cuda.device_count()) == with_probe


# The real library calls: they exist only with a CUDA-built torch on a machine without the NVIDIA
# driver (this project's CPU machines and CI). Elsewhere the decision itself is still tested, by
# the mocked cases above.
@pytest.mark.skipif(NVML_OPENS, reason="the NVIDIA management library opens here, so the probe is kept "
                    "(decision tested by the mocked 'nvml opens' case)")
@pytest.mark.skipif(not torch.backends.cuda.is_built(), reason="a CPU-only torch makes no probe "
                    "(decision tested by the mocked 'cpu-only torch' case)")
def test_an_optimizer_step_opens_no_library_once_the_probe_is_dropped(monkeypatch, variable_set):
    # With Lightning's variable, each step of torch's AdamW tries to open the library and fails.
    assert library_opens_per_step(monkeypatch) >= 1
    assert runtime.skip_nvml_probe_without_driver()
    assert library_opens_per_step(monkeypatch) == 0
