// CPU kernels: at::parallel_for over contiguous spans, a plain inner loop the compiler
// vectorises, and the scalar arithmetic of rounding.h.
//
// This file is compiled once per instruction set (quantize_cpu.cpp: the baseline;
// quantize_cpu_avx2.cpp: AVX2), each time into its own namespace LOWP_CPU_ISA, and
// quantize_cpu() picks the best one the processor supports at run time.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <memory>
#include <vector>

#include "quantize.h"

namespace lowp {
namespace LOWP_CPU_ISA {
namespace {

constexpr int64_t kGrain = 1 << 15;  // elements per task: large enough to amortise scheduling
constexpr int64_t kTile = 2048;      // elements computed while the next tile is prefetched

// Asks for the elements kTile past [begin, end) (up to `limit`) to be brought into cache.
// The loops below walk memory in tiles and prefetch ahead by hand: on the machines we
// measured, the hardware prefetcher alone left these compute-heavy streaming loops 3x slower
// than the same loops on cached data. Short spans (small blocks) prefetch as much as they use.
template <typename scalar_t>
void prefetch_ahead(const scalar_t* data, int64_t begin, int64_t end, int64_t limit) {
  const int64_t stop = std::min(end + kTile, limit);
  for (int64_t j = begin + kTile; j < stop; j += 64 / sizeof(scalar_t)) __builtin_prefetch(data + j);
}

// Calls f(begin, end, block) in parallel over contiguous runs of elements that lie in one
// block (for the element-wise formats: the whole tensor, one "block", cut into pieces).
template <typename F>
void for_each_span(const BlockLayout& layout, F&& f) {
  const int64_t per_dim = (layout.dim_size + layout.block_len - 1) / layout.block_len;
  const int64_t item_len = layout.block_len * layout.inner;
  const int64_t pieces = std::max<int64_t>(1, (item_len + kGrain - 1) / kGrain);
  const int64_t items = layout.outer * per_dim;
  // Tasks of at least kGrain elements; a smaller tensor runs on the calling thread, without
  // the cost of starting a parallel region.
  const int64_t grain = std::max<int64_t>(1, kGrain / std::min(item_len, kGrain));
  at::parallel_for(0, items * pieces, grain, [&](int64_t lo, int64_t hi) {
    // piece p = (o * per_dim + c) * pieces + piece; counted up, not divided (blocks can be short)
    int64_t piece = lo % pieces, c = (lo / pieces) % per_dim, o = (lo / pieces) / per_dim;
    for (int64_t p = lo; p < hi; ++p) {
      const int64_t d0 = c * layout.block_len;
      const int64_t d1 = std::min(layout.dim_size, d0 + layout.block_len);
      const int64_t start = (o * layout.dim_size + d0) * layout.inner;
      const int64_t stop = (o * layout.dim_size + d1) * layout.inner;
      const int64_t begin = start + piece * kGrain;
      const int64_t end = std::min(stop, begin + kGrain);
      if (begin < end) f(begin, end, layout.blocks_per_outer ? o * layout.blocks_per_outer + c : c);
      if (++piece == pieces) {
        piece = 0;
        if (++c == per_dim) {
          c = 0;
          ++o;
        }
      }
    }
  });
}

// One element. Fast: the shortcuts for nearest-even and stochastic rounding (rounding.h);
// callers check that they apply. `step`: the constant step of fixed and block formats, the
// step below the normals of floats.
template <Kind K, Rounding R, bool Fast>
LOWP_HD float quantize_element(const FormatParams& p, float x, int block_e_q, const Step& step, const Range& range,
                               uint32_t rbits) {
  if (Fast) {
    const uint32_t u = bits_of(x);
    const uint32_t a = u & ~kSignBit;
    uint32_t mag;
    if (K == Kind::Float) {
      mag = float_round<R>(p, a, step, rbits);
    } else if (R == Rounding::Stochastic) {
      mag = bits_of(round_stochastic_step(float_of(a), step, rbits));
    } else {
      mag = bits_of(round_nearest_step(float_of(a), step));
    }
    // fixed point and blocks saturate; floats may overflow to Inf
    return K == Kind::Float ? apply_range_rounding_up(u, mag, range) : apply_range_saturating(u, mag, range);
  }
  return quantize_value<R>(x, step_exponent<K>(p, x, block_e_q), range.max_pos, range.max_neg, p.overflow_inf,
                           rbits);
}

// Elements [begin, end) with one block's step and range; the loop body is branch-free
// (rounding.h) and its counter 32-bit, so the compiler vectorises it. The caller splits
// spans at multiples of 2^32, where the high word of the stochastic-rounding counter changes.
template <Kind K, Rounding R, bool Fast, typename scalar_t>
void quantize_span(const scalar_t* __restrict__ in, scalar_t* __restrict__ out, int64_t begin, int64_t end,
                   int64_t numel, const FormatParams p, int block_e_q, float max_pos, float max_neg, uint64_t key) {
  const uint32_t counter_high = static_cast<uint32_t>(static_cast<uint64_t>(begin) >> 32);
  const Step step = make_step(K == Kind::Float ? float_small_step_exponent(p) : Fast ? block_e_q : 0);
  const Range range = make_range(max_pos, max_neg, p.overflow_inf);
  for (int64_t t = begin; t < end; t += kTile) {
    const int64_t stop = std::min(end, t + kTile);
    prefetch_ahead(in, t, stop, numel);
    const scalar_t* tile_in = in + t;
    scalar_t* tile_out = out + t;
    const uint32_t counter_low = static_cast<uint32_t>(t);
    const uint32_t n = static_cast<uint32_t>(stop - t);
    for (uint32_t j = 0; j < n; ++j) {
      const uint32_t r = R == Rounding::Stochastic ? random_bits(key, counter_low + j, counter_high) : 0u;
      tile_out[j] = static_cast<scalar_t>(
          quantize_element<K, R, Fast>(p, static_cast<float>(tile_in[j]), block_e_q, step, range, r));
    }
  }
}

// Whether the shortcuts of rounding.h apply: the two modes they cover, and for fixed point
// and blocks a step they can take.
template <Kind K, Rounding R>
bool shortcuts_apply(int block_e_q) {
  if (K == Kind::Scaled) return false;  // (the general path, for now)
  return (R == Rounding::Nearest || R == Rounding::Stochastic) && (K == Kind::Float || step_is_fast(block_e_q));
}

// quantize_span over [begin, end), split where the counter's high word changes, with the
// shortcuts where they apply.
template <Kind K, Rounding R, typename scalar_t>
void quantize_range(const scalar_t* in, scalar_t* out, int64_t begin, int64_t end, int64_t numel,
                    const FormatParams& p, int block_e_q, float max_pos, float max_neg, uint64_t key) {
  const bool fast = shortcuts_apply<K, R>(block_e_q);
  const auto span = fast ? quantize_span<K, R, true, scalar_t> : quantize_span<K, R, false, scalar_t>;
  const int64_t wrap = (begin | 0xFFFFFFFFLL) + 1;  // next multiple of 2^32
  if (end > wrap) {
    span(in, out, begin, wrap, numel, p, block_e_q, max_pos, max_neg, key);
    begin = wrap;
  }
  span(in, out, begin, end, numel, p, block_e_q, max_pos, max_neg, key);
}

// Largest finite magnitude in [begin, end), as float32 bits (a vectorised max-reduction).
template <typename scalar_t>
uint32_t span_max(const scalar_t* __restrict__ in, int64_t begin, int64_t end, int64_t numel) {
  uint32_t m = 0;
  for (int64_t t = begin; t < end; t += kTile) {
    const int64_t stop = std::min(end, t + kTile);
    prefetch_ahead(in, t, stop, numel);
    const scalar_t* tile = in + t;
    const uint32_t n = static_cast<uint32_t>(stop - t);
    for (uint32_t j = 0; j < n; ++j) {
      const uint32_t a = finite_magnitude_bits(static_cast<float>(tile[j]));
      m = a > m ? a : m;
    }
  }
  return m;
}

// How one block of a block or scaled format is rounded, once its state is known. A scaled
// block with scale 2^E is a fixed-point span with step 2^(E - fl) (fixed-point elements, as
// block floating point is), or a float span whose exponent range is moved up by E (float
// elements), which the float loops handle as long as the moved format's smallest normal and
// step stay where float32 and the shortcuts can take them; otherwise the general scaled path.
struct BlockPlan {
  Kind kind;        // Block (a constant step), Float (moved exponents) or Scaled (general)
  FormatParams p;   // the format the loop sees
  int block;        // step_exponent's block argument
  float max_mag;
};

template <Kind K>
BlockPlan plan_block(const FormatParams& p, const BlockState& s) {
  if (K == Kind::Block) return {Kind::Block, p, s.block, s.max_mag};
  if (p.element == Kind::Fixed) return {Kind::Block, p, p.e_q + s.block, s.max_mag};
  FormatParams moved = p;
  moved.emin = p.emin + s.block;
  moved.max_pos = moved.max_neg = s.max_mag;
  moved.overflow_inf = false;
  if (moved.emin >= -126 && step_is_fast(float_small_step_exponent(moved))) return {Kind::Float, moved, 0, s.max_mag};
  return {Kind::Scaled, p, s.block, s.max_mag};
}

// A short block's elements [begin, end) with the shortcuts: quantize_span's loop without its
// tiling and prefetching, which cost a short block more than they save (measured: 1.7x
// slower in place at block_size=32 through quantize_span).
template <Kind K, Rounding R, typename scalar_t>
void quantize_short_span(const scalar_t* __restrict__ in, scalar_t* __restrict__ out, int64_t begin, int64_t end,
                         const FormatParams& p, int block, float max_mag, uint64_t key) {
  const Step step = make_step(K == Kind::Float ? float_small_step_exponent(p) : block);
  const Range range = make_range(max_mag, max_mag, false);
  const uint32_t counter_low = static_cast<uint32_t>(begin), counter_high = static_cast<uint32_t>(begin >> 32);
  const uint32_t n = static_cast<uint32_t>(end - begin);
  const scalar_t* block_in = in + begin;
  scalar_t* block_out = out + begin;
  for (uint32_t j = 0; j < n; ++j) {
    const uint32_t r = R == Rounding::Stochastic ? random_bits(key, counter_low + j, counter_high) : 0u;
    block_out[j] =
        static_cast<scalar_t>(quantize_element<K, R, true>(p, static_cast<float>(block_in[j]), block, step, range, r));
  }
}

// One block's elements [begin, end) as planned; `short_block`: the elements are few (and in
// cache), so the shortcut loop runs without tiling where the shortcuts apply.
template <Rounding R, typename scalar_t>
void quantize_planned(const BlockPlan& plan, const scalar_t* in, scalar_t* out, int64_t begin, int64_t end,
                      int64_t numel, uint64_t key, bool short_block) {
  const bool one_word = (begin >> 32) == ((end - 1) >> 32);  // the counter's high word is constant
  switch (plan.kind) {
    case Kind::Block:
      if (short_block && one_word && shortcuts_apply<Kind::Block, R>(plan.block)) {
        quantize_short_span<Kind::Block, R>(in, out, begin, end, plan.p, plan.block, plan.max_mag, key);
      } else {
        quantize_range<Kind::Block, R>(in, out, begin, end, numel, plan.p, plan.block, plan.max_mag, plan.max_mag, key);
      }
      break;
    case Kind::Float:
      if (short_block && one_word && shortcuts_apply<Kind::Float, R>(0)) {
        quantize_short_span<Kind::Float, R>(in, out, begin, end, plan.p, 0, plan.max_mag, key);
      } else {
        quantize_range<Kind::Float, R>(in, out, begin, end, numel, plan.p, 0, plan.max_mag, plan.max_mag, key);
      }
      break;
    default:
      quantize_range<Kind::Scaled, R>(in, out, begin, end, numel, plan.p, plan.block, plan.max_mag, plan.max_mag,
                                      key);
  }
}

// Blocks [first, last) of a block_size layout whose blocks are short (a task holds many):
// each block's maximum, then its rounding, while it is in cache, in one loop over the blocks
// that keeps the format's constants in registers (a 32-element block is otherwise mostly
// set-up). K: Block or Scaled.
template <Kind K, Rounding R, typename scalar_t>
void quantize_short_blocks(const scalar_t* __restrict__ in, scalar_t* __restrict__ out, const BlockLayout& layout,
                           int64_t first, int64_t last, const FormatParams& p, uint64_t key) {
  const int64_t numel = layout.numel();
  int64_t o = first / layout.blocks_per_outer, c = first % layout.blocks_per_outer;
  for (int64_t b = first; b < last; ++b) {
    const int64_t d0 = c * layout.block_len;
    const int64_t d1 = std::min(layout.dim_size, d0 + layout.block_len);
    const int64_t begin = (o * layout.dim_size + d0) * layout.inner;
    const int64_t end = (o * layout.dim_size + d1) * layout.inner;
    if (++c == layout.blocks_per_outer) {
      c = 0;
      ++o;
    }
    const BlockPlan plan = plan_block<K>(p, block_state<K>(p, span_max(in, begin, end, numel)));
    quantize_planned<R>(plan, in, out, begin, end, numel, key, true);
  }
}

// Largest finite magnitude (as float32 bits) of every block, without a temporary tensor.
template <typename scalar_t>
std::vector<uint32_t> block_maxima(const scalar_t* in, const BlockLayout& layout) {
  const int64_t n = layout.num_blocks();
  std::unique_ptr<std::atomic<uint32_t>[]> maxima(new std::atomic<uint32_t>[n]);
  for (int64_t b = 0; b < n; ++b) maxima[b].store(0u, std::memory_order_relaxed);
  for_each_span(layout, [&](int64_t begin, int64_t end, int64_t block) {
    const uint32_t m = span_max(in, begin, end, layout.numel());
    uint32_t seen = maxima[block].load(std::memory_order_relaxed);
    while (m > seen && !maxima[block].compare_exchange_weak(seen, m, std::memory_order_relaxed)) {
    }
  });
  std::vector<uint32_t> result(n);
  for (int64_t b = 0; b < n; ++b) result[b] = maxima[b].load(std::memory_order_relaxed);
  return result;
}

}  // namespace

void quantize_cpu(const at::Tensor& in, at::Tensor& out, const FormatParams& p, Rounding mode, uint64_t key,
                  const BlockLayout& layout) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.scalar_type(), "lowp_quantize_cpu", [&] {
    const scalar_t* src = in.const_data_ptr<scalar_t>();
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    const int64_t numel = layout.numel();
    dispatch_kind(p.kind, [&](auto kind) {
      constexpr Kind K = decltype(kind)::value;
      dispatch_rounding(mode, [&](auto rounding) {
        constexpr Rounding R = decltype(rounding)::value;
        if constexpr (K == Kind::Fixed || K == Kind::Float) {
          for_each_span(layout, [&](int64_t begin, int64_t end, int64_t) {
            quantize_range<K, R>(src, dst, begin, end, numel, p, p.e_q, p.max_pos, p.max_neg, key);
          });
        } else if (layout.blocks_per_outer && layout.block_len * layout.inner <= kGrain) {
          // Every span is one whole, small block (block_size runs): one pass, the block
          // maximum taken while its elements are in cache.
          const int64_t grain = std::max<int64_t>(1, kGrain / (layout.block_len * layout.inner));
          at::parallel_for(0, layout.num_blocks(), grain, [&](int64_t first, int64_t last) {
            quantize_short_blocks<K, R>(src, dst, layout, first, last, p, key);
          });
        } else {  // blocks spread over many spans: their maxima first, then the rounding
          const std::vector<uint32_t> maxima = block_maxima(src, layout);
          std::vector<BlockPlan> plans(maxima.size());
          for (size_t b = 0; b < maxima.size(); ++b) plans[b] = plan_block<K>(p, block_state<K>(p, maxima[b]));
          for_each_span(layout, [&](int64_t begin, int64_t end, int64_t block) {
            quantize_planned<R>(plans[block], src, dst, begin, end, numel, key, false);
          });
        }
      });
    });
  });
}

}  // namespace LOWP_CPU_ISA
}  // namespace lowp
