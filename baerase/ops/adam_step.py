"""adam_step: one Adam step for all K candidate classes, parameters stacked on a leading ``[K, ...]``.

Custom op ``baerase::adam_step`` (no autograd; mutates params, exp_avgs, exp_avg_sqs and steps in
place). Contract (every backend): every tensor fp32 and contiguous on one device; params, grads
and moments [K, ...]; steps fp32 [K] per-class step counts; active bool [K] or None (all).
torch.optim.Adam's arithmetic, so a batched step equals K separate optimisers.
"""

from collections.abc import Iterable
from typing import Optional

import torch
from torch import Tensor

from ..errors import InputError
from .dispatch import record_backends, routed_op
from .reference import adam_step_ref


@routed_op("adam_step", "adam_step", mutates_args=("params", "exp_avgs", "exp_avg_sqs", "steps"))
def adam_step(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    active: Optional[Tensor],  # noqa: UP045 - the schema inference reads typing.Optional
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
) -> None:
    """In place: one Adam step per class; classes where ``active`` is False keep parameters,
    moments and step count."""
    adam_step_ref(params, grads, exp_avgs, exp_avg_sqs, steps, active, lr, beta1, beta2, eps)


@adam_step.register_fake
def _(params, grads, exp_avgs, exp_avg_sqs, steps, active, lr, beta1, beta2, eps):
    return None


def _check_active(active: Tensor | None, k: int, device: torch.device) -> Tensor | None:
    if active is None:
        return None
    if active.dtype != torch.bool or active.shape != (k,):
        raise InputError(f"active must be a bool tensor of shape [{k}], got {active.dtype} {list(active.shape)}")
    return active.to(device).contiguous()


class BatchedAdam(torch.optim.Optimizer):
    """Adam over fp32 parameters stacked per candidate class: every tensor is ``[K, ...]``.

    One ``step`` equals K separate ``torch.optim.Adam`` steps (paper betas (0.5, 0.999) by
    default), with per-class step counts so that ``step(active=mask)`` can freeze classes (bool
    ``[K]``; False: no update, no moment or step-count change), e.g. candidates that already
    stopped. ``backend`` names the implementation the last step used.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict],
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
                if p.dim() == 0 or p.dtype != torch.float32:
                    raise InputError(f"BatchedAdam needs fp32 parameters [K, ...], got {p.dtype} {list(p.shape)}")
        self.backend: str | None = None

    def _state(self, p: Tensor, k: int) -> dict:
        if not self.state[p]:
            self.state[p] = {
                "step": torch.zeros(k, dtype=torch.float32, device=p.device),
                "exp_avg": torch.zeros_like(p, memory_format=torch.contiguous_format),
                "exp_avg_sq": torch.zeros_like(p, memory_format=torch.contiguous_format),
            }
        return self.state[p]

    @torch.no_grad()
    def step(self, active: Tensor | None = None, closure=None):
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
            states = [self._state(p, k) for p in params]
            beta1, beta2 = group["betas"]
            with record_backends() as used:
                adam_step(
                    params,
                    [p.grad.contiguous() for p in params],
                    [s["exp_avg"] for s in states],
                    [s["exp_avg_sq"] for s in states],
                    [s["step"] for s in states],
                    _check_active(active, k, params[0].device),
                    float(group["lr"]),
                    float(beta1),
                    float(beta2),
                    float(group["eps"]),
                )
            self.backend = used["adam_step"]
        return loss
