// Low-precision accumulation on the CPU: out[b] = a[b] @ b[b] with every addition of the
// products rounded once, from the exact sum, to a float accumulator format (add_rounded in
// rounding.h), optionally promoted into a float32 accumulator every `chunk` products. The
// bits are those of lightning_lowp/accumulation_reference.py (its docstring is the contract).
//
// The product fl32(a * b) must be rounded on its own before the addition: a fused
// multiply-add would add the exact product. The baseline x86-64 instruction set has no FMA,
// and the AVX2 build below asks for AVX2 only (not "fma"); fp-contract=off makes sure that no
// compiler or flag can fuse a * b + c in this file anyway.
#pragma GCC optimize("fp-contract=off")

#include "quantize.h"

#define LOWP_CPU_ISA baseline
#include "accumulate_kernels.h"
#undef LOWP_CPU_ISA

#if LOWP_HAVE_X86_BUILDS
// The same kernel for AVX2 (per-lane variable shifts), without FMA (see above). Library
// headers are included first (through the baseline build), so that only the kernel is
// compiled for AVX2; it runs only on processors that have it.
#pragma GCC push_options
#pragma GCC target("avx2")
#define LOWP_CPU_ISA avx2
#include "accumulate_kernels.h"
#undef LOWP_CPU_ISA
#pragma GCC pop_options

// And for AVX-512 (16 lanes). AVX-512F has fused multiply-adds in its base set; the
// fp-contract=off above is what keeps them out of this kernel (the tests compare it with the
// reference bit for bit on processors that have it).
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq")
// (GCC's C++ front end does not define __AVX512F__ under a target pragma: hence a macro of ours.)
#define LOWP_CPU_ISA avx512
#define LOWP_CPU_AVX512 1
#include "accumulate_kernels.h"
#undef LOWP_CPU_AVX512
#undef LOWP_CPU_ISA
#pragma GCC pop_options
#endif

namespace lowp {

void accumulate_cpu(const at::Tensor& a, const at::Tensor& b, at::Tensor& out, const FormatParams& f, Rounding mode,
                    int64_t chunk, uint64_t key) {
  const int64_t batches = a.size(0), M = a.size(1), K = a.size(2), N = b.size(2);
  const float* a_data = a.const_data_ptr<float>();
  const float* b_data = b.const_data_ptr<float>();
  float* out_data = out.mutable_data_ptr<float>();
  const int64_t rows = batches * M;
#if LOWP_HAVE_X86_BUILDS
  const CpuIsa isa = cpu_isa();  // as for quantize_cpu
  if (isa == CpuIsa::Avx512) return avx512::accumulate(mode, a_data, b_data, out_data, rows, M, K, N, f, chunk, key);
  if (isa == CpuIsa::Avx2) return avx2::accumulate(mode, a_data, b_data, out_data, rows, M, K, N, f, chunk, key);
#endif
  baseline::accumulate(mode, a_data, b_data, out_data, rows, M, K, N, f, chunk, key);
}

void aligned_accumulate_cpu(const at::Tensor& a, const at::Tensor& b, at::Tensor& out, int64_t group, int bits,
                            bool toward_zero, int64_t chunk) {
  const int64_t batches = a.size(0), M = a.size(1), K = a.size(2), N = b.size(2);
  const float* a_data = a.const_data_ptr<float>();
  const float* b_data = b.const_data_ptr<float>();
  float* out_data = out.mutable_data_ptr<float>();
  const int64_t rows = batches * M;
#if LOWP_HAVE_X86_BUILDS
  const CpuIsa isa = cpu_isa();
  if (isa == CpuIsa::Avx512)
    return avx512::accumulate_aligned(toward_zero, a_data, b_data, out_data, rows, M, K, N, group, bits, chunk);
  if (isa == CpuIsa::Avx2)
    return avx2::accumulate_aligned(toward_zero, a_data, b_data, out_data, rows, M, K, N, group, bits, chunk);
#endif
  baseline::accumulate_aligned(toward_zero, a_data, b_data, out_data, rows, M, K, N, group, bits, chunk);
}

}  // namespace lowp
