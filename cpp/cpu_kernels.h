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
#include <cfloat>
#include <cmath>
#include <memory>
#include <vector>

#include "quantize.h"
#if LOWP_CPU_AVX512  // the AVX-512 build (quantize_cpu_avx512.cpp)
#include "block_maxima_avx512.h"
#endif

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
// block (for the element-wise formats: the whole tensor, one "block", cut into pieces). Not
// for column blocks (quantize_column_blocks), where a run crosses many blocks.
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
      if (begin < end) f(begin, end, layout.block_of(o, d0, 0));
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

// (On __restrict__ here and below: `in` and `out` may be one array (in place). Each iteration
// reads element j and then writes element j, touching no other, so no reordering the
// restriction allows can change a result; without it, GCC's run-time alias check would send
// in-place calls to the scalar loop.)
// Elements [begin, end) with one block's step and range; the loop body is branch-free
// (rounding.h) and its counter 32-bit, so the compiler vectorises it. Element t's
// stochastic-rounding counter is t + shift (shift: nonzero for a buffer, see
// quantize_column_blocks). The caller splits spans where the counter's high word changes.
template <Kind K, Rounding R, bool Fast, typename scalar_t>
void quantize_span(const scalar_t* __restrict__ in, scalar_t* __restrict__ out, int64_t begin, int64_t end,
                   int64_t numel, const FormatParams p, int block_e_q, float max_pos, float max_neg, uint64_t key,
                   int64_t shift) {
  const uint32_t counter_high = static_cast<uint32_t>(static_cast<uint64_t>(begin + shift) >> 32);
  const Step step = make_step(K == Kind::Float ? float_small_step_exponent(p) : Fast ? block_e_q : 0);
  const Range range = make_range(max_pos, max_neg, p.overflow_inf);
  for (int64_t t = begin; t < end; t += kTile) {
    const int64_t stop = std::min(end, t + kTile);
    prefetch_ahead(in, t, stop, numel);
    const scalar_t* tile_in = in + t;
    scalar_t* tile_out = out + t;
    const uint32_t counter_low = static_cast<uint32_t>(t + shift);
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

// The first index after `begin` where the counter (index + shift) crosses a multiple of 2^32.
inline int64_t next_counter_wrap(int64_t begin, int64_t shift) { return ((begin + shift) | 0xFFFFFFFFLL) + 1 - shift; }

// quantize_span over [begin, end), split where the counter's high word changes, with the
// shortcuts where they apply.
template <Kind K, Rounding R, typename scalar_t>
void quantize_range(const scalar_t* in, scalar_t* out, int64_t begin, int64_t end, int64_t numel,
                    const FormatParams& p, int block_e_q, float max_pos, float max_neg, uint64_t key,
                    int64_t shift = 0) {
  const bool fast = shortcuts_apply<K, R>(block_e_q);
  const auto span = fast ? quantize_span<K, R, true, scalar_t> : quantize_span<K, R, false, scalar_t>;
  const int64_t wrap = next_counter_wrap(begin, shift);
  if (end > wrap) {
    span(in, out, begin, wrap, numel, p, block_e_q, max_pos, max_neg, key, shift);
    begin = wrap;
  }
  span(in, out, begin, end, numel, p, block_e_q, max_pos, max_neg, key, shift);
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
// A block with a float scale has its own loop (quantize_float_scaled_span).
struct BlockPlan {
  Kind kind;        // Block (a constant step), Float (moved exponents) or Scaled (general)
  FormatParams p;   // the format the loop sees
  int block;        // step_exponent's block argument
  float max_mag;
  float scale;      // a float scale (BlockState); kind is then Scaled
};

template <Kind K>
BlockPlan plan_block(const FormatParams& p, const BlockState& s) {
  if (K == Kind::Block) return {Kind::Block, p, s.block, s.max_mag, 0.0f};
  if (p.scale != ScaleKind::E8m0) return {Kind::Scaled, p, 0, s.max_mag, s.scale};
  if (p.element == Kind::Fixed) return {Kind::Block, p, p.e_q + s.block, s.max_mag, 0.0f};
  FormatParams moved = p;
  moved.emin = p.emin + s.block;
  moved.max_pos = moved.max_neg = s.max_mag;
  moved.overflow_inf = false;
  if (moved.emin >= -126 && step_is_fast(float_small_step_exponent(moved))) {
    return {Kind::Float, moved, 0, s.max_mag, 0.0f};
  }
  return {Kind::Scaled, p, s.block, s.max_mag, 0.0f};
}

// The elements [begin, end) of a block with a float scale (rounding.h), in a loop of their
// own: quantize_float_scaled_fast where it applies (a loop that vectorises), else
// quantize_float_scaled.
template <Rounding R, bool Fast, typename scalar_t>
void quantize_float_scaled_loop(const scalar_t* __restrict__ in, scalar_t* __restrict__ out, int64_t begin,
                                int64_t end, int64_t numel, const FormatParams p, float scale, float inf_mag,
                                uint64_t key, int64_t shift) {
  for (int64_t t = begin; t < end;) {
    // tiles that do not cross a multiple of 2^32, where the counter's high word changes
    const int64_t stop = std::min<int64_t>({end, t + kTile, next_counter_wrap(t, shift)});
    prefetch_ahead(in, t, stop, numel);
    const scalar_t* tile_in = in + t;
    scalar_t* tile_out = out + t;
    const uint32_t counter_low = static_cast<uint32_t>(t + shift);
    const uint32_t counter_high = static_cast<uint32_t>((t + shift) >> 32);
    const uint32_t n = static_cast<uint32_t>(stop - t);
    for (uint32_t j = 0; j < n; ++j) {
      const float x = static_cast<float>(tile_in[j]);
      const uint32_t r = R == Rounding::Stochastic ? random_bits(key, counter_low + j, counter_high) : 0u;
      tile_out[j] = static_cast<scalar_t>(Fast ? quantize_float_scaled_fast<R>(p, x, scale, r)
                                               : quantize_float_scaled<R>(p, x, scale, inf_mag, r));
    }
    t = stop;
  }
}

template <Rounding R, typename scalar_t>
void quantize_float_scaled_span(const scalar_t* in, scalar_t* out, int64_t begin, int64_t end, int64_t numel,
                                const FormatParams& p, float scale, float inf_mag, uint64_t key, int64_t shift) {
  const auto loop = float_scaled_fast_applies<R>(p, scale) ? quantize_float_scaled_loop<R, true, scalar_t>
                                                           : quantize_float_scaled_loop<R, false, scalar_t>;
  loop(in, out, begin, end, numel, p, scale, inf_mag, key, shift);
}

// A short block's elements [begin, end) with the shortcuts: quantize_span's loop without its
// tiling and prefetching, which cost a short block more than they save (measured: 1.7x
// slower in place at block_size=32 through quantize_span).
template <Kind K, Rounding R, typename scalar_t>
void quantize_short_span(const scalar_t* __restrict__ in, scalar_t* __restrict__ out, int64_t begin, int64_t end,
                         const FormatParams& p, int block, float max_mag, uint64_t key, int64_t shift) {
  const Step step = make_step(K == Kind::Float ? float_small_step_exponent(p) : block);
  const Range range = make_range(max_mag, max_mag, false);
  const uint32_t counter_low = static_cast<uint32_t>(begin + shift);
  const uint32_t counter_high = static_cast<uint32_t>((begin + shift) >> 32);
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
// cache), so the shortcut loop runs without tiling where the shortcuts apply. Element t's
// stochastic-rounding counter is t + shift.
template <Rounding R, typename scalar_t>
void quantize_planned(const BlockPlan& plan, const scalar_t* in, scalar_t* out, int64_t begin, int64_t end,
                      int64_t numel, uint64_t key, bool short_block, int64_t shift = 0) {
  const bool one_word = next_counter_wrap(begin, shift) >= end;  // the counter's high word is constant
  const int64_t limit = short_block ? end : numel;                 // a short block prefetches nothing
  if (plan.p.scale != ScaleKind::E8m0) {
    quantize_float_scaled_span<R>(in, out, begin, end, limit, plan.p, plan.scale, plan.max_mag,
                                  key, shift);
    return;
  }
  switch (plan.kind) {
    case Kind::Block:
      if (short_block && one_word && shortcuts_apply<Kind::Block, R>(plan.block)) {
        quantize_short_span<Kind::Block, R>(in, out, begin, end, plan.p, plan.block, plan.max_mag, key, shift);
      } else {
        quantize_range<Kind::Block, R>(in, out, begin, end, limit, plan.p, plan.block, plan.max_mag, plan.max_mag, key,
                                       shift);
      }
      break;
    case Kind::Float:
      if (short_block && one_word && shortcuts_apply<Kind::Float, R>(0)) {
        quantize_short_span<Kind::Float, R>(in, out, begin, end, plan.p, 0, plan.max_mag, key, shift);
      } else {
        quantize_range<Kind::Float, R>(in, out, begin, end, limit, plan.p, 0, plan.max_mag, plan.max_mag, key, shift);
      }
      break;
    default:
      quantize_range<Kind::Scaled, R>(in, out, begin, end, limit, plan.p, plan.block, plan.max_mag, plan.max_mag,
                                      key, shift);
  }
}

// The exponent of the smallest step of a scaled format's element (before scaling).
inline int element_step_exponent(const FormatParams& p) {
  return p.element == Kind::Fixed ? p.e_q : float_small_step_exponent(p);
}

// Whether blocks with power-of-two scales 2^E, E in [e_low, e_high], can be rounded
// normalised: each value divided by its block's 2^E, rounded in the element's own grid and
// multiplied back. True for E8M0 scales when every element value times 2^E is a float32
// (E + element_emax <= 127: multiplying back is exact; the block's largest magnitude is
// finite) and the element's steps are far above float32's normals (so a quotient that
// underflows rounds as the exact quotient would: only its sign and that it is not zero matter).
inline bool normalize_applies(const FormatParams& p, int e_low, int e_high) {
  return p.kind == Kind::Scaled && p.scale == ScaleKind::E8m0 && element_step_exponent(p) >= -93 &&
         element_step_exponent(p) + e_low >= -149 && e_high + p.element_emax <= 127;
}

// The scale exponents of `count` blocks with power-of-two scales from their maxima, into
// exponents[], their largest into *e_high, and whether those blocks can be rounded normalised
// (normalize_applies). (The floor rule in its own loop, which vectorises.)
inline bool normalized_exponents(const FormatParams& p, const uint32_t* maxima, int64_t count, int* exponents,
                                 int* e_high_out) {
  if (p.scale_rule == ScaleRule::Floor) {
    for (int64_t i = 0; i < count; ++i) exponents[i] = floor_scale_exponent(p, maxima[i]);
  } else {
    for (int64_t i = 0; i < count; ++i) exponents[i] = scale_exponent(p, maxima[i]);
  }
  int e_low = 127, e_high = -127;
  for (int64_t i = 0; i < count; ++i) {
    e_low = min_int(e_low, exponents[i]);
    e_high = max_int(e_high, exponents[i]);
  }
  *e_high_out = e_high;
  return normalize_applies(p, e_low, e_high);
}

// One element of a block with power-of-two scale 2^E, normalised (see normalize_applies):
// x * 2^-E rounded in the element's own grid, times 2^E. A quotient that underflowed to zero
// stands in as half of float32's smallest normal, which rounds as the exact quotient would.
// (Underflow = false: the caller knows E <= 0, where x * 2^-E cannot underflow.)
template <Kind KE, Rounding R, bool Fast, bool Underflow = true>
LOWP_HD float quantize_normalized(const FormatParams& p, float x, float scale, float inverse, const Step& step,
                                  const Range& range, uint32_t rbits) {
  const float half_tiny = pow2_normal(-126) * 0.5f;
  float y = x * inverse;
  if (Underflow) y = (y == 0.0f && x != 0.0f) ? std::copysign(half_tiny, x) : y;
  return quantize_element<KE, R, Fast>(p, y, p.e_q, step, range, rbits) * scale;
}

// Largest finite magnitude (bits) of a short block of n elements in cache: span_max without
// its tiling and prefetching.
template <int64_t Len, typename scalar_t>
uint32_t short_block_max(const scalar_t* __restrict__ block, int64_t n) {
  uint32_t m = 0;
  for (int64_t j = 0; j < (Len ? Len : n); ++j) {
    const uint32_t a = finite_magnitude_bits(static_cast<float>(block[j]));
    m = a > m ? a : m;
  }
  return m;
}

// The largest finite magnitude (bits) of each of `count` consecutive blocks of `len` elements
// at `in`, into maxima[]. Len: the block length where it is fixed at compile time, else 0.
template <int64_t Len, typename scalar_t>
void consecutive_block_maxima(const scalar_t* __restrict__ in, int64_t len, int64_t count,
                              uint32_t* __restrict__ maxima) {
  int64_t i = 0;
#if LOWP_CPU_AVX512
  // (blocks of 16 only: for MX's blocks of 32 the same reduction is faster in cache but,
  // measured, ~8% slower streaming a 64 MiB tensor)
  if constexpr (std::is_same_v<scalar_t, float> && Len == 16) {
    for (; i + 16 <= count; i += 16) {
      // (blocks holding Inf or NaN, rare, again without them)
      for (uint32_t special = avx512::magnitude_maxima16(in + i * Len, maxima + i); special;
           special &= special - 1) {
        const int b = __builtin_ctz(special);
        maxima[i + b] = short_block_max<Len>(in + (i + b) * Len, Len);
      }
    }
  }
#endif
  for (; i < count; ++i) maxima[i] = short_block_max<Len>(in + i * len, len);
}

// Blocks [first, last) of a block_size layout whose blocks are short (a task holds many):
// each block's maximum, then its rounding, while it is in cache, in one loop over the blocks
// that keeps the format's constants in registers (a 32-element block is otherwise mostly
// set-up). K: Block or Scaled. tensor_max: the whole tensor's largest finite magnitude (bits),
// for NVFP4's tensor scale.
template <Kind K, Rounding R, typename scalar_t>
void quantize_short_blocks(const scalar_t* __restrict__ in, scalar_t* __restrict__ out, const BlockLayout& layout,
                           int64_t first, int64_t last, const FormatParams& p, uint32_t tensor_max, uint64_t key) {
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
    // The output kTile ahead, for writing: the stores then find their lines in cache instead of
    // waiting to read them in (measured: MX nearest into a preallocated tensor, 8.2 -> 7.5 ms).
    for (int64_t j = begin + kTile; j < std::min(end + kTile, numel); j += 64 / sizeof(scalar_t)) {
      __builtin_prefetch(out + j, 1);
    }
    const BlockPlan plan = plan_block<K>(p, block_state<K>(p, span_max(in, begin, end, numel), tensor_max));
    quantize_planned<R>(plan, in, out, begin, end, numel, key, true);
  }
}

// Short whole blocks [first, last) with float scales (NVFP4's blocks of 16 and the like), a
// batch of blocks at a time, in loops that vectorise: every block's maximum, then their
// scales (float_block_scale, across the blocks), then every element. A loop per block would
// cost a 16-element block more in set-up than in arithmetic. A batch whose stochastic-rounding
// counters cross a multiple of 2^32 goes through quantize_short_blocks. Len: the block
// length where it is fixed at compile time, else 0.
template <Rounding R, int64_t Len, typename scalar_t>
void quantize_float_scaled_blocks(const scalar_t* __restrict__ in, scalar_t* __restrict__ out,
                                  const BlockLayout& layout, int64_t first, int64_t last, const FormatParams p,
                                  uint32_t tensor_max, uint64_t key) {
  // (p by value: a reference could alias the floats written, which keeps the loops scalar)
  constexpr int64_t kBatch = 2048;  // elements
  alignas(64) uint32_t maxima[kBatch];  // (aligned: the AVX-512 maxima are stored a vector at a time)
  float scale[kBatch], inf_mag[kBatch], element_scale[kBatch], element_inf[kBatch];
  const int64_t len = Len ? Len : layout.block_len, per_batch = std::max<int64_t>(1, kBatch / len);
  for (int64_t b0 = first; b0 < last; b0 += per_batch) {
    const int64_t count = std::min(last, b0 + per_batch) - b0, n = count * len;
    const int64_t batch_begin = b0 * len;  // whole blocks along the last dim: contiguous
    if (R == Rounding::Stochastic && next_counter_wrap(batch_begin, 0) < batch_begin + n) {
      quantize_short_blocks<Kind::Scaled, R>(in, out, layout, b0, b0 + count, p, tensor_max, key);
      continue;
    }
    const scalar_t* batch_in = in + batch_begin;
    scalar_t* batch_out = out + batch_begin;
    consecutive_block_maxima<Len>(batch_in, len, count, maxima);
    for (int64_t i = 0; i < count; ++i) float_block_scale(p, maxima[i], tensor_max, &scale[i], &inf_mag[i]);
    uint32_t fast = 1;  // (an integer: a bool reduction stops the vectoriser)
    for (int64_t i = 0; i < count; ++i) fast &= static_cast<uint32_t>(float_scaled_fast_applies<R>(p, scale[i]));
    // Each element's scale beside it, and one loop over the batch: a loop per block would set
    // up the format's constants again for every block (measured: NVFP4 1.5x slower).
    for (int64_t i = 0; i < count; ++i) {
      for (int64_t j = 0; j < len; ++j) element_scale[i * len + j] = scale[i];
    }
    const uint32_t counter_low = static_cast<uint32_t>(batch_begin);
    const uint32_t counter_high = static_cast<uint32_t>(static_cast<uint64_t>(batch_begin) >> 32);
    const auto bits = [&](uint32_t j) {
      return R == Rounding::Stochastic ? random_bits(key, counter_low + j, counter_high) : 0u;
    };
    if (fast) {
      // (a 32-bit index: the counters are 32-bit, and a 64-bit one costs two more instructions)
      for (uint32_t j = 0; j < static_cast<uint32_t>(n); ++j) {
        batch_out[j] = static_cast<scalar_t>(
            quantize_float_scaled_fast<R>(p, static_cast<float>(batch_in[j]), element_scale[j], bits(j)));
      }
    } else {
      for (int64_t i = 0; i < count; ++i) {
        for (int64_t j = 0; j < len; ++j) element_inf[i * len + j] = inf_mag[i];
      }
      for (uint32_t j = 0; j < static_cast<uint32_t>(n); ++j) {
        batch_out[j] = static_cast<scalar_t>(
            quantize_float_scaled<R>(p, static_cast<float>(batch_in[j]), element_scale[j], element_inf[j], bits(j)));
      }
    }
  }
}

// Short blocks [first, last) along the last dim (layout.inner == 1) with power-of-two
// scales, a batch of blocks at a time, in loops that vectorise: every block's maximum, then
// their scale exponents (scale_exponent), then every element rounded normalised
// (quantize_normalized). A batch where normalize_applies does not hold, or whose counters
// cross a multiple of 2^32, goes through quantize_short_blocks, whose loop per block costs an
// MX block of 32 more in set-up than in arithmetic. Len: the block length where it is fixed
// at compile time (blocks of 32 and 16 fill vector registers exactly), else 0.
template <Kind KE, Rounding R, bool Fast, int64_t Len, typename scalar_t>
void quantize_normalized_blocks(const scalar_t* __restrict__ in, scalar_t* __restrict__ out,
                                const BlockLayout& layout, int64_t first, int64_t last, const FormatParams p,
                                uint32_t tensor_max, uint64_t key) {
  // (p by value: a reference could alias the floats written, which keeps the loops scalar)
  constexpr int64_t kBatch = 2048;  // elements
  int64_t starts[kBatch + 1];       // the blocks' offsets in the batch, and its end
  alignas(64) uint32_t maxima[kBatch];  // (aligned: the AVX-512 maxima are stored a vector at a time)
  int exponents[kBatch];
  const int64_t len = Len ? Len : layout.block_len, numel = layout.numel();
  const int64_t per_batch = std::max<int64_t>(1, kBatch / len);
  const Step step = make_step(KE == Kind::Float ? float_small_step_exponent(p) : p.e_q);
  const Range range = make_range(p.element_max, p.element_max, false);
  // block b = o * blocks_per_outer + c is [o * dim_size + c * len, ... + min(len, dim_size - c * len))
  int64_t o = first / layout.blocks_per_outer, c = first % layout.blocks_per_outer;
  for (int64_t b0 = first; b0 < last; b0 += per_batch) {
    const int64_t count = std::min(last, b0 + per_batch) - b0;
    const int64_t batch_begin = o * layout.dim_size + c * len;
    for (int64_t i = 0; i < count; ++i) {
      starts[i] = o * layout.dim_size + c * len - batch_begin;
      starts[i + 1] = o * layout.dim_size + std::min(layout.dim_size, (c + 1) * len) - batch_begin;
      if (++c == layout.blocks_per_outer) {
        c = 0;
        ++o;
      }
    }
    const int64_t batch_end = batch_begin + starts[count];
    const scalar_t* batch_in = in + batch_begin;
    scalar_t* batch_out = out + batch_begin;
    // the output a batch ahead, for writing (as in quantize_short_blocks)
    for (int64_t j = batch_begin + kBatch; j < std::min(batch_end + kBatch, numel); j += 64 / sizeof(scalar_t)) {
      __builtin_prefetch(out + j, 1);
    }
    if (Len) {  // whole blocks, one after the other
      consecutive_block_maxima<Len>(batch_in, Len, count, maxima);
    } else {  // the last block of a row may be short
      for (int64_t i = 0; i < count; ++i) maxima[i] = short_block_max<0>(batch_in + starts[i], starts[i + 1] - starts[i]);
    }
    int e_high;
    if (!normalized_exponents(p, maxima, count, exponents, &e_high) || next_counter_wrap(batch_begin, 0) < batch_end) {
      quantize_short_blocks<Kind::Scaled, R>(in, out, layout, b0, b0 + count, p, tensor_max, key);
      continue;
    }
    const uint32_t counter_high = static_cast<uint32_t>(static_cast<uint64_t>(batch_begin) >> 32);
    const auto round_batch = [&](auto underflow) {
      for (int64_t i = 0; i < count; ++i) {
        const float scale = scale_pow2(1u, exponents[i]), inverse = scale_pow2(1u, -exponents[i]);  // exact
        const int64_t n = Len ? Len : starts[i + 1] - starts[i];
        const scalar_t* block_in = batch_in + starts[i];
        scalar_t* block_out = batch_out + starts[i];
        const uint32_t counter_low = static_cast<uint32_t>(batch_begin + starts[i]);
        for (int64_t j = 0; j < n; ++j) {
          const uint32_t r = R == Rounding::Stochastic
                                 ? random_bits(key, counter_low + static_cast<uint32_t>(j), counter_high)
                                 : 0u;
          block_out[j] = static_cast<scalar_t>(quantize_normalized<KE, R, Fast, decltype(underflow)::value>(
              p, static_cast<float>(block_in[j]), scale, inverse, step, range, r));
        }
      }
    };
    // Scales of at most 1 (the usual: MX blocks of values below 2^emax), where no quotient
    // underflows, skip the check (measured: MX nearest ~20% fewer operations per element).
    if (e_high > 0) {
      round_batch(std::true_type());
    } else {
      round_batch(std::false_type());
    }
  }
}

// quantize_normalized_blocks for p's element kind, block length and the shortcuts.
template <Rounding R, typename scalar_t>
void quantize_normalized_blocks_of(const scalar_t* in, scalar_t* out, const BlockLayout& layout, int64_t first,
                                   int64_t last, const FormatParams& p, uint32_t tensor_max, uint64_t key) {
  const bool fast = shortcuts_apply<Kind::Block, R>(element_step_exponent(p));
  const bool whole = layout.dim_size % layout.block_len == 0;
  const auto run = [&](auto element, auto len) {
    constexpr Kind KE = decltype(element)::value;
    constexpr int64_t Len = decltype(len)::value;
    const auto blocks = fast ? quantize_normalized_blocks<KE, R, true, Len, scalar_t>
                             : quantize_normalized_blocks<KE, R, false, Len, scalar_t>;
    blocks(in, out, layout, first, last, p, tensor_max, key);
  };
  const auto with_len = [&](auto element) {
    if (whole && layout.block_len == 32) return run(element, std::integral_constant<int64_t, 32>());
    if (whole && layout.block_len == 16) return run(element, std::integral_constant<int64_t, 16>());
    run(element, std::integral_constant<int64_t, 0>());
  };
  if (p.element == Kind::Fixed) {
    with_len(std::integral_constant<Kind, Kind::Block>());
  } else {
    with_len(std::integral_constant<Kind, Kind::Float>());
  }
}

// quantize_short_blocks, or quantize_float_scaled_blocks / quantize_normalized_blocks where they apply.
template <Kind K, Rounding R, typename scalar_t>
void quantize_blocks(const scalar_t* in, scalar_t* out, const BlockLayout& layout, int64_t first, int64_t last,
                     const FormatParams& p, uint32_t tensor_max, uint64_t key) {
  if (K == Kind::Scaled && p.scale != ScaleKind::E8m0 && layout.inner == 1 &&
      layout.dim_size % layout.block_len == 0 && layout.block_len <= 256) {
    if (layout.block_len == 16) {
      quantize_float_scaled_blocks<R, 16>(in, out, layout, first, last, p, tensor_max, key);
    } else if (layout.block_len == 32) {
      quantize_float_scaled_blocks<R, 32>(in, out, layout, first, last, p, tensor_max, key);
    } else {
      quantize_float_scaled_blocks<R, 0>(in, out, layout, first, last, p, tensor_max, key);
    }
  } else if (K == Kind::Scaled && p.scale == ScaleKind::E8m0 && layout.inner == 1 && layout.block_len <= 256) {
    quantize_normalized_blocks_of<R>(in, out, layout, first, last, p, tensor_max, key);
  } else {
    quantize_short_blocks<K, R>(in, out, layout, first, last, p, tensor_max, key);
  }
}

// Runs along a dim that is not the last (layout.inner > 1): each block is a strided column of
// a [block_len, inner] slab; a task takes the columns [i0, i0 + width) of one slab. Counters
// are as if the dim had been moved last (BlockLayout::counter_of).

// The slab's rows [d0, d0 + n) x columns [i0, i0 + width), row by row, where each column's
// block can be rounded with constants set once per column (scale[w] and the like): the loop
// over a row's columns then vectorises. element(x, w, rbits): x of column w rounded.
template <Rounding R, typename scalar_t, typename Element>
void quantize_column_rows(const scalar_t* in, scalar_t* out, const BlockLayout& layout, int64_t o, int64_t d0,
                          int64_t n, int64_t i0, int64_t width, uint64_t key, const Element& element) {
  for (int64_t k = 0; k < n; ++k) {
    const int64_t offset = (o * layout.dim_size + d0 + k) * layout.inner + i0;
    const scalar_t* row_in = in + offset;
    scalar_t* row_out = out + offset;
    // column w's counter: counter + w * dim_size; bits(w) draws its random bits
    const uint64_t counter = static_cast<uint64_t>(layout.counter_of(o, d0 + k, i0));
    const auto round_row = [&](auto bits) {
      for (int64_t w = 0; w < width; ++w) {
        row_out[w] = static_cast<scalar_t>(element(static_cast<float>(row_in[w]), w, bits(w)));
      }
    };
    const uint64_t last = counter + static_cast<uint64_t>((width - 1) * layout.dim_size);
    if (R != Rounding::Stochastic) {
      round_row([](int64_t) { return 0u; });
    } else if ((counter >> 32) == (last >> 32)) {  // one high word: 32-bit counters, which vectorise
      const uint32_t low = static_cast<uint32_t>(counter), high = static_cast<uint32_t>(counter >> 32);
      const uint32_t stride = static_cast<uint32_t>(layout.dim_size);
      round_row([&](int64_t w) { return random_bits(key, low + static_cast<uint32_t>(w) * stride, high); });
    } else {
      round_row([&](int64_t w) { return random_bits(key, counter + static_cast<uint64_t>(w * layout.dim_size)); });
    }
  }
}

// Columns with power-of-two scales 2^E, rounded normalised (see normalize_applies) with the
// element's constant step.
template <Kind KE, Rounding R, bool Fast, bool Underflow, typename scalar_t>
void quantize_normalized_rows(const scalar_t* in, scalar_t* out, const BlockLayout& layout, const FormatParams p,
                              int64_t o, int64_t d0, int64_t n, int64_t i0, int64_t width, const float* scale,
                              const float* inverse, uint64_t key) {
  const Step step = make_step(KE == Kind::Float ? float_small_step_exponent(p) : p.e_q);
  const Range range = make_range(p.element_max, p.element_max, false);
  quantize_column_rows<R>(in, out, layout, o, d0, n, i0, width, key, [&](float x, int64_t w, uint32_t rbits) {
    return quantize_normalized<KE, R, Fast, Underflow>(p, x, scale[w], inverse[w], step, range, rbits);
  });
}

// Columns with float scales, where quantize_float_scaled_fast applies to every one.
template <Rounding R, typename scalar_t>
void quantize_float_scaled_rows(const scalar_t* in, scalar_t* out, const BlockLayout& layout, const FormatParams p,
                                int64_t o, int64_t d0, int64_t n, int64_t i0, int64_t width, const float* scale,
                                uint64_t key) {
  quantize_column_rows<R>(in, out, layout, o, d0, n, i0, width, key, [&](float x, int64_t w, uint32_t rbits) {
    return quantize_float_scaled_fast<R>(p, x, scale[w], rbits);
  });
}

// Otherwise: a task copies its columns into a buffer, one block after the other, rounds each
// there as a short contiguous block, and copies the results back.
template <Kind K, Rounding R, typename scalar_t>
void quantize_transposed_columns(const scalar_t* in, scalar_t* out, const BlockLayout& layout,
                                 const FormatParams& p, const BlockState* states, int64_t o, int64_t d0, int64_t n,
                                 int64_t i0, int64_t width, float* held, float* rounded, uint64_t key) {
  const int64_t inner = layout.inner;
  for (int64_t k = 0; k < n; ++k) {
    const scalar_t* row = in + (o * layout.dim_size + d0 + k) * inner + i0;
    for (int64_t w = 0; w < width; ++w) held[w * n + k] = static_cast<float>(row[w]);
  }
  for (int64_t w = 0; w < width; ++w) {
    const int64_t shift = layout.counter_of(o, d0, i0 + w) - w * n;
    quantize_planned<R>(plan_block<K>(p, states[w]), held, rounded, w * n, (w + 1) * n, width * n, key, true, shift);
  }
  for (int64_t k = 0; k < n; ++k) {
    scalar_t* row = out + (o * layout.dim_size + d0 + k) * inner + i0;
    for (int64_t w = 0; w < width; ++w) row[w] = static_cast<scalar_t>(rounded[w * n + k]);
  }
}

// Column blocks: each task finds its columns' maxima row by row (a vectorised loop), then
// rounds them row by row (normalised, or with float scales through the shortcuts) or through
// a buffer. (Measured at blocks of 32 along dim 0 of
// 4096 x 4096: ~1.5x x.clone() normalised, ~6x through the buffer; moving the whole tensor's
// dim last, as this replaced, took 12-15x.)
template <Kind K, Rounding R, typename scalar_t>
void quantize_column_blocks(const scalar_t* in, scalar_t* out, const BlockLayout& layout, const FormatParams& p,
                            uint32_t tensor_max, uint64_t key) {
  constexpr int64_t kBufferElements = 4096;  // per buffer: 16 KiB, two of them in L1
  const int64_t len = layout.block_len, inner = layout.inner;
  const int64_t per_dim = (layout.dim_size + len - 1) / len;
  // at least 16 columns: one 64-byte line of float32 read per row
  const int64_t columns = std::min(inner, std::max<int64_t>(16, kBufferElements / len));
  const int64_t groups = (inner + columns - 1) / columns;
  const int64_t grain = std::max<int64_t>(1, kGrain / (columns * len));
  const bool fast = K == Kind::Scaled && shortcuts_apply<Kind::Block, R>(element_step_exponent(p));
  at::parallel_for(0, layout.outer * per_dim * groups, grain, [&](int64_t first, int64_t last) {
    std::vector<float> buffer(2 * columns * len);
    std::vector<uint32_t> maxima(columns);
    std::vector<BlockState> states(columns);
    std::vector<float> scale(columns), inverse(columns), inf_mag(columns);
    std::vector<int> exponents(columns);
    for (int64_t task = first; task < last; ++task) {
      const int64_t g = task % groups, c = (task / groups) % per_dim, o = task / groups / per_dim;
      const int64_t d0 = c * len, n = std::min(layout.dim_size, d0 + len) - d0;
      const int64_t i0 = g * columns, width = std::min(inner, i0 + columns) - i0;
      std::fill(maxima.begin(), maxima.end(), 0u);
      for (int64_t k = 0; k < n; ++k) {
        const scalar_t* row = in + (o * layout.dim_size + d0 + k) * inner + i0;
        for (int64_t w = 0; w < width; ++w) {
          const uint32_t a = finite_magnitude_bits(static_cast<float>(row[w]));
          maxima[w] = a > maxima[w] ? a : maxima[w];
        }
      }
      if (K == Kind::Scaled && p.scale != ScaleKind::E8m0) {  // float scales, across the columns
        // (inf_mag: what +-Inf becomes, element_max * s, which the shortcuts give anyway; two
        // loops, each of which vectorises)
        for (int64_t w = 0; w < width; ++w) float_block_scale(p, maxima[w], tensor_max, &scale[w], &inf_mag[w]);
        uint32_t all_fast = 1;  // (an integer: a bool reduction stops the vectoriser)
        for (int64_t w = 0; w < width; ++w) {
          all_fast &= static_cast<uint32_t>(float_scaled_fast_applies<R>(p, scale[w]));
        }
        if (all_fast) {
          quantize_float_scaled_rows<R>(in, out, layout, p, o, d0, n, i0, width, scale.data(), key);
          continue;
        }
      }
      // power-of-two scales: the exponents across the columns, and 2^E, 2^-E where the
      // columns can be rounded normalised; else (and for block floating point) per column
      int e_high = 0;
      const bool normalized = K == Kind::Scaled && p.scale == ScaleKind::E8m0 &&
                              normalized_exponents(p, maxima.data(), width, exponents.data(), &e_high);
      if (!normalized) {
        for (int64_t w = 0; w < width; ++w) states[w] = block_state<K>(p, maxima[w], tensor_max);
        quantize_transposed_columns<K, R>(in, out, layout, p, states.data(), o, d0, n, i0, width, buffer.data(),
                                          buffer.data() + columns * len, key);
        continue;
      }
      for (int64_t w = 0; w < width; ++w) {  // E in [-127, 127], exactly
        scale[w] = scale_pow2(1u, exponents[w]);
        inverse[w] = scale_pow2(1u, -exponents[w]);
      }
      // (scales of at most 1: no quotient underflows, see quantize_normalized)
      const auto rows_of = [&](auto underflow) {
        constexpr bool U = decltype(underflow)::value;
        return p.element == Kind::Fixed ? (fast ? quantize_normalized_rows<Kind::Block, R, true, U, scalar_t>
                                                : quantize_normalized_rows<Kind::Block, R, false, U, scalar_t>)
                                        : (fast ? quantize_normalized_rows<Kind::Float, R, true, U, scalar_t>
                                                : quantize_normalized_rows<Kind::Float, R, false, U, scalar_t>);
      };
      const auto rows = e_high > 0 ? rows_of(std::true_type()) : rows_of(std::false_type());
      rows(in, out, layout, p, o, d0, n, i0, width, scale.data(), inverse.data(), key);
    }
  });
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
        } else {
          // NVFP4's tensor scale needs the whole tensor's largest finite magnitude first.
          const uint32_t tensor_max = p.tensor_scale ? block_maxima(src, BlockLayout{1, 1, numel})[0] : 0u;
          if (layout.column_blocks()) {
            quantize_column_blocks<K, R>(src, dst, layout, p, tensor_max, key);
          } else if (layout.blocks_per_outer && layout.tile_rows == 1 && layout.block_len <= kGrain) {
            // Every span is one whole, small block (block_size runs): one pass, the block
            // maximum taken while its elements are in cache.
            const int64_t grain = std::max<int64_t>(1, kGrain / (layout.block_len * layout.inner));
            at::parallel_for(0, layout.num_blocks(), grain, [&](int64_t first, int64_t last) {
              quantize_blocks<K, R>(src, dst, layout, first, last, p, tensor_max, key);
            });
          } else {  // blocks spread over many spans: their maxima first, then the rounding
            const std::vector<uint32_t> maxima = block_maxima(src, layout);
            std::vector<BlockPlan> plans(maxima.size());
            for (size_t b = 0; b < maxima.size(); ++b) {
              plans[b] = plan_block<K>(p, block_state<K>(p, maxima[b], tensor_max));
            }
            for_each_span(layout, [&](int64_t begin, int64_t end, int64_t block) {
              quantize_planned<R>(plans[block], src, dst, begin, end, numel, key, false);
            });
          }
        }
      });
    });
  });
}

}  // namespace LOWP_CPU_ISA
}  // namespace lowp
