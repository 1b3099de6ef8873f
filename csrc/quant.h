// Quantized weight formats: blocks of 32 weights along K with one fp16 scale per row and block,
// packed 16 rows at a time so that one activation load feeds 16 rows. This header defines the
// layout (QBlock, the only place that knows a code's byte position) and declares the scalar
// specification (quant.cpp); the SIMD kernels are tested against it bit for bit.
#pragma once
#include <cstddef>
#include <cstdint>
#include <cstring>

namespace glm4rt {

constexpr int kQBlock = 32;      // weights per block along K (one scale each)
constexpr int kQGroupRows = 16;  // weight rows interleaved in one packed group
constexpr int kQChunkBytes = 64;  // one chunk: 4 bytes (4 codes, or 8 int4 codes) of each of 16 rows

// int8: q in [-127, 127], w = d * q, d = amax / 127                                (8.5 bits/weight)
// int4: q in [0, 15],     w = d * (q - 8), d chosen per block by a least-squares
//       search over candidate scales (same storage as llama.cpp's Q4_0)             (4.5 bits/weight)
// q4k:  q in [0, 15],     w = (D * sc) * q - (M * mn): per block an 8-bit scale sc and an 8-bit
//       minimum mn, per row and super-block of 8 blocks (256 weights) fp16 D and M; the structure of
//       llama.cpp's Q4_K (8-bit instead of 6-bit sub-scales; a partial last super-block where K is
//       not a multiple of 256)                                                     (4.625 bits/weight)
enum class QFormat : int { Int8 = 0, Int4 = 1, Q4K = 2 };

// IEEE half <-> float, round to nearest even (scalar, exact).
float fp16_to_f32(uint16_t h);
uint16_t f32_to_fp16(float f);

// One packed block: kQGroupRows rows x kQBlock weights, the codes in 64-byte chunks, then the 16
// rows' fp16 scales. Chunk c holds 4 bytes of every row, row r at bytes 4r .. 4r + 3 (one row per
// 32-bit lane of a 512-bit load, rows 0-7 / 8-15 in the two halves of a 256-bit one):
//   int8 (QBlock<false>, Q8Block): 8 chunks; byte j of row r in chunk c holds k = 4c + j, stored
//        as q + 128 (unsigned, for VNNI's u8 operand)
//   int4 (QBlock<true>,  Q4Block): 4 chunks; byte j of row r in chunk c holds k = 4c + j in its low
//        nibble and k = 16 + 4c + j in its high nibble
// The blocks of a group (its 16 rows over all of K) are contiguous in K order, and groups follow
// each other in row order. Only bytes: a packed matrix may sit at any address (a memory map of a
// saved checkpoint), so the struct needs no alignment, and scales are read with memcpy.
// The ISA files use only code_byte and q_block, integer arithmetic: the copy of an inline function
// that the linker keeps may come from any file, and these have no ISA-specific instruction to leak.
template <bool kInt4>
struct QBlock {
  static constexpr int kChunks = kInt4 ? 4 : 8;
  static constexpr int kCodeOffset = kInt4 ? 8 : 128;  // stored code = q + kCodeOffset

  uint8_t codes[kChunks * kQChunkBytes];
  uint8_t scales[kQGroupRows * sizeof(uint16_t)];  // fp16 bits, row r at bytes 2r and 2r + 1

