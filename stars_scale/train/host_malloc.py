"""glibc malloc settings for the host (CPU) side of a training process.

PyTorch's CPU tensors come from glibc malloc, and two of its defaults decide what a CPU training
step costs at small sizes:

- blocks above the *mmap threshold* get a fresh `mmap` and are unmapped again on free, so every
  page of them is faulted in and zero-filled by the kernel on first touch;
- after frees, the top of the heap is handed back to the kernel past the *trim threshold*
  (128 KiB), so the next step faults the same pages in again.

A training step allocates and frees the same few hundred activation-sized blocks (0.5–2 MB at
the arithmetic scale) every step, and with the defaults a large share of the elementwise work,
above all in the regulariser's double backward, is page faults. `keep_freed_memory()` pins
the mmap threshold at glibc's maximum (32 MiB) and raises the trim threshold, so freed blocks stay
in the process and are reused: the resident set stays at the step's peak instead of shrinking
between steps. `bench/step.py --malloc system|tuned` measures the difference.

Measuring peak memory wants the opposite (`return_freed_memory()`): blocks served by mmap and
returned on free, so the resident high-water mark is the step's own peak.
"""
from __future__ import annotations

import ctypes
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 << 20  # glibc refuses larger values on 64-bit
KEEP_TRIM_THRESHOLD = 1 << 30


def _mallopt(param: int, value: int) -> bool:
    """True when glibc accepted the setting; False off Linux/glibc (musl, macOS) or when refused."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        fn = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return fn(param, value) == 1


def keep_freed_memory(mmap_threshold: int = MMAP_THRESHOLD_MAX, trim_threshold: int = KEEP_TRIM_THRESHOLD) -> bool:
    """Keep freed host memory in the process for reuse (training speed). True when applied."""
    return _mallopt(M_MMAP_THRESHOLD, mmap_threshold) and _mallopt(M_TRIM_THRESHOLD, trim_threshold)


def return_freed_memory(mmap_threshold: int = 65536) -> bool:
    """Serve large blocks by mmap and return them to the OS on free (memory measurement: glibc
    otherwise raises the threshold after each free, keeps freed blocks resident and the
    high-water mark drifts). True when applied."""
    return _mallopt(M_MMAP_THRESHOLD, mmap_threshold)
