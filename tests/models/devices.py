"""What the backends should pick on this host: the model tests run unchanged on
a CPU (CI) and on an NVIDIA GPU (``scripts/gpu_check.sh``)."""

from __future__ import annotations


def expected_device() -> str:
    """The device type a backend places a model on when its settings leave it open."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def device_type(described: object) -> str:
    """The type of a device as a backend describes it ("cuda:0" and "cuda" alike)."""
    import torch

    return torch.device(str(described)).type


def expected_transformers_dtype() -> str:
    """fp32 on a CPU; bf16 on a GPU that computes in it natively (compute
    capability 8.0 on: Ampere, Hopper), fp16 on older GPUs, where bf16 is emulated."""
    import torch

    if not torch.cuda.is_available():
        return "float32"
    major, _ = torch.cuda.get_device_capability()
    return "bfloat16" if major >= 8 else "float16"
