// AMX kernels (Intel Sapphire Rapids and later): prefill matmuls on the tile unit with AMX-BF16
// (tdpbf16ps: a 16 x 16 fp32 tile += 16 x 32 bf16 times 32 x 16 bf16, products exact, sums fp32).
// The table is the avx512_bf16 one with the amx entries filled in; dispatch.cpp selects it only
// when CPUID reports AMX-TILE and AMX-BF16, the OS saves the tile state (XCR0 bits 17, 18) and
// Linux granted this process the tile data (arch_prctl ARCH_REQ_XCOMP_PERM).
//
// Layouts (kernels.h): activations and weights are both cut into k blocks of 32; a block of 32
// tokens (or weight rows) is two 16 x 32 bf16 tiles of 1 KiB, stored one after the other:
//   x tiles  [k block][half][16 tokens][32 k]              (the A operand: row = token)
//   w tiles  [k block][half][16 pairs][16 rows][2 of k]   (the B operand: VNNI pairs of k)
// so every tile load is one contiguous KiB.
#include <immintrin.h>

#include <algorithm>
#include <cmath>

#include "../kernels.h"
#include "../quant.h"

#include "x86_avx512_exp.h"
#include "x86_avx512_transpose.h"

namespace glm4rt {
namespace amx {
namespace {

constexpr int kTile = kAmxTileElems;  // bf16 values per tile: 16 x 32

// Tile registers: 0, 1 = x (tokens 0-15, 16-31); 2, 3 = w (rows 0-15, 16-31); 4..7 = C.
struct alignas(64) TileConfig {
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

void tile_begin() {
  TileConfig cfg{};
  cfg.palette_id = 1;
  for (int t = 0; t < 8; ++t) {
    cfg.rows[t] = 16;
    cfg.colsb[t] = 64;
  }
  // Not _tile_loadconfig: GCC 12's version tells the compiler it reads only the first 8 bytes,
  // and the stores to the rest of cfg can then be dropped.
  __asm__ volatile("ldtilecfg %0" : : "m"(cfg));
}

void tile_end() { _tile_release(); }

// The C tiles 4..7 of a [32, 32] fp32 block (rows ldc floats apart): loaded (accumulate) or
// zeroed, and stored back; two == false: only rows 0-15 (tiles 4, 5) are loaded and stored.
inline void c_tiles_begin(float* c, size_t ldc, bool two, bool accumulate) {
  const size_t stride = ldc * sizeof(float);
  if (accumulate) {
    _tile_loadd(4, c, stride);
    _tile_loadd(5, c + 16, stride);
    if (two) {
      _tile_loadd(6, c + 16 * ldc, stride);
      _tile_loadd(7, c + 16 * ldc + 16, stride);
    }
  } else {
    _tile_zero(4);
    _tile_zero(5);
    _tile_zero(6);
    _tile_zero(7);
  }
}

inline void c_tiles_end(float* c, size_t ldc, bool two) {
  const size_t stride = ldc * sizeof(float);
  _tile_stored(4, c, stride);
  _tile_stored(5, c + 16, stride);
  if (two) {
    _tile_stored(6, c + 16 * ldc, stride);
    _tile_stored(7, c + 16 * ldc + 16, stride);
  }
}

// C [32 tokens, 32 rows] (+)= x tiles . w tiles over kb blocks of 32 k. C rows ldc floats apart.
// m <= 16: only the first 16 tokens are computed (C rows 16-31 untouched).
// The x tiles of the next block are prefetched into L1 (the w tiles of a panel are reused by every
// token block and stay there); load order lets each tile product start as soon as its operands
// are in.
void gemm(const uint16_t* xa, const uint16_t* wa, int kb, float* c, size_t ldc, int m, bool accumulate) {
  const bool two = m > 16;
  c_tiles_begin(c, ldc, two, accumulate);
  for (int b = 0; b < kb; ++b) {
    const uint16_t* xb = xa + static_cast<size_t>(b) * 2 * kTile;
    const uint16_t* wb = wa + static_cast<size_t>(b) * 2 * kTile;
    const char* next = reinterpret_cast<const char*>(xb + 2 * kTile);
    for (int line = 0; line < (two ? 2 : 1) * kTile * 2; line += 64) _mm_prefetch(next + line, _MM_HINT_T0);
    _tile_loadd(0, xb, 64);
    _tile_loadd(2, wb, 64);
    _tile_dpbf16ps(4, 0, 2);
    _tile_loadd(3, wb + kTile, 64);
    _tile_dpbf16ps(5, 0, 3);
    if (two) {
      _tile_loadd(1, xb + kTile, 64);
      _tile_dpbf16ps(6, 1, 2);
      _tile_dpbf16ps(7, 1, 3);
    }
  }
  c_tiles_end(c, ldc, two);
}

inline __mmask16 mask16(int left) {
  return left >= 16 ? (__mmask16)0xFFFF : left > 0 ? (__mmask16)((1u << left) - 1u) : (__mmask16)0;
}

// 32 fp32 values (lo = k 0..15, hi = k 16..31) -> 32 bf16 in k order, nearest even.
inline __m512i to_bf16(__m512 lo, __m512 hi) {
  const __m512bh v = _mm512_cvtne2ps_pbh(hi, lo);
  return reinterpret_cast<const __m512i&>(v);
}

// x tiles of m <= 32 tokens (rows of x, ldx apart), k blocks b0 .. b0 + kb: tokens past m and k
// past K are zeros.
void pack_x(const float* x, size_t ldx, int m, int K, int b0, int kb, uint16_t* xa) {
  for (int b = 0; b < kb; ++b) {
    const int k0 = 32 * (b0 + b);
    const __mmask16 lo = mask16(K - k0), hi = mask16(K - k0 - 16);
    for (int t = 0; t < 32; ++t) {
      __m512i v = _mm512_setzero_si512();
      if (t < m) {
        const float* xt = x + t * ldx + k0;
        v = to_bf16(_mm512_maskz_loadu_ps(lo, xt), _mm512_maskz_loadu_ps(hi, xt + 16));
      }
      _mm512_storeu_si512(xa + static_cast<size_t>(b) * 2 * kTile + t * 32, v);
    }
  }
}

// w tiles of n <= 32 bf16 rows (ldw apart), blocks b0 .. b0 + kb of K: 16 rows x 16 pairs of
// dwords transposed into 16 pairs x 16 rows. Rows past n and k past K are zeros.
void pack_bf16(const uint16_t* w, size_t ldw, int n, int K, int b0, int kb, uint16_t* wa) {
  for (int b = 0; b < kb; ++b) {
    const int k0 = 32 * (b0 + b);
    const __mmask32 mask = K - k0 >= 32 ? ~0u : (1u << (K - k0)) - 1u;
    for (int h = 0; h < 2; ++h) {
      __m512i r[16];
      for (int i = 0; i < 16; ++i)
        r[i] = 16 * h + i < n ? _mm512_maskz_loadu_epi16(mask, w + (16 * h + i) * ldw + k0) : _mm512_setzero_si512();
      transpose16(r);  // r[p] = pair p of rows 16h .. 16h+15
      uint16_t* dst = wa + (static_cast<size_t>(b) * 2 + h) * kTile;
      for (int p = 0; p < 16; ++p) _mm512_storeu_si512(dst + 32 * p, r[p]);
    }
  }
}

// Two fp32 vectors of the same 16 rows (a = k, b = k + 1; lanes = rows) -> one tile row of bf16
// pairs: dword r = bf16(a[r]) | bf16(b[r]) << 16.
inline __m512i pair_row(__m512 a, __m512 b) {
  const __m512i idx = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8,
                                       23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  return _mm512_permutexvar_epi16(idx, to_bf16(a, b));  // words: a0 b0 a1 b1 ...
}

// Quantized groups (quant.h) dequantized into w tiles: element = bf16(d * q), d the fp16 scale
// widened, q the signed quant (int8: byte - 128, int4: nibble - 8); d * q is exact in fp32, so
// the only rounding is the final one to bf16, nearest even: dequantize_packed (quant.cpp, the
// specification) rounded to bf16.
// group: the first of n_groups (1 or 2) groups of 16 rows, group_bytes apart; blocks b0 .. b0+kb.
// q4k (n_blocks locates the super-block headers): element = bf16((D sc) q - M mn), the one rounding
// of the fp32 subtraction (D sc q is exact) as in dequantize_packed, then the one to bf16.
template <QFormat F>
void pack_q(const uint8_t* group, size_t group_bytes, int n_groups, int n_blocks, int b0, int kb, uint16_t* wa) {
  constexpr bool kInt4 = F != QFormat::Int8;  // q4k: int4's codes (same bytes, same block size)
  using Block = QBlock<kInt4>;
  for (int b = 0; b < kb; ++b)
    for (int h = 0; h < 2; ++h) {
      uint16_t* dst = wa + (static_cast<size_t>(b) * 2 + h) * kTile;  // row p at dst + 32 p
      if (h >= n_groups) {
        for (int p = 0; p < 16; ++p) _mm512_storeu_si512(dst + 32 * p, _mm512_setzero_si512());
        continue;
      }
      const Block* blk = q_block<kInt4>(group + h * group_bytes, b0 + b);
      __m512 d, offset = _mm512_setzero_ps();
      __m512i zero_code = _mm512_set1_epi32(8);
      if constexpr (F == QFormat::Q4K) {
        const Q4KBlock* kblk = reinterpret_cast<const Q4KBlock*>(blk);
        const uint8_t* header = q4k_header(group + h * group_bytes, n_blocks, (b0 + b) / kQ4KSuper);
        d = _mm512_mul_ps(_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(header))),
                          _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(kblk->sc)))));
        offset = _mm512_mul_ps(
            _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(header + kQ4KHeaderBytes / 2))),
            _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(kblk->mn)))));
        zero_code = _mm512_setzero_si512();
      } else {
        d = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk->scales)));
      }
      if (kInt4) {
        // chunk c: byte j of lane r holds k = 4c + j (low nibble) and 16 + 4c + j (high nibble).
        for (int c = 0; c < 4; ++c) {
          const __m512i v = _mm512_loadu_si512(blk->codes + Block::code_byte(0, 4 * c));
          __m512 f[8];  // f[j] = k 4c + j (j < 4), f[4 + j] = k 16 + 4c + j
          for (int j = 0; j < 4; ++j) {
            const __m512i lo = _mm512_and_si512(_mm512_srli_epi32(v, 8 * j), _mm512_set1_epi32(0xF));
            const __m512i hi = _mm512_and_si512(_mm512_srli_epi32(v, 8 * j + 4), _mm512_set1_epi32(0xF));
            // int4: d (q - 8) - 0; q4k: (D sc) q - M mn, one rounding (fmsub)
            f[j] = _mm512_fmsub_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(lo, zero_code)), d, offset);
            f[4 + j] = _mm512_fmsub_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(hi, zero_code)), d, offset);
          }
          _mm512_storeu_si512(dst + 32 * (2 * c), pair_row(f[0], f[1]));
          _mm512_storeu_si512(dst + 32 * (2 * c + 1), pair_row(f[2], f[3]));
          _mm512_storeu_si512(dst + 32 * (8 + 2 * c), pair_row(f[4], f[5]));
          _mm512_storeu_si512(dst + 32 * (8 + 2 * c + 1), pair_row(f[6], f[7]));
        }
      } else {
        // chunk c: byte j of lane r holds k = 4c + j, stored as q + 128.
        for (int c = 0; c < 8; ++c) {
          const __m512i v = _mm512_xor_si512(_mm512_loadu_si512(blk->codes + Block::code_byte(0, 4 * c)),
                                             _mm512_set1_epi8(static_cast<char>(0x80)));
          __m512 f[4];
          for (int j = 0; j < 4; ++j)  // sign-extend byte j of every lane
            f[j] = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(v, 24 - 8 * j), 24)), d);
          _mm512_storeu_si512(dst + 32 * (2 * c), pair_row(f[0], f[1]));
          _mm512_storeu_si512(dst + 32 * (2 * c + 1), pair_row(f[2], f[3]));
        }
      }
    }
}

