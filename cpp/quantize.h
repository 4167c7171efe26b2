// Declarations shared by ops.cpp (argument handling) and the CPU / CUDA kernel files.
#pragma once

#include <ATen/core/Tensor.h>

#include <type_traits>
#include <vector>

#include "rounding.h"

// AVX2 and AVX-512 builds of the CPU kernels are made with GCC-compatible compilers on x86-64.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__CUDACC__)
#define LOWP_HAVE_X86_BUILDS 1
#else
#define LOWP_HAVE_X86_BUILDS 0
#endif

namespace lowp {

// The blocks of a block or scaled format on a contiguous tensor viewed as [outer, dim_size,
// inner], dim_size being the blocking dim. Element (o, d, i) belongs to block
//   d / block_len                                                   when blocks_per_outer == 0:
//       blocks shared by every outer and inner index (block floating point's one exponent per
//       index along a dim; the whole tensor, with dim_size 1);
//   (tile_row(o) * blocks_per_outer + d / block_len) * inner + i    otherwise:
//       runs of block_len along dim, one block per run and inner index. tile_row(o) is o for
//       runs; for (tile_rows, block_len) tiles over the last two dims (inner 1) it groups
//       tile_rows consecutive rows within each matrix of `rows` rows.
struct BlockLayout {
  int64_t outer = 1, dim_size = 1, inner = 1;
  int64_t block_len = 1;          // indices of dim per block
  int64_t blocks_per_outer = 0;   // runs per outer index; 0: blocks shared by every outer index
  int64_t rows = 1, tile_rows = 1;
  LOWP_HD int64_t numel() const { return outer * dim_size * inner; }
  LOWP_HD int64_t tile_row(int64_t o) const {
    if (tile_rows == 1) return o;
    return (o / rows) * ((rows + tile_rows - 1) / tile_rows) + (o % rows) / tile_rows;
  }
  LOWP_HD int64_t num_blocks() const {
    const int64_t per_dim = (dim_size + block_len - 1) / block_len;
    return blocks_per_outer ? (tile_row(outer - 1) + 1) * blocks_per_outer * inner : per_dim;
  }
  // Whether each block is a strided column (runs along a dim that is not the last).
  LOWP_HD bool column_blocks() const { return blocks_per_outer != 0 && inner > 1; }
  LOWP_HD int64_t block_of(int64_t o, int64_t d, int64_t i) const {
    if (!blocks_per_outer) return d / block_len;
    return (tile_row(o) * blocks_per_outer + d / block_len) * inner + i;
  }
  // Stochastic rounding's counter of element (o, d, i): its index in the tensor with dim moved
  // last when the blocks are columns (so a block's counters are consecutive), else its index.
  LOWP_HD int64_t counter_of(int64_t o, int64_t d, int64_t i) const {
    return column_blocks() ? (o * inner + i) * dim_size + d : (o * dim_size + d) * inner + i;
  }
};

// out = quantize(in); `in` and `out` are contiguous (or dense with equal strides, for the
// element-wise formats) and may be the same tensor. `key` seeds stochastic rounding.
void quantize_cpu(const at::Tensor& in, at::Tensor& out, const FormatParams& p, Rounding mode,
                  uint64_t key, const BlockLayout& blocks);
void quantize_cuda(const at::Tensor& in, at::Tensor& out, const FormatParams& p, Rounding mode,
                   uint64_t key, const BlockLayout& blocks);
// One tensor of quantize_foreach_cuda: in and out dense with the same strides (in storage
// order), not empty; key: its stochastic-rounding key.
struct ForeachItem {
  at::Tensor in, out;
  uint64_t key;
};
// out = quantize(in) for every item, element-wise formats only: a multi-tensor kernel, a
// launch per many tensors (quantize_cuda.cu).
void quantize_foreach_cuda(const std::vector<ForeachItem>& items, const FormatParams& p, Rounding mode);
// Whether quantize_foreach_ takes quantize_foreach_cuda (LOWP_CUDA_FOREACH; see quantize_cuda.cu).
bool foreach_cuda_kernel();

// The best instruction set this processor offers among the CPU kernels' builds, chosen once
// (LOWP_CPU_ISA=avx2 or =baseline caps the choice, for benchmarks and debugging).
enum class CpuIsa { Baseline, Avx2, Avx512 };
CpuIsa cpu_isa();

}  // namespace lowp

