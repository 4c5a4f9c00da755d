"""patch_apply on every backend against its reference (the recipe of tests/fastpath.py)."""

import pytest
import torch
from conftest import requires_cpp, requires_triton
from fastpath import BACKENDS, DTYPES, check_op, device_for, opcheck

from baerase import ops
from baerase.errors import InputError
from baerase.ops.reference import patch_apply_ref

# (K, B, C, H, W, h, w): batch 1 and a 1x1 patch, odd sizes, a patch as large as the image.
SHAPES = [(1, 1, 1, 4, 4, 1, 1), (2, 3, 3, 9, 7, 3, 2), (3, 2, 2, 5, 6, 5, 6)]
FP32 = (1e-5, 1e-5)


def inputs(shape, shared_positions=False, dtype=torch.float32, device="cpu"):
    """(x [B, C, H, W], patch [K, B, C, h, w], rows, cols ([B] or [K, B]), mean, std)."""
    k, b, c, h, w, ph, pw = shape
    n = 1 if shared_positions else k
    rows = torch.randint(0, h - ph + 1, (n, b), device=device)
    cols = torch.randint(0, w - pw + 1, (n, b), device=device)
    if shared_positions:
        rows, cols = rows[0], cols[0]
    x = torch.rand(b, c, h, w, device=device).to(dtype)
    patch = torch.rand(k, b, c, ph, pw, device=device).to(dtype)
    return x, patch, rows, cols, torch.rand(c, device=device) * 0.5, torch.rand(c, device=device) + 0.2


def native(x, patch, rows, cols, mean, std):
    """Paste (exact in any dtype), then normalise by torch in the inputs' dtype."""
    return (patch_apply_ref(x, patch, rows, cols) - mean.to(x.dtype).view(-1, 1, 1)) / std.to(x.dtype).view(-1, 1, 1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("shared_positions", [False, True])
def test_matches_reference(backend, shape, shared_positions):
    args = inputs(shape, shared_positions, device=device_for(backend))
    check_op(backend, ops.patch_apply, patch_apply_ref, args, (1,), *FP32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("dtype", "atol", "rtol"), DTYPES)
def test_dtypes(backend, dtype, atol, rtol):
    args = inputs((2, 3, 3, 7, 6, 3, 2), dtype=dtype, device=device_for(backend))
    check_op(backend, ops.patch_apply, patch_apply_ref, args, (1,), atol, rtol, native=native)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    x, patch, rows, cols, mean, std = inputs((2, 3, 3, 7, 6, 3, 2), device=device_for(backend))
    opcheck(backend, torch.ops.baerase.patch_apply.default, (x, patch.requires_grad_(), rows, cols, mean, std))
    grad_out = torch.randn((2, *x.shape), device=x.device)
    opcheck(backend, torch.ops.baerase.patch_apply_backward.default, (grad_out, rows, cols, std, 3, 2))


def test_compiles_without_graph_breaks():
    x, patch, rows, cols, mean, std = inputs((2, 3, 3, 7, 6, 3, 2))
    patch.requires_grad_()
    fn = torch.compile(lambda *a: ops.patch_apply(*a).square().sum(), fullgraph=True, backend="aot_eager")
    with ops.record_backends() as used:
        fn(x, patch, rows, cols, mean, std).backward()
    want = torch.autograd.grad(patch_apply_ref(x, patch, rows, cols, mean, std).square().sum(), patch)[0]
    torch.testing.assert_close(patch.grad, want)
    assert set(used) == {"patch_apply", "patch_apply_backward"}


@requires_cpp
def test_cpp_rejects_bad_inputs():
    x, patch, rows, cols, mean, std = inputs((1, 2, 3, 4, 4, 2, 2))
    with ops.use_backend("cpp"):
        with pytest.raises(InputError, match="outside the image"):
            ops.patch_apply(x, patch, rows + 3, cols, mean, std)
        with pytest.raises(InputError, match="does not fit"):
            ops.patch_apply(x, torch.zeros(1, 2, 3, 5, 5), rows, cols, mean, std)


@requires_triton
def test_triton_drops_cells_outside_the_image():
    # A kernel cannot check corners without a device sync: cells outside the image are dropped.
    x, patch, rows, cols, mean, std = inputs((1, 2, 3, 4, 4, 2, 2), device=device_for("triton"))
    with ops.use_backend("triton"):
        out = ops.patch_apply(x, patch, rows * 0 + 3, cols * 0, mean, std)
    torch.testing.assert_close(out[0, :, :, 3, :2], ((patch[0, :, :, 0] - mean.view(-1, 1)) / std.view(-1, 1)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_rejects_bad_positions(backend):
    x, patch, rows, cols, mean, std = inputs((1, 2, 3, 4, 4, 2, 2), device=device_for(backend))
    with ops.use_backend(backend):
        with pytest.raises(InputError, match="rows"):
            ops.patch_apply(x, patch, rows.expand(2, 2), cols, mean, std)
        with pytest.raises(InputError, match="cols"):
            ops.patch_apply(x, patch, rows, cols.float(), mean, std)
