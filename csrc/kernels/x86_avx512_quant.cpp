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

namespace glm4rt {
namespace {

// std::min(a, b) is (b < a) ? b : a, which _mm512_min_ps(b, a) computes (the same value and the
// same zero sign when a == b); likewise std::max(a, b) = _mm512_max_ps(b, a).
inline __m512 std_min(__m512 a, __m512 b) { return _mm512_min_ps(b, a); }
inline __m512 std_max(__m512 a, __m512 b) { return _mm512_max_ps(b, a); }
inline __m512 negate(__m512 x) {  // -x: the sign bit flipped, as the reference's unary minus
  return _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(x), _mm512_set1_epi32(INT32_MIN)));
}

// q4k_block_fit_ref for 16 rows: w[k] and v[k] of the block's weight k, one row per lane.
void q4k_block_fit(const __m512* w, const float* v, __m512* s_out, __m512* o_out) {
  const __m512 zero = _mm512_setzero_ps(), one = _mm512_set1_ps(1.0f), fifteen = _mm512_set1_ps(15.0f);
  __m512 lo = zero, hi = _mm512_set1_ps(-INFINITY), sw = zero, swx = zero;
  for (int k = 0; k < kQBlock; ++k) {
    const __m512 vk = v != nullptr ? _mm512_set1_ps(v[k]) : one;
    lo = std_min(lo, w[k]);
    hi = std_max(hi, w[k]);
    sw = _mm512_add_ps(sw, vk);
    swx = _mm512_add_ps(swx, _mm512_mul_ps(vk, w[k]));
  }
  const __m512 range = _mm512_sub_ps(hi, lo);
  __m512 s_best = zero, o_best = lo;
  const __mmask16 live = _mm512_cmp_ps_mask(range, zero, _CMP_GT_OQ) & _mm512_cmp_ps_mask(sw, zero, _CMP_GT_OQ);
  if (live == 0) {
    *s_out = s_best;
    *o_out = o_best;
    return;
  }
  __m512 best_err = _mm512_set1_ps(INFINITY);
  for (int step = 0; step <= 20; ++step) {
    const __m512 iscale = _mm512_div_ps(_mm512_set1_ps(14.0f + 0.1f * static_cast<float>(step)), range);
    __m512 l[kQBlock];
    __m512 swl = zero, swll = zero, swlx = zero;
    for (int k = 0; k < kQBlock; ++k)
      l[k] = std_min(fifteen, std_max(zero, round_even(_mm512_mul_ps(iscale, _mm512_sub_ps(w[k], lo)))));
    for (int k = 0; k < kQBlock; ++k) {
      const __m512 vk = v != nullptr ? _mm512_set1_ps(v[k]) : one, vl = _mm512_mul_ps(vk, l[k]);
      swl = _mm512_add_ps(swl, vl);
      swll = _mm512_add_ps(swll, _mm512_mul_ps(vl, l[k]));
      swlx = _mm512_add_ps(swlx, _mm512_mul_ps(vl, w[k]));
    }
    const __m512 det = _mm512_sub_ps(_mm512_mul_ps(sw, swll), _mm512_mul_ps(swl, swl));
    const __mmask16 solved = _mm512_cmp_ps_mask(det, zero, _CMP_GT_OQ);
    __m512 s = _mm512_maskz_div_ps(solved, _mm512_sub_ps(_mm512_mul_ps(sw, swlx), _mm512_mul_ps(swl, swx)), det);
    __m512 o = _mm512_maskz_div_ps(solved, _mm512_sub_ps(_mm512_mul_ps(swll, swx), _mm512_mul_ps(swl, swlx)), det);
    const __mmask16 refit = ~solved | _mm512_cmp_ps_mask(o, zero, _CMP_GT_OQ);
    const __mmask16 usable = ~refit | _mm512_cmp_ps_mask(swll, zero, _CMP_GT_OQ);  // else: continue
    o = _mm512_mask_mov_ps(o, refit, zero);
    s = _mm512_mask_div_ps(s, refit, swlx, swll);
    s = std_max(s, zero);
    __m512 err = zero;
    for (int k = 0; k < kQBlock; ++k) {
      const __m512 vk = v != nullptr ? _mm512_set1_ps(v[k]) : one;
      const __m512 e = _mm512_sub_ps(_mm512_add_ps(_mm512_mul_ps(s, l[k]), o), w[k]);
      err = _mm512_add_ps(err, _mm512_mul_ps(_mm512_mul_ps(vk, e), e));
    }
    const __mmask16 take = live & usable & _mm512_cmp_ps_mask(err, best_err, _CMP_LT_OQ);
    best_err = _mm512_mask_mov_ps(best_err, take, err);
    s_best = _mm512_mask_mov_ps(s_best, take, s);
    o_best = _mm512_mask_mov_ps(o_best, take, o);
  }
  *s_out = s_best;
  *o_out = o_best;
}

}  // namespace

