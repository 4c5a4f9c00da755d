import os

import pytest
import torch

# Without a GPU the Triton kernels run on CPU tensors through the interpreter. Triton reads this
# when a kernel is defined, so it must be set before the capability checks below load baerase.kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from baerase.ops import available_backends
from baerase.ops.dispatch import OPS

HAS_CUDA = torch.cuda.is_available()


def _has(backend: str, device: str) -> bool:
    """The ops have a kernel registered for the device's dispatch key and the backend serves it."""
    key = torch._C._dispatch_key_for_device(device)
    registered = all(torch._C._dispatch_has_kernel_for_dispatch_key(f"baerase::{op}", key) for op in OPS)
    return registered and backend in available_backends(device)


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
    interpret = os.environ.get("TRITON_INTERPRET")
    return f"baerase backends: cpp={HAS_CPP} triton={HAS_TRITON} cuda={HAS_CUDA} interpret={interpret}"


# ---- shared fixtures ---------------------------------------------------------------------------------


@pytest.fixture
def one_thread():
    """Small convolutions run faster single-threaded than with thread hand-offs on busy cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def backdoored():
    """A SmallCNN on 8 procedural colour classes (16x16) with a 3x3 BadNets corner backdoor into class
    3, trained once per session (a few seconds). Shared: tests must not modify the model (copy it)."""
    from helpers import Backdoored

    from baerase.attacks import BadNets, train_backdoored
    from baerase.data import make_colour, split
    from baerase.models import SmallCNN

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            x, y = make_colour(8, per_class=150, side=16, seed=0)
            train, clean, test = split(x, y, [0.6, 0.2, 0.2], seed=0)
            trigger = BadNets(3, "corner", seed=1)
            model = train_backdoored(SmallCNN(3, 8, 16), *train, trigger, 3, rate=0.1, epochs=12, seed=0)
    finally:
        torch.set_num_threads(n)
    return Backdoored(model.eval(), trigger, 3, train, clean, test)
