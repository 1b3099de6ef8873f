// What the ARM64 quantized kernels share (arm_neon.cpp, arm_dotprod_impl.h): reading the block
// scales and finishing a block's integer sums in float, with baseline NEON only. Included inside
// each file's own anonymous namespace (every file is compiled with its own -march).
//
// Per token, row and block the float arithmetic is this one, operation for operation (integer block
// sum -> float, one multiply-add by scale * x-scale, in block order), so every ARM quantized path
// gives the same bits for a row whatever the number of tokens beside it.
#pragma once
#include <arm_neon.h>

#include <cstddef>
#include <cstdint>
#include <cstring>

#include "../quant.h"

namespace glm4rt {
namespace {  // one copy per including file
namespace arm_quant {

inline float32x4_t widen_fp16(const uint8_t* p) {  // 4 fp16 -> fp32
  uint16_t h[4];
  std::memcpy(h, p, sizeof h);
  return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(h)));
}

inline float32x4_t widen_u8(const uint8_t* p) {  // 4 bytes -> fp32
  uint8_t b[8] = {p[0], p[1], p[2], p[3], 0, 0, 0, 0};
  return vcvtq_f32_u32(vmovl_u16(vget_low_u16(vmovl_u8(vld1_u8(b)))));
}

// The signed codes of 16 stored bytes (4 rows x 4 k): int8 stored q + 128, int4 nibbles 0..15.
template <QFormat F, bool kHigh>
inline int8x16_t codes_of(uint8x16_t v) {
  if constexpr (F == QFormat::Int8) return vreinterpretq_s8_u8(veorq_u8(v, vdupq_n_u8(0x80)));
  else if constexpr (kHigh) return vreinterpretq_s8_u8(vshrq_n_u8(v, 4));
  else return vreinterpretq_s8_u8(vandq_u8(v, vdupq_n_u8(0x0f)));
}

// acc[qr] (rows 4 qr .. 4 qr + 3) += the block's contribution, given its integer sums isum.
template <QFormat F>
inline float32x4_t scale_block(float32x4_t acc, int32x4_t isum, const uint8_t* group, int n_blocks, int b,
                               const uint8_t* blk, int qr, float xsb, int32_t sx) {
  if constexpr (F == QFormat::Q4K) {
    const Q4KBlock* kb = reinterpret_cast<const Q4KBlock*>(blk);
    const uint8_t* header = q4k_header(group, n_blocks, b / kQ4KSuper);
    const float32x4_t scale = vmulq_f32(widen_fp16(header + 8 * qr), widen_u8(kb->sc + 4 * qr));
    const float32x4_t offset = vmulq_f32(widen_fp16(header + kQ4KHeaderBytes / 2 + 8 * qr), widen_u8(kb->mn + 4 * qr));
    acc = vfmaq_f32(acc, vcvtq_f32_s32(isum), vmulq_n_f32(scale, xsb));
    return vfmsq_f32(acc, offset, vdupq_n_f32(xsb * static_cast<float>(sx)));
  } else {
    using Block = QBlock<F != QFormat::Int8>;
    const Block* q = reinterpret_cast<const Block*>(blk);
    const int32x4_t s = F == QFormat::Int4 ? vsubq_s32(isum, vdupq_n_s32(8 * sx)) : isum;
    return vfmaq_f32(acc, vcvtq_f32_s32(s), vmulq_n_f32(widen_fp16(q->scales + 8 * qr), xsb));
  }
}

// The 16-row groups of a tile, rows cut at `rows`: group_fn(group, y of its first row, its rows).
template <typename Fn>
inline void for_each_group(const uint8_t* group, size_t group_bytes, int n_groups, float* y, int rows, Fn group_fn) {
  for (int g = 0; g < n_groups && rows > g * kQGroupRows; ++g) {
    const int r = rows - g * kQGroupRows < kQGroupRows ? rows - g * kQGroupRows : kQGroupRows;
    group_fn(group + g * group_bytes, y + g * kQGroupRows, r);
  }
}

}  // namespace arm_quant
}  // namespace
}  // namespace glm4rt
