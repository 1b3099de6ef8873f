// Quantized tiles with 256-bit VNNI (vpdpbusd on ymm): the AVX-VNNI kernels of AVX2-class CPUs
// that have it without AVX-512 (Intel Alder Lake and later client cores, Zen 5 ...).
// Included by two files, each compiled with its own flags and defining GLM4RT_DPBUSD:
//   x86_avx_vnni.cpp       -mavxvnni,               _mm256_dpbusd_avx_epi32 (VEX encoding)
//   x86_avx_vnni_evex.cpp  -mavx512vnni -mavx512vl, _mm256_dpbusd_epi32     (EVEX encoding)
// The two encodings compute the same thing; the EVEX build stands in for the VEX one on CPUs that
// have AVX512-VNNI but not AVX-VNNI (Ice Lake, Zen 4), so that this code is run and tested there.
#pragma once
#include <immintrin.h>

#include <cstddef>
#include <cstdint>
#include <cstring>

#include "../quant.h"

#ifndef GLM4RT_DPBUSD
#error "define GLM4RT_DPBUSD before including x86_avx_vnni_impl.h"
#endif

namespace glm4rt {
namespace {
namespace avx_vnni {

inline int32_t load_i32(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// MT tokens x the 16 rows of one group (layout in quant.h), as two ymm halves: each 64-byte chunk
// holds 4 consecutive k of all 16 rows, bytes 0-31 rows 0-7 and bytes 32-63 rows 8-15 (one row
// per 32-bit lane). One broadcast of 4 activation bytes feeds 8 rows per vpdpbusd. Stored quants
// are unsigned (int8: q + 128, int4: q + 8), so sum(stored * x) - offset * sum(x) is the dot product.
template <int MT, QFormat F>
void qtile(const uint8_t* group, int n_blocks, const int8_t* xq, const float* xs, const int32_t* xsum,
           size_t ldq, size_t lds, float* y, size_t ldy, int rows) {
  constexpr bool kInt4 = F != QFormat::Int8;  // q4k: int4's codes (same bytes, same block size)
  using Block = QBlock<kInt4>;
  const __m256i low4 = _mm256_set1_epi8(0x0f);
  __m256 acc[MT][2];
  for (int m = 0; m < MT; ++m) acc[m][0] = acc[m][1] = _mm256_setzero_ps();
  for (int b = 0; b < n_blocks; ++b) {
    const Block* blk = q_block<kInt4>(group, b);
    for (int h = 0; h < 2; ++h) {  // rows 0-7, then rows 8-15
      __m256i isum[MT];
      for (int m = 0; m < MT; ++m) isum[m] = _mm256_setzero_si256();
      if (kInt4) {
        for (int c = 0; c < 4; ++c) {
          const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk->codes + Block::code_byte(8 * h, 4 * c)));
          const __m256i lo = _mm256_and_si256(v, low4);                         // k = 4c .. 4c+3
          const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);  // k = 16+4c ..
          for (int m = 0; m < MT; ++m) {
            const int8_t* x = xq + m * ldq + b * 32;
            isum[m] = GLM4RT_DPBUSD(isum[m], lo, _mm256_set1_epi32(load_i32(x + 4 * c)));
            isum[m] = GLM4RT_DPBUSD(isum[m], hi, _mm256_set1_epi32(load_i32(x + 16 + 4 * c)));
          }
        }
      } else {
        for (int c = 0; c < 8; ++c) {
          const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk->codes + Block::code_byte(8 * h, 4 * c)));
          for (int m = 0; m < MT; ++m)
            isum[m] = GLM4RT_DPBUSD(isum[m], v, _mm256_set1_epi32(load_i32(xq + m * ldq + b * 32 + 4 * c)));
        }
      }
      if constexpr (F == QFormat::Q4K) {  // xs (D sc isum - M mn xsum), rows 8h .. 8h + 7
        const Q4KBlock* kblk = reinterpret_cast<const Q4KBlock*>(blk);
        const uint8_t* header = q4k_header(group, n_blocks, b / kQ4KSuper);
        const __m256 scale = _mm256_mul_ps(
            _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(header + 16 * h))),
            _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(kblk->sc + 8 * h)))));
        const __m256 offset = _mm256_mul_ps(
            _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(header + kQ4KHeaderBytes / 2 + 16 * h))),
            _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(kblk->mn + 8 * h)))));
        for (int m = 0; m < MT; ++m) {
          const float xsb = xs[m * lds + b];
          acc[m][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[m]), _mm256_mul_ps(scale, _mm256_set1_ps(xsb)), acc[m][h]);
          acc[m][h] = _mm256_fnmadd_ps(offset, _mm256_set1_ps(xsb * static_cast<float>(xsum[m * lds + b])), acc[m][h]);
        }
      } else {
        const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk->scales + sizeof(uint16_t) * 8 * h)));
        for (int m = 0; m < MT; ++m) {
          const __m256i s = _mm256_sub_epi32(isum[m], _mm256_set1_epi32(Block::kCodeOffset * xsum[m * lds + b]));
          acc[m][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_mul_ps(d, _mm256_set1_ps(xs[m * lds + b])),
                                      acc[m][h]);
        }
      }
    }
  }
  for (int m = 0; m < MT; ++m) {
    float out[16];
    _mm256_storeu_ps(out, acc[m][0]);
    _mm256_storeu_ps(out + 8, acc[m][1]);
    for (int r = 0; r < rows && r < 16; ++r) y[m * ldy + r] = out[r];
  }
}

constexpr int kTokensPerTile = 4;

template <QFormat F>
void qgemm_tile(const uint8_t* group, size_t group_bytes, int n_groups, int n_blocks, const int8_t* xq,
                const float* xs, const int32_t* xsum, size_t ldq, size_t lds, int mt, float* y,
                size_t ldy, int rows) {
  for (int g = 0; g < n_groups && rows > 16 * g; ++g) {
    const uint8_t* grp = group + g * group_bytes;
    const int r = rows - 16 * g < 16 ? rows - 16 * g : 16;
    float* yg = y + 16 * g;
    switch (mt) {
      case 1: qtile<1, F>(grp, n_blocks, xq, xs, xsum, ldq, lds, yg, ldy, r); break;
      case 2: qtile<2, F>(grp, n_blocks, xq, xs, xsum, ldq, lds, yg, ldy, r); break;
      case 3: qtile<3, F>(grp, n_blocks, xq, xs, xsum, ldq, lds, yg, ldy, r); break;
      default: qtile<4, F>(grp, n_blocks, xq, xs, xsum, ldq, lds, yg, ldy, r); break;
    }
  }
}

// The avx2 table with these quantized tiles.
KernelTable with_vnni_tiles(const KernelTable& avx2, const char* name) {
  KernelTable t = avx2;
  t.name = name;
  t.qmt = kTokensPerTile;
  t.qgemm_int8 = qgemm_tile<QFormat::Int8>;
  t.qgemm_int4 = qgemm_tile<QFormat::Int4>;
  t.qgemm_q4k = qgemm_tile<QFormat::Q4K>;
  return t;
}

}  // namespace avx_vnni
}  // namespace
}  // namespace glm4rt
