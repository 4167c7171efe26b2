// cpu_kernels.h built for AVX-512 (16 lanes; see quantize_cpu_avx2.cpp for why a build per
// instruction set). Library headers come first so that only our kernels are
// compiled for AVX-512; quantize_cpu.cpp calls them only on processors that have it.
#include "quantize.h"

#if LOWP_HAVE_X86_BUILDS
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <atomic>
#include <memory>
#include <vector>

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,prefer-vector-width=512")
// (GCC's C++ front end does not define __AVX512F__ under a target pragma: hence a macro of ours.)
#define LOWP_CPU_ISA avx512
#define LOWP_CPU_AVX512 1
#include "cpu_kernels.h"
#pragma GCC pop_options
#endif
