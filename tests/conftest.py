import os

import pytest
import torch

# Without a GPU the Triton kernels run on CPU tensors through the interpreter. Triton reads this
# when a kernel is defined, so it must be set before _has() below imports baerase.kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from baerase.ops import dispatch


def _has(backend: str, device: str) -> bool:
    return all(dispatch._serves(backend, op, torch.device(device)) for op in dispatch.OPS)


HAS_CUDA = torch.cuda.is_available()
HAS_TRITON = _has("triton", "cuda" if HAS_CUDA else "cpu")
HAS_CPP = _has("cpp", "cpu")

requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
requires_triton = pytest.mark.skipif(
    not HAS_TRITON, reason="Triton kernels unavailable (need triton and CUDA, or TRITON_INTERPRET=1)"
)
requires_cpp = pytest.mark.skipif(not HAS_CPP, reason="C++ extension baerase._C is not built")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_report_header(config):
    return f"baerase backends: cpp={HAS_CPP} triton={HAS_TRITON} cuda={HAS_CUDA} interpret={os.environ.get('TRITON_INTERPRET')}"
