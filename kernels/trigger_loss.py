"""Fused softmax / clipped target probability / cross-entropy over logits [M, Kc].

Forward keeps a running max and rescaled sum per row (online softmax) while it streams column
blocks, so Kc = 100,000 costs one read of the logits and O(ROWS * BLOCK_N) registers; it saves only
the per-row logsumexp. Backward recomputes p = exp(logit - lse) block by block and writes the
gradient of both terms in one pass:
    d/dlogits [g_h * min(p_t, beta) + g_n * nll] = (g_n - g_h * [p_t <= beta] * p_t) * (p - onehot_t)
The hinge gradient passes at p_t == beta, as torch.clamp's does, so the reference is matched there.
The recomputed p carries lse's rounding, |lse| * 6e-8 relative: negligible for logits below ~1e3.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from baerase.errors import InputError

from ._common import FLOAT_DTYPES, check_float, check_tensors, device_guard, warps_for

# 4096 fp32 columns per tile: 16 values per thread at 8 warps, far from spilling, and Kc=100,000
# takes 25 blocks. Small Kc packs several rows per tile instead so each program still moves ~4 KiB+.
_TILE = 4096


def _tile(m: int, kc: int) -> tuple[int, int]:
    block_n = min(_TILE, triton.next_power_of_2(kc))
    rows = max(1, min(_TILE // block_n, triton.next_power_of_2(max(m, 1))))
    return rows, block_n


@triton.jit
def _trigger_loss_fwd_kernel(
    logits_ptr,
    target_ptr,
    hinge_ptr,
    nll_ptr,
    lse_ptr,
    M,
    KC,
    stride_m,
    beta,
    N_BLOCKS: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # N_BLOCKS = cdiv(Kc, BLOCK_N) is constexpr: a constant trip count pipelines the loads, and the
    # interpreter cannot loop to a runtime int.
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < M
    base = logits_ptr + rows[:, None] * stride_m
    run_max = tl.full([ROWS], float("-inf"), dtype=tl.float32)
    run_sum = tl.zeros([ROWS], dtype=tl.float32)
    for blk in range(N_BLOCKS):
        cols = blk * BLOCK_N + tl.arange(0, BLOCK_N)
        ok = row_ok[:, None] & (cols[None, :] < KC)
        z = tl.load(base + cols[None, :], mask=ok, other=float("-inf")).to(tl.float32)
        new_max = tl.maximum(run_max, tl.max(z, axis=1))
        # Rows past M stay at -inf; shift them by 0 so they never produce inf - inf = NaN.
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        run_sum = run_sum * tl.exp(run_max - shift) + tl.sum(tl.exp(z - shift[:, None]), axis=1)
        run_max = new_max
    log_sum = tl.log(tl.where(row_ok, run_sum, 1.0))  # padding rows: keep log(0) out
    lse = run_max + log_sum
    t = tl.load(target_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    # An out-of-range target reads nothing and yields NaN instead of a stray memory access.
    t_ok = row_ok & (t >= 0) & (t < KC)
    z_t = tl.load(logits_ptr + rows * stride_m + t, mask=t_ok, other=float("nan")).to(tl.float32)
    # (max - z_t) + log(sum) rather than lse - z_t: for large logits lse's rounding (|lse| * 6e-8,
    # 6e-4 at 1e4) would otherwise leak into the loss.
    nll = (run_max - z_t) + log_sum
    p_t = tl.exp(-nll)
    tl.store(hinge_ptr + rows, tl.minimum(p_t, beta), mask=row_ok)
    tl.store(nll_ptr + rows, nll, mask=row_ok)
    tl.store(lse_ptr + rows, lse, mask=row_ok)


@triton.jit
def _trigger_loss_bwd_kernel(
    grad_hinge_ptr,
    grad_nll_ptr,
    logits_ptr,
    target_ptr,
    lse_ptr,
    grad_ptr,
    M,
    KC,
    stride_m,
    beta,
    ROWS: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    ok = row_ok[:, None] & (cols[None, :] < KC)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    t = tl.load(target_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    t_ok = row_ok & (t >= 0) & (t < KC)
    z_t = tl.load(logits_ptr + rows * stride_m + t, mask=t_ok, other=float("nan")).to(tl.float32)
    p_t = tl.exp(z_t - lse)
    g_h = tl.load(grad_hinge_ptr + rows, mask=row_ok, other=0.0)
    g_n = tl.load(grad_nll_ptr + rows, mask=row_ok, other=0.0)
    coef = g_n - tl.where(p_t <= beta, g_h * p_t, 0.0)  # dL/dnll, the hinge being exp(-nll)
    # -inf padding: exp(z - lse) is then 0, not an overflow, outside the tile.
    z = tl.load(logits_ptr + rows[:, None] * stride_m + cols[None, :], mask=ok, other=float("-inf")).to(tl.float32)
    p = tl.exp(z - lse[:, None])
    onehot = cols[None, :] == t[:, None]
    grad = coef[:, None] * tl.where(onehot, p - 1.0, p)
    tl.store(grad_ptr + rows[:, None] * KC + cols[None, :], grad.to(grad_ptr.dtype.element_ty), mask=ok)


def _check(op: str, logits: torch.Tensor, target: torch.Tensor) -> tuple[int, int]:
    if logits.dim() != 2 or logits.dtype not in FLOAT_DTYPES:
        raise InputError(f"{op}: logits must be a float [M, Kc] tensor, got {logits.dtype} {list(logits.shape)}")
    m, kc = logits.shape
    if kc == 0:
        raise InputError(f"{op}: logits need at least one class column")
    if target.shape != (m,) or target.dtype != torch.int64:
        raise InputError(f"{op}: target must be int64 [{m}], got {target.dtype} {list(target.shape)}")
    return m, kc


def trigger_loss_fwd(
    logits: torch.Tensor, target: torch.Tensor, beta: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits [M, Kc] (any float dtype), target int64 [M] -> (min(p_t, beta), lse - logit_t, lse),
    each fp32 [M]."""
    op = "trigger_loss_fwd"
    device = check_tensors(op, logits=logits, target=target)
    m, kc = _check(op, logits, target)
    hinge, nll, lse = (torch.empty(m, dtype=torch.float32, device=device) for _ in range(3))
    if m == 0:
        return hinge, nll, lse
    rows, block_n = _tile(m, kc)
    with device_guard(device):
        _trigger_loss_fwd_kernel[(triton.cdiv(m, rows),)](
            logits,
            target,
            hinge,
            nll,
            lse,
            m,
            kc,
            logits.stride(0),
            float(beta),
            N_BLOCKS=triton.cdiv(kc, block_n),
            ROWS=rows,
            BLOCK_N=block_n,
            num_warps=warps_for(rows * block_n),
        )
    return hinge, nll, lse


