"""Where a model runs: mixed precision, the attention kernel that suits it, and torch's threads."""
from __future__ import annotations

import contextlib

import torch


def autocast(device: torch.device, precision: str):
    """Mixed precision for a forward pass: "fp32" runs as is; "bf16"/"fp16" under torch.autocast."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype)


def attention_kernels(device: torch.device, precision: str):
    """Scaled-dot-product attention on the math kernel for bf16 on CPU; otherwise PyTorch's choice.

    PyTorch's CPU flash-attention kernel is built for long sequences. At a student's 25–65 tokens
    and 32-wide heads its backward pass is slow under bf16 autocast, and the math kernel makes the
    whole bf16 step faster; in fp32 the flash kernel is no slower, so fp32 keeps it.
    `benchmarks/train_step.py` measures both steps under this setting."""
    if torch.device(device).type != "cpu" or precision != "bf16":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH])


@contextlib.contextmanager
def torch_threads(n: int):
    """Run with `n` intra-op threads, then restore the count. torch's setting is process-wide, so a
    training run left at 1 thread would otherwise slow (and change the float sums of) whatever runs
    next in the same process: an in-process executor's later steps, or the caller's own code."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
