// The table of ISA-specific primitives. Every ISA (generic, avx2, avx_vnni, avx512, avx512_bf16,
// amx) fills one table, member by member; dispatch.cpp picks one at import time. The drivers in
// ops.cpp (threads, tiling, attention, norms) are ISA-neutral and call through this table.
#pragma once
#include <cstddef>
#include <cstdint>
#include <limits>
#if defined(_MSC_VER) && defined(_M_X64)
#include <intrin.h>  // _mm_prefetch
#endif

#include "quant.h"

namespace glm4rt {

// -inf as a constant (a constant expression: no call of numeric_limits' inline function is left in
// the ISA files, whose copy of it could be the one the linker keeps).
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// A float the compiler must hold in a register: the scalar k tails that contract into FMAs
// (-mfma) read their operands through it, so that they stay the same FMA, in register form.
// QEMU's TCG (7.2 and 10.0, .ci/emulate) loads 16 bytes for the 4-byte memory operand of a scalar FMA
// (vfmadd231ss m32) and faults when the float is the last one before an unmapped page. Without
// FMA contraction (the generic kernels, other architectures) it is the identity.
inline float in_register(float v) {
#if defined(__FMA__) && defined(__GNUC__)
  __asm__("" : "+x"(v));
#endif
  return v;
}

// Prefetch the cache line at p for reading; locality 3 = into L1 (and every level), 2 = into L2.
// GCC and Clang have the builtin; MSVC has the x86 intrinsic; elsewhere it is a hint left out.
#if defined(__GNUC__)
#define GLM4RT_PREFETCH(p, locality) __builtin_prefetch((p), 0, (locality))
#elif defined(_MSC_VER) && defined(_M_X64)
#define GLM4RT_PREFETCH(p, locality) \
  _mm_prefetch(reinterpret_cast<const char*>(p), (locality) == 3 ? _MM_HINT_T0 : _MM_HINT_T1)
#else
#define GLM4RT_PREFETCH(p, locality) static_cast<void>(p)
#endif

// Put before each loop over a tile's accumulator array that runs after its k loop (the sums'
// reduction and store): fully unrolled, so that every accumulator is a register. A loop GCC leaves
// rolled indexes the array, which then lives on the stack, and GCC stores every accumulator to it
// on every step of the k loop (a 4 x 4 bf16 dot tile ran at a third of its speed).
#if defined(__clang__)
#define GLM4RT_UNROLL _Pragma("unroll")
#elif defined(__GNUC__)
#define GLM4RT_UNROLL _Pragma("GCC unroll 64")
#else
#define GLM4RT_UNROLL
#endif

// How far ahead of their loads the dot-form tiles (avx2, avx512, avx512_bf16) prefetch each weight
// row into L1: without it a tile of 4 tokens read its weights at half the bandwidth of one token's
// GEMV on Zen 5 (benchmarks/kernel-notes.md).
constexpr int kTilePrefetchBytes = 2048;

// C[m, n] (+)= sum_k X[m, k] * W[n, k]  for a tile of m <= mr tokens and n <= nr weight rows.
//   x: [m, k] with row stride ldx     w: [n, k] with row stride ldw     c: [m, n] with row stride ldc
// accumulate=false overwrites C, true adds to it (used for blocks of k after the first).
using GemmTileF32 = void (*)(const float* x, size_t ldx, const float* w, size_t ldw, float* c,
                             size_t ldc, int m, int n, int k, bool accumulate);
// Same with bf16 weights (raw uint16 bit patterns), widened to fp32 exactly; fp32 accumulation.
using GemmTileBF16 = void (*)(const float* x, size_t ldx, const uint16_t* w, size_t ldw, float* c,
                              size_t ldc, int m, int n, int k, bool accumulate);
// sum_i a[i] * b[i]
using DotF32 = float (*)(const float* a, const float* b, int n);

// Quantized weights (formats in quant.h): y[m, r] for mt tokens and the 16 rows of one packed
// group, over all n_blocks blocks of K:
//   y[m, r] = sum_b xs[m, b] * d[r, b] * (sum_k q[r, k] * xq[m, k])   (int4: q - 8 for q)
//   q4k:      sum_b xs[m, b] * (D sc[r, b] * (sum_k q[r, k] * xq[m, k]) - M mn[r, b] * xsum[m, b])
//   group: the group's first block      xq [mt, ldq] int8, xs / xsum [mt, lds] (quant.h)
//   y: [mt, ldy], only the first `rows` (<= 16) of the group are written.
// n_groups (1 or 2, 2 only with mt == 1) consecutive groups, group_bytes apart, are done in one
// pass so that decode (one token) shares each activation broadcast between 32 rows; `rows` then
// counts the rows of both (<= 32) and y receives them consecutively.
using QGemmTile = void (*)(const uint8_t* group, size_t group_bytes, int n_groups, int n_blocks,
                           const int8_t* xq, const float* xs, const int32_t* xsum, size_t ldq,
                           size_t lds, int mt, float* y, size_t ldy, int rows);

// bf16 activations x bf16 weights with AVX512-BF16 (vdpbf16ps): products of bf16 values are
// exact in fp32, sums are fp32. Null in the tables of CPUs without it; the drivers then round x to
// bf16 and run gemm_tile_bf16, which computes the same products exactly.
// Dot form (few tokens): as GemmTileBF16 with x in bf16 too; k is the whole row, not a k block.
using GemmTileBF16x = void (*)(const uint16_t* x, size_t ldx, const uint16_t* w, size_t ldw,
                               float* c, size_t ldc, int m, int n, int k, bool accumulate);
// Panel form (many tokens): C[m, n] (+)= sum_p x[i, p] . w[j, p] over npairs pairs of k, with
//   xp [npairs, kBf16PanelTokens]: bf16 pairs (low half = even k) of up to 12 tokens
//   wp [npairs, kBf16PanelRows]:   bf16 pairs of 32 weight rows
// m <= 12 tokens and n <= 32 rows of C [m, n] (row stride ldc) are written.
constexpr int kBf16PanelTokens = 12;
constexpr int kBf16PanelRows = 32;
using Bf16Panel = void (*)(const uint32_t* xp, const uint32_t* wp, int npairs, float* c, size_t ldc,
                           int m, int n, bool accumulate);
// Packs wp [npairs, 32] from 32 full rows of bf16 weights (row stride ldw), k = 0 .. 2 npairs.
using Bf16Pack = void (*)(const uint16_t* w, size_t ldw, int npairs, uint32_t* wp);
// Packs xp [(K + 1) / 2, 12] from m <= 12 fp32 rows x [m, K] (row stride ldx), rounded to bf16
// (nearest even); rows m .. 11 and the pad of an odd K are zeros.
using Bf16PackX = void (*)(const float* x, size_t ldx, int m, int K, uint32_t* xp);

// Panel form with fp32 FMAs (many tokens on CPUs without AVX512-BF16; fp32 weights on any):
// the weights of kF32PanelRows rows over kc columns are packed once, k-major and widened to fp32,
//   wp [kc, kF32PanelRows]   (rows past the matrix are zeros)
// and every tile of m <= kF32PanelTokens tokens runs over it:
//   C[i, j] (+)= sum_k x[i, k] * wp[k, j]    x [m, kc] (row stride ldx), C [m, n <= 16] (ldc)
// Each C element is one fp32 lane summing k in order, the same on every thread count.
constexpr int kF32PanelTokens = 6;
constexpr int kF32PanelRows = 16;
using F32Panel = void (*)(const float* x, size_t ldx, const float* wp, int kc, float* c, size_t ldc,
                          int m, int n, bool accumulate);
// Packs wp [kc, 16] from the n <= 16 rows at w (row stride ldw), columns 0 .. kc.
using F32PackF32 = void (*)(const float* w, size_t ldw, int n, int kc, float* wp);
using F32PackBF16 = void (*)(const uint16_t* w, size_t ldw, int n, int kc, float* wp);

// AMX tiles (many tokens on CPUs with AMX-BF16; null elsewhere). Activations and weights are cut
// into k blocks of 32; a block of 32 tokens or 32 weight rows is two 1 KiB tiles of 16 x 32 bf16,
//   x tiles [k block][half][16 tokens][32 k]            (token = 16 half + row)
//   w tiles [k block][half][16 pairs][16 rows][2 of k]  (weight row = 16 half + column)
// amx_gemm: C [32, 32] (+)= x tiles . w tiles^T over kb blocks; C rows ldc floats apart; m <= 16
// computes (and writes) only C rows 0-15. Products of bf16 values are exact, sums fp32 (the tile
// unit treats denormal inputs as zeros). Runs between amx_begin and amx_end on the calling thread
// (tile configuration / release).
// amx_pack_x: the x tiles of m <= 32 token rows (ldx apart), blocks b0 .. b0 + kb (zeros past m
//   and K), rounded to bf16, nearest even.
// amx_pack_bf16: the w tiles of n <= 32 bf16 rows (ldw apart), blocks b0 .. b0 + kb (zeros past n, K).
// amx_pack_int8 / amx_pack_int4: the w tiles of n_groups (1 or 2) packed groups (quant.h),
//   group_bytes apart, blocks b0 .. b0 + kb; each weight dequantized to bf16(d * q), nearest even
//   (exact: the only rounding is the one to bf16). A missing second group gives zero rows.
// amx_pack_q4k: the same for q4k groups of n_blocks blocks (AmxPackQ4K): bf16 of the fp32
//   weight (D sc) q - M mn, the value that dequantize_packed gives.
constexpr int kAmxTileElems = 16 * 32;
constexpr int kAmxBlock = 32;  // tokens, weight rows and k per block
using AmxThread = void (*)();
using AmxGemm = void (*)(const uint16_t* xa, const uint16_t* wa, int kb, float* c, size_t ldc, int m,
                         bool accumulate);
using AmxPackX = void (*)(const float* x, size_t ldx, int m, int K, int b0, int kb, uint16_t* xa);
using AmxPackBF16 = void (*)(const uint16_t* w, size_t ldw, int n, int K, int b0, int kb, uint16_t* wa);
using AmxPackQ = void (*)(const uint8_t* group, size_t group_bytes, int n_groups, int b0, int kb,
                          uint16_t* wa);
using AmxPackQ4K = void (*)(const uint8_t* group, size_t group_bytes, int n_groups, int n_blocks, int b0,
                            int kb, uint16_t* wa);

// AMX prefill attention (the amx ISA; null elsewhere), as exact as fp32: every fp32 operand is the
// sum of three bf16 parts (hi = bf16(x), mid = bf16(x - hi), lo = bf16(x - hi - mid), nearest
// even; the differences are exact, so hi + mid + lo == x for normal x), and a product a . b is
// the sum of the six part products a_i . b_j with i + j <= 2 (the three left out are below
// 2^-26 of it), each exact on the tile unit, summed in fp32. Keys are cut into blocks of 32;
// a packed block of K or V holds amx_attn_block_elems(d) bf16 values, x tiles (kernels.h):
//   K block [part][d block of 32][half][16 keys][32 d]     (S^T = K Q^T: rows = keys)
//   V block [part][block of 32 dims][half][16 dims][32 keys]   (O^T += V^T P^T: rows = dims)
// amx_attn_pack: the K and V blocks of n <= 32 keys (rows of k and v, d floats apart; d a
//   multiple of 32 up to kMaxHeadDim); keys past n are zeros (their rows are not read).
// amx_attn_rows: causal softmax attention of up to kAmxAttnRows query rows that share one kv head
//   over packed K / V blocks, transposed (S^T = K Q^T, O^T += V^T P^T, so that the softmax over
//   keys runs down columns: lanes are query rows), with an online softmax per block of 32 keys.
//   Row r sees key s iff s < n_vis[r] and (key_mask == null or key_mask[s] != 0); a row that
//   sees no key gets zeros. Runs between amx_begin and amx_end.
constexpr int kAmxAttnRows = 128;
constexpr int kAmxAttnParts = 3;
inline size_t amx_attn_block_elems(int d) { return static_cast<size_t>(kAmxAttnParts) * 32 * d; }
struct AmxAttnRows {
  const float* const* q;  // [rows] query rows (d floats each)
  float* const* out;      // [rows] output rows
  const int* n_vis;       // [rows] causal limit of each row
  int rows;               // <= kAmxAttnRows
  const uint16_t* ka;     // packed K blocks 0 .. (max n_vis + 31) / 32, amx_attn_block_elems(d) apart
  const uint16_t* va;     // packed V blocks, the same
  const uint8_t* key_mask;
  int d;
  float scale;
  void* scratch;  // amx_attn_scratch_bytes(d), 64-byte aligned
};
inline size_t amx_attn_scratch_bytes(int d) {
  return static_cast<size_t>(kAmxAttnRows) * kAmxAttnParts * d * 2  // Q^T parts (w tiles)
         + kAmxAttnParts * 32 * 32 * 2                               // P^T parts of a row block
         + static_cast<size_t>(kAmxAttnRows) * d * 4                 // O^T per block of 32 rows
         + 32 * 32 * 4 + 2 * kAmxAttnRows * 4;                       // S^T [32, 32], m, l
}
using AmxAttnPack = void (*)(const float* k, const float* v, int n, int d, uint16_t* ka, uint16_t* va);
using AmxAttnRowsFn = void (*)(const AmxAttnRows& a);

// Largest head_dim the attention kernels take (they keep a block of transposed keys or the
// transposed queries on the stack); the bindings reject larger ones. GLM-4 models use 128.
constexpr int kMaxHeadDim = 256;

// Attention scores: S[r, s] = sum_c q[r, c] * k[s, c] for R query rows (ldq apart) and n keys
// (rows of k, d apart; d <= kMaxHeadDim); S rows lds apart, overwritten. The SIMD versions
// transpose each block of keys once for all R rows, so every score is a lane of a vector of FMAs
// (no reductions).
using AttnQK = void (*)(const float* q, size_t ldq, int R, const float* k, int n, int d, float* s,
                        size_t lds);

// Attention values: out[G, d] = P[G, S] @ V[S, d] (P rows ldp apart, V rows d apart);
// overwrites out. Keys are taken in blocks that stay in L1 across the G heads.
using AttnPV = void (*)(const float* p, size_t ldp, int G, const float* v, int S, int d, float* out);

// Decode attention: the G query heads of one token that share a kv head, over the n keys of a
// range (rows of k and v, d apart; d <= kMaxHeadDim); key_mask [n] (0 = padding) or null. Writes
//   out [G, d] = sum_s e^(score_s - m) v_s  (not yet divided by l)
//   m [G] = the largest visible score (-inf if none), l [G] = sum_s e^(score_s - m)
// so that key ranges computed apart (on different threads) merge exactly. Each K and V row is read
// once for all G heads. Every table has one; the drivers use it when no attention
// probabilities are asked for.
using AttnDecode = void (*)(const float* q, int G, const float* k, const float* v, int n, int d,
                            const uint8_t* key_mask, float scale, float* out, float* m, float* l);

// In place over x[n]: softmax (fp32); -inf entries get 0, an all -inf row becomes all 0.
using SoftmaxF32 = void (*)(float* x, int n);
// out[i] = up[i] * silu(gate[i]) = up[i] * gate[i] / (1 + exp(-gate[i]))
using SiluMulF32 = void (*)(const float* gate, const float* up, float* out, int n);

// int4 quantization of one packed block (16 rows x 32 weights) by the specification,
// quantize_int4_group_ref in quant.cpp, bit for bit (the SIMD versions run one row per lane).
//   wt [32][16] k-major: wt[k * 16 + r] (rows past the matrix and k past K are zeros)
using QuantizeInt4 = void (*)(const float* wt, Q4Block* blk);
// q4k quantization of one super-block of a group by the specification, quantize_q4k_super_ref
// (quant.cpp), bit for bit (the SIMD version runs one row per lane).
using QuantizeQ4K = void (*)(const float* wt, int kb, const float* v, Q4KBlock* blk, uint8_t* header);

// XOR of every 8-byte word of data[n_bytes] (n_bytes a multiple of 64): the bandwidth probe, with
// the widest loads of the ISA so that it measures the memory, not the loop.
using ReadXor = uint64_t (*)(const uint8_t* data, size_t n_bytes);

// Filled by name in each ISA file's table function (generic_kernels() and so on); an entry an ISA
// lacks stays null and the drivers take another path (ops.cpp, matmul_path / attention_path).
struct KernelTable {
  const char* name = nullptr;  // "generic", "avx2", "avx_vnni", "avx512", "avx512_bf16", "amx"
  // Every table:
  int mr = 0;  // tokens per gemm tile
  int nr = 0;  // weight rows per gemm tile
  GemmTileF32 gemm_tile_f32 = nullptr;
  GemmTileBF16 gemm_tile_bf16 = nullptr;
  DotF32 dot_f32 = nullptr;
  ReadXor read_xor = nullptr;
  AttnQK attn_qk = nullptr;
  AttnPV attn_pv = nullptr;
  AttnDecode attn_decode = nullptr;
  SoftmaxF32 softmax = nullptr;
  SiluMulF32 silu_mul = nullptr;
  int qmt = 0;  // tokens per quantized tile
  QGemmTile qgemm_int8 = nullptr;
  QGemmTile qgemm_int4 = nullptr;
  QGemmTile qgemm_q4k = nullptr;
  QuantizeInt4 quantize_int4 = nullptr;
  QuantizeQ4K quantize_q4k = nullptr;
  // fp32 panels: avx2 (and avx_vnni, avx512, avx512_bf16, amx, which take avx2's); null in generic.
  F32Panel f32_panel = nullptr;
  F32PackF32 f32_pack = nullptr;
  F32PackBF16 f32_pack_bf16 = nullptr;
  // bf16 x bf16 products: avx512_bf16 and amx (AVX512-BF16), and ARM64's bf16 (BFDOT; dot tiles only).
  GemmTileBF16x gemm_tile_bf16x = nullptr;
  // The same dot tiles for one token too (no 4-chain GEMV): every output element is summed in
  // one order whatever m, for batch-invariant mode (ops.cpp, matmul_path).
  GemmTileBF16x gemm_tile_bf16x_dot = nullptr;
  Bf16Panel bf16_panel = nullptr;
  Bf16Pack bf16_pack = nullptr;
  Bf16PackX bf16_pack_x = nullptr;
  // AMX tiles: amx only.
  AmxThread amx_begin = nullptr;
  AmxThread amx_end = nullptr;
  AmxGemm amx_gemm = nullptr;
  AmxPackX amx_pack_x = nullptr;
  AmxPackBF16 amx_pack_bf16 = nullptr;
  AmxPackQ amx_pack_int8 = nullptr;
  AmxPackQ amx_pack_int4 = nullptr;
  AmxPackQ4K amx_pack_q4k = nullptr;
  AmxAttnPack amx_attn_pack = nullptr;
  AmxAttnRowsFn amx_attn_rows = nullptr;
};

// CPU tunings: settings that change speed, never results, chosen from CPUID (dispatch.cpp) and
// read by the table functions. Developers may override them for benchmarking with the
// GLM4RT_DEV_* environment variables, which dispatch.cpp reads and validates when the module is
// imported (cpu_tuning()).
struct CpuTuning {
  // Where the AVX-512 decode GEMVs prefetch their weight streams: into L1, ~3-4 KiB ahead (the
  // int8 / int4 / bf16 ones; AMD Zen 5 and later, with a 48 KiB L1), or into L2, ~2 KiB ahead
  // (the quantized ones; bf16 none). GLM4RT_DEV_DECODE_PREFETCH=l1|l2.
  bool decode_prefetch_l1;
  // Whether the AVX512-BF16 decode GEMV streams rows of any length 4 at a time (Intel) or only
  // rows longer than 8192 (AMD: shorter rows stream faster one at a time there).
  // GLM4RT_DEV_BF16_GEMV_ROWS=1|4.
  bool bf16_gemv_four_rows;
};
const CpuTuning& cpu_tuning();

// One function per ISA file; each returns its static table.
const KernelTable& generic_kernels();
#if defined(GLM4RT_ARM64)
const KernelTable& neon_kernels();     // arm_neon.cpp: the generic table + NEON tiles
const KernelTable& dotprod_kernels();  // arm_dotprod.cpp: the neon table + SDOT quantized tiles
const KernelTable& i8mm_kernels();     // arm_i8mm.cpp: the neon table + SMMLA (and SDOT) quantized tiles
const KernelTable& bf16_kernels();     // arm_bf16.cpp: the i8mm table + BFDOT tiles for bf16 weights
#endif
#if defined(GLM4RT_X86)
void quantize_int4_avx2(const float* wt, Q4Block* blk);    // x86_avx2_quant.cpp
void quantize_int4_avx512(const float* wt, Q4Block* blk);  // x86_avx512_quant.cpp
void quantize_q4k_avx512(const float* wt, int kb, const float* v, Q4KBlock* blk, uint8_t* header);
const KernelTable& avx2_kernels();
const KernelTable& avx_vnni_kernels();       // the avx2 table + 256-bit VNNI quantized tiles (VEX)
const KernelTable& avx_vnni_evex_kernels();  // the same tiles in EVEX encoding (AVX512-VNNI CPUs)
const KernelTable& avx512_kernels();
const KernelTable& avx512_bf16_kernels();  // the avx512 table + the bf16 dot products
const KernelTable& amx_kernels();          // the avx512_bf16 table + the AMX prefill tiles
#endif

}  // namespace glm4rt
