"""megatron_tlt: Megatron-style RL training for reasoning LLMs with an online-trained drafter (TLT).

CPU install (tests, the tiny demo):  pip install -e ".[test]"  --  pin the CPU torch first (see README).
GPU users keep their own CUDA torch; `pip install -e ".[gpu]"` adds flash-attn / Transformer Engine.
"""
from setuptools import find_packages, setup

setup(
    name="megatron_tlt",
    version="0.1.0",
    description="Megatron-style RL training with speculative rollouts and an adaptive drafter trained on idle ranks",
    packages=find_packages(include=["megatron_tlt", "megatron_tlt.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.5",
        "megatron-core>=0.13,<0.17",
        "omegaconf>=2.3",
        "safetensors>=0.4",
        "tokenizers>=0.19",
        "transformers>=4.45",
        "pyyaml",
        "numpy",
        "tqdm",
        "matplotlib",
        "tensorboard",
        "math-verify>=0.9.0,<0.10",  # the math reward's LaTeX -> sympy equivalence (rl/verifiers.py)
    ],
    extras_require={
        "test": ["pytest>=7", "import-linter>=2.1",
                 "triton; platform_system == 'Linux' and platform_machine == 'x86_64'"],  # tests/test_kernels.py, interpreted
        "parquet": ["pyarrow"],
        "wandb": ["wandb"],
        "gpu": ["flash-attn", "transformer-engine[pytorch]"],
    },
    entry_points={"console_scripts": ["megatron-tlt=megatron_tlt.cli:main"]},
)
