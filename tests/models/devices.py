"""What the backends should pick on this host: the model tests run unchanged on
a CPU (CI) and on an NVIDIA GPU (``scripts/gpu_check.sh``)."""

from __future__ import annotations


def expected_device() -> str:
    """The device a backend places a model on when its settings leave it open."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def expected_transformers_dtype() -> str:
    """fp32 on a CPU; bf16 on a GPU that has it, else fp16."""
    import torch

    if not torch.cuda.is_available():
        return "float32"
    return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
