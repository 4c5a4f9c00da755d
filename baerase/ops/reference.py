"""Pure-PyTorch reference implementations of baerase's fast-path ops.

Three jobs: CPU fallback, test oracle and benchmark baseline. Kept short and obviously right;
autograd derives every backward here.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def normalize_images(x: torch.Tensor, mean: torch.Tensor | None, std: torch.Tensor | None) -> torch.Tensor:
    """(x - mean) / std per channel over the third-last dimension (mean/std [C]); x itself for None."""
    if mean is None:
        return x
    shape = (-1, 1, 1)
    return (x - mean.view(shape)) / std.view(shape)


def trigger_apply_ref(
    x: torch.Tensor,
    mask_logits: torch.Tensor,
    pattern: torch.Tensor,
    mean: torch.Tensor | None = None,
    std: torch.Tensor | None = None,
) -> torch.Tensor:
    """Stamp K masked triggers onto a batch: ``normalize(x + sigmoid(m) * (p - x))``.

    x: [B, C, H, W] pixels in [0, 1]; mask_logits: [K, 1|C, H, W]; pattern: [K, C, H, W]
    (one pattern per candidate) or [K, B, C, H, W] (one per candidate and sample); mean, std: [C]
    or None. Returns [K, B, C, H, W].
    """
    m = torch.sigmoid(mask_logits.float()).unsqueeze(1)  # [K, 1, 1|C, H, W]
    p = pattern.float() if pattern.dim() == 5 else pattern.float().unsqueeze(1)
    out = x.float().unsqueeze(0) + m * (p - x.float().unsqueeze(0))
    return normalize_images(out, mean, std).to(x.dtype)


def patch_apply_ref(
    x: torch.Tensor,
    patch: torch.Tensor,
    rows: torch.Tensor,
    cols: torch.Tensor,
    mean: torch.Tensor | None = None,
    std: torch.Tensor | None = None,
) -> torch.Tensor:
    """Paste an h x w patch per (candidate, sample) at per-sample positions, then normalise.

    x: [B, C, H, W]; patch: [K, B, C, h, w]; rows, cols: int64 [B] (top-left corner, the same
    position for every candidate) or [K, B]. Returns [K, B, C, H, W].
    """
    k, b, c, h, w = patch.shape
    height, width = x.shape[-2:]
    rows = rows.expand(k, b) if rows.dim() == 1 else rows
    cols = cols.expand(k, b) if cols.dim() == 1 else cols
    # Flat pixel index of every patch cell, per (candidate, sample): [K, B, h*w].
    dr = torch.arange(h, device=x.device).view(h, 1)
    dc = torch.arange(w, device=x.device).view(1, w)
    flat = ((rows[..., None, None] + dr) * width + cols[..., None, None] + dc).reshape(k, b, 1, h * w)
    out = x.float().unsqueeze(0).expand(k, b, c, height, width).reshape(k, b, c, height * width)
    out = out.scatter(3, flat.expand(k, b, c, h * w), patch.float().reshape(k, b, c, h * w))
    return normalize_images(out.view(k, b, c, height, width), mean, std).to(x.dtype)


def trigger_loss_ref(
    logits: torch.Tensor, target: torch.Tensor, beta: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row hinge and cross-entropy toward ``target``.

    logits: [M, Kc]; target: int64 [M]. Returns (min(softmax(logits)_t, beta), CE(logits, t)),
    both fp32 [M]. With beta >= 1 the hinge is the plain target probability.
    """
    logp = F.log_softmax(logits.float(), dim=-1)
    nll = -logp.gather(1, target.view(-1, 1)).squeeze(1)
    hinge = torch.clamp(torch.exp(-nll), max=beta)
    return hinge, nll


def mine_lower_bound_ref(t_joint: torch.Tensor, t_marginal: torch.Tensor) -> torch.Tensor:
    """Donsker-Varadhan bound per candidate: mean(T) - log mean exp(T').

    t_joint, t_marginal: [K, N] statistics-network outputs. Returns [K].
    """
    n = t_marginal.shape[-1]
    return t_joint.float().mean(-1) - (torch.logsumexp(t_marginal.float(), -1) - torch.log(
        torch.tensor(float(n), device=t_marginal.device)))


@torch.no_grad()
def batched_adam_step_ref(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    steps: list[torch.Tensor],
    active: torch.Tensor | None,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
) -> None:
    """In place: one Adam step (torch.optim.Adam's arithmetic) per class of stacked parameters.

    params, grads, exp_avgs, exp_avg_sqs: [K, ...] each; steps: fp32 [K] per-class step counts;
    active: bool [K] or None (all). Inactive classes keep parameters, moments and step count.
    """
    for p, g, m, v, step in zip(params, grads, exp_avgs, exp_avg_sqs, steps):
        # Frozen classes are left out by index rather than masked afterwards, so the common
        # all-active step runs in place like torch.optim.Adam.
        idx = None if active is None or bool(active.all()) else active.to(p.device).nonzero().squeeze(1)
        ps, gs, ms, vs, st = (t if idx is None else t.index_select(0, idx) for t in (p, g, m, v, step))
        st.add_(1)
        ms.lerp_(gs, 1 - beta1)
        vs.mul_(beta2).addcmul_(gs, gs, value=1 - beta2)
        shape = (-1,) + (1,) * (p.dim() - 1)
        step_size = (lr / (1 - beta1 ** st.double())).float().view(shape)
        bc2_sqrt = (1 - beta2 ** st.double()).sqrt().float().view(shape)
        ps.sub_(step_size * (ms / (vs.sqrt() / bc2_sqrt + eps)))
        if idx is not None:
            for dst, src in ((p, ps), (m, ms), (v, vs), (step, st)):
                dst.index_copy_(0, idx, src)


@torch.no_grad()
def moving_average_ref(
    ma: torch.Tensor, value: torch.Tensor, rate: float, active: torch.Tensor | None = None
) -> None:
    """In place: ``ma = (1 - rate) * ma + rate * value`` for the active classes (leading dim K)."""
    new = (1 - rate) * ma + rate * value
    if active is not None:
        new = torch.where(active.view((-1,) + (1,) * (ma.dim() - 1)), new, ma)
    ma.copy_(new)
