"""Input checks and launch helpers shared by the Triton launchers."""

from __future__ import annotations

import contextlib
import os

import torch
import triton

from baerase.errors import InputError

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def check_tensors(op: str, **tensors: torch.Tensor) -> torch.device:
    """All tensors on one device that Triton can run on, contiguous; returns that device."""
    devices = {t.device for t in tensors.values()}
    if len(devices) != 1:
        where = ", ".join(f"{n}: {t.device}" for n, t in tensors.items())
        raise InputError(f"{op}: all tensors must be on one device ({where})")
    device = devices.pop()
    if device.type != "cuda" and not (device.type == "cpu" and interpreting()):
        raise InputError(
            f"{op}: the Triton kernels need CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), got {device}"
        )
    for name, t in tensors.items():
        if not t.is_contiguous():
            raise InputError(f"{op}: {name} must be contiguous (call .contiguous() first)")
    return device


def check_float(op: str, **tensors: torch.Tensor) -> None:
    for name, t in tensors.items():
        if t.dtype not in FLOAT_DTYPES:
            raise InputError(f"{op}: {name} must be float32, float16, bfloat16 or float64, got {t.dtype}")


def check_stats(op: str, mean: torch.Tensor, std: torch.Tensor, channels: int) -> None:
    for name, t in (("mean", mean), ("std", std)):
        if t.shape != (channels,) or t.dtype != torch.float32:
            raise InputError(f"{op}: {name} must be float32 [{channels}], got {t.dtype} {list(t.shape)}")


def device_guard(device: torch.device):
    """Launch on the tensors' GPU, not the current one (multi-GPU hosts)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def block_for(n: int, cap: int = 1024, floor: int = 16) -> int:
    return max(floor, min(cap, triton.next_power_of_2(max(n, 1))))


def warps_for(block: int) -> int:
    # 4 warps keep 8 fp32 lanes per thread at 1024; wider tiles need more warps, not more registers.
    return 4 if block <= 1024 else 8 if block <= 4096 else 16


def sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1