// quantize_q4k_super_ref (quant.cpp) for the 16 rows of a group at once, one row per lane, every
// operation in the reference's order: the same bytes.
void quantize_q4k_avx512(const float* wt, int kb, const float* v, Q4KBlock* blk, uint8_t* header) {
  const __m512 zero = _mm512_setzero_ps();
  __m512 s[kQ4KSuper], o[kQ4KSuper];
  __m512 s_max = zero, o_max = zero;
  for (int j = 0; j < kb; ++j) {
    __m512 w[kQBlock];
    for (int k = 0; k < kQBlock; ++k) w[k] = _mm512_loadu_ps(wt + (j * kQBlock + k) * kQGroupRows);
    q4k_block_fit(w, v != nullptr ? v + j * kQBlock : nullptr, &s[j], &o[j]);
    s_max = std_max(s_max, s[j]);
    o_max = std_max(o_max, negate(o[j]));
  }
  constexpr int kRound = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  const __m256i dh = _mm512_cvtps_ph(_mm512_div_ps(s_max, _mm512_set1_ps(255.0f)), kRound);
  const __m256i mh = _mm512_cvtps_ph(_mm512_div_ps(o_max, _mm512_set1_ps(255.0f)), kRound);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(header), dh);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(header + kQ4KHeaderBytes / 2), mh);
  const __m512 d = _mm512_cvtph_ps(dh), m = _mm512_cvtph_ps(mh), c255 = _mm512_set1_ps(255.0f);
  const __mmask16 d_pos = _mm512_cmp_ps_mask(d, zero, _CMP_GT_OQ), m_pos = _mm512_cmp_ps_mask(m, zero, _CMP_GT_OQ);
  for (int j = 0; j < kb; ++j) {
    const __m512 sc = _mm512_maskz_mov_ps(d_pos, std_min(c255, round_even(_mm512_div_ps(s[j], d))));
    const __m512 mn = _mm512_maskz_mov_ps(m_pos, std_min(c255, round_even(_mm512_div_ps(negate(o[j]), m))));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(blk[j].sc), _mm512_cvtepi32_epi8(_mm512_cvttps_epi32(sc)));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(blk[j].mn), _mm512_cvtepi32_epi8(_mm512_cvttps_epi32(mn)));
    const __m512 scale = _mm512_mul_ps(d, sc), offset = _mm512_mul_ps(m, mn);
    const __mmask16 scale_pos = _mm512_cmp_ps_mask(scale, zero, _CMP_GT_OQ);
    auto code = [&](int k) {
      const __m512 w = _mm512_loadu_ps(wt + (j * kQBlock + k) * kQGroupRows);
      const __m512 q = std_min(_mm512_set1_ps(15.0f),
                               std_max(zero, round_even(_mm512_div_ps(_mm512_add_ps(w, offset), scale))));
      return _mm512_cvttps_epi32(_mm512_maskz_mov_ps(scale_pos, q));
    };
    for (int c = 0; c < 4; ++c) {
      __m512i bytes = _mm512_setzero_si512();
      for (int b = 0; b < 4; ++b) {
        const int k = 4 * c + b;
        bytes = _mm512_or_si512(bytes, _mm512_slli_epi32(_mm512_or_si512(code(k), _mm512_slli_epi32(code(k + 16), 4)), 8 * b));
      }
      _mm512_storeu_si512(blk[j].codes + Q4KBlock::code_byte(0, 4 * c), bytes);
    }
  }
}

}  // namespace glm4rt
