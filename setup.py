"""stars_scale: distributed pretraining of looped language models with STARS.

CPU installs must pin torch==2.13.0 (the `cpu` extra does): an unpinned torch pulls a
multi-GB CUDA build. On GPU clusters install the CUDA torch first, then `.[gpu]`.
"""
from setuptools import find_packages, setup

CORE = [
    "numpy>=1.24",
    "pyyaml>=6",
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
        "dev": ["pytest>=8", "pytest-timeout>=2.3", "transformers>=4.45", "lm-eval==0.4.13", "hypothesis>=6.100"],
    },
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
