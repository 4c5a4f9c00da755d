"""Masked-trigger application for K candidates: out = normalize(x + sigmoid(m) * (p - x)).

Forward: one program per (candidate, sample, channel, pixel block), candidates adjacent in launch
order so x and the masks/patterns come from DRAM about once; out is written once, so the kernel is
bound by the write of [K, B, C, H, W]. Backward: one program per (candidate, mask channel, pixel
block) loops over the batch (and over channels for a shared 1-channel mask) and accumulates both
gradients in fp32 registers, so no [K, B, ...] intermediate is kept.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from baerase.errors import InputError

from ._common import (
    block_for,
    candidate_sample_block,
    check_float,
    check_stats,
    check_tensors,
    device_guard,
    launch_rows,
    sm_count,
    warps_for,
)


@triton.jit
def _trigger_apply_fwd_kernel(
    x_ptr,
    m_ptr,
    p_ptr,
    mean_ptr,
    std_ptr,
    out_ptr,
    K,
    B,
    C,
    HW,
    m_stride_k,
    m_stride_c,
    p_stride_k,
    p_stride_b,
    BLOCK: tl.constexpr,
):
    # Candidate fastest, then sample: x[:, c, blk] and the K masks/patterns of a block come from DRAM once.
    k, b, c, offs, valid = candidate_sample_block(K, B, HW, BLOCK)
    row = (k * B + b) * C + c  # row of out viewed as [K*B*C, H*W]
    x = tl.load(x_ptr + (b * C + c) * HW + offs, mask=valid, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + k * m_stride_k + c * m_stride_c + offs, mask=valid, other=0.0).to(tl.float32)
    p = tl.load(p_ptr + k * p_stride_k + b * p_stride_b + c * HW + offs, mask=valid, other=0.0).to(tl.float32)
    mean = tl.load(mean_ptr + c)
    std = tl.load(std_ptr + c)
    y = (x + tl.sigmoid(m) * (p - x) - mean) / std
    tl.store(out_ptr + row * HW + offs, y.to(out_ptr.dtype.element_ty), mask=valid)


@triton.jit
def _trigger_apply_bwd_kernel(
    g_ptr,
    x_ptr,
    m_ptr,
    p_ptr,
    std_ptr,
    gm_ptr,
    gp_ptr,
    K,
    C,
    HW,
    m_stride_k,
    m_stride_c,
    p_stride_k,
    p_stride_b,
    B: tl.constexpr,
    CPM: tl.constexpr,
    PER_SAMPLE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # B and CPM (image channels per mask channel: C for a shared mask, else 1) are constexpr loop
    # bounds: constant trip counts pipeline better, and the interpreter cannot loop to a runtime int.
    # Candidate fastest: the K programs of one pixel block run together and share x in L2.
    pid = tl.program_id(0).to(tl.int64)
    k = pid % K
    rest = pid // K
    cm_count = C // CPM
    cm = rest % cm_count
    hw_blk = rest // cm_count
    offs = hw_blk * BLOCK + tl.arange(0, BLOCK)
    valid = offs < HW
    m = tl.load(m_ptr + k * m_stride_k + cm * m_stride_c + offs, mask=valid, other=0.0).to(tl.float32)
    s = tl.sigmoid(m)
    acc_m = tl.zeros([BLOCK], dtype=tl.float32)
    for ci in range(CPM):
        c = cm * CPM + ci
        std = tl.load(std_ptr + c)
        acc_mc = tl.zeros([BLOCK], dtype=tl.float32)
        if PER_SAMPLE:
            for b in range(B):
                p = tl.load(p_ptr + k * p_stride_k + b * p_stride_b + c * HW + offs, mask=valid, other=0.0)
                x = tl.load(x_ptr + (b * C + c) * HW + offs, mask=valid, other=0.0).to(tl.float32)
                g = tl.load(g_ptr + ((k * B + b) * C + c) * HW + offs, mask=valid, other=0.0).to(tl.float32)
                acc_mc += g * (p.to(tl.float32) - x)
                gp = g * s / std
                tl.store(
                    gp_ptr + k * p_stride_k + b * p_stride_b + c * HW + offs,
                    gp.to(gp_ptr.dtype.element_ty),
                    mask=valid,
                )
        else:
            p = tl.load(p_ptr + k * p_stride_k + c * HW + offs, mask=valid, other=0.0).to(tl.float32)
            acc_g = tl.zeros([BLOCK], dtype=tl.float32)
            for b in range(B):
                x = tl.load(x_ptr + (b * C + c) * HW + offs, mask=valid, other=0.0).to(tl.float32)
                g = tl.load(g_ptr + ((k * B + b) * C + c) * HW + offs, mask=valid, other=0.0).to(tl.float32)
                acc_g += g
                acc_mc += g * (p - x)
            gp = acc_g * s / std
            tl.store(gp_ptr + k * p_stride_k + c * HW + offs, gp.to(gp_ptr.dtype.element_ty), mask=valid)
        acc_m += acc_mc / std
    gm = acc_m * s * (1.0 - s)
    tl.store(gm_ptr + k * m_stride_k + cm * m_stride_c + offs, gm.to(gm_ptr.dtype.element_ty), mask=valid)


def _check(op, x, mask_logits, pattern, mean, std) -> tuple[int, int, int, int, int, int, bool]:
    check_float(op, x=x, mask_logits=mask_logits, pattern=pattern)
    if x.dim() != 4:
        raise InputError(f"{op}: x must be [B, C, H, W], got {list(x.shape)}")
    b, c, h, w = x.shape
    if mask_logits.dim() != 4 or mask_logits.shape[1] not in (1, c) or mask_logits.shape[2:] != (h, w):
        raise InputError(f"{op}: mask_logits must be [K, 1|{c}, {h}, {w}], got {list(mask_logits.shape)}")
    k, cm = mask_logits.shape[:2]
    if pattern.shape not in ((k, c, h, w), (k, b, c, h, w)):
        raise InputError(
            f"{op}: pattern must be [{k}, {c}, {h}, {w}] or [{k}, {b}, {c}, {h}, {w}], got {list(pattern.shape)}"
        )
    check_stats(op, mean, std, c)
    return k, b, c, h * w, cm, pattern.dim() == 5


def _strides(pattern: torch.Tensor, c: int, hw: int, cm: int, per_sample: bool) -> tuple[int, int, int, int]:
    """The kernels' (m_stride_k, m_stride_c, p_stride_k, p_stride_b): a 1-channel mask is read at its
    channel 0 for every image channel, a shared pattern at the same place for every sample."""
    return cm * hw, hw if cm > 1 else 0, pattern[0].numel(), c * hw if per_sample else 0


def trigger_apply_fwd(
    x: torch.Tensor, mask_logits: torch.Tensor, pattern: torch.Tensor, mean: torch.Tensor, std: torch.Tensor
) -> torch.Tensor:
    """x [B, C, H, W], mask_logits [K, 1|C, H, W], pattern [K, C, H, W] or [K, B, C, H, W],
    mean/std fp32 [C] -> out [K, B, C, H, W] in x.dtype (fp32 math)."""
    op = "trigger_apply_fwd"
    device = check_tensors(op, x=x, mask_logits=mask_logits, pattern=pattern, mean=mean, std=std)
    k, b, c, hw, cm, per_sample = _check(op, x, mask_logits, pattern, mean, std)
    out = torch.empty((k, *x.shape), dtype=x.dtype, device=device)
    strides = _strides(pattern, c, hw, cm, per_sample)
    return launch_rows(
        _trigger_apply_fwd_kernel, out, k * b * c, hw, x, mask_logits, pattern, mean, std, out, k, b, c, hw, *strides
    )


def trigger_apply_bwd(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    mask_logits: torch.Tensor,
    pattern: torch.Tensor,
    mean: torch.Tensor,
    std: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """grad_out [K, B, C, H, W] -> (grad_mask_logits like mask_logits, grad_pattern like pattern),
    reduced over B (and over C for a 1-channel mask) in fp32."""
    op = "trigger_apply_bwd"
    device = check_tensors(op, grad_out=grad_out, x=x, mask_logits=mask_logits, pattern=pattern, mean=mean, std=std)
    k, b, c, hw, cm, per_sample = _check(op, x, mask_logits, pattern, mean, std)
    check_float(op, grad_out=grad_out)
    if grad_out.shape != (k, *x.shape):
        raise InputError(f"{op}: grad_out must be {[k, *x.shape]}, got {list(grad_out.shape)}")
    grad_mask = torch.empty_like(mask_logits)
    grad_pattern = torch.empty_like(pattern)
    if grad_mask.numel() == 0:
        return grad_mask, grad_pattern
    if b == 0:
        return grad_mask.zero_(), grad_pattern.zero_()
    # One program per (candidate, mask channel, pixel block): shrink the block until the grid fills
    # the GPU twice over, since each program streams the whole batch.
    block = block_for(hw)
    while block > 128 and k * cm * triton.cdiv(hw, block) < 2 * sm_count(device):
        block //= 2
    grid = (k * cm * triton.cdiv(hw, block),)
    with device_guard(device):
        _trigger_apply_bwd_kernel[grid](
            grad_out,
            x,
            mask_logits,
            pattern,
            std,
            grad_mask,
            grad_pattern,
            k,
            c,
            hw,
            *_strides(pattern, c, hw, cm, per_sample),
            B=b,
            CPM=c // cm,
            PER_SAMPLE=per_sample,
            BLOCK=block,
            num_warps=warps_for(block),
        )
    return grad_mask, grad_pattern
