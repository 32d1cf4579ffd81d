"""stars_scale: distributed pretraining of looped language models with STARS.

CPU installs must pin torch==2.13.0 (the `cpu` extra does): an unpinned torch pulls a
multi-GB CUDA build. On GPU clusters install the CUDA torch first, then `.[gpu]`.
"""
import os
import sys

from setuptools import find_packages, setup

CORE = [
    "numpy>=1.24",
    "pyyaml>=6",
    "pydantic>=2",  # config.py validates the run config with it
    "tqdm>=4.60",
    "matplotlib>=3.7",
    "mlflow==3.17.2",
    "psutil>=5.9",
    "megatron-core==0.16.1",
    "deepspeed==0.19.8",
    "webdataset==1.0.2",
    "tokenizers>=0.19",
    "safetensors>=0.4",
]



def cuda_extension_kwargs() -> dict:
    """Build csrc/ as `stars_scale._C` when a CUDA toolkit and a CUDA torch are both present.

    Anywhere else (CPU machines, pip's isolated build env without torch) print why and build
    the pure-Python package: the kernels then run as their PyTorch references. On a GPU cluster:
    `pip install --no-build-isolation -e .` after installing the CUDA torch (STARS_NO_CUDA_EXT=1
    skips the build).
    """
    def skip(why: str) -> dict:
        print(f"stars_scale: not building the CUDA kernels ({why}); they run as PyTorch references",
              file=sys.stderr)
        return {}

    if os.environ.get("STARS_NO_CUDA_EXT") == "1":
        return skip("STARS_NO_CUDA_EXT=1")
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        return skip("torch is not importable in this build environment; use pip install --no-build-isolation")
    if torch.version.cuda is None:
        return skip(f"torch {torch.__version__} is a CPU build")
    if CUDA_HOME is None:
        return skip("no CUDA toolkit (nvcc) found; set CUDA_HOME")
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "stars_scale", "kernels"))
    from extension import NVCC_FLAGS, SOURCES  # noqa: E402  (the one list of sources and flags)

    ext = CUDAExtension("stars_scale._C", [os.path.join("csrc", s) for s in SOURCES],
                        define_macros=[("STARS_PYTHON_MODULE", None)],
                        extra_compile_args={"cxx": ["-O3"], "nvcc": list(NVCC_FLAGS)})
    return {"ext_modules": [ext], "cmdclass": {"build_ext": BuildExtension}}


setup(
    name="stars_scale",
    version="0.1.0",
    description="Distributed pretraining of looped (recurrent-depth) LMs with the STARS regulariser",
    packages=find_packages(include=["stars_scale", "stars_scale.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.4"] + CORE,
    extras_require={
        "cpu": ["torch==2.13.0"],
        # flash-attn ships as an sdist that needs CUDA and a CUDA torch to build.
        "flash": ["flash-attn>=2.6"],
        # lm-evaluation-harness for `stars-eval lm` (pinned: the StarsLM adapter follows its LM API)
        "eval": ["lm-eval==0.4.13"],
        # csrc/ builds with torch.utils.cpp_extension, which wants ninja (setup.py and the JIT path).
        "gpu": ["ninja>=1.11"],
        "dev": ["pytest>=8", "pytest-timeout>=2.3", "transformers>=4.45", "lm-eval==0.4.13", "hypothesis>=6.100"],
    },
    **cuda_extension_kwargs(),
    entry_points={
        "console_scripts": [
            "stars-train=stars_scale.cli.train:main",
            "stars-eval=stars_scale.cli.eval:main",
            "stars-generate=stars_scale.cli.generate:main",
            "stars-data=stars_scale.cli.data:main",
            "stars-convert=stars_scale.cli.convert:main",
            "stars-plan=stars_scale.cli.plan:main",
            "stars-launch=stars_scale.cli.launch:main",
        ]
    },
)
