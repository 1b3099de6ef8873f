// A 16 x 16 transpose of 32-bit elements in zmm registers, shared by the AVX-512 files (and
// only included by them: it needs their compile flags). Internal linkage in each includer.
#pragma once
#include <immintrin.h>

namespace glm4rt {
namespace {

// 16 rows x 16 dwords transposed in place: in r[i] = row i, out r[c] = column c.
// Two rounds of unpacks transpose each 4 x 4 block inside 128-bit lanes, two rounds of lane
// shuffles place the blocks.
inline void transpose16(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int g = 0; g < 16; g += 4) {  // r[g + j] lane L = rows g..g+3 of column 4L + j
    r[g] = _mm512_unpacklo_epi64(t[g], t[g + 2]);
    r[g + 1] = _mm512_unpackhi_epi64(t[g], t[g + 2]);
    r[g + 2] = _mm512_unpacklo_epi64(t[g + 1], t[g + 3]);
    r[g + 3] = _mm512_unpackhi_epi64(t[g + 1], t[g + 3]);
  }
  for (int j = 0; j < 4; ++j) {
    const __m512i a = _mm512_shuffle_i32x4(r[j], r[4 + j], 0x88), b = _mm512_shuffle_i32x4(r[j], r[4 + j], 0xdd);
    const __m512i c = _mm512_shuffle_i32x4(r[8 + j], r[12 + j], 0x88), d = _mm512_shuffle_i32x4(r[8 + j], r[12 + j], 0xdd);
    t[j] = _mm512_shuffle_i32x4(a, c, 0x88);       // column j
    t[8 + j] = _mm512_shuffle_i32x4(a, c, 0xdd);   // column 8 + j
    t[4 + j] = _mm512_shuffle_i32x4(b, d, 0x88);   // column 4 + j
    t[12 + j] = _mm512_shuffle_i32x4(b, d, 0xdd);  // column 12 + j
  }
  for (int i = 0; i < 16; ++i) r[i] = t[i];
}

}  // namespace
}  // namespace glm4rt
