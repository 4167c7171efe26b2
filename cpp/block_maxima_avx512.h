// The block maxima of the AVX-512 build of cpu_kernels.h, for short blocks along the last
// dim (NVFP4's 16): sixteen blocks' maxima in one vector, by a transposed reduction. Reducing
// each block's vector on its own costs ~8 shuffles and maxima a block, and a batch of NVFP4
// blocks spent a fifth of its time there; reducing sixteen vectors into one costs ~3 a block.
// Written with intrinsics because the compiler does not find this reduction.
#pragma once

#include <immintrin.h>

#include <cstdint>

// (GCC 12's masked intrinsics start from an uninitialised "undefined" vector, which
// -Wuninitialized reports at every inlined call.)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"

namespace lowp {
namespace avx512 {

// Four vectors of 16 lanes, reduced pairwise: in each 128-bit lane j, lane 4 * j + t of the
// result holds the maximum of lanes 4 * j .. 4 * j + 3 of vector t.
inline __m512i max_of_quads(__m512i v0, __m512i v1, __m512i v2, __m512i v3) {
  // [v0 v1 v0 v1] per 128-bit lane, each lane the maximum of two of the vector's
  const __m512i w0 = _mm512_max_epu32(_mm512_unpacklo_epi32(v0, v1), _mm512_unpackhi_epi32(v0, v1));
  const __m512i w1 = _mm512_max_epu32(_mm512_unpacklo_epi32(v2, v3), _mm512_unpackhi_epi32(v2, v3));
  // [v0 v1 v2 v3] per 128-bit lane, each the maximum of the vector's four lanes there
  return _mm512_max_epu32(_mm512_unpacklo_epi64(w0, w1), _mm512_unpackhi_epi64(w0, w1));
}

// Two results of max_of_quads (vectors 0-3 and 4-7), reduced across 128-bit lanes: 128-bit
// lane c of the result holds vectors 4 * (c / 2) .. + 3's maxima over lanes 2 * (c % 2) and
// 2 * (c % 2) + 1 (that is, half of the vectors' 512 bits).
inline __m512i max_of_halves(__m512i q0, __m512i q1) {
  return _mm512_max_epu32(_mm512_shuffle_i32x4(q0, q1, 0x88), _mm512_shuffle_i32x4(q0, q1, 0xdd));
}

// The largest of the 16 magnitudes (float32 bits, sign cleared, not masked) of each of 16
// vectors, in order: lane i of the result is vector i's maximum.
inline __m512i lane_maxima(const __m512i v[16]) {
  const __m512i h0 = max_of_halves(max_of_quads(v[0], v[1], v[2], v[3]), max_of_quads(v[4], v[5], v[6], v[7]));
  const __m512i h1 =
      max_of_halves(max_of_quads(v[8], v[9], v[10], v[11]), max_of_quads(v[12], v[13], v[14], v[15]));
  return max_of_halves(h0, h1);
}

// The largest magnitude's bits of each of the 16 blocks of 16 float32s at `in`, into
// maxima[0..15]; returns a bit mask of the blocks that hold Inf or NaN, whose entries are
// then not their largest finite magnitude (the caller recomputes those).
inline uint32_t magnitude_maxima16(const float* in, uint32_t* maxima) {
  const __m512i magnitude = _mm512_set1_epi32(0x7fffffff);
  __m512i v[16];
  for (int i = 0; i < 16; ++i) v[i] = _mm512_and_si512(_mm512_loadu_si512(in + i * 16), magnitude);
  const __m512i result = lane_maxima(v);
  _mm512_storeu_si512(maxima, result);
  return _mm512_cmpgt_epu32_mask(result, _mm512_set1_epi32(0x7f7fffff));  // past the largest finite
}

}  // namespace avx512
}  // namespace lowp

#pragma GCC diagnostic pop
