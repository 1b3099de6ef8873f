// The specification of the int8 / int4 formats (quant.h): scalar reference quantizers for weights
// and activations, and the reading of a packed matrix. Plain scalar code, no threads and no
// dispatch: the drivers (ops.cpp) and the SIMD twins are tested against it bit for bit.
#include "quant.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

namespace glm4rt {

float fp16_to_f32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0) {  // zero or subnormal: mant * 2^-24
    float v = std::ldexp(static_cast<float>(mant), -24);
    std::memcpy(&bits, &v, sizeof bits);
    bits |= sign;
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else {
    bits = sign | ((exp + 112) << 23) | (mant << 13);
  }
  float out;
  std::memcpy(&out, &bits, sizeof out);
  return out;
}

uint16_t f32_to_fp16(float f) {
  uint32_t x;
  std::memcpy(&x, &f, sizeof x);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  x &= 0x7fffffffu;
  if (x >= 0x7f800000u) return sign | (x > 0x7f800000u ? 0x7e00 : 0x7c00);  // nan / inf
  if (x >= 0x477ff000u) return sign | 0x7c00;                              // rounds past 65504
  if (x < 0x38800000u) {  // below the smallest normal half: a multiple of 2^-24
    float a;
    std::memcpy(&a, &x, sizeof a);
    return sign | static_cast<uint16_t>(std::nearbyint(a * 16777216.0f));
  }
  x += 0xc8000fffu + ((x >> 13) & 1u);  // rebias exponent by -112, round to nearest even
  return sign | static_cast<uint16_t>(x >> 13);
}

namespace {

// Round to nearest even for |v| < 2^22, in any compile mode (the SIMD paths do the same).
inline float round_even(float v) { return (v + 12582912.0f) - 12582912.0f; }

}  // namespace

void quantize_block_int8_ref(const float* w, int8_t* q, uint16_t* d) {
  float amax = 0.0f;
  for (int k = 0; k < kQBlock; ++k) amax = std::max(amax, std::fabs(w[k]));
  const float scale = amax / 127.0f;
  const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
  for (int k = 0; k < kQBlock; ++k)
    q[k] = static_cast<int8_t>(std::min(127.0f, std::max(-127.0f, round_even(w[k] * inv))));
  *d = f32_to_fp16(scale);
}

void quantize_block_int4_ref(const float* w, uint8_t* q, uint16_t* d) {
  // The value of largest magnitude maps to about -8 (the wider side of [-8, 7]), as in Q4_0;
  // then 19 inverse scales around that are tried, each with its least-squares scale rounded to
  // fp16, and the one with the smallest squared error wins. The error of a candidate is
  // sum(w^2) - 2 d sum(l w) + d^2 sum(l^2): one pass per candidate, and the rounding loop has no
  // float reduction, so the compiler vectorises it.
  float m = 0.0f, sum_ww = 0.0f;
  for (int k = 0; k < kQBlock; ++k) {
    if (std::fabs(w[k]) > std::fabs(m)) m = w[k];
    sum_ww += w[k] * w[k];
  }
  if (m == 0.0f) {
    for (int k = 0; k < kQBlock; ++k) q[k] = 8;
    *d = 0;
    return;
  }
  float best_err = INFINITY;
  uint16_t best_d = 0;
  float best_l[kQBlock] = {};
  for (int step = -9; step <= 9; ++step) {
    const float iscale = -(8.0f + 0.1f * static_cast<float>(step)) / m;
    float l[kQBlock];
    for (int k = 0; k < kQBlock; ++k) l[k] = std::min(7.0f, std::max(-8.0f, round_even(iscale * w[k])));
    float sum_lw = 0.0f, sum_ll = 0.0f;
    for (int k = 0; k < kQBlock; ++k) {
      sum_lw += l[k] * w[k];
      sum_ll += l[k] * l[k];  // exact: small integers
    }
    if (sum_ll == 0.0f) continue;
    const uint16_t dh = f32_to_fp16(sum_lw / sum_ll);
    const float dq = fp16_to_f32(dh);
    const float err = sum_ww - 2.0f * dq * sum_lw + dq * dq * sum_ll;
    if (err < best_err) {
      best_err = err;
      best_d = dh;
      std::memcpy(best_l, l, sizeof l);
    }
  }
  for (int k = 0; k < kQBlock; ++k) q[k] = static_cast<uint8_t>(static_cast<int>(best_l[k]) + 8);
  *d = best_d;
}

