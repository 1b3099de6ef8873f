// The quantized group kernel of CPUs with the dot product instructions (FEAT_DotProd: SDOT),
// included by arm_dotprod.cpp and arm_i8mm.cpp (each compiles it with its own -march, inside its
// own anonymous namespace).
//
// Quantized layout (quant.h): a 16-byte load of a 64-byte chunk is 4 rows x 4 consecutive k, row r
// in 32-bit lane r, so one SDOT by the 4 activation bytes of those k (lane-indexed from a 16-byte
// load of x) adds the 4 rows' dot products to 4 int32 lanes directly. The float part is
// arm_quant::scale_block, the NEON kernel's.
#pragma once
#include <arm_neon.h>

#include <cstddef>
#include <cstdint>

#include "../quant.h"
#include "arm_quant_common.h"

namespace glm4rt {
namespace {  // one copy per including file: each is compiled with its own -march
namespace arm_dot {

using arm_quant::codes_of;

// One group (16 rows) for tokens m0 .. m1 - 1, one token at a time: y[m, r] for r < rows.
template <QFormat F>
void sdot_group(const uint8_t* group, int n_blocks, const int8_t* xq, const float* xs, const int32_t* xsum,
                size_t ldq, size_t lds, int m0, int m1, float* y, size_t ldy, int rows) {
  constexpr bool kInt4 = F != QFormat::Int8;
  using Block = QBlock<kInt4>;
  for (int m = m0; m < m1; ++m) {
    float32x4_t acc[4] = {vdupq_n_f32(0.0f), vdupq_n_f32(0.0f), vdupq_n_f32(0.0f), vdupq_n_f32(0.0f)};
    for (int b = 0; b < n_blocks; ++b) {
      const uint8_t* blk = reinterpret_cast<const uint8_t*>(q_block<kInt4>(group, b));
      const int8_t* x = xq + m * ldq + b * kQBlock;
      const int8x16_t x0 = vld1q_s8(x), x1 = vld1q_s8(x + 16);  // k 0..15, 16..31
      for (int qr = 0; qr < 4; ++qr) {
        int32x4_t isum = vdupq_n_s32(0);
        const uint8_t* c = blk + Block::code_byte(4 * qr, 0);
        if constexpr (kInt4) {  // chunk j: low nibbles k = 4j .., high nibbles k = 16 + 4j ..
          const uint8x16_t v0 = vld1q_u8(c), v1 = vld1q_u8(c + kQChunkBytes);
          const uint8x16_t v2 = vld1q_u8(c + 2 * kQChunkBytes), v3 = vld1q_u8(c + 3 * kQChunkBytes);
          // (Each code vector in parentheses: Clang's vdotq_laneq_s32 is a macro.)
          isum = vdotq_laneq_s32(isum, (codes_of<F, false>(v0)), x0, 0);
          isum = vdotq_laneq_s32(isum, (codes_of<F, false>(v1)), x0, 1);
          isum = vdotq_laneq_s32(isum, (codes_of<F, false>(v2)), x0, 2);
          isum = vdotq_laneq_s32(isum, (codes_of<F, false>(v3)), x0, 3);
          isum = vdotq_laneq_s32(isum, (codes_of<F, true>(v0)), x1, 0);
          isum = vdotq_laneq_s32(isum, (codes_of<F, true>(v1)), x1, 1);
          isum = vdotq_laneq_s32(isum, (codes_of<F, true>(v2)), x1, 2);
          isum = vdotq_laneq_s32(isum, (codes_of<F, true>(v3)), x1, 3);
        } else {  // chunk j: k = 4j ..
          isum = vdotq_laneq_s32(isum, (codes_of<F, false>(vld1q_u8(c))), x0, 0);
          isum = vdotq_laneq_s32(isum, (codes_of<F, false>(vld1q_u8(c + kQChunkBytes))), x0, 1);
          isum = vdotq_laneq_s32(isum, (codes_of<F, false>(vld1q_u8(c + 2 * kQChunkBytes))), x0, 2);
          isum = vdotq_laneq_s32(isum, (codes_of<F, false>(vld1q_u8(c + 3 * kQChunkBytes))), x0, 3);
          isum = vdotq_laneq_s32(isum, (codes_of<F, false>(vld1q_u8(c + 4 * kQChunkBytes))), x1, 0);
          isum = vdotq_laneq_s32(isum, (codes_of<F, false>(vld1q_u8(c + 5 * kQChunkBytes))), x1, 1);
          isum = vdotq_laneq_s32(isum, (codes_of<F, false>(vld1q_u8(c + 6 * kQChunkBytes))), x1, 2);
          isum = vdotq_laneq_s32(isum, (codes_of<F, false>(vld1q_u8(c + 7 * kQChunkBytes))), x1, 3);
        }
        acc[qr] = arm_quant::scale_block<F>(acc[qr], isum, group, n_blocks, b, blk, qr, xs[m * lds + b], xsum[m * lds + b]);
      }
    }
    float out[16];
    for (int qr = 0; qr < 4; ++qr) vst1q_f32(out + 4 * qr, acc[qr]);
    for (int r = 0; r < rows; ++r) y[m * ldy + r] = out[r];
  }
}

}  // namespace arm_dot
}  // namespace
}  // namespace glm4rt
