"""Batched per-class recovery bookkeeping: one optimiser step and one MINE moving-average update for
all K candidate classes, with parameters stacked on a leading class dimension ``[K, ...]``.

The C++ extension serves contiguous fp32 CPU tensors; the PyTorch reference serves everything else and is
the fallback when the extension is absent. ``BAERASE_BACKEND=cpp`` makes a missing extension an
error; ``triton`` has no optimiser kernel, so it leaves this to the reference.
"""

from __future__ import annotations

from collections.abc import Iterable
from types import SimpleNamespace

import torch

from ..errors import BackendError, InputError
from .dispatch import implementation, requested_backend
from .reference import batched_adam_step_ref, moving_average_ref

_REF = SimpleNamespace(
    name="ref", batched_adam_step=batched_adam_step_ref, moving_average_=moving_average_ref
)


def _backend(tensors: list[torch.Tensor]):
    """The implementation for ``tensors`` (a namespace with ``batched_adam_step``, ``moving_average_``)."""
    name = requested_backend()
    native = all(t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous() for t in tensors)
    if name in ("ref", "triton") or (name is None and not native):
        return _REF
    if name == "cpp" and not native:
        raise BackendError("backend 'cpp' was requested but it serves only contiguous fp32 CPU tensors")
    try:
        module = implementation("cpp")
    except BackendError:
        if name == "cpp":
            raise
        return _REF
    return SimpleNamespace(
        name="cpp", batched_adam_step=module.batched_adam_step, moving_average_=module.moving_average_
    )


def _check_active(active: torch.Tensor | None, k: int) -> torch.Tensor | None:
    if active is None:
        return None
    if active.dtype != torch.bool or active.shape != (k,):
        raise InputError(
            f"active must be a bool tensor of shape [{k}], got {active.dtype} {list(active.shape)}"
        )
    return active.cpu().contiguous() if active.device.type != "cpu" else active.contiguous()


def moving_average_(ma: torch.Tensor, value: torch.Tensor, rate: float, active: torch.Tensor | None = None):
    """In place ``ma = (1 - rate) * ma + rate * value`` per class (MINE's E[exp T] tracker).

    ma, value: [K] (or [K, ...]); rate: the paper's 0.001; active: bool [K], False freezes a class.
    Returns ``ma``.
    """
    if ma.shape != value.shape:
        raise InputError(f"ma {list(ma.shape)} and value {list(value.shape)} must have the same shape")
    impl = _backend([ma, value])
    active = _check_active(active, ma.shape[0] if ma.dim() else 1)
    if impl.name == "cpp":
        impl.moving_average_(ma, value.detach().contiguous(), float(rate), active)
    else:
        impl.moving_average_(
            ma, value.detach(), float(rate), None if active is None else active.to(ma.device)
        )
    return ma


class BatchedAdam(torch.optim.Optimizer):
    """Adam over parameters stacked per candidate class: every tensor is ``[K, ...]``.

    One ``step`` equals K separate ``torch.optim.Adam`` steps (paper betas (0.5, 0.999) by
    default), with per-class step counts so that ``step(active=mask)`` can freeze classes (bool
    ``[K]``; False: no update, no moment or step-count change), e.g. candidates that already
    stopped. ``backend`` names the implementation the last step used.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict],
        lr: float = 2e-4,
        betas: tuple[float, float] = (0.5, 0.999),
        eps: float = 1e-8,
    ):
        if not lr > 0:
            raise InputError(f"lr must be positive, got {lr}")
        if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise InputError(f"betas must lie in [0, 1), got {betas}")
        if not eps >= 0:
            raise InputError(f"eps must be non-negative, got {eps}")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps})
        for group in self.param_groups:
            for p in group["params"]:
                if p.dim() == 0:
                    raise InputError("BatchedAdam parameters need a leading class dimension [K, ...]")
        self.backend: str | None = None

    @torch.no_grad()
    def step(self, active: torch.Tensor | None = None, closure=None):
        """Update every class, or only those where ``active`` (bool [K]) is True."""
        if callable(active):  # torch's positional ``step(closure)``
            active, closure = None, active
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            if any(p.grad.is_sparse for p in params):
                raise InputError("BatchedAdam does not support sparse gradients")
            k = params[0].shape[0]
            if any(p.shape[0] != k for p in params):
                raise InputError("all parameters of a group must share the class dimension K")
            for p in params:
                if not self.state[p]:
                    self.state[p] = {
                        "step": torch.zeros(k, dtype=torch.float32, device=p.device),
                        "exp_avg": torch.zeros_like(p, memory_format=torch.contiguous_format),
                        "exp_avg_sq": torch.zeros_like(p, memory_format=torch.contiguous_format),
                    }
            impl = _backend(params)
            mask = _check_active(active, k)
            if impl.name == "ref" and mask is not None:
                mask = mask.to(params[0].device)
            states = [self.state[p] for p in params]
            impl.batched_adam_step(
                params,
                [p.grad.contiguous() for p in params],
                [s["exp_avg"] for s in states],
                [s["exp_avg_sq"] for s in states],
                [s["step"] for s in states],
                mask,
                float(group["lr"]),
                float(group["betas"][0]),
                float(group["betas"][1]),
                float(group["eps"]),
            )
            self.backend = impl.name
        return loss
