"""Finding the compiled CUDA extension (`csrc/`): built by setup.py, or JIT-compiled.

The extension registers its kernels as `torch.ops.stars_scale_cuda.*` (CUDA dispatch key only).
It is looked for once, on first use, and only where torch has CUDA:

1. `stars_scale._C`, which `pip install -e .` builds when nvcc and a CUDA torch are present;
2. with `STARS_KERNELS_JIT=1`, a JIT build of `csrc/` by `torch.utils.cpp_extension.load`
   (ninja; cached under `$TORCH_EXTENSIONS_DIR`), for development.

`cuda_ops()` is the op namespace or None; `why_unavailable()` says in one line why not.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

CSRC = Path(__file__).resolve().parents[2] / "csrc"
SOURCES = ("ops.cpp", "add_norm.cu", "activation.cu", "rope.cu", "xent.cu", "probe.cu")
ARCH_FLAGS = ("-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90")
NVCC_FLAGS = ("-O3", "--use_fast_math", "--expt-relaxed-constexpr", *ARCH_FLAGS)

_state: dict = {}


def _load() -> tuple[object | None, str]:
    if not torch.cuda.is_available():
        return None, "torch has no CUDA device here" + ("" if torch.version.cuda else " (a CPU build of torch)")
    try:
        import stars_scale._C  # noqa: F401  (registers torch.ops.stars_scale_cuda)
        return torch.ops.stars_scale_cuda, ""
    except ImportError as e:
        reason = f"stars_scale._C is not built ({e})"
    if os.environ.get("STARS_KERNELS_JIT") == "1":
        try:
            jit_build(verbose=os.environ.get("STARS_KERNELS_VERBOSE") == "1")
            return torch.ops.stars_scale_cuda, ""
        except Exception as e:  # a failed compile is reported, not raised, on the auto path
            reason = f"the JIT build of csrc/ failed: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
    return None, reason


def jit_build(verbose: bool = False) -> None:
    """Compile csrc/ now (ninja) and load it into this process."""
    from torch.utils.cpp_extension import load

    load(name="stars_scale_cuda_jit", sources=[str(CSRC / s) for s in SOURCES], extra_cflags=["-O3"],
         extra_cuda_cflags=list(NVCC_FLAGS), is_python_module=False, verbose=verbose)


def cuda_ops():
    """torch.ops.stars_scale_cuda when the extension is loaded (on a CUDA machine), else None."""
    if "ops" not in _state:
        _state["ops"], _state["why"] = _load()
    return _state["ops"]


def why_unavailable() -> str:
    cuda_ops()
    return _state["why"]
