// The accumulation kernel of accumulate_cpu.cpp, included once per instruction set into its
// own namespace LOWP_CPU_ISA (no include guard: that is the point).
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "quantize.h"
#if LOWP_CPU_AVX512  // the AVX-512 build (accumulate_cpu.cpp)
#include "accumulate_nearest_avx512.h"
#endif

namespace lowp {
namespace LOWP_CPU_ISA {
namespace {

// The rows [row_begin, row_end) of the (B * M) x N result. Per row: one accumulator per
// output column n, the products added k by k by add_products(acc, x, b_row,
// first), which loops over n (innermost, so that it can vectorise; `first` is the random-bit
// counter of column 0, (row * N) * K + k), promoted into float32 every `chunk` products (0:
// never).
template <typename AddProducts>
inline void accumulate_rows(const float* a, const float* b, float* out, int64_t M, int64_t K, int64_t N, int64_t chunk,
                            int64_t row_begin, int64_t row_end, AddProducts add_products) {
  std::vector<float> acc_buffer(static_cast<size_t>(N)), acc32_buffer(static_cast<size_t>(N));
  float* __restrict acc = acc_buffer.data();
  float* __restrict acc32 = acc32_buffer.data();
  for (int64_t row = row_begin; row < row_end; ++row) {
    const int64_t batch = row / M;
    const float* a_row = a + row * K;
    const float* b_mat = b + batch * K * N;
    float* __restrict out_row = out + row * N;
    std::fill(acc, acc + N, 0.0f);
    std::fill(acc32, acc32 + N, 0.0f);
    const uint64_t row_counter = static_cast<uint64_t>(row) * static_cast<uint64_t>(N) * static_cast<uint64_t>(K);
    int64_t since_promotion = 0;
    for (int64_t k = 0; k < K; ++k) {
      add_products(acc, a_row[k], b_mat + k * N, row_counter + static_cast<uint64_t>(k));
      if (chunk > 0 && ++since_promotion == chunk) {
        since_promotion = 0;
        for (int64_t n = 0; n < N; ++n) {
          acc32[n] = add_rn(acc32[n], acc[n]);
          acc[n] = 0.0f;
        }
      }
    }
    if (chunk > 0) {
      for (int64_t n = 0; n < N; ++n) out_row[n] = add_rn(acc32[n], acc[n]);
    } else {
      std::copy(acc, acc + N, out_row);
    }
  }
}

// The rows in mode R: nearest by the fewest operations that apply to f (the same bits:
// the vector forms of accumulate_nearest_avx512.h in the AVX-512 build, add_rounded_nearest_odd_wide,
// add_rounded_nearest_odd, add_rounded_nearest_fast), the other modes by add_rounded.
template <Rounding R>
inline void accumulate_rows_in(const float* a, const float* b, float* out, int64_t M, int64_t K, int64_t N,
                               const FormatParams& params, int64_t chunk, uint64_t key, int64_t row_begin,
                               int64_t row_end) {
  const FormatParams f = params;  // a local copy: stores to the accumulators cannot alias it
  if (R == Rounding::Nearest) {
#if LOWP_CPU_AVX512
    if (is_binary16(f) || (f.man <= 21 && has_float32_range(f))) {
      const bool binary16 = is_binary16(f);
      const RoundFloat32Range float32_range(static_cast<uint32_t>(23 - f.man));
      accumulate_rows(a, b, out, M, K, N, chunk, row_begin, row_end,
                      [&](float* acc, float x, const float* b_row, uint64_t) {
                        if (binary16) {
                          add_products_x16(acc, x, b_row, N, RoundBinary16());
                        } else {
                          add_products_x16(acc, x, b_row, N, float32_range);
                        }
                      });
      return;
    }
#endif
    const Step small = make_step(float_small_step_exponent(f));
    const NearestOdd odd_params = make_nearest_odd(f);
    const uint32_t cut = static_cast<uint32_t>(23 - f.man);
    const bool wide = f.man <= 21 && has_float32_range(f), odd = nearest_odd_applies(f), fast = f.man <= 22;
    accumulate_rows(a, b, out, M, K, N, chunk, row_begin, row_end,
                    [&](float* __restrict acc, float x, const float* __restrict b_row, uint64_t) {
                      if (wide) {
                        for (int64_t n = 0; n < N; ++n) acc[n] = add_rounded_nearest_odd_wide(acc[n], mul_rn(x, b_row[n]), cut);
                      } else if (odd) {
                        for (int64_t n = 0; n < N; ++n) acc[n] = add_rounded_nearest_odd(acc[n], mul_rn(x, b_row[n]), odd_params);
                      } else if (fast) {
                        for (int64_t n = 0; n < N; ++n) acc[n] = add_rounded_nearest_fast(acc[n], mul_rn(x, b_row[n]), f, small);
                      } else {
                        for (int64_t n = 0; n < N; ++n) acc[n] = add_rounded<R>(acc[n], mul_rn(x, b_row[n]), f, 0u);
                      }
                    });
    return;
  }
  const uint32_t cut = static_cast<uint32_t>(23 - f.man);
  const bool wide = f.man <= 21 && has_float32_range(f);
  accumulate_rows(
      a, b, out, M, K, N, chunk, row_begin, row_end,
      [&](float* __restrict acc, float x, const float* __restrict b_row, uint64_t first) {
        if (R != Rounding::Stochastic) {
          for (int64_t n = 0; n < N; ++n) acc[n] = add_rounded<R>(acc[n], mul_rn(x, b_row[n]), f, 0u);
          return;
        }
        // counter of (row, n, k): (row * N + n) * K + k = first + n * K
        const uint64_t last = first + static_cast<uint64_t>(N - 1) * static_cast<uint64_t>(K);
        if ((first >> 32) == (last >> 32)) {
          // The counters' high halves agree: 32-bit counters, which vectorise.
          const uint32_t low = static_cast<uint32_t>(first), high = static_cast<uint32_t>(first >> 32);
          const uint32_t stride = static_cast<uint32_t>(K);
          if (wide) {  // fewer operations, the same bits
            for (int64_t n = 0; n < N; ++n) {
              const uint32_t r = random_bits(key, low + static_cast<uint32_t>(n) * stride, high);
              acc[n] = add_rounded_stochastic_wide(acc[n], mul_rn(x, b_row[n]), cut, r);
            }
            return;
          }
          for (int64_t n = 0; n < N; ++n) {
            const uint32_t r = random_bits(key, low + static_cast<uint32_t>(n) * stride, high);
            acc[n] = add_rounded<R>(acc[n], mul_rn(x, b_row[n]), f, r);
          }
        } else {
          for (int64_t n = 0; n < N; ++n) {
            const uint64_t counter = first + static_cast<uint64_t>(n) * static_cast<uint64_t>(K);
            acc[n] = add_rounded<R>(acc[n], mul_rn(x, b_row[n]), f, random_bits(key, counter));
          }
        }
      });
}

// Tasks of whole rows, about 2^16 products each.
template <Rounding R>
void accumulate_all(const float* a, const float* b, float* out, int64_t rows, int64_t M, int64_t K, int64_t N,
                    const FormatParams& f, int64_t chunk, uint64_t key) {
  const int64_t per_row = std::max<int64_t>(1, K * N);
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / per_row);
  at::parallel_for(0, rows, grain, [&](int64_t lo, int64_t hi) {
    accumulate_rows_in<R>(a, b, out, M, K, N, f, chunk, key, lo, hi);
  });
}

// The tensor-core model (AlignedSum; truncate_to_step in rounding.h) on rows
// [row_begin, row_end): per group of `group` products, a pass over the group for every
// column's largest exponent, then one that sums the truncated terms exactly: in float where
// that is exact (bits + ceil(log2(group + 1)) <= 24 and no column's sum can pass float32's
// range; every term is a multiple of 2^(e - bits + 1) below 2^(e + 1), and so are the partial
// sums), else in double (at most 32 + 17 = 49 significant bits). Both give the exact sum, so
// the same bits.
template <bool TowardZero>
inline void aligned_rows(const float* a, const float* b, float* out, int64_t M, int64_t K, int64_t N, int64_t group,
                         int bits, int64_t chunk, int64_t row_begin, int64_t row_end) {
  int carry_bits = 0;  // ceil(log2(group + 1))
  while ((int64_t{1} << carry_bits) < group + 1) ++carry_bits;
  const bool float_sums = bits + carry_bits <= 24;
  const int float_e_limit = 126 - carry_bits;  // sums of magnitude below 2^127
  std::vector<float> acc_buffer(static_cast<size_t>(N)), acc32_buffer(static_cast<size_t>(N));
  std::vector<float> sum32_buffer(static_cast<size_t>(N));
  std::vector<int> e_buffer(static_cast<size_t>(N));
  std::vector<double> sum_buffer(static_cast<size_t>(N));
  float* __restrict acc = acc_buffer.data();
  float* __restrict acc32 = acc32_buffer.data();
  float* __restrict sum32 = sum32_buffer.data();
  int* __restrict e_max = e_buffer.data();
  double* __restrict sum = sum_buffer.data();
  for (int64_t row = row_begin; row < row_end; ++row) {
    const float* a_row = a + row * K;
    const float* b_mat = b + (row / M) * K * N;
    std::fill(acc, acc + N, 0.0f);
    std::fill(acc32, acc32 + N, 0.0f);
    int64_t since_promotion = 0;
    for (int64_t k0 = 0; k0 < K; k0 += group) {
      const int64_t k1 = std::min(K, k0 + group);
      for (int64_t n = 0; n < N; ++n) e_max[n] = aligned_exponent(acc[n]);
      for (int64_t k = k0; k < k1; ++k) {
        const float x = a_row[k];
        const float* __restrict b_row = b_mat + k * N;
        for (int64_t n = 0; n < N; ++n) e_max[n] = max_int(e_max[n], aligned_exponent(mul_rn(x, b_row[n])));
      }
      int top = kNoExponent;
      for (int64_t n = 0; n < N; ++n) top = max_int(top, e_max[n]);
      if (float_sums && top <= float_e_limit) {
        for (int64_t n = 0; n < N; ++n) sum32[n] = truncate_to_step(acc[n], e_max[n] - bits + 1);
        for (int64_t k = k0; k < k1; ++k) {
          const float x = a_row[k];
          const float* __restrict b_row = b_mat + k * N;
          for (int64_t n = 0; n < N; ++n)
            sum32[n] = add_rn(sum32[n], truncate_to_step(mul_rn(x, b_row[n]), e_max[n] - bits + 1));
        }
        std::copy(sum32, sum32 + N, acc);  // exact: nothing to round
      } else {
        for (int64_t n = 0; n < N; ++n) sum[n] = truncate_to_step(acc[n], e_max[n] - bits + 1);
        for (int64_t k = k0; k < k1; ++k) {
          const float x = a_row[k];
          const float* __restrict b_row = b_mat + k * N;
          for (int64_t n = 0; n < N; ++n) sum[n] += truncate_to_step(mul_rn(x, b_row[n]), e_max[n] - bits + 1);
        }
        for (int64_t n = 0; n < N; ++n) acc[n] = store_float32<TowardZero>(sum[n]);
      }
      since_promotion += k1 - k0;
      if (chunk > 0 && since_promotion == chunk) {  // chunk is a multiple of group
        since_promotion = 0;
        for (int64_t n = 0; n < N; ++n) {
          acc32[n] = add_rn(acc32[n], acc[n]);
          acc[n] = 0.0f;
        }
      }
    }
    float* __restrict out_row = out + row * N;
    if (chunk > 0) {
      for (int64_t n = 0; n < N; ++n) out_row[n] = add_rn(acc32[n], acc[n]);
    } else {
      std::copy(acc, acc + N, out_row);
    }
  }
}

}  // namespace

// One kernel, instantiated per rounding mode (compile-time dispatch).
void accumulate(Rounding mode, const float* a, const float* b, float* out, int64_t rows, int64_t M, int64_t K,
                int64_t N, const FormatParams& f, int64_t chunk, uint64_t key) {
  switch (mode) {
    case Rounding::Nearest: return accumulate_all<Rounding::Nearest>(a, b, out, rows, M, K, N, f, chunk, key);
    case Rounding::NearestAway: return accumulate_all<Rounding::NearestAway>(a, b, out, rows, M, K, N, f, chunk, key);
    case Rounding::TowardZero: return accumulate_all<Rounding::TowardZero>(a, b, out, rows, M, K, N, f, chunk, key);
    case Rounding::Down: return accumulate_all<Rounding::Down>(a, b, out, rows, M, K, N, f, chunk, key);
    case Rounding::Up: return accumulate_all<Rounding::Up>(a, b, out, rows, M, K, N, f, chunk, key);
    case Rounding::Stochastic: return accumulate_all<Rounding::Stochastic>(a, b, out, rows, M, K, N, f, chunk, key);
  }
}

// The tensor-core model, in tasks of whole rows of about 2^16 products each.
void accumulate_aligned(bool toward_zero, const float* a, const float* b, float* out, int64_t rows, int64_t M,
                        int64_t K, int64_t N, int64_t group, int bits, int64_t chunk) {
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(1, K * N));
  at::parallel_for(0, rows, grain, [&](int64_t lo, int64_t hi) {
    if (toward_zero) {
      aligned_rows<true>(a, b, out, M, K, N, group, bits, chunk, lo, hi);
    } else {
      aligned_rows<false>(a, b, out, M, K, N, group, bits, chunk, lo, hi);
    }
  });
}

}  // namespace LOWP_CPU_ISA
}  // namespace lowp
