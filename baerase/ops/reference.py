"""Pure-PyTorch reference implementations of baerase's fast-path ops.

Three jobs: CPU fallback, test oracle and benchmark baseline. Kept short and obviously right.
Each ``<op>_ref`` is differentiable by autograd, which makes it the tests' gradient oracle; the
``<op>_backward_ref`` functions are the closed-form gradients the ``baerase::<op>_backward``
custom ops default to (autograd is off inside a custom op's kernel).
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


def identity_stats(
    mean: torch.Tensor | None, std: torch.Tensor | None, x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """mean/std as contiguous fp32 [C] for the ops' kernels; zeros and ones (no normalisation) for None."""
    if mean is None:
        c = x.shape[1]
        return x.new_zeros(c, dtype=torch.float32), x.new_ones(c, dtype=torch.float32)
    return mean.float().contiguous(), std.float().contiguous()


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


def trigger_apply_backward_ref(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    mask_logits: torch.Tensor,
    pattern: torch.Tensor,
    mean: torch.Tensor,
    std: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of trigger_apply_ref for grad_out [K, B, C, H, W]: (grad_mask_logits,
    grad_pattern), reduced over B (and over C for a 1-channel mask), each in its tensor's dtype."""
    s = torch.sigmoid(mask_logits.float()).unsqueeze(1)  # [K, 1, 1|C, H, W]
    g = grad_out.float() / std.float().view(-1, 1, 1)  # through the normalisation
    p = pattern.float() if pattern.dim() == 5 else pattern.float().unsqueeze(1)
    grad_pattern = s * g if pattern.dim() == 5 else (s * g).sum(1)
    grad_s = (g * (p - x.float())).sum(1).sum_to_size(mask_logits.shape)
    s = s.squeeze(1)
    return (grad_s * s * (1 - s)).to(mask_logits.dtype), grad_pattern.to(pattern.dtype)


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
    flat = _patch_index(rows, cols, k, b, h, w, width).unsqueeze(2).expand(k, b, c, h * w)
    out = x.float().unsqueeze(0).expand(k, b, c, height, width).reshape(k, b, c, height * width)
    out = out.scatter(3, flat, patch.float().reshape(k, b, c, h * w))
    return normalize_images(out.view(k, b, c, height, width), mean, std).to(x.dtype)


def _patch_index(rows: torch.Tensor, cols: torch.Tensor, k: int, b: int, h: int, w: int, width: int) -> torch.Tensor:
    """Flat pixel index of every cell of an h x w patch per (candidate, sample): [K, B, h*w]."""
    dr = torch.arange(h, device=rows.device).view(h, 1)
    dc = torch.arange(w, device=rows.device).view(1, w)
    rows, cols = rows.expand(k, b), cols.expand(k, b)
    return ((rows[..., None, None] + dr) * width + cols[..., None, None] + dc).reshape(k, b, h * w)


def patch_apply_backward_ref(
    grad_out: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, std: torch.Tensor, h: int, w: int
) -> torch.Tensor:
    """Gradient of patch_apply_ref w.r.t. the patch: grad_out [K, B, C, H, W] under each patch,
    divided by std [C]. Returns [K, B, C, h, w] in grad_out's dtype."""
    k, b, c, height, width = grad_out.shape
    flat = _patch_index(rows, cols, k, b, h, w, width).unsqueeze(2).expand(k, b, c, h * w)
    grad = grad_out.float().reshape(k, b, c, height * width).gather(3, flat) / std.float().view(-1, 1)
    return grad.view(k, b, c, h, w).to(grad_out.dtype)


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


def trigger_loss_backward_ref(
    grad_hinge: torch.Tensor,
    grad_nll: torch.Tensor,
    logits: torch.Tensor,
    target: torch.Tensor,
    lse: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """Gradient of ``sum(grad_hinge * hinge + grad_nll * nll)`` w.r.t. logits [M, Kc], given
    lse = logsumexp(logits) [M]: ``(g_n - g_h * [p_t <= beta] * p_t) * (softmax - onehot_t)``
    (torch.clamp passes the gradient at p_t == beta). In logits' dtype."""
    p = torch.exp(logits.float() - lse.view(-1, 1))
    p_t = p.gather(1, target.view(-1, 1)).squeeze(1)
    coef = grad_nll - torch.where(p_t <= beta, grad_hinge * p_t, 0.0)
    onehot = torch.zeros_like(p).scatter_(1, target.view(-1, 1), 1.0)  # F.one_hot syncs CUDA to check target
    return (coef.view(-1, 1) * (p - onehot)).to(logits.dtype)


def mine_lower_bound_ref(t_joint: torch.Tensor, t_marginal: torch.Tensor) -> torch.Tensor:
    """Donsker-Varadhan bound per candidate: mean(T) - log mean exp(T').

    t_joint, t_marginal: [K, N] statistics-network outputs. Returns [K].
    """
    n = t_marginal.shape[-1]
    return t_joint.float().mean(-1) - (
        torch.logsumexp(t_marginal.float(), -1) - torch.log(torch.tensor(float(n), device=t_marginal.device))
    )


@torch.no_grad()
def adam_step_ref(
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
    for p, g, m, v, step in zip(params, grads, exp_avgs, exp_avg_sqs, steps, strict=True):
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
def moving_average_ref(ma: torch.Tensor, value: torch.Tensor, rate: float, active: torch.Tensor | None = None) -> None:
    """In place: ``ma = (1 - rate) * ma + rate * value`` for the active classes (leading dim K)."""
    new = (1 - rate) * ma + rate * value
    if active is not None:
        new = torch.where(active.view((-1,) + (1,) * (ma.dim() - 1)), new, ma)
    ma.copy_(new)