namespace {

// One packed block from its tile wt [32][16] (k-major), row by row with the reference quantizer:
// int8 codes stored as q + 128, int4 codes k and k + 16 in the low and high nibble of one byte.
template <bool kInt4>
void quantize_group(const float* wt, QBlock<kInt4>* blk) {
  for (int r = 0; r < kQGroupRows; ++r) {
    float w[kQBlock];
    for (int k = 0; k < kQBlock; ++k) w[k] = wt[k * kQGroupRows + r];
    uint16_t d;
    if constexpr (kInt4) {
      uint8_t q[kQBlock];
      quantize_block_int4_ref(w, q, &d);
      for (int k = 0; k < kQBlock / 2; ++k)
        blk->codes[Q4Block::code_byte(r, k)] = static_cast<uint8_t>(q[k] | (q[k + 16] << 4));
    } else {
      int8_t q[kQBlock];
      quantize_block_int8_ref(w, q, &d);
      for (int k = 0; k < kQBlock; ++k) blk->codes[Q8Block::code_byte(r, k)] = static_cast<uint8_t>(q[k] + 128);
    }
    std::memcpy(blk->scales + sizeof d * r, &d, sizeof d);
  }
}

}  // namespace

void quantize_int8_group_ref(const float* wt, Q8Block* blk) { quantize_group(wt, blk); }
void quantize_int4_group_ref(const float* wt, Q4Block* blk) { quantize_group(wt, blk); }

float q4k_header_d(const uint8_t* header, int r) {
  uint16_t bits;
  std::memcpy(&bits, header + sizeof bits * r, sizeof bits);
  return fp16_to_f32(bits);
}

float q4k_header_m(const uint8_t* header, int r) {
  uint16_t bits;
  std::memcpy(&bits, header + kQ4KHeaderBytes / 2 + sizeof bits * r, sizeof bits);
  return fp16_to_f32(bits);
}

void q4k_block_fit_ref(const float* w, const float* v, float* s_out, float* o_out) {
  // The grids run from the block's minimum (or 0, the offset is never positive: as in Q4_K) to
  // about its maximum: q = round((w - min) * (14 + 0.1 i) / range), i = 0 .. 20; each grid's s and
  // o are the weighted least-squares fit of w by s q + o (o set to 0 and s refitted alone when the
  // fit wants it positive or every q is equal), and the fit with the smallest weighted error wins.
  float lo = 0.0f, hi = -INFINITY, sw = 0.0f, swx = 0.0f;
  for (int k = 0; k < kQBlock; ++k) {
    const float vk = v != nullptr ? v[k] : 1.0f;
    lo = std::min(lo, w[k]);
    hi = std::max(hi, w[k]);
    sw += vk;
    swx += vk * w[k];
  }
  const float range = hi - lo;
  *s_out = 0.0f;
  *o_out = lo;  // a block of equal weights (or zeros): w = o exactly
  if (!(range > 0.0f) || !(sw > 0.0f)) return;
  float best_err = INFINITY;
  for (int step = 0; step <= 20; ++step) {
    const float iscale = (14.0f + 0.1f * static_cast<float>(step)) / range;
    float l[kQBlock];
    for (int k = 0; k < kQBlock; ++k) l[k] = std::min(15.0f, std::max(0.0f, round_even(iscale * (w[k] - lo))));
    float swl = 0.0f, swll = 0.0f, swlx = 0.0f;
    for (int k = 0; k < kQBlock; ++k) {
      const float vk = v != nullptr ? v[k] : 1.0f;
      swl += vk * l[k];
      swll += vk * l[k] * l[k];
      swlx += vk * l[k] * w[k];
    }
    // det = 0 when every q is the same (a constant block): then o = 0 and s alone fits, as when
    // the fit wants o > 0.
    const float det = sw * swll - swl * swl;
    float s = 0.0f, o = 0.0f;
    if (det > 0.0f) {
      s = (sw * swlx - swl * swx) / det;
      o = (swll * swx - swl * swlx) / det;
    }
    if (!(det > 0.0f) || o > 0.0f) {
      if (!(swll > 0.0f)) continue;
      o = 0.0f;
      s = swlx / swll;
    }
    s = std::max(s, 0.0f);
    float err = 0.0f;
    for (int k = 0; k < kQBlock; ++k) {
      const float e = s * l[k] + o - w[k];
      err += (v != nullptr ? v[k] : 1.0f) * e * e;
    }
    if (err < best_err) {
      best_err = err;
      *s_out = s;
      *o_out = o;
    }
  }
}

