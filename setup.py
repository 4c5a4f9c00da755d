"""Build script. The C++ extension (``baerase._C``, the CPU kernels of ``csrc/``) is optional.

Environment:
  BAERASE_NO_EXT=1        skip the C++ extension; baerase then runs its PyTorch reference on CPU.
  BAERASE_REQUIRE_EXT=1   a failed extension build is an error instead of a warning (CI sets it).

The top-level ``kernels/`` folder (Triton) is installed as ``baerase.kernels`` through
``package_dir``, for regular and editable installs alike.
"""

import os
import platform
import shutil
import subprocess
import sys
import tempfile
import warnings

from setuptools import find_packages, setup

PACKAGES = [*find_packages(include=["baerase", "baerase.*"]), "baerase.kernels"]
PACKAGE_DIR = {"baerase.kernels": "kernels"}
REQUIRE_EXT = os.environ.get("BAERASE_REQUIRE_EXT") == "1"
OPENMP_PROBE = """#include <omp.h>
int main() {
  int n = 0;
#pragma omp parallel
  n = omp_get_num_threads();
  return n < 1;
}
"""


def skip_extension(reason: str) -> dict:
    if REQUIRE_EXT:
        raise RuntimeError(f"baerase: BAERASE_REQUIRE_EXT=1 but the C++ extension cannot be built: {reason}")
    warnings.warn(f"baerase: building without the C++ extension ({reason}); CPU ops use the reference", stacklevel=2)
    return {}


def compiler_accepts(flag: str) -> bool:
    """Whether the C++ compiler builds and links a small OpenMP program with ``flag``."""
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        return False
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "probe.cpp")
        with open(src, "w") as f:
            f.write(OPENMP_PROBE)
        done = subprocess.run([cxx, flag, src, "-o", os.path.join(tmp, "probe")], capture_output=True, check=False)
    return done.returncode == 0


def compile_flags() -> tuple[list[str], list[str]]:
    """(compile, link) flags for GCC/Clang; MSVC keeps torch's defaults."""
    if sys.platform == "win32":
        return [], []
    # -g0: Python's default CFLAGS ask for debug info, which costs compile time and .so size.
    # -fno-trapping-math: lets the compiler turn the kernels' float compare-selects (clamps, max)
    # into SIMD blends; -fno-math-errno lets it vectorise sqrt (Adam's step: 4x faster at K=10 x 1.6M
    # parameters, measured). The kernels read neither floating-point exception flags nor errno.
    flags, link = ["-O3", "-g0", "-fno-trapping-math", "-fno-math-errno"], []
    if platform.machine().lower() in ("x86_64", "amd64"):
        flags.append("-march=x86-64-v2")  # SSE4.2 baseline; csrc/simd.h adds AVX2 / AVX-512 clones
    # at::parallel_for and `#pragma omp simd` need OpenMP; Apple clang ships without it.
    if compiler_accepts("-fopenmp"):
        flags.append("-fopenmp")
        link.append("-fopenmp")
    return flags, link


def extension_kwargs() -> dict:
    if os.environ.get("BAERASE_NO_EXT") == "1":
        if REQUIRE_EXT:
            raise RuntimeError("baerase: BAERASE_NO_EXT=1 and BAERASE_REQUIRE_EXT=1 contradict each other")
        return {}
    names = os.listdir("csrc") if os.path.isdir("csrc") else []
    sources = sorted(os.path.join("csrc", f) for f in names if f.endswith(".cpp"))
    if not sources:
        return skip_extension("no csrc/*.cpp sources")
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError as exc:  # no torch at build time (e.g. an isolated build without it)
        return skip_extension(str(exc))
    flags, link = compile_flags()
    ext = CppExtension("baerase._C", sources, extra_compile_args=flags, extra_link_args=link)
    return {"ext_modules": [ext], "cmdclass": {"build_ext": optional_build(BuildExtension)}}


def optional_build(base):
    """BuildExtension whose failure warns and installs the pure-Python package (or raises under
    BAERASE_REQUIRE_EXT=1)."""

    class Build(base):
        def run(self):
            try:
                super().run()
            except Exception as exc:
                skip_extension(f"build failed: {exc}")

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as exc:
                skip_extension(f"build failed: {exc}")

    return Build.with_options(use_ninja=True) if hasattr(Build, "with_options") else Build


setup(
    packages=PACKAGES,
    package_dir=PACKAGE_DIR,
    package_data={"baerase.data": ["*.npz"], "baerase.schema": ["*.json"]},
    **extension_kwargs(),
)
