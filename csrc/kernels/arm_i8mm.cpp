// ARM64 with the int8 matrix multiply instructions (FEAT_I8MM, Armv8.6; Neoverse V1 / N2, Apple
// M2 and later, Graviton 3): the dotprod table with SMMLA quantized tiles for pairs of tokens. One
// SMMLA multiplies a 2 x 8 block of activations (two tokens, 8 k) by a 2 x 8 block of weights (two
// rows) into 2 x 2 int32 sums: twice SDOT's products per instruction, so prompts (many tokens) use
// it and a lone token (decode, an odd last one) takes SDOT (arm_dotprod_impl.h).
//
// The layout's chunks hold 4 k per row; two chunks zipped by 32-bit lanes give rows r, r + 1 with 8
// consecutive k each: the SMMLA weight operand, with no repacking of the stored weights (the
// layout stays the one every ISA reads). The float arithmetic per token and row is SDOT's, so a
// token's outputs have the same bits alone or paired.
#include "../kernels.h"
#include "../quant.h"
#include "arm_dotprod_impl.h"

namespace glm4rt {
namespace {

// The low or high 2 lanes of a 4-lane vector, twice: the per-row values of rows (0, 1) or (2, 3)
// in SMMLA's result order [token a row 0, token a row 1, token b row 0, token b row 1].
inline float32x4_t rows01(float32x4_t v) { return vcombine_f32(vget_low_f32(v), vget_low_f32(v)); }
inline float32x4_t rows23(float32x4_t v) { return vcombine_f32(vget_high_f32(v), vget_high_f32(v)); }
inline float32x4_t per_token(float a, float b) { return vcombine_f32(vdup_n_f32(a), vdup_n_f32(b)); }

// Weights of rows 4 qr .. 4 qr + 3 at k 4j .. 4j + 7 (chunks j and j + 1) as two SMMLA operands.
inline void zip_rows(int8x16_t c0, int8x16_t c1, int8x16_t& r01, int8x16_t& r23) {
  r01 = vreinterpretq_s8_s32(vzip1q_s32(vreinterpretq_s32_s8(c0), vreinterpretq_s32_s8(c1)));
  r23 = vreinterpretq_s8_s32(vzip2q_s32(vreinterpretq_s32_s8(c0), vreinterpretq_s32_s8(c1)));
}

// One group (16 rows) for tokens m and m + 1.
template <QFormat F>
void smmla_group(const uint8_t* group, int n_blocks, const int8_t* xq, const float* xs, const int32_t* xsum,
                 size_t ldq, size_t lds, int m, float* y, size_t ldy, int rows) {
  constexpr bool kInt4 = F != QFormat::Int8;
  using Block = QBlock<kInt4>;
  float32x4_t acc[4][2];  // [qr][rows 01 / 23]: lanes [m r, m r+1, m+1 r, m+1 r+1]
  for (int qr = 0; qr < 4; ++qr) acc[qr][0] = acc[qr][1] = vdupq_n_f32(0.0f);
  for (int b = 0; b < n_blocks; ++b) {
    const uint8_t* blk = reinterpret_cast<const uint8_t*>(q_block<kInt4>(group, b));
    const int8_t* xa = xq + m * ldq + b * kQBlock;
    const int8_t* xb = xa + ldq;
    const float xsa = xs[m * lds + b], xsb = xs[(m + 1) * lds + b];
    const int32_t sxa = xsum[m * lds + b], sxb = xsum[(m + 1) * lds + b];
    for (int qr = 0; qr < 4; ++qr) {
      int32x4_t s01 = vdupq_n_s32(0), s23 = vdupq_n_s32(0);
      const uint8_t* c = blk + Block::code_byte(4 * qr, 0);
      int8x16_t w01, w23;
      if constexpr (kInt4) {  // chunk j: low nibbles k = 4j .., high nibbles k = 16 + 4j ..
        for (int j = 0; j < 4; j += 2) {
          const uint8x16_t v0 = vld1q_u8(c + j * kQChunkBytes), v1 = vld1q_u8(c + (j + 1) * kQChunkBytes);
          zip_rows(arm_quant::codes_of<F, false>(v0), arm_quant::codes_of<F, false>(v1), w01, w23);
          const int8x16_t lo = vcombine_s8(vld1_s8(xa + 4 * j), vld1_s8(xb + 4 * j));
          s01 = vmmlaq_s32(s01, lo, w01);
          s23 = vmmlaq_s32(s23, lo, w23);
          zip_rows(arm_quant::codes_of<F, true>(v0), arm_quant::codes_of<F, true>(v1), w01, w23);
          const int8x16_t hi = vcombine_s8(vld1_s8(xa + 16 + 4 * j), vld1_s8(xb + 16 + 4 * j));
          s01 = vmmlaq_s32(s01, hi, w01);
          s23 = vmmlaq_s32(s23, hi, w23);
        }
      } else {  // chunk j: k = 4j ..
        for (int j = 0; j < 8; j += 2) {
          zip_rows(arm_quant::codes_of<F, false>(vld1q_u8(c + j * kQChunkBytes)),
                   arm_quant::codes_of<F, false>(vld1q_u8(c + (j + 1) * kQChunkBytes)), w01, w23);
          const int8x16_t x = vcombine_s8(vld1_s8(xa + 4 * j), vld1_s8(xb + 4 * j));
          s01 = vmmlaq_s32(s01, x, w01);
          s23 = vmmlaq_s32(s23, x, w23);
        }
      }
      // Per token and row the operations of arm_quant::scale_block, in its order.
      const float32x4_t xsv = per_token(xsa, xsb);
      if constexpr (F == QFormat::Q4K) {
        const Q4KBlock* kb = reinterpret_cast<const Q4KBlock*>(blk);
        const uint8_t* header = q4k_header(group, n_blocks, b / kQ4KSuper);
        const float32x4_t scale = vmulq_f32(arm_quant::widen_fp16(header + 8 * qr), arm_quant::widen_u8(kb->sc + 4 * qr));
        const float32x4_t offset =
            vmulq_f32(arm_quant::widen_fp16(header + kQ4KHeaderBytes / 2 + 8 * qr), arm_quant::widen_u8(kb->mn + 4 * qr));
        const float32x4_t xsx = per_token(xsa * static_cast<float>(sxa), xsb * static_cast<float>(sxb));
        acc[qr][0] = vfmsq_f32(vfmaq_f32(acc[qr][0], vcvtq_f32_s32(s01), vmulq_f32(rows01(scale), xsv)), rows01(offset), xsx);
        acc[qr][1] = vfmsq_f32(vfmaq_f32(acc[qr][1], vcvtq_f32_s32(s23), vmulq_f32(rows23(scale), xsv)), rows23(offset), xsx);
      } else {
        const float32x4_t d = arm_quant::widen_fp16(reinterpret_cast<const Block*>(blk)->scales + 8 * qr);
        if constexpr (F == QFormat::Int4) {
          const int32x4_t off = vcombine_s32(vdup_n_s32(8 * sxa), vdup_n_s32(8 * sxb));
          s01 = vsubq_s32(s01, off);
          s23 = vsubq_s32(s23, off);
        }
        acc[qr][0] = vfmaq_f32(acc[qr][0], vcvtq_f32_s32(s01), vmulq_f32(rows01(d), xsv));
        acc[qr][1] = vfmaq_f32(acc[qr][1], vcvtq_f32_s32(s23), vmulq_f32(rows23(d), xsv));
      }
    }
  }
  float out[2][16];  // [token][row]
  for (int qr = 0; qr < 4; ++qr)
    for (int h = 0; h < 2; ++h) {
      float lanes[4];
      vst1q_f32(lanes, acc[qr][h]);
      out[0][4 * qr + 2 * h] = lanes[0];
      out[0][4 * qr + 2 * h + 1] = lanes[1];
      out[1][4 * qr + 2 * h] = lanes[2];
      out[1][4 * qr + 2 * h + 1] = lanes[3];
    }
  for (int t = 0; t < 2; ++t)
    for (int r = 0; r < rows; ++r) y[(m + t) * ldy + r] = out[t][r];
}

template <QFormat F>
void qgemm_tile(const uint8_t* group, size_t group_bytes, int n_groups, int n_blocks, const int8_t* xq,
                const float* xs, const int32_t* xsum, size_t ldq, size_t lds, int mt, float* y, size_t ldy,
                int rows) {
  arm_quant::for_each_group(group, group_bytes, n_groups, y, rows, [&](const uint8_t* gp, float* yg, int r) {
    int m = 0;
    for (; m + 2 <= mt; m += 2) smmla_group<F>(gp, n_blocks, xq, xs, xsum, ldq, lds, m, yg, ldy, r);
    if (m < mt) arm_dot::sdot_group<F>(gp, n_blocks, xq, xs, xsum, ldq, lds, m, mt, yg, ldy, r);
  });
}

}  // namespace

const KernelTable& i8mm_kernels() {
  static const KernelTable table = [] {
    KernelTable t = neon_kernels();
    t.name = "i8mm";
    t.qgemm_int8 = qgemm_tile<QFormat::Int8>;
    t.qgemm_int4 = qgemm_tile<QFormat::Int4>;
    t.qgemm_q4k = qgemm_tile<QFormat::Q4K>;
    return t;
  }();
  return table;
}

}  // namespace glm4rt