void quantize_q4k_super_ref(const float* wt, int kb, const float* v, Q4KBlock* blk, uint8_t* header) {
  for (int r = 0; r < kQGroupRows; ++r) {
    float w[kQ4KSuper][kQBlock], s[kQ4KSuper], o[kQ4KSuper];
    float s_max = 0.0f, o_max = 0.0f;
    for (int j = 0; j < kb; ++j) {
      for (int k = 0; k < kQBlock; ++k) w[j][k] = wt[(j * kQBlock + k) * kQGroupRows + r];
      q4k_block_fit_ref(w[j], v != nullptr ? v + j * kQBlock : nullptr, &s[j], &o[j]);
      s_max = std::max(s_max, s[j]);
      o_max = std::max(o_max, -o[j]);
    }
    const uint16_t dh = f32_to_fp16(s_max / 255.0f), mh = f32_to_fp16(o_max / 255.0f);
    const float d = fp16_to_f32(dh), m = fp16_to_f32(mh);
    std::memcpy(header + sizeof dh * r, &dh, sizeof dh);
    std::memcpy(header + kQ4KHeaderBytes / 2 + sizeof mh * r, &mh, sizeof mh);
    for (int j = 0; j < kb; ++j) {
      const float sc = d > 0.0f ? std::min(255.0f, round_even(s[j] / d)) : 0.0f;
      const float mn = m > 0.0f ? std::min(255.0f, round_even(-o[j] / m)) : 0.0f;
      blk[j].sc[r] = static_cast<uint8_t>(sc);
      blk[j].mn[r] = static_cast<uint8_t>(mn);
      const float scale = d * sc, offset = m * mn;  // exact
      uint8_t q[kQBlock];
      for (int k = 0; k < kQBlock; ++k)
        q[k] = static_cast<uint8_t>(
            scale > 0.0f ? std::min(15.0f, std::max(0.0f, round_even((w[j][k] + offset) / scale))) : 0.0f);
      for (int k = 0; k < kQBlock / 2; ++k)
        blk[j].codes[Q4KBlock::code_byte(r, k)] = static_cast<uint8_t>(q[k] | (q[k + 16] << 4));
    }
  }
}

namespace {

template <bool kInt4>
void dequantize_blocks(const uint8_t* packed, int N, int K, float* out) {
  const int nb = q_blocks(K);
  for (int row = 0; row < N; ++row) {
    const int r = row % kQGroupRows;
    const uint8_t* group = packed + static_cast<size_t>(row / kQGroupRows) * q_group_bytes(kInt4 ? QFormat::Int4 : QFormat::Int8, K);
    for (int b = 0; b < nb; ++b) {
      const QBlock<kInt4>* blk = q_block<kInt4>(group, b);
      const float d = blk->scale(r);
      for (int k = 0; k < kQBlock && b * kQBlock + k < K; ++k) {
        const int q = blk->code(r, k) - (kInt4 ? 8 : 0);
        out[static_cast<size_t>(row) * K + b * kQBlock + k] = d * static_cast<float>(q);
      }
    }
  }
}

void dequantize_q4k(const uint8_t* packed, int N, int K, float* out) {
  const int nb = q_blocks(K);
  for (int row = 0; row < N; ++row) {
    const int r = row % kQGroupRows;
    const uint8_t* group = packed + static_cast<size_t>(row / kQGroupRows) * q_group_bytes(QFormat::Q4K, K);
    for (int b = 0; b < nb; ++b) {
      const Q4KBlock* blk = q4k_block(group, b);
      const uint8_t* header = q4k_header(group, nb, b / kQ4KSuper);
      const float scale = q4k_header_d(header, r) * blk->sc[r], offset = q4k_header_m(header, r) * blk->mn[r];
      for (int k = 0; k < kQBlock && b * kQBlock + k < K; ++k)
        out[static_cast<size_t>(row) * K + b * kQBlock + k] = scale * static_cast<float>(blk->code(r, k)) - offset;
    }
  }
}

}  // namespace

void dequantize_packed(QFormat f, const uint8_t* packed, int N, int K, float* out) {
  if (f == QFormat::Q4K)
    dequantize_q4k(packed, N, K, out);
  else if (f == QFormat::Int8)
    dequantize_blocks<false>(packed, N, K, out);
  else
    dequantize_blocks<true>(packed, N, K, out);
}

void quantize_acts_row_ref(const float* x, int K, int8_t* q, float* scale, int32_t* sum) {
  for (int b = 0; b < q_blocks(K); ++b) {
    const int k0 = b * kQBlock, n = std::min(kQBlock, K - k0);
    float amax = 0.0f;
    bool finite = true;
    for (int k = 0; k < n; ++k) {
      const float a = std::fabs(x[k0 + k]);
      finite = finite && a <= std::numeric_limits<float>::max();  // false for NaN and inf
      amax = std::max(amax, a);
    }
    // A block with NaN or inf gets the scale NaN and codes 0: every product it enters is then
    // NaN, as in fp32 (converting NaN or inf * 0 to int would be undefined behaviour).
    const float inv = finite && amax > 0.0f ? 127.0f / amax : 0.0f;
    int32_t s = 0;
    for (int k = 0; k < kQBlock; ++k) {
      const int v = k < n && finite ? static_cast<int>(round_even(x[k0 + k] * inv)) : 0;
      q[k0 + k] = static_cast<int8_t>(v);
      s += v;
    }
    scale[b] = finite ? amax / 127.0f : std::numeric_limits<float>::quiet_NaN();
    sum[b] = s;
  }
}

}  // namespace glm4rt
