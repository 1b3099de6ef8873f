// Quantized weight formats: blocks of 32 weights along K with one fp16 scale per row and block,
// and the packed layout the kernels read (16 rows interleaved, so one activation load feeds 16
// rows). The scalar functions here are the specification; the SIMD kernels are tested against them.
#pragma once
#include <cstddef>
#include <cstdint>

namespace glm4rt {

constexpr int kQBlock = 32;      // weights per block along K (one scale each)
constexpr int kQGroupRows = 16;  // weight rows interleaved in one packed group

// int8: q in [-127, 127], w = d * q, d = amax / 127                                (8.5 bits/weight)
// int4: q in [0, 15],     w = d * (q - 8), d chosen per block by a least-squares
//       search over candidate scales (same storage as llama.cpp's Q4_0)             (4.5 bits/weight)
enum class QFormat : int { Int8 = 0, Int4 = 1 };

// One packed block = kQGroupRows rows x kQBlock weights: the quants, then 16 fp16 scales.
//   Int8 quants: 8 chunks of [16 rows][4 bytes], byte = q + 128 (unsigned for VNNI's u8 operand)
//   Int4 quants: 4 chunks of [16 rows][4 bytes]; byte j of row r in chunk c holds
//                q[r][4c + j] in its low nibble and q[r][4(c + 4) + j] in its high nibble
// Blocks of one group are contiguous (K order), groups follow each other (row order).
constexpr size_t kQ8QuantBytes = kQGroupRows * kQBlock;
constexpr size_t kQ4QuantBytes = kQGroupRows * kQBlock / 2;
constexpr size_t kQScaleBytes = kQGroupRows * sizeof(uint16_t);
constexpr size_t kQ8BlockBytes = kQ8QuantBytes + kQScaleBytes;
constexpr size_t kQ4BlockBytes = kQ4QuantBytes + kQScaleBytes;
static_assert(kQ8BlockBytes == 544, "int8 block: 512 quant bytes + 16 fp16 scales");
static_assert(kQ4BlockBytes == 288, "int4 block: 256 quant bytes + 16 fp16 scales");

inline size_t q_block_bytes(QFormat f) { return f == QFormat::Int8 ? kQ8BlockBytes : kQ4BlockBytes; }
inline int q_blocks(int K) { return (K + kQBlock - 1) / kQBlock; }
inline int q_groups(int N) { return (N + kQGroupRows - 1) / kQGroupRows; }
inline size_t q_packed_bytes(QFormat f, int N, int K) {
  return static_cast<size_t>(q_groups(N)) * q_blocks(K) * q_block_bytes(f);
}

// IEEE half <-> float, round to nearest even (scalar, exact).
float fp16_to_f32(uint16_t h);
uint16_t f32_to_fp16(float f);

// Reference block quantizers (the specification). w: 32 floats.
void quantize_block_int8_ref(const float* w, int8_t* q, uint16_t* d);
void quantize_block_int4_ref(const float* w, uint8_t* q, uint16_t* d);

// Quantize rows [row0, row0 + n_rows) of an [N, K] matrix into `packed` (the whole matrix's
// buffer of q_packed_bytes). Exactly one of w_f32 / w_bf16 is given and points at row row0.
// row0 must be a multiple of kQGroupRows; rows past N in the last group are zero.
void quantize_pack(QFormat f, const float* w_f32, const uint16_t* w_bf16, int N, int K, int row0,
                   int n_rows, uint8_t* packed);
// out[N, K] = the weights the packed matrix represents.
void dequantize_packed(QFormat f, const uint8_t* packed, int N, int K, float* out);

// Activations quantized for the integer dot products: per token and block of 32,
// scale = amax / 127, q = round(x / scale) in [-127, 127], sum = sum of the block's q.
//   q [M, n_blocks * 32] (zero past K), scale [M, n_blocks], sum [M, n_blocks]
void quantize_acts(const float* x, int M, int K, int8_t* q, float* scale, int32_t* sum);

}  // namespace glm4rt
