"""One recipe for the op tests (tests/test_<op>.py): run an op under each backend and compare its
outputs and every gradient against the reference differentiated by autograd, printing the first
mismatches; run ``torch.library.opcheck`` under each backend.

Low precision (bf16 / fp16): the kernel sees inputs in that dtype, the oracle their exact fp32
copies; the kernel may differ from the oracle by the table's tolerance plus twice torch's own
error, i.e. the same formula evaluated by torch in that dtype (``native``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest
import torch
from conftest import HAS_CUDA, requires_cpp, requires_triton

from baerase.ops import record_backends, use_backend

BACKENDS = [
    pytest.param("ref", id="ref"),
    pytest.param("cpp", id="cpp", marks=requires_cpp),
    pytest.param("triton", id="triton", marks=requires_triton),
]
FAST_BACKENDS = BACKENDS[1:]
# (dtype, atol, rtol): fp32 against the reference; low precision on top of torch's own error.
DTYPES = [
    pytest.param(torch.float32, 1e-5, 1e-5, id="fp32"),
    pytest.param(torch.bfloat16, 1e-2, 1e-2, id="bf16"),
    pytest.param(torch.float16, 1e-3, 1e-3, id="fp16"),
]


def device_for(backend: str) -> str:
    """Triton runs on the GPU when there is one, else through its interpreter on CPU tensors."""
    return "cuda" if backend == "triton" and HAS_CUDA else "cpu"


def assert_close(name: str, actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float) -> None:
    """allclose with a message listing the first mismatching elements."""
    assert actual.shape == expected.shape, f"{name}: shape {list(actual.shape)} != {list(expected.shape)}"
    actual, expected = actual.detach().float().cpu(), expected.detach().float().cpu()
    bad = ~torch.isclose(actual, expected, atol=atol, rtol=rtol, equal_nan=True)
    if bad.any():
        idx = bad.nonzero()[:5].tolist()
        rows = "\n".join(f"  {i}: got {actual[tuple(i)].item():.7g}, want {expected[tuple(i)].item():.7g}" for i in idx)
        diff = (actual - expected).abs().max().item()
        pytest.fail(f"{name}: {int(bad.sum())}/{bad.numel()} mismatches (max abs diff {diff:.3g})\n{rows}")


def _leaves(args: Sequence, diff: Sequence[int], dtype: torch.dtype | None) -> list:
    """Fresh copies of args (float tensors cast to ``dtype`` if given), the ``diff`` ones requiring grad."""
    out = []
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor):
            a = a.detach().to(dtype) if dtype is not None and a.is_floating_point() else a.detach()
            a = a.clone().requires_grad_(i in diff)
        out.append(a)
    return out


def _tuple(x) -> tuple:
    return x if isinstance(x, tuple) else (x,)


def _grads(outs: tuple, inputs: list, diff: Sequence[int], cotangents: list) -> tuple:
    cot = [c.to(o.dtype) for c, o in zip(cotangents, outs, strict=True)]
    return torch.autograd.grad(outs, [inputs[i] for i in diff], cot)


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.detach().float().cpu() - b.detach().float().cpu()).abs().max().item() if a.numel() else 0.0


def check_op(
    backend: str,
    op: Callable,
    ref: Callable,
    args: Sequence,
    diff: Sequence[int],
    atol: float,
    rtol: float,
    native: Callable | None = None,
) -> None:
    """``op(*args)`` under ``backend`` (which must run forward and backward) against ``ref`` on
    fp32 copies: every output and the gradient of every ``args[i]``, ``i`` in ``diff``, for random
    cotangents. Output dtypes must match ``ref`` on the same inputs, gradient dtypes their
    argument's. ``native``: the formula evaluated by torch in the inputs' dtype; twice its error
    against the oracle widens atol."""
    oracle_in = _leaves(args, diff, torch.float32)
    want = _tuple(ref(*oracle_in))
    cotangents = [torch.randn_like(w) for w in want]
    want = want + _grads(want, oracle_in, diff, cotangents)
    kernel_in = _leaves(args, diff, None)
    with use_backend(backend), record_backends() as used:
        outs = _tuple(op(*kernel_in))
        got = outs + _grads(outs, kernel_in, diff, cotangents)
    assert set(used.values()) == {backend}, f"asked for {backend}, ran {used}"
    with torch.no_grad():
        contract = [o.dtype for o in _tuple(ref(*_leaves(args, (), None)))] + [args[i].dtype for i in diff]
    slack = [0.0] * len(want)
    if native is not None:
        native_in = _leaves(args, diff, None)
        nat = _tuple(native(*native_in))
        nat = nat + _grads(nat, native_in, diff, cotangents)
        slack = [2 * _max_err(n, w) for n, w in zip(nat, want, strict=True)]
    names = [f"output {i}" for i in range(len(outs))] + [f"grad of argument {i}" for i in diff]
    for name, g, w, dtype, s in zip(names, got, want, contract, slack, strict=True):
        assert g.dtype == dtype, f"{name}: dtype {g.dtype}, the contract says {dtype}"
        assert_close(name, g, w, atol + s, rtol)


def opcheck(backend: str, op, args: Sequence) -> None:
    """``torch.library.opcheck`` (schema, autograd registration, fake kernel, AOT dispatch) with
    ``backend`` serving the op's kernels."""
    with use_backend(backend):
        torch.library.opcheck(op, tuple(args))
