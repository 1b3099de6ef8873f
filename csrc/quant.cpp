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

namespace {

template <bool kInt4>
void dequantize_blocks(const uint8_t* packed, int N, int K, float* out) {
  const int nb = q_blocks(K);
  for (int row = 0; row < N; ++row) {
    const int r = row % kQGroupRows;
    const uint8_t* group = packed + static_cast<size_t>(row / kQGroupRows) * nb * sizeof(QBlock<kInt4>);
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

}  // namespace

void dequantize_packed(QFormat f, const uint8_t* packed, int N, int K, float* out) {
  if (f == QFormat::Int8)
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