// ---- prefill attention: split products (kernels.h) -------------------------------------------

// x rounded to bf16 (nearest even) and widened back: exact fp32 values.
inline __m512 bf16_round(__m512 x) {
  const __m256bh h = _mm512_cvtneps_pbh(x);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(reinterpret_cast<const __m256i&>(h)), 16));
}

// pair_row for a and b that are bf16 values already (their low 16 bits zero).
inline __m512i pair_row_exact(__m512 a, __m512 b) {
  return _mm512_or_si512(_mm512_srli_epi32(_mm512_castps_si512(a), 16), _mm512_castps_si512(b));
}

// x = part[0] + part[1] + part[2], each a bf16 value (kernels.h).
inline void split3(__m512 x, __m512 part[kAmxAttnParts]) {
  part[0] = bf16_round(x);
  const __m512 r = _mm512_sub_ps(x, part[0]);
  part[1] = bf16_round(r);
  part[2] = bf16_round(_mm512_sub_ps(r, part[1]));
}

// C [32, 32] (+)= sum over the part pairs i + j <= 2 of x part i . w part j, over kb blocks of 32
// (each part's blocks consecutive, parts x_part / w_part elements apart). m <= 16: C rows 0-15.
void gemm_split(const uint16_t* xa, size_t x_part, const uint16_t* wa, size_t w_part, int kb,
                float* c, size_t ldc, int m, bool accumulate) {
  const bool two = m > 16;
  c_tiles_begin(c, ldc, two, accumulate);
  for (int b = 0; b < kb; ++b)
    for (int j = 0; j < kAmxAttnParts; ++j) {  // each w part loaded once, the x parts (in L1) again
      const uint16_t* wb = wa + j * w_part + static_cast<size_t>(b) * 2 * kTile;
      _tile_loadd(2, wb, 64);
      _tile_loadd(3, wb + kTile, 64);
      for (int i = 0; i + j < kAmxAttnParts; ++i) {
        const uint16_t* xb = xa + i * x_part + static_cast<size_t>(b) * 2 * kTile;
        _tile_loadd(0, xb, 64);
        _tile_dpbf16ps(4, 0, 2);
        _tile_dpbf16ps(5, 0, 3);
        if (two) {
          _tile_loadd(1, xb + kTile, 64);
          _tile_dpbf16ps(6, 1, 2);
          _tile_dpbf16ps(7, 1, 3);
        }
      }
    }
  c_tiles_end(c, ldc, two);
}

