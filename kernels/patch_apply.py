"""Random-position patch stamping: paste patch[k, b] at (rows[k, b], cols[k, b]) into x[b], normalise.

Forward: one program per (candidate, sample, channel, pixel block) reads x outside the patch and the
patch inside it, and writes the normalised image once. Backward is a gather of grad_out under the
patch, scaled by 1/std. Patch cells that fall outside the image are dropped in the forward and get
a zero gradient, so out-of-range corners never read or write out of bounds.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from baerase.errors import InputError

from ._common import candidate_sample_block, check_float, check_stats, check_tensors, launch_rows


@triton.jit
def _patch_apply_fwd_kernel(
    x_ptr,
    patch_ptr,
    rows_ptr,
    cols_ptr,
    mean_ptr,
    std_ptr,
    out_ptr,
    K,
    B,
    C,
    W,
    HW,
    PH,
    PW,
    BLOCK: tl.constexpr,
):
    # Candidate fastest so the K programs stamping one image block share x in L2.
    k, b, c, offs, valid = candidate_sample_block(K, B, HW, BLOCK)
    kb = k * B + b
    row = kb * C + c  # (candidate, sample, channel)
    r0 = tl.load(rows_ptr + kb)
    c0 = tl.load(cols_ptr + kb)
    i = offs // W - r0
    j = offs % W - c0
    inside = valid & (i >= 0) & (i < PH) & (j >= 0) & (j < PW)
    x = tl.load(x_ptr + (b * C + c) * HW + offs, mask=valid & ~inside, other=0.0).to(tl.float32)
    p = tl.load(patch_ptr + (row * PH + i) * PW + j, mask=inside, other=0.0).to(tl.float32)
    v = tl.where(inside, p, x)
    y = (v - tl.load(mean_ptr + c)) / tl.load(std_ptr + c)
    tl.store(out_ptr + row * HW + offs, y.to(out_ptr.dtype.element_ty), mask=valid)


@triton.jit
def _patch_apply_bwd_kernel(
    g_ptr,
    rows_ptr,
    cols_ptr,
    std_ptr,
    gp_ptr,
    C,
    H,
    W,
    PH,
    PW,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    n_blk = tl.cdiv(PH * PW, BLOCK)
    blk = pid % n_blk
    row = pid // n_blk  # (candidate, sample, channel)
    c = row % C
    kb = row // C
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    valid = offs < PH * PW
    hh = tl.load(rows_ptr + kb) + offs // PW
    ww = tl.load(cols_ptr + kb) + offs % PW
    inside = valid & (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W)
    g = tl.load(g_ptr + row * H * W + hh * W + ww, mask=inside, other=0.0).to(tl.float32)
    gp = g / tl.load(std_ptr + c)
    tl.store(gp_ptr + row * PH * PW + offs, gp.to(gp_ptr.dtype.element_ty), mask=valid)


def _check_positions(op: str, rows: torch.Tensor, cols: torch.Tensor, k: int, b: int) -> None:
    for name, t in (("rows", rows), ("cols", cols)):
        if t.shape != (k, b) or t.dtype != torch.int64:
            raise InputError(f"{op}: {name} must be int64 [{k}, {b}], got {t.dtype} {list(t.shape)}")


def patch_apply_fwd(
    x: torch.Tensor,
    patch: torch.Tensor,
    rows: torch.Tensor,
    cols: torch.Tensor,
    mean: torch.Tensor,
    std: torch.Tensor,
) -> torch.Tensor:
    """x [B, C, H, W], patch [K, B, C, h, w], rows/cols int64 [K, B] (top-left corners), mean/std
    fp32 [C] -> out [K, B, C, H, W] in x.dtype."""
    op = "patch_apply_fwd"
    device = check_tensors(op, x=x, patch=patch, rows=rows, cols=cols, mean=mean, std=std)
    check_float(op, x=x, patch=patch)
    if x.dim() != 4:
        raise InputError(f"{op}: x must be [B, C, H, W], got {list(x.shape)}")
    b, c, h, w = x.shape
    if patch.dim() != 5 or patch.shape[1:3] != (b, c) or patch.shape[3] > h or patch.shape[4] > w:
        raise InputError(f"{op}: patch must be [K, {b}, {c}, h<={h}, w<={w}], got {list(patch.shape)}")
    k, ph, pw = patch.shape[0], patch.shape[3], patch.shape[4]
    _check_positions(op, rows, cols, k, b)
    check_stats(op, mean, std, c)
    out = torch.empty((k, b, c, h, w), dtype=x.dtype, device=device)
    return launch_rows(
        _patch_apply_fwd_kernel, out, k * b * c, h * w, x, patch, rows, cols, mean, std, out, k, b, c, w, h * w, ph, pw
    )


def patch_apply_bwd(
    grad_out: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, std: torch.Tensor, h: int, w: int
) -> torch.Tensor:
    """grad_out [K, B, C, H, W] -> grad_patch [K, B, C, h, w] in grad_out's dtype (autograd casts it
    to the patch's)."""
    op = "patch_apply_bwd"
    device = check_tensors(op, grad_out=grad_out, rows=rows, cols=cols, std=std)
    check_float(op, grad_out=grad_out)
    if grad_out.dim() != 5:
        raise InputError(f"{op}: grad_out must be [K, B, C, H, W], got {list(grad_out.shape)}")
    k, b, c, height, width = grad_out.shape
    _check_positions(op, rows, cols, k, b)
    check_stats(op, std, std, c)
    grad_patch = torch.empty((k, b, c, h, w), dtype=grad_out.dtype, device=device)
    args = (grad_out, rows, cols, std, grad_patch, c, height, width, h, w)
    return launch_rows(_patch_apply_bwd_kernel, grad_patch, k * b * c, h * w, *args)
