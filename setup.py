"""Build script. The C++ extension (``baerase._C``) is optional.

Environment:
  BAERASE_NO_EXT=1   skip the C++ extension; baerase then runs its PyTorch reference on CPU.
"""
import os
import sys
import warnings

from setuptools import find_packages, setup

PACKAGES = find_packages(include=["baerase", "baerase.*"]) + ["baerase.kernels"]
PACKAGE_DIR = {"baerase.kernels": "kernels"}


def extension_kwargs() -> dict:
    if os.environ.get("BAERASE_NO_EXT") == "1":
        return {}
    sources = sorted(os.path.join("csrc", f) for f in os.listdir("csrc") if f.endswith(".cpp")) if os.path.isdir("csrc") else []
    if not sources:
        return {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension

        # -g0: Python's default CFLAGS ask for debug info, which costs compile time and .so size.
        # -fno-trapping-math: lets GCC turn the kernels' float compare-selects (clamps, max) into
        # SIMD blends; the kernels never read floating-point exception flags.
        flags = ["-O3", "-g0", "-fno-trapping-math"]
        if sys.platform.startswith("linux"):
            flags += ["-fopenmp", "-march=x86-64-v2"]
        ext = CppExtension("baerase._C", sources, extra_compile_args=flags, extra_link_args=["-fopenmp"])
        return {"ext_modules": [ext], "cmdclass": {"build_ext": OptionalBuildExtension.wrap(BuildExtension)}}
    except Exception as exc:  # no torch headers or no compiler: install without the extension
        warnings.warn(f"baerase: building without the C++ extension ({exc})")
        return {}


class OptionalBuildExtension:
    """Wrap BuildExtension so a failed compile warns and installs the pure-Python package."""

    @staticmethod
    def wrap(base):
        class _Build(base):
            def run(self):
                try:
                    super().run()
                except Exception as exc:
                    warnings.warn(f"baerase: C++ extension build failed ({exc}); using the PyTorch reference on CPU")

            def build_extension(self, ext):
                try:
                    super().build_extension(ext)
                except Exception as exc:
                    warnings.warn(f"baerase: C++ extension build failed ({exc}); using the PyTorch reference on CPU")

        return _Build.with_options(use_ninja=True) if hasattr(_Build, "with_options") else _Build


setup(
    packages=PACKAGES,
    package_dir=PACKAGE_DIR,
    package_data={"baerase.data": ["*.npz"]},
    **extension_kwargs(),
)