// x tile rows from fp32: 32 values (lo = 0..15, hi = 16..31) split into parts, part p's bf16 row
// stored at dst + p * part.
inline void store_split_row(__m512 lo, __m512 hi, uint16_t* dst, size_t part) {
  __m512 a[kAmxAttnParts], b[kAmxAttnParts];
  split3(lo, a);
  split3(hi, b);
  for (int p = 0; p < kAmxAttnParts; ++p) _mm512_storeu_si512(dst + p * part, to_bf16(a[p], b[p]));
}

// The attention runs transposed, S^T = K Q^T and O^T += V^T P^T, so that the softmax over keys
// is a column operation: lanes are query rows, and the maxima and sums are vertical.
void attn_pack(const float* k, const float* v, int n, int d, uint16_t* ka, uint16_t* va) {
  const int nb = d / 32;
  const size_t part = static_cast<size_t>(nb) * 2 * kTile;
  const __m512 zero = _mm512_setzero_ps();
  for (int key = 0; key < 32; ++key)  // K: x tiles, a row per key
    for (int b = 0; b < nb; ++b) {
      const float* row = k + static_cast<size_t>(key) * d + 32 * b;
      store_split_row(key < n ? _mm512_loadu_ps(row) : zero, key < n ? _mm512_loadu_ps(row + 16) : zero,
                      ka + (static_cast<size_t>(b) * 2 + key / 16) * kTile + 32 * (key % 16), part);
    }
  for (int c0 = 0; c0 < d; c0 += 16) {  // V: x tiles, a row per dim (16 dims x 32 keys transposed)
    __m512i r[2][16];
    for (int h = 0; h < 2; ++h)
      for (int i = 0; i < 16; ++i)
        r[h][i] = 16 * h + i < n ? _mm512_loadu_si512(v + static_cast<size_t>(16 * h + i) * d + c0) : _mm512_setzero_si512();
    transpose16(r[0]);  // r[h][c] = dim c0 + c of keys 16h .. 16h+15
    transpose16(r[1]);
    for (int c = 0; c < 16; ++c)
      store_split_row(_mm512_castsi512_ps(r[0][c]), _mm512_castsi512_ps(r[1][c]),
                      va + (static_cast<size_t>(c0 / 16)) * kTile + 32 * c, part);
  }
}

