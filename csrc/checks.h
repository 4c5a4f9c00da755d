// Input checks shared by the CPU kernels: every entry point validates through these macros, so a
// contract violation raises a Python ValueError naming the argument (the op's kernel in
// baerase/ops/dispatch.py re-raises it as InputError) instead of reading out of bounds.
#pragma once

// Per-op headers instead of ATen/ATen.h: a translation unit then compiles in a fraction of the time.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/sigmoid.h>

#include <cstdint>

#define BAERASE_CHECK_CPU(t) TORCH_CHECK_VALUE((t).device().is_cpu(), #t " must be a CPU tensor")
#define BAERASE_CHECK_CONTIGUOUS(t) TORCH_CHECK_VALUE((t).is_contiguous(), #t " must be contiguous")
#define BAERASE_CHECK_INPUT(t) \
  BAERASE_CHECK_CPU(t);        \
  BAERASE_CHECK_CONTIGUOUS(t)
#define BAERASE_CHECK_DIM(t, n) \
  TORCH_CHECK_VALUE((t).dim() == (n), #t " must have " #n " dimensions, got ", (t).sizes())
#define BAERASE_CHECK_DTYPE(t, dt) \
  TORCH_CHECK_VALUE((t).scalar_type() == (dt), #t " must be ", (dt), ", got ", (t).scalar_type())
#define BAERASE_CHECK_FLOATING(t) \
  TORCH_CHECK_VALUE(at::isFloatingType((t).scalar_type()), #t " must be a floating-point tensor")
#define BAERASE_CHECK_SIZE(t, d, n) \
  TORCH_CHECK_VALUE((t).size(d) == (n), #t ".size(" #d ") must be ", (n), ", got ", (t).size(d))
