"""Process-wide settings that cost training time and change nothing else.

``skip_nvml_probe_without_driver``: importing Lightning sets ``PYTORCH_NVML_BASED_CUDA_CHECK=1``
(so that asking whether CUDA is available does not initialise CUDA before a fork). Under that
variable every ``torch.cuda.is_available()`` of a CUDA build of torch first opens the NVIDIA
management library (``libnvidia-ml.so.1``), and torch's Adam and AdamW ask it on every
``optimizer.step()``. On a machine without the NVIDIA driver (a laptop or CI runner with the
default Linux wheel of torch) the library is absent, the open fails each time, and torch falls
back to the CUDA runtime's own count (``torch._C._cuda_getDeviceCount``), which is what it
calls without the variable. On this project's 2-core CPU the failed open took 50 µs per call
alone and 0.15-0.7 ms per optimizer step in training loops (``benchmarks/results/throughput.md``,
"The NVML probe"). Where the library cannot be opened, dropping the variable gives the same
answer without that cost; where it can (a machine with NVIDIA GPUs) the variable is kept.
"""

from __future__ import annotations

import ctypes
import os

import torch

NVML_CHECK_VARIABLE = "PYTORCH_NVML_BASED_CUDA_CHECK"
#: The library torch's NVML probe opens (``torch.cuda._raw_device_count_nvml``).
NVML_LIBRARY = "libnvidia-ml.so.1"


def nvml_can_be_opened() -> bool:
    try:
        ctypes.CDLL(NVML_LIBRARY)
    except OSError:
        return False
    return True


def skip_nvml_probe_without_driver() -> bool:
    """Drop ``PYTORCH_NVML_BASED_CUDA_CHECK`` when torch would try NVML, fail, and fall back
    anyway (a CUDA build of torch on a machine without the NVIDIA management library); True
    when it was dropped. ROCm builds probe AMD's library instead and are left alone."""
    if os.environ.get(NVML_CHECK_VARIABLE) != "1" or not torch.backends.cuda.is_built() or torch.version.hip:
        return False
    if nvml_can_be_opened():
        return False
    del os.environ[NVML_CHECK_VARIABLE]
    return True