  // Byte of `codes` that holds row r's code for weight k of the block (0 <= k < 32; an int4 code
  // for k >= 16 is the high nibble of the byte of k - 16). With r a multiple of 8 and k of 4, the
  // first byte of a vector of rows r .. r + 7 (or + 15) and codes k .. k + 3.
  static constexpr int code_byte(int r, int k) {
    const int kk = kInt4 ? k % 16 : k;
    return kk / 4 * kQChunkBytes + r * 4 + kk % 4;
  }
  // Row r's q for weight k (int8: -127 .. 127; int4: 0 .. 15, the stored nibble).
  int code(int r, int k) const {
    const uint8_t byte = codes[code_byte(r, k)];
    if (kInt4) return k < 16 ? byte & 0x0f : byte >> 4;
    return static_cast<int>(byte) - 128;
  }
  // Row r's scale d, widened from fp16.
  float scale(int r) const {
    uint16_t bits;
    std::memcpy(&bits, scales + sizeof(uint16_t) * r, sizeof bits);
    return fp16_to_f32(bits);
  }
};
using Q8Block = QBlock<false>;
using Q4Block = QBlock<true>;
static_assert(sizeof(Q8Block) == 544 && alignof(Q8Block) == 1, "int8 block: 512 code bytes + 16 fp16 scales");
static_assert(sizeof(Q4Block) == 288 && alignof(Q4Block) == 1, "int4 block: 256 code bytes + 16 fp16 scales");

// A q4k block: the codes exactly as in Q4Block (same code_byte), then row r's 8-bit scale sc at
// sc[r] and 8-bit minimum at mn[r]. A q4k group is its n_blocks blocks (288 bytes each, in K order,
// as the other formats) followed by one header per super-block of kQ4KSuper blocks: row r's fp16 D
// at bytes 2r, its fp16 M at bytes 32 + 2r. Row r's weight k of block b is
//   w = (D * sc) * q - (M * mn)      q = the nibble, D and M of super-block b / kQ4KSuper
// (D * sc and M * mn are exact in fp32: 11 x 8 significant bits).
constexpr int kQ4KSuper = 8;               // blocks per super-block
constexpr int kQ4KHeaderBytes = 64;        // D and M of 16 rows, fp16
struct Q4KBlock {
  uint8_t codes[Q4Block::kChunks * kQChunkBytes];
  uint8_t sc[kQGroupRows];
  uint8_t mn[kQGroupRows];
  static constexpr int code_byte(int r, int k) { return Q4Block::code_byte(r, k); }
  int code(int r, int k) const {
    const uint8_t byte = codes[code_byte(r, k)];
    return k < 16 ? byte & 0x0f : byte >> 4;
  }
};
static_assert(sizeof(Q4KBlock) == 288 && alignof(Q4KBlock) == 1, "q4k block: 256 code bytes + 16 + 16 sub-scales");
inline int q4k_supers(int n_blocks) { return (n_blocks + kQ4KSuper - 1) / kQ4KSuper; }
// The header of super-block s of a q4k group of n_blocks blocks.
inline const uint8_t* q4k_header(const uint8_t* group, int n_blocks, int s) {
  return group + static_cast<size_t>(n_blocks) * sizeof(Q4KBlock) + static_cast<size_t>(s) * kQ4KHeaderBytes;
}
// Row r's D and M of a header, widened from fp16.
float q4k_header_d(const uint8_t* header, int r);
float q4k_header_m(const uint8_t* header, int r);

// Block b of the group at `group` (the group's blocks are contiguous).
template <bool kInt4>
inline const QBlock<kInt4>* q_block(const uint8_t* group, int b) {
  return reinterpret_cast<const QBlock<kInt4>*>(group) + b;
}
inline const Q4KBlock* q4k_block(const uint8_t* group, int b) { return reinterpret_cast<const Q4KBlock*>(group) + b; }

inline size_t q_block_bytes(QFormat f) { return f == QFormat::Int8 ? sizeof(Q8Block) : sizeof(Q4Block); }
inline int q_blocks(int K) { return (K + kQBlock - 1) / kQBlock; }
inline int q_groups(int N) { return (N + kQGroupRows - 1) / kQGroupRows; }
// Bytes of one packed group (16 rows over all of K).
inline size_t q_group_bytes(QFormat f, int K) {
  const int nb = q_blocks(K);
  return static_cast<size_t>(nb) * q_block_bytes(f) +
         (f == QFormat::Q4K ? static_cast<size_t>(q4k_supers(nb)) * kQ4KHeaderBytes : 0);
}
inline size_t q_packed_bytes(QFormat f, int N, int K) { return static_cast<size_t>(q_groups(N)) * q_group_bytes(f, K); }

// ---- the specification (quant.cpp) -----------------------------------------------------------

// Reference block quantizers. w: 32 floats of one row.
void quantize_block_int8_ref(const float* w, int8_t* q, uint16_t* d);
void quantize_block_int4_ref(const float* w, uint8_t* q, uint16_t* d);

// One packed block from its weights wt [32][16], k-major: wt[k * 16 + r] (rows past the matrix
// and k past K are zeros), by the reference quantizers row by row. The int4 one has SIMD twins
// (the kernel table's quantize_int4) that must give the same bytes.
void quantize_int8_group_ref(const float* wt, Q8Block* blk);
void quantize_int4_group_ref(const float* wt, Q4Block* blk);

// q4k, one row's block of 32 weights: the scale s >= 0 and offset o <= 0 of w ~ s * q + o
// (q in [0, 15]) with the least weighted squared error sum v[k] (s q[k] + o - w[k])^2 over 21
// candidate grids, each fitted by least squares. v: importance of each weight (calibration
// activations' mean squares; null = all 1).
void q4k_block_fit_ref(const float* w, const float* v, float* s, float* o);
// One q4k super-block of a group: kb <= kQ4KSuper blocks from wt [kb * 32][16] (k-major, zeros past
// the matrix and K), importance v [kb * 32] or null. Fits every row's blocks, rounds the scales
// and minimums to D * sc and M * mn (D = max s / 255, M = max -o / 255 per row, fp16), then rounds
// every weight to the nearest q of its final grid. Writes blk[0 .. kb) and the header.
void quantize_q4k_super_ref(const float* wt, int kb, const float* v, Q4KBlock* blk, uint8_t* header);

// out[N, K] = the weights the packed matrix represents: d * q (int4: d * (q - 8); q4k as above).
void dequantize_packed(QFormat f, const uint8_t* packed, int N, int K, float* out);

// Activations quantized for the integer dot products, one token (row) of K values: per block of
// 32, scale = amax / 127, q = round(x / scale) in [-127, 127], sum = sum of the block's q; a block
// with NaN or inf gets the scale NaN and codes 0.
//   q [n_blocks * 32] (zero past K), scale [n_blocks], sum [n_blocks]
void quantize_acts_row_ref(const float* x, int K, int8_t* q, float* scale, int32_t* sum);

}  // namespace glm4rt
