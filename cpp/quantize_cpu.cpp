// The CPU entry point: the kernels of cpu_kernels.h built for the baseline instruction set,
// and a run-time choice of the AVX-512 or AVX2 builds (quantize_cpu_avx512.cpp,
// quantize_cpu_avx2.cpp) where the processor has them. The rounding arithmetic needs
// per-lane variable shifts, which the x86-64 baseline (SSE2) lacks.
#define LOWP_CPU_ISA baseline
#include "cpu_kernels.h"

#include <cstdlib>
#include <cstring>

namespace lowp {

#if LOWP_HAVE_X86_BUILDS
namespace avx2 {
void quantize_cpu(const at::Tensor& in, at::Tensor& out, const FormatParams& p, Rounding mode, uint64_t key,
                  const BlockLayout& layout);
}
namespace avx512 {
void quantize_cpu(const at::Tensor& in, at::Tensor& out, const FormatParams& p, Rounding mode, uint64_t key,
                  const BlockLayout& layout);
}
#endif

CpuIsa cpu_isa() {
#if LOWP_HAVE_X86_BUILDS
  static const char* cap = std::getenv("LOWP_CPU_ISA");
  static const bool allow_avx512 = cap == nullptr || std::strcmp(cap, "avx512") == 0;
  static const bool allow_avx2 = allow_avx512 || std::strcmp(cap, "avx2") == 0;
  static const bool has_avx512 = allow_avx512 && __builtin_cpu_supports("avx512f") &&
                                 __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
                                 __builtin_cpu_supports("avx512dq");
  static const bool has_avx2 = allow_avx2 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (has_avx512) return CpuIsa::Avx512;
  if (has_avx2) return CpuIsa::Avx2;
#endif
  return CpuIsa::Baseline;
}

void quantize_cpu(const at::Tensor& in, at::Tensor& out, const FormatParams& p, Rounding mode, uint64_t key,
                  const BlockLayout& layout) {
#if LOWP_HAVE_X86_BUILDS
  const CpuIsa isa = cpu_isa();
  if (isa == CpuIsa::Avx512) return avx512::quantize_cpu(in, out, p, mode, key, layout);
  if (isa == CpuIsa::Avx2) return avx2::quantize_cpu(in, out, p, mode, key, layout);
#endif
  baseline::quantize_cpu(in, out, p, mode, key, layout);
}

}  // namespace lowp
