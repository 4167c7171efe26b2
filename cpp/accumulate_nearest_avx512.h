// Rounding to nearest in the AVX-512 build of accumulate_kernels.h, 16 output columns per
// instruction, for the accumulators that most runs use: IEEE binary16 (fp16), whose rounding
// the processor has built in, and the formats of float32's range (bf16, float(8, m)). They
// are the vector forms of add_rounded_nearest_odd and add_rounded_nearest_odd_wide
// (rounding.h), written with intrinsics because the mask registers and the binary16
// conversion are what make them fast: 17-20 instructions per 16 columns where GCC's vectorised
// scalar code takes 22 (bf16) and 37 (fp16). The tests hold them to the reference and to the
// scalar code (LOWP_CPU_ISA=avx2) bit for bit.
#pragma once

#include <immintrin.h>

#include <cstdint>

namespace lowp {
namespace avx512 {

// s = fl32(acc + p), and the exact sum acc + p rounded to odd on float32's 24 bits: TwoSum's
// error e, then one step toward zero where e points below |s| and the last bit set where
// e != 0 (add_rounded_nearest_odd's operations, on the bits, sign and all). Meaningful where s
// is finite; the callers pass s itself through elsewhere.
struct SumToOdd {
  __m512 s;
  __m512i odd;
};

inline SumToOdd sum_rounded_to_odd(__m512 acc, __m512 p) {
  const __m512i magnitude = _mm512_set1_epi32(0x7fffffff), sign = _mm512_set1_epi32(static_cast<int>(0x80000000u));
  const __m512i one = _mm512_set1_epi32(1);
  const __m512 s = _mm512_add_ps(acc, p);
  const __m512 bb = _mm512_sub_ps(s, acc);  // two_sum_error
  const __m512 e = _mm512_add_ps(_mm512_sub_ps(acc, _mm512_sub_ps(s, bb)), _mm512_sub_ps(p, bb));
  const __m512i u = _mm512_castps_si512(s), e_bits = _mm512_castps_si512(e);
  const __mmask16 inexact = _mm512_test_epi32_mask(e_bits, magnitude);
  const __mmask16 below = _mm512_mask_test_epi32_mask(inexact, _mm512_xor_si512(e_bits, u), sign);
  const __m512i toward_zero = _mm512_mask_sub_epi32(u, below, u, one);
  return {s, _mm512_mask_or_epi32(toward_zero, inexact, toward_zero, one)};
}

// Where s is finite the rounded value, else s (Inf and NaN pass, as in the scalar code).
inline __m512 unless_not_finite(__m512 s, __m512 rounded) {
  const __m512i magnitude = _mm512_set1_epi32(0x7fffffff), inf = _mm512_set1_epi32(0x7f800000);
  const __mmask16 finite = _mm512_cmplt_epu32_mask(_mm512_and_si512(_mm512_castps_si512(s), magnitude), inf);
  return _mm512_mask_blend_ps(finite, s, rounded);
}

// binary16: the processor's float32 -> binary16 conversion rounds the odd sum to nearest even
// with binary16's subnormals and its overflow to Inf (24 >= 11 + 2 bits: the correct rounding
// of the exact sum).
struct RoundBinary16 {
  __m512 operator()(__m512 acc, __m512 p) const {
    const SumToOdd t = sum_rounded_to_odd(acc, p);
    const __m256i half = _mm512_cvtps_ph(_mm512_castsi512_ps(t.odd), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    return unless_not_finite(t.s, _mm512_cvtph_ps(half));
  }
};

// A format of float32's range keeping the top 23 - cut mantissa bits: ties to even on the
// bits of the odd sum (add_rounded_nearest_odd_wide; overflow carries into Inf's bits).
struct RoundFloat32Range {
  __m512i cut, half_unit_minus_one, keep;
  explicit RoundFloat32Range(uint32_t c)
      : cut(_mm512_set1_epi32(static_cast<int>(c))),
        half_unit_minus_one(_mm512_set1_epi32(static_cast<int>(((1u << c) - 1u) >> 1))),
        keep(_mm512_set1_epi32(static_cast<int>(~((1u << c) - 1u)))) {}
  __m512 operator()(__m512 acc, __m512 p) const {
    const SumToOdd t = sum_rounded_to_odd(acc, p);
    const __m512i last_kept = _mm512_and_si512(_mm512_srlv_epi32(t.odd, cut), _mm512_set1_epi32(1));
    const __m512i even = _mm512_and_si512(_mm512_add_epi32(_mm512_add_epi32(t.odd, half_unit_minus_one), last_kept), keep);
    return unless_not_finite(t.s, _mm512_castsi512_ps(even));
  }
};

// acc[n] = round(acc[n], fl32(x * b_row[n])) for n < N. (round by value: a local copy, kept in
// registers; the stores to acc could alias the one behind a reference.)
template <typename Round>
inline void add_products_x16(float* acc, float x, const float* b_row, int64_t N, const Round round) {
  const __m512 xs = _mm512_set1_ps(x);
  int64_t n = 0;
  for (; n + 16 <= N; n += 16) {
    const __m512 p = _mm512_mul_ps(xs, _mm512_loadu_ps(b_row + n));
    _mm512_storeu_ps(acc + n, round(_mm512_loadu_ps(acc + n), p));
  }
  if (n < N) {  // the last N % 16 columns, under a mask
    const __mmask16 tail = static_cast<__mmask16>((1u << (N - n)) - 1u);
    const __m512 p = _mm512_mul_ps(xs, _mm512_maskz_loadu_ps(tail, b_row + n));
    _mm512_mask_storeu_ps(acc + n, tail, round(_mm512_maskz_loadu_ps(tail, acc + n), p));
  }
}

}  // namespace avx512
}  // namespace lowp