void attn_rows(const AmxAttnRows& a) {
  const int d = a.d, nb = d / 32, n_rb = (a.rows + 31) / 32;
  const size_t part = static_cast<size_t>(nb) * 2 * kTile, q_block = kAmxAttnParts * part;
  const size_t kv_block = amx_attn_block_elems(d);
  uint16_t* qa = static_cast<uint16_t*>(a.scratch);  // Q^T [row block][part][d block][half][16 pairs][16 rows][2]
  uint16_t* pa = qa + static_cast<size_t>(kAmxAttnRows / 32) * q_block;  // P^T [part][half][16 pairs of keys][16 rows][2]
  float* ot = reinterpret_cast<float*>(pa + kAmxAttnParts * 2 * kTile);  // O^T [row block][d][32 rows]
  float* st = ot + static_cast<size_t>(kAmxAttnRows) * d;                // S^T [32 keys][32 rows]
  float* mx = st + 32 * 32;                                              // [rows] running maxima
  float* l = mx + kAmxAttnRows;                                          // [rows] running sums
  const float neg_inf = kNegInf;
  int vis[kAmxAttnRows];  // causal limits, 0 for the padding rows of the last block
  int rb_vis[kAmxAttnRows / 32] = {};
  for (int r = 0; r < n_rb * 32; ++r) {
    vis[r] = r < a.rows ? a.n_vis[r] : 0;
    rb_vis[r / 32] = std::max(rb_vis[r / 32], vis[r]);
    mx[r] = neg_inf;
    l[r] = 0.0f;
  }
  std::fill(ot, ot + static_cast<size_t>(n_rb) * d * 32, 0.0f);
  for (int rb = 0; rb < n_rb; ++rb)  // Q^T: 16 rows x 16 pairs of d transposed, per part
    for (int b = 0; b < nb; ++b)
      for (int h = 0; h < 2; ++h) {
        __m512i t[kAmxAttnParts][16];
        for (int i = 0; i < 16; ++i) {
          const int r = 32 * rb + 16 * h + i;
          __m512 lo[kAmxAttnParts], hi[kAmxAttnParts];
          split3(r < a.rows ? _mm512_loadu_ps(a.q[r] + 32 * b) : _mm512_setzero_ps(), lo);
          split3(r < a.rows ? _mm512_loadu_ps(a.q[r] + 32 * b + 16) : _mm512_setzero_ps(), hi);
          for (int p = 0; p < kAmxAttnParts; ++p) t[p][i] = to_bf16(lo[p], hi[p]);
        }
        for (int p = 0; p < kAmxAttnParts; ++p) {
          transpose16(t[p]);
          uint16_t* dst = qa + rb * q_block + p * part + (static_cast<size_t>(b) * 2 + h) * kTile;
          for (int c = 0; c < 16; ++c) _mm512_storeu_si512(dst + 32 * c, t[p][c]);
        }
      }
  const int n_vis = *std::max_element(rb_vis, rb_vis + n_rb);
  const __m512 scale = _mm512_set1_ps(a.scale), ninf = _mm512_set1_ps(neg_inf), one = _mm512_set1_ps(1.0f);
  for (int s0 = 0; s0 < n_vis; s0 += 32) {
    const uint16_t* kb = a.ka + static_cast<size_t>(s0 / 32) * kv_block;
    const uint16_t* vb = a.va + static_cast<size_t>(s0 / 32) * kv_block;
    uint32_t keys = ~0u;  // key_mask bits of the block
    if (a.key_mask != nullptr)
      for (int i = 0; i < 32 && s0 + i < n_vis; ++i)
        if (a.key_mask[s0 + i] == 0) keys &= ~(1u << i);
    for (int rb = 0; rb < n_rb; ++rb) {
      if (rb_vis[rb] <= s0) continue;  // no row of the block sees these keys (nor later ones)
      gemm_split(kb, part, qa + rb * q_block, part, nb, st, 32, 32, false);  // S^T = K Q^T
      float* o = ot + static_cast<size_t>(rb) * d * 32;
      for (int h = 0; h < 2; ++h) {  // lanes: rows 32 rb + 16 h + lane
        const int r0 = 32 * rb + 16 * h;
        const __m512i lim = _mm512_sub_epi32(_mm512_loadu_si512(vis + r0), _mm512_set1_epi32(s0));
        __mmask16 see[32];  // per key: the rows that see it
        __m512 col_max = ninf;
        for (int i = 0; i < 32; ++i) {
          see[i] = (keys >> i & 1u) ? _mm512_cmpgt_epi32_mask(lim, _mm512_set1_epi32(i)) : (__mmask16)0;
          col_max = _mm512_mask_max_ps(col_max, see[i], col_max, _mm512_mul_ps(_mm512_loadu_ps(st + 32 * i + 16 * h), scale));
        }
        const __m512 m_old = _mm512_loadu_ps(mx + r0), m_new = _mm512_max_ps(m_old, col_max);
        const __mmask16 live = _mm512_cmp_ps_mask(m_new, ninf, _CMP_NEQ_OQ);  // rows that have seen a key
        // e^(m_old - m_new): 1 where the maximum stays, 0 (or below 1e-37, times O = 0) after -inf.
        const __m512 alpha = _mm512_mask_blend_ps(live, one, exp16(_mm512_sub_ps(m_old, m_new)));
        const __m512 mz = _mm512_maskz_mov_ps(live, m_new);
        __m512 sum = _mm512_setzero_ps();
        for (int q = 0; q < 16; ++q) {  // P^T, a pair of keys per tile row
          __m512 pk[2];
          for (int j = 0; j < 2; ++j) {
            const int i = 2 * q + j;
            const __m512 x = _mm512_mul_ps(_mm512_loadu_ps(st + 32 * i + 16 * h), scale);
            pk[j] = _mm512_maskz_mov_ps(see[i], exp16(_mm512_sub_ps(x, mz)));
            sum = _mm512_add_ps(sum, pk[j]);
          }
          __m512 e[kAmxAttnParts], f[kAmxAttnParts];
          split3(pk[0], e);
          split3(pk[1], f);
          for (int p = 0; p < kAmxAttnParts; ++p)
            _mm512_storeu_si512(pa + (static_cast<size_t>(p) * 2 + h) * kTile + 32 * q, pair_row_exact(e[p], f[p]));
        }
        _mm512_storeu_ps(mx + r0, m_new);
        _mm512_storeu_ps(l + r0, _mm512_fmadd_ps(_mm512_loadu_ps(l + r0), alpha, sum));
        if (_mm512_cmp_ps_mask(alpha, one, _CMP_NEQ_UQ) != 0)
          for (int c = 0; c < d; ++c)
            _mm512_storeu_ps(o + 32 * c + 16 * h, _mm512_mul_ps(_mm512_loadu_ps(o + 32 * c + 16 * h), alpha));
      }
      for (int j = 0; j < nb; ++j)  // O^T += V^T P^T, 32 dims at a time
        gemm_split(vb + static_cast<size_t>(j) * 2 * kTile, part, pa, 2 * kTile, 1, o + static_cast<size_t>(32 * j) * 32, 32, 32, true);
    }
  }
  for (int r = 0; r < a.rows; ++r) {
    const float* o = ot + static_cast<size_t>(r / 32) * d * 32 + r % 32;
    const float inv = l[r] > 0.0f ? 1.0f / l[r] : 0.0f;
    for (int c = 0; c < d; ++c) a.out[r][c] = o[32 * c] * inv;
  }
}

}  // namespace
}  // namespace amx

const KernelTable& amx_kernels() {
  static const KernelTable table = [] {
    KernelTable t = avx512_bf16_kernels();
    t.name = "amx";
    t.amx_begin = amx::tile_begin;
    t.amx_end = amx::tile_end;
    t.amx_gemm = amx::gemm;
    t.amx_pack_x = amx::pack_x;
    t.amx_pack_bf16 = amx::pack_bf16;
    t.amx_pack_int8 = [](const uint8_t* group, size_t group_bytes, int n_groups, int b0, int kb, uint16_t* wa) {
      amx::pack_q<QFormat::Int8>(group, group_bytes, n_groups, 0, b0, kb, wa);
    };
    t.amx_pack_int4 = [](const uint8_t* group, size_t group_bytes, int n_groups, int b0, int kb, uint16_t* wa) {
      amx::pack_q<QFormat::Int4>(group, group_bytes, n_groups, 0, b0, kb, wa);
    };
    t.amx_pack_q4k = amx::pack_q<QFormat::Q4K>;
    t.amx_attn_pack = amx::attn_pack;
    t.amx_attn_rows = amx::attn_rows;
    return t;
  }();
  return table;
}

}  // namespace glm4rt
