// cpu_kernels.h built for AVX2 (8 lanes, per-lane variable shifts: what the rounding
// arithmetic needs to vectorise). Library headers come first so that only our kernels are
// compiled for AVX2; quantize_cpu.cpp calls them only on processors that have it.
#include "quantize.h"

#if LOWP_HAVE_X86_BUILDS
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <atomic>
#include <memory>
#include <vector>

#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define LOWP_CPU_ISA avx2
#include "cpu_kernels.h"
#pragma GCC pop_options
#endif
