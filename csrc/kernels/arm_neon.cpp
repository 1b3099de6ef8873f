// ARM64 NEON (Advanced SIMD, present on every AArch64 CPU): the fp32 / bf16 dot-form gemm tiles and
// dot product, the decode attention over 4 lanes, and the quantized tiles with widening 8-bit
// multiplies (vmull_s8 + pairwise adds into 32 bits; the sdot / smmla versions of CPUs with
// dotprod / i8mm are separate files). The other entries are the generic ones.
//
// Quantized layout (quant.h): a 64-byte chunk holds 4 consecutive k of all 16 rows, row r at bytes
// 4r .. 4r + 3, so one 16-byte load is 4 rows x 4 k, and one 4-byte activation broadcast feeds
// all of them.
#include <arm_neon.h>

#include <cmath>
#include <cstring>
#include <limits>

#include "../kernels.h"
#include "../quant.h"
#include "arm_quant_common.h"
#include "attn_decode_impl.h"

namespace glm4rt {
namespace neon {
namespace {

inline float32x4_t load4(const float* w) { return vld1q_f32(w); }
inline float32x4_t load4(const uint16_t* w) {  // 4 bf16 -> fp32, exact
  return vreinterpretq_f32_u32(vshll_n_u16(vld1_u16(w), 16));
}
inline float load1(const float* w) { return *w; }
inline float load1(const uint16_t* w) {
  const uint32_t u = static_cast<uint32_t>(*w) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

constexpr int kTile = 4;  // tokens and weight rows per gemm tile

// C[m, n] (+)= X[m, :k] . W[n, :k] for m, n <= 4: 16 accumulators of 4 lanes over k, then one
// horizontal sum each (rows past m or n repeat the last one and are not stored).
template <typename W>
void gemm_tile(const float* x, size_t ldx, const W* w, size_t ldw, float* c, size_t ldc, int m, int n,
               int k, bool accumulate) {
  const float* xr[kTile];
  const W* wr[kTile];
  for (int i = 0; i < kTile; ++i) xr[i] = x + static_cast<size_t>(i < m ? i : m - 1) * ldx;
  for (int j = 0; j < kTile; ++j) wr[j] = w + static_cast<size_t>(j < n ? j : n - 1) * ldw;
  float32x4_t acc[kTile][kTile];
  for (int i = 0; i < kTile; ++i)
    for (int j = 0; j < kTile; ++j) acc[i][j] = vdupq_n_f32(0.0f);
  int p = 0;
  for (; p + 4 <= k; p += 4) {
    float32x4_t xv[kTile], wv[kTile];
    for (int i = 0; i < kTile; ++i) xv[i] = vld1q_f32(xr[i] + p);
    for (int j = 0; j < kTile; ++j) wv[j] = load4(wr[j] + p);
    for (int i = 0; i < kTile; ++i)
      for (int j = 0; j < kTile; ++j) acc[i][j] = vfmaq_f32(acc[i][j], xv[i], wv[j]);
  }
  for (int i = 0; i < m; ++i)
    for (int j = 0; j < n; ++j) {
      float v = vaddvq_f32(acc[i][j]);
      for (int q = p; q < k; ++q) v += xr[i][q] * load1(wr[j] + q);
      c[i * ldc + j] = accumulate ? c[i * ldc + j] + v : v;
    }
}

float dot_f32(const float* a, const float* b, int n) {
  float32x4_t acc[4] = {vdupq_n_f32(0.0f), vdupq_n_f32(0.0f), vdupq_n_f32(0.0f), vdupq_n_f32(0.0f)};
  int i = 0;
  for (; i + 16 <= n; i += 16)
    for (int l = 0; l < 4; ++l) acc[l] = vfmaq_f32(acc[l], vld1q_f32(a + i + 4 * l), vld1q_f32(b + i + 4 * l));
  for (; i + 4 <= n; i += 4) acc[0] = vfmaq_f32(acc[0], vld1q_f32(a + i), vld1q_f32(b + i));
  float tail = 0.0f;
  for (; i < n; ++i) tail += a[i] * b[i];
  return vaddvq_f32(vaddq_f32(vaddq_f32(acc[0], acc[1]), vaddq_f32(acc[2], acc[3]))) + tail;
}

// Four lanes for the decode attention (attn_decode_impl.h); exp per lane with std::exp.
struct Vec4 {
  using R = float32x4_t;
  static constexpr int W = 4;
  static R zero() { return vdupq_n_f32(0.0f); }
  static R set1(float x) { return vdupq_n_f32(x); }
  static R load(const float* p) { return vld1q_f32(p); }
  static void store(float* p, R r) { vst1q_f32(p, r); }
  static R bcast(const float* p) { return vld1q_dup_f32(p); }
  static R fma(R a, R b, R c) { return vfmaq_f32(c, a, b); }
  static R mul(R a, R b) { return vmulq_f32(a, b); }
  static R add(R a, R b) { return vaddq_f32(a, b); }
  static R max(R a, R b) { return vmaxq_f32(a, b); }
  static R exp_visible(R s, R m) {
    float sv[4], mv[4];
    vst1q_f32(sv, s);
    vst1q_f32(mv, m);
    for (int l = 0; l < 4; ++l)
      sv[l] = sv[l] == -std::numeric_limits<float>::infinity() ? 0.0f : std::exp(sv[l] - mv[l]);
    return vld1q_f32(sv);
  }
  static R finite_or_zero(R m) {
    const uint32x4_t ninf = vceqq_f32(m, vdupq_n_f32(-std::numeric_limits<float>::infinity()));
    return vbslq_f32(ninf, vdupq_n_f32(0.0f), m);
  }
};

// ---- quantized weights ------------------------------------------------------------------------

// Row sums of 4 rows x 4 k products of one 16-byte load (s8 codes) and a broadcast of 4 s8
// activations, added pairwise into acc[0] (rows 0, 1) and acc[1] (rows 2, 3).
inline void mac4x4(int32x4_t acc[2], int8x16_t codes, int8x16_t x4) {
  acc[0] = vpadalq_s16(acc[0], vmull_s8(vget_low_s8(codes), vget_low_s8(x4)));
  acc[1] = vpadalq_s16(acc[1], vmull_high_s8(codes, x4));
}

inline int8x16_t bcast4(const int8_t* x) {
  int32_t v;
  std::memcpy(&v, x, sizeof v);
  return vreinterpretq_s8_s32(vdupq_n_s32(v));
}

// One group (16 rows) for mt tokens: y[m, r] = sum_b xs (d (sum q x - offset sum x)) (int8 / int4),
// or sum_b xs (D sc sum q x - M mn sum x) (q4k).
template <QFormat F>
void qgemm_group(const uint8_t* group, int n_blocks, const int8_t* xq, const float* xs, const int32_t* xsum,
                 size_t ldq, size_t lds, int mt, float* y, size_t ldy, int rows) {
  constexpr bool kInt4 = F != QFormat::Int8;
  using Block = QBlock<kInt4>;
  for (int m = 0; m < mt; ++m) {
    float32x4_t acc[4] = {vdupq_n_f32(0.0f), vdupq_n_f32(0.0f), vdupq_n_f32(0.0f), vdupq_n_f32(0.0f)};
    for (int b = 0; b < n_blocks; ++b) {
      const Block* blk = q_block<kInt4>(group, b);
      const int8_t* x = xq + m * ldq + b * kQBlock;
      const float xsb = xs[m * lds + b];
      const int32_t sx = xsum[m * lds + b];
      for (int qr = 0; qr < 4; ++qr) {  // rows 4 qr .. 4 qr + 3
        int32x4_t pairs[2] = {vdupq_n_s32(0), vdupq_n_s32(0)};
        if (kInt4) {
          for (int c = 0; c < 4; ++c) {
            const uint8x16_t v = vld1q_u8(blk->codes + Block::code_byte(4 * qr, 4 * c));
            mac4x4(pairs, arm_quant::codes_of<F, false>(v), bcast4(x + 4 * c));       // k = 4c ..
            mac4x4(pairs, arm_quant::codes_of<F, true>(v), bcast4(x + 16 + 4 * c));   // k = 16 + 4c ..
          }
        } else {
          for (int c = 0; c < 8; ++c) {
            const uint8x16_t v = vld1q_u8(blk->codes + Block::code_byte(4 * qr, 4 * c));
            mac4x4(pairs, arm_quant::codes_of<F, false>(v), bcast4(x + 4 * c));
          }
        }
        const int32x4_t isum = vpaddq_s32(pairs[0], pairs[1]);  // rows 4 qr .. 4 qr + 3
        acc[qr] = arm_quant::scale_block<F>(acc[qr], isum, group, n_blocks, b, reinterpret_cast<const uint8_t*>(blk),
                                            qr, xsb, sx);
      }
    }
    float out[16];
    for (int qr = 0; qr < 4; ++qr) vst1q_f32(out + 4 * qr, acc[qr]);
    for (int r = 0; r < rows; ++r) y[m * ldy + r] = out[r];
  }
}

template <QFormat F>
void qgemm_tile(const uint8_t* group, size_t group_bytes, int n_groups, int n_blocks, const int8_t* xq,
                const float* xs, const int32_t* xsum, size_t ldq, size_t lds, int mt, float* y, size_t ldy,
                int rows) {
  arm_quant::for_each_group(group, group_bytes, n_groups, y, rows, [&](const uint8_t* gp, float* yg, int r) {
    qgemm_group<F>(gp, n_blocks, xq, xs, xsum, ldq, lds, mt, yg, ldy, r);
  });
}

}  // namespace
}  // namespace neon

const KernelTable& neon_kernels() {
  static const KernelTable table = [] {
    KernelTable t = generic_kernels();
    t.name = "neon";
    t.mr = neon::kTile;
    t.nr = neon::kTile;
    t.gemm_tile_f32 = neon::gemm_tile<float>;
    t.gemm_tile_bf16 = neon::gemm_tile<uint16_t>;
    t.dot_f32 = neon::dot_f32;
    t.attn_decode = attn_decode::attn_decode<neon::Vec4, 16>;
    t.qmt = 4;
    t.qgemm_int8 = neon::qgemm_tile<QFormat::Int8>;
    t.qgemm_int4 = neon::qgemm_tile<QFormat::Int4>;
    t.qgemm_q4k = neon::qgemm_tile<QFormat::Q4K>;
    return t;
  }();
  return table;
}

}  // namespace glm4rt
