"""Input checks and launch helpers shared by the Triton launchers."""

from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

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


def launch_rows(kernel, out: torch.Tensor, rows: int, n: int, *args) -> torch.Tensor:
    """Launch ``kernel[grid](*args, BLOCK=, num_warps=)`` with one program per (row, block of ``n``
    elements) over ``rows`` rows, on ``out``'s device; nothing runs when ``out`` is empty. Returns ``out``."""
    if out.numel() == 0:
        return out
    block = block_for(n)
    with device_guard(out.device):
        kernel[(rows * triton.cdiv(n, block),)](*args, BLOCK=block, num_warps=warps_for(block))
    return out


def block_for(n: int, cap: int = 1024, floor: int = 16) -> int:
    return max(floor, min(cap, triton.next_power_of_2(max(n, 1))))


def warps_for(block: int) -> int:
    # 4 warps keep 8 fp32 lanes per thread at 1024; wider tiles need more warps, not more registers.
    return 4 if block <= 1024 else 8 if block <= 4096 else 16


def sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


@triton.jit
def candidate_sample_block(K, B, HW, BLOCK: tl.constexpr):
    """This program's (candidate k, sample b, channel c, pixel offsets, in-range mask) in a launch of
    one program per (candidate, sample, channel, pixel block): ``launch_rows(kernel, out, K * B * C, HW, ...)``.

    int64: K*B*C*H*W passes 2**31 at real scan sizes (K=100, B=128, 3x224x224). Candidate fastest,
    then sample: programs resident together share one (channel, pixel block), so x[:, c, blk] and the
    K candidates' data for that block are read from DRAM once and then hit L2, instead of x being
    re-read once per candidate (K times the image at 224x224).
    """
    pid = tl.program_id(0).to(tl.int64)
    k = pid % K
    rest = pid // K
    b = rest % B
    rest = rest // B
    n_hw = tl.cdiv(HW, BLOCK)
    hw_blk = rest % n_hw
    c = rest // n_hw
    offs = hw_blk * BLOCK + tl.arange(0, BLOCK)
    return k, b, c, offs, offs < HW
