// int4 quantization of one packed block with AVX2 + F16C: quantize_block_int4_ref (quant.cpp) for
// 8 rows at a time, one row per lane, every operation in the reference's order, so the result is
// the reference's bit for bit. Compiled without FMA and with -ffp-contract=off.
#include <immintrin.h>

#include <cmath>

#include "../kernels.h"
#include "../quant.h"

namespace glm4rt {
namespace {

inline __m256 round_even(__m256 v) {  // as quant.cpp's round_even, for |v| < 2^22
  const __m256 magic = _mm256_set1_ps(12582912.0f);
  return _mm256_sub_ps(_mm256_add_ps(v, magic), magic);
}

// std::min(7.0f, std::max(-8.0f, round_even(iscale * w))) (NaN handling as in avx512_quant).
inline __m256 quant_level(__m256 iscale, __m256 w) {
  return _mm256_min_ps(_mm256_max_ps(round_even(_mm256_mul_ps(iscale, w)), _mm256_set1_ps(-8.0f)),
                       _mm256_set1_ps(7.0f));
}

// Rows 8h .. 8h + 7 of the block: wt [32][16] k-major; their codes are the bytes 32h .. 32h + 31
// of each 64-byte chunk (quant.h).
void quantize_half(const float* wt, int h, Q4Block* blk) {
  const __m256 zero = _mm256_setzero_ps(), sign = _mm256_set1_ps(-0.0f);
  __m256 m = zero, abs_m = zero, sum_ww = zero;
  for (int k = 0; k < 32; ++k) {
    const __m256 w = _mm256_loadu_ps(wt + 16 * k + 8 * h), abs_w = _mm256_andnot_ps(sign, w);
    const __m256 bigger = _mm256_cmp_ps(abs_w, abs_m, _CMP_GT_OQ);
    m = _mm256_blendv_ps(m, w, bigger);
    abs_m = _mm256_blendv_ps(abs_m, abs_w, bigger);
    sum_ww = _mm256_add_ps(sum_ww, _mm256_mul_ps(w, w));
  }
  const __m256 nonzero = _mm256_cmp_ps(m, zero, _CMP_NEQ_OQ);
  __m256 best_err = _mm256_set1_ps(INFINITY), best_dq = zero, best_iscale = zero;
  for (int step = -9; step <= 9; ++step) {
    const float c = -(8.0f + 0.1f * static_cast<float>(step));
    const __m256 iscale = _mm256_div_ps(_mm256_set1_ps(c), m);
    __m256 sum_lw = zero, sum_ll = zero;
    for (int k = 0; k < 32; ++k) {
      const __m256 w = _mm256_loadu_ps(wt + 16 * k + 8 * h), l = quant_level(iscale, w);
      sum_lw = _mm256_add_ps(sum_lw, _mm256_mul_ps(l, w));
      sum_ll = _mm256_add_ps(sum_ll, _mm256_mul_ps(l, l));
    }
    const __m128i dh = _mm256_cvtps_ph(_mm256_div_ps(sum_lw, sum_ll), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256 dq = _mm256_cvtph_ps(dh);
    const __m256 err = _mm256_add_ps(_mm256_sub_ps(sum_ww, _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(2.0f), dq), sum_lw)),
                                     _mm256_mul_ps(_mm256_mul_ps(dq, dq), sum_ll));
    const __m256 take = _mm256_and_ps(_mm256_and_ps(nonzero, _mm256_cmp_ps(sum_ll, zero, _CMP_NEQ_OQ)),
                                      _mm256_cmp_ps(err, best_err, _CMP_LT_OQ));
    best_err = _mm256_blendv_ps(best_err, err, take);
    best_dq = _mm256_blendv_ps(best_dq, dq, take);
    best_iscale = _mm256_blendv_ps(best_iscale, iscale, take);
  }
  const __m256i eight = _mm256_set1_epi32(8);
  for (int c = 0; c < 4; ++c) {
    __m256i bytes = _mm256_setzero_si256();
    for (int j = 0; j < 4; ++j) {
      const int k = 4 * c + j;
      const __m256i lo = _mm256_add_epi32(_mm256_cvttps_epi32(quant_level(best_iscale, _mm256_loadu_ps(wt + 16 * k + 8 * h))), eight);
      const __m256i hi = _mm256_add_epi32(_mm256_cvttps_epi32(quant_level(best_iscale, _mm256_loadu_ps(wt + 16 * (k + 16) + 8 * h))), eight);
      bytes = _mm256_or_si256(bytes, _mm256_slli_epi32(_mm256_or_si256(lo, _mm256_slli_epi32(hi, 4)), 8 * j));
    }
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(blk->codes + Q4Block::code_byte(8 * h, 4 * c)), bytes);
  }
  _mm_storeu_si128(reinterpret_cast<__m128i*>(blk->scales + sizeof(uint16_t) * 8 * h),
                   _mm256_cvtps_ph(best_dq, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

}  // namespace

void quantize_int4_avx2(const float* wt, Q4Block* blk) {
  quantize_half(wt, 0, blk);
  quantize_half(wt, 1, blk);
}

}  // namespace glm4rt