namespace lowp {

// Calls f(std::integral_constant<Rounding, mode>{}) so kernels get the mode as a template
// argument: one kernel source, specialised per mode by the compiler.
template <typename F>
void dispatch_rounding(Rounding mode, F&& f) {
  using R = Rounding;
  switch (mode) {
    case R::Nearest: f(std::integral_constant<R, R::Nearest>{}); break;
    case R::NearestAway: f(std::integral_constant<R, R::NearestAway>{}); break;
    case R::TowardZero: f(std::integral_constant<R, R::TowardZero>{}); break;
    case R::Down: f(std::integral_constant<R, R::Down>{}); break;
    case R::Up: f(std::integral_constant<R, R::Up>{}); break;
    case R::Stochastic: f(std::integral_constant<R, R::Stochastic>{}); break;
  }
}

template <typename F>
void dispatch_kind(Kind kind, F&& f) {
  switch (kind) {
    case Kind::Fixed: f(std::integral_constant<Kind, Kind::Fixed>{}); break;
    case Kind::Float: f(std::integral_constant<Kind, Kind::Float>{}); break;
    case Kind::Block: f(std::integral_constant<Kind, Kind::Block>{}); break;
    case Kind::Scaled: f(std::integral_constant<Kind, Kind::Scaled>{}); break;
  }
}

// Step exponent of one element: per element for floats, per block for block floating point
// (`block` is the block's step exponent, looked up by the caller), per element and block for
// scaled formats (`block` is the exponent of the block's scale), constant for fixed point.
template <Kind K>
LOWP_HD int step_exponent(const FormatParams& p, float x, int block) {
  if (K == Kind::Float) return float_step_exponent(p, bits_of(x) & ~kSignBit);
  if (K == Kind::Block) return block;
  if (K == Kind::Scaled) return scaled_step_exponent(p, bits_of(x) & ~kSignBit, block);
  return p.e_q;
}

// What a block of a block or scaled format needs, from its largest finite magnitude (and,
// for NVFP4's tensor scale, the whole tensor's): the `block` argument of step_exponent, the
// largest magnitude of its elements (what +-Inf saturates to), and for float scales the
// block's scale (0: every finite element becomes +-0; `block` is then unused).
struct BlockState {
  int block;
  float max_mag;
  float scale;
};

template <Kind K>
LOWP_HD BlockState block_state(const FormatParams& p, uint32_t max_bits, uint32_t tensor_max_bits) {
  BlockState s;
  s.scale = 0.0f;
  if (K == Kind::Scaled && p.scale != ScaleKind::E8m0) {
    s.block = 0;
    float_block_scale(p, max_bits, tensor_max_bits, &s.scale, &s.max_mag);
  } else if (K == Kind::Scaled) {
    s.block = scale_exponent(p, max_bits);
    s.max_mag = p.element_max * pow2_normal(s.block / 2) * pow2_normal(s.block - s.block / 2);  // exact
  } else {
    block_step(max_bits, p.wl, &s.block, &s.max_mag);
  }
  return s;
}

// out[i] = a[i] @ b[i] with every addition rounded once to the float format p in `mode`,
// promoted into float32 every `chunk` products (0: never); a (B, M, K), b (B, K, N), out
// (B, M, N), float32 and contiguous (accumulate_cpu.cpp; see add_rounded in rounding.h).
void accumulate_cpu(const at::Tensor& a, const at::Tensor& b, at::Tensor& out, const FormatParams& p,
                    Rounding mode, int64_t chunk, uint64_t key);
// The same with the tensor-core accumulator (AlignedSum; aligned_rows in accumulate_kernels.h).
void aligned_accumulate_cpu(const at::Tensor& a, const at::Tensor& b, at::Tensor& out, int64_t group, int bits,
                            bool toward_zero, int64_t chunk);
#ifdef LOWP_WITH_CUDA
// Both on CUDA tensors, the same bits (accumulate_cuda.cu).
void accumulate_cuda(const at::Tensor& a, const at::Tensor& b, at::Tensor& out, const FormatParams& p, Rounding mode,
                     int64_t chunk, uint64_t key);
void aligned_accumulate_cuda(const at::Tensor& a, const at::Tensor& b, at::Tensor& out, int64_t group, int bits,
                             bool toward_zero, int64_t chunk);
#endif

}  // namespace lowp
