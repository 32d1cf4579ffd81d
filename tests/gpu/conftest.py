"""tests/gpu: run on a CUDA machine (bench/gpu/check.sh runs them there); skipped with a reason
everywhere else. `STARS_REQUIRE_KERNELS=1` (set by check.sh) turns a missing extension into a
failure instead of a skip."""
from __future__ import annotations

import os

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    why = "needs a CUDA device" + ("" if torch.version.cuda else f" (torch {torch.__version__} is a CPU build)")
    for item in items:
        if "tests/gpu/" in str(item.fspath).replace(os.sep, "/"):
            item.add_marker(pytest.mark.skip(reason=why))


@pytest.fixture(scope="session")
def native():
    """torch.ops.stars_scale_cuda (the built extension)."""
    from stars_scale.kernels.extension import cuda_ops, why_unavailable

    ops = cuda_ops()
    if ops is None:
        msg = f"the CUDA extension is not available: {why_unavailable()}"
        if os.environ.get("STARS_REQUIRE_KERNELS") == "1":
            pytest.fail(msg)
        pytest.skip(msg + " (build it, or set STARS_KERNELS_JIT=1)")
    return ops
