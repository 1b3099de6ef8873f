// int4 quantization of one packed block with AVX-512: quantize_block_int4_ref (quant.cpp) for the
// 16 rows of a group at once, one row per lane, every operation in the reference's order, so the
// result is the reference's bit for bit. Compiled with -ffp-contract=off (no fused multiply-adds
// where the reference rounds twice).
#include <immintrin.h>

#include <cmath>

#include "../kernels.h"
#include "../quant.h"

namespace glm4rt {
namespace {

inline __m512 round_even(__m512 v) {  // as quant.cpp's round_even, for |v| < 2^22
  const __m512 magic = _mm512_set1_ps(12582912.0f);
  return _mm512_sub_ps(_mm512_add_ps(v, magic), magic);
}

// std::min(7.0f, std::max(-8.0f, round_even(iscale * w))): max(x, -8) and min(y, 7) return the
// second operand on NaN, as std::max(-8, x) and std::min(7, y) do.
inline __m512 quant_level(__m512 iscale, __m512 w) {
  return _mm512_min_ps(_mm512_max_ps(round_even(_mm512_mul_ps(iscale, w)), _mm512_set1_ps(-8.0f)),
                       _mm512_set1_ps(7.0f));
}

}  // namespace

void quantize_int4_avx512(const float* wt, Q4Block* blk) {
  const __m512 zero = _mm512_setzero_ps(), sign = _mm512_set1_ps(-0.0f);
  __m512 m = zero, abs_m = zero, sum_ww = zero;
  for (int k = 0; k < 32; ++k) {
    const __m512 w = _mm512_loadu_ps(wt + 16 * k), abs_w = _mm512_andnot_ps(sign, w);
    const __mmask16 bigger = _mm512_cmp_ps_mask(abs_w, abs_m, _CMP_GT_OQ);
    m = _mm512_mask_mov_ps(m, bigger, w);
    abs_m = _mm512_mask_mov_ps(abs_m, bigger, abs_w);
    sum_ww = _mm512_add_ps(sum_ww, _mm512_mul_ps(w, w));
  }
  const __mmask16 nonzero = _mm512_cmp_ps_mask(m, zero, _CMP_NEQ_OQ);
  __m512 best_err = _mm512_set1_ps(INFINITY), best_dq = zero, best_iscale = zero;
  for (int step = -9; step <= 9; ++step) {
    const float c = -(8.0f + 0.1f * static_cast<float>(step));
    const __m512 iscale = _mm512_div_ps(_mm512_set1_ps(c), m);
    __m512 sum_lw = zero, sum_ll = zero;
    for (int k = 0; k < 32; ++k) {
      const __m512 w = _mm512_loadu_ps(wt + 16 * k), l = quant_level(iscale, w);
      sum_lw = _mm512_add_ps(sum_lw, _mm512_mul_ps(l, w));
      sum_ll = _mm512_add_ps(sum_ll, _mm512_mul_ps(l, l));
    }
    const __m256i dh = _mm512_cvtps_ph(_mm512_div_ps(sum_lw, sum_ll), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 dq = _mm512_cvtph_ps(dh);
    const __m512 err = _mm512_add_ps(_mm512_sub_ps(sum_ww, _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(2.0f), dq), sum_lw)),
                                     _mm512_mul_ps(_mm512_mul_ps(dq, dq), sum_ll));
    const __mmask16 take = nonzero & _mm512_cmp_ps_mask(sum_ll, zero, _CMP_NEQ_OQ) &
                           _mm512_cmp_ps_mask(err, best_err, _CMP_LT_OQ);
    best_err = _mm512_mask_mov_ps(best_err, take, err);
    best_dq = _mm512_mask_mov_ps(best_dq, take, dq);
    best_iscale = _mm512_mask_mov_ps(best_iscale, take, iscale);
  }
  // The winning levels, recomputed from the winning inverse scale (lanes never taken: 0 -> q 8).
  const __m512i eight = _mm512_set1_epi32(8);
  for (int c = 0; c < 4; ++c) {
    __m512i bytes = _mm512_setzero_si512();
    for (int j = 0; j < 4; ++j) {
      const int k = 4 * c + j;
      const __m512i lo = _mm512_add_epi32(_mm512_cvttps_epi32(quant_level(best_iscale, _mm512_loadu_ps(wt + 16 * k))), eight);
      const __m512i hi = _mm512_add_epi32(_mm512_cvttps_epi32(quant_level(best_iscale, _mm512_loadu_ps(wt + 16 * (k + 16)))), eight);
      bytes = _mm512_or_si512(bytes, _mm512_slli_epi32(_mm512_or_si512(lo, _mm512_slli_epi32(hi, 4)), 8 * j));
    }
    _mm512_storeu_si512(blk->codes + Q4Block::code_byte(0, 4 * c), bytes);
  }
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(blk->scales),
                      _mm512_cvtps_ph(best_dq, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

}  // namespace glm4rt
