"""Triton kernels for baerase's fast-path ops (installed as ``baerase.kernels``)."""