def trigger_loss_bwd(
    grad_hinge: torch.Tensor,
    grad_nll: torch.Tensor,
    logits: torch.Tensor,
    target: torch.Tensor,
    lse: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """Upstream fp32 [M] gradients of (hinge, nll) -> grad_logits [M, Kc] in logits.dtype."""
    op = "trigger_loss_bwd"
    device = check_tensors(op, grad_hinge=grad_hinge, grad_nll=grad_nll, logits=logits, target=target, lse=lse)
    m, kc = _check(op, logits, target)
    for name, t in (("grad_hinge", grad_hinge), ("grad_nll", grad_nll), ("lse", lse)):
        if t.shape != (m,) or t.dtype != torch.float32:
            raise InputError(f"{op}: {name} must be float32 [{m}], got {t.dtype} {list(t.shape)}")
    check_float(op, logits=logits)
    grad = torch.empty((m, kc), dtype=logits.dtype, device=device)
    if m == 0:
        return grad
    # No loop here: a 2-D grid of tiles, so the backward is parallel over columns too.
    rows, block_n = _tile(m, min(kc, 1024))
    grid = (triton.cdiv(m, rows), triton.cdiv(kc, block_n))
    with device_guard(device):
        _trigger_loss_bwd_kernel[grid](
            grad_hinge,
            grad_nll,
            logits,
            target,
            lse,
            grad,
            m,
            kc,
            logits.stride(0),
            float(beta),
            ROWS=rows,
            BLOCK_N=block_n,
            num_warps=warps_for(rows * block_n),
        )
    return grad
