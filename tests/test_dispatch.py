"""Backend choice (baerase/ops/dispatch.py): context-local overrides, the auto policy, records of
what ran, and the fallbacks when a backend is missing or requested but unavailable."""

import os
import subprocess
import sys
import threading

import pytest
import torch
from conftest import requires_cpp

from baerase import ops
from baerase.errors import BackendError


def small_inputs():
    x = torch.rand(2, 3, 4, 4)
    return x, torch.randn(2, 1, 4, 4, requires_grad=True), torch.rand(2, 3, 4, 4, requires_grad=True)


def test_override_is_context_local(monkeypatch):
    monkeypatch.delenv("BAERASE_BACKEND", raising=False)
    seen, ready, done = {}, threading.Event(), threading.Event()

    def other_thread():
        ready.wait()
        seen["requested"] = ops.requested_backend()
        with ops.record_backends() as used:
            ops.trigger_apply(*small_inputs())
        seen["used"] = used
        done.set()

    worker = threading.Thread(target=other_thread)
    worker.start()
    with ops.use_backend("ref"), ops.record_backends() as used:
        ready.set()
        done.wait()
        ops.trigger_apply(*small_inputs())
    worker.join()
    auto = ops.backend_for("trigger_apply", "cpu")
    assert seen == {"requested": None, "used": {"trigger_apply": auto}}
    assert used == {"trigger_apply": "ref"}


def test_nesting_environment_and_names(monkeypatch):
    monkeypatch.setenv("BAERASE_BACKEND", "ref")
    assert ops.requested_backend() == "ref"
    with ops.use_backend("auto"):
        assert ops.requested_backend() is None
        with ops.use_backend(None):  # None leaves the choice to the environment
            assert ops.backend_for("trigger_loss", "cpu") == "ref"
        assert ops.requested_backend() is None
    with pytest.raises(BackendError, match="unknown backend"), ops.use_backend("fast"):
        pass
    monkeypatch.setenv("BAERASE_BACKEND", "fast")
    with pytest.raises(BackendError, match="unknown backend"):
        ops.backend_for("trigger_loss", "cpu")


def test_requested_backend_must_serve_the_device():
    with ops.use_backend("cpp"), pytest.raises(BackendError, match="serves cpu tensors, not meta"):
        ops.backend_for("trigger_apply", "meta")
    with ops.use_backend("ref"):
        assert ops.backend_for("trigger_apply", "meta") == "ref"
    # The reference serves the ops a requested backend has no kernel for.
    if "triton" in ops.available_backends("cpu"):
        with ops.use_backend("triton"):
            assert ops.backend_for("adam_step", "cpu") == "ref"


def test_auto_policy_thresholds():
    # On CUDA the fast path runs only from the sizes where benchmarks/results/gpu_h200.md shows it winning.
    fast = "triton" if "triton" in ops.available_backends("cuda") else "ref"
    assert ops.backend_for("trigger_loss", "cuda", size=128 * 100 * 100) == "ref"
    assert ops.backend_for("trigger_apply", "cuda", size=10 * 128 * 3 * 32 * 32) == "ref"
    assert ops.backend_for("trigger_apply", "cuda", size=100 * 128 * 3 * 32 * 32) == fast
    assert ops.backend_for("adam_step", "cuda") == "ref"
    assert ops.backend_for("trigger_loss", "cpu", size=1) == ("cpp" if "cpp" in ops.available_backends() else "ref")


def test_backward_keeps_the_forward_choice_and_is_recorded():
    with ops.use_backend("ref"), ops.record_backends() as forward:
        out = ops.trigger_apply(*small_inputs())
    with ops.record_backends() as backward:
        out.sum().backward()
    assert forward == {"trigger_apply": "ref", "trigger_apply_backward": "ref"}
    assert backward == {"trigger_apply_backward": "ref"}


def _run(script: str, envs: list[dict]) -> list[tuple[int, str]]:
    """(return code, stderr) of ``script`` in a fresh interpreter per env, run side by side."""
    procs = [
        subprocess.Popen([sys.executable, "-c", script], env={**os.environ, **env}, stderr=subprocess.PIPE, text=True)
        for env in envs
    ]
    return [(p.wait(timeout=120), p.stderr.read()) for p in procs]


def test_missing_extension_warns_once_and_falls_back():
    script = """
import logging, sys, torch
sys.modules["baerase._C"] = None  # as if the extension was never built
logging.basicConfig(level=logging.WARNING)
from baerase import ops
from baerase.errors import BackendError
assert ops.backend_for("trigger_loss", "cpu") == "ref"
for _ in range(3):
    ops.trigger_loss(torch.randn(4, 5), torch.randint(0, 5, (4,)))
try:
    with ops.use_backend("cpp"):
        ops.trigger_loss(torch.randn(4, 5), torch.randint(0, 5, (4,)))
    raise SystemExit("an unavailable requested backend must raise")
except BackendError as exc:
    assert "baerase._C" in str(exc), exc
"""
    [(code, stderr)] = _run(script, [{}])
    assert code == 0, stderr
    assert stderr.count("cpp backend unavailable") == 1, stderr


@requires_cpp
def test_every_simd_tier_matches_the_reference():
    """BAERASE_CPU_ISA caps the C++ SIMD tier: the narrower clones compute what the reference does."""
    script = """
import os, torch
from baerase import _C, ops
from baerase.ops.reference import adam_step_ref, trigger_loss_ref
assert _C.cpu_isa() in ("baseline", os.environ["BAERASE_CPU_ISA"]), _C.cpu_isa()
for m, kc in [(67, 10), (130, 100), (3, 1001)]:
    logits, target = torch.randn(m, kc) * 4, torch.randint(0, kc, (m,))
    with ops.use_backend("cpp"):
        got = ops.trigger_loss(logits, target, 0.5)
    torch.testing.assert_close(got, trigger_loss_ref(logits, target, 0.5), atol=1e-5, rtol=1e-5)
p, g = torch.randn(3, 5000), torch.randn(3, 5000)
a = [[p.clone()], [torch.zeros_like(p)], [torch.zeros_like(p)], [torch.zeros(3)]]
b = [[t[0].clone()] for t in a]
with ops.use_backend("cpp"):
    ops.adam_step(a[0], [g], a[1], a[2], a[3], None, 0.01, 0.5, 0.9, 1e-8)
adam_step_ref(b[0], [g], b[1], b[2], b[3], None, 0.01, 0.5, 0.9, 1e-8)
torch.testing.assert_close(a, b)
"""
    for code, stderr in _run(script, [{"BAERASE_CPU_ISA": "avx2"}, {"BAERASE_CPU_ISA": "baseline"}]):
        assert code == 0, stderr
