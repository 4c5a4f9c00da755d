// Input checks shared by the CPU kernels: every entry point validates through these macros so a
// contract violation raises a Python RuntimeError naming the argument instead of reading garbage.
#pragma once

#include <ATen/ATen.h>

#define BAERASE_CHECK_CPU(t) TORCH_CHECK((t).device().is_cpu(), #t " must be a CPU tensor")
#define BAERASE_CHECK_CONTIGUOUS(t) TORCH_CHECK((t).is_contiguous(), #t " must be contiguous")
#define BAERASE_CHECK_INPUT(t) \
  BAERASE_CHECK_CPU(t);        \
  BAERASE_CHECK_CONTIGUOUS(t)
#define BAERASE_CHECK_DIM(t, n) \
  TORCH_CHECK((t).dim() == (n), #t " must have " #n " dimensions, got ", (t).sizes())
#define BAERASE_CHECK_DTYPE(t, dt) \
  TORCH_CHECK((t).scalar_type() == (dt), #t " must be ", (dt), ", got ", (t).scalar_type())
#define BAERASE_CHECK_FLOATING(t) \
  TORCH_CHECK(at::isFloatingType((t).scalar_type()), #t " must be a floating-point tensor")
#define BAERASE_CHECK_SIZE(t, d, n) \
  TORCH_CHECK((t).size(d) == (n), #t ".size(" #d ") must be ", (n), ", got ", (t).size(d))
