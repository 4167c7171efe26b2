// Declarations shared by ops.cpp (argument handling) and the CPU / CUDA kernel files.
#pragma once

#include <ATen/core/Tensor.h>

#include <type_traits>

#include "rounding.h"

// AVX2 and AVX-512 builds of the CPU kernels are made with GCC-compatible compilers on x86-64.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__CUDACC__)
#define LOWP_HAVE_X86_BUILDS 1
#else
#define LOWP_HAVE_X86_BUILDS 0
#endif

namespace lowp {

// Blocks of block floating point on a contiguous tensor viewed as [outer, dim_size, inner]:
// element (o, d, i) belongs to block  o * blocks_per_outer + d / block_len  when the blocks
// are per outer index (block_size runs), or to block  d / block_len  when they are shared
// by every outer index (whole tensor: dim_size = 1; one exponent per index along a dim).
struct BlockLayout {
  int64_t outer = 1, dim_size = 1, inner = 1;
  int64_t block_len = 1;          // indices of dim per block
  int64_t blocks_per_outer = 0;   // 0: blocks shared by every outer index
  LOWP_HD int64_t numel() const { return outer * dim_size * inner; }
  LOWP_HD int64_t num_blocks() const {
    const int64_t per_dim = (dim_size + block_len - 1) / block_len;
    return blocks_per_outer ? outer * per_dim : per_dim;
  }
};

// out = quantize(in); `in` and `out` are contiguous (or dense with equal strides, for the
// element-wise formats) and may be the same tensor. `key` seeds stochastic rounding.
void quantize_cpu(const at::Tensor& in, at::Tensor& out, const FormatParams& p, Rounding mode,
                  uint64_t key, const BlockLayout& blocks);
void quantize_cuda(const at::Tensor& in, at::Tensor& out, const FormatParams& p, Rounding mode,
                   uint64_t key, const BlockLayout& blocks);

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

// What a block of a block or scaled format needs, from its largest finite magnitude: the
// `block` argument of step_exponent, and the largest magnitude of its elements.
struct BlockState {
  int block;
  float max_mag;
};

template <Kind K>
LOWP_HD BlockState block_state(const FormatParams& p, uint32_t max_bits) {
  BlockState s;
  if (K == Kind::Scaled) {
    s.block = scale_exponent(p, max_bits);
    s.max_mag = p.element_max * pow2_normal(s.block / 2) * pow2_normal(s.block - s.block / 2);  // exact
  } else {
    block_step(max_bits, p.wl, &s.block, &s.max_mag);
  }
  return s;
}

}  // namespace lowp
