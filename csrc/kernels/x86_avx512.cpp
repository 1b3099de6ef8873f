// AVX-512 (F + BW + VL + DQ + VNNI) kernels. Compiled with AVX-512 flags, called only when CPUID says the CPU
// and OS support it. Only <immintrin.h> is included, and everything is internal to this file, so
// no AVX-512 code can leak into the generic path through a shared inline function.
#include <immintrin.h>

#include <cstring>

#include "../kernels.h"
#include "../quant.h"
#include "attn_decode_impl.h"
#include "x86_avx512_exp.h"
#include "x86_avx512_transpose.h"

namespace glm4rt {
namespace avx512 {
namespace {

inline __mmask16 tail_mask(int left) { return left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1u); }

inline __m512 load_f32(const float* p, __mmask16 mask) { return _mm512_maskz_loadu_ps(mask, p); }

// 16 bf16 values widened exactly to fp32 (bf16 is the top half of an fp32).
inline __m512 load_f32(const uint16_t* p, __mmask16 mask) {
  __m256i half = _mm256_maskz_loadu_epi16(mask, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
}

// C tile [M, N] over the full k; the k tail is handled with masked loads (zeros beyond k).
template <int M, int N, typename W>
void tile(const float* x, size_t ldx, const W* w, size_t ldw, float* c, size_t ldc, int k,
          bool accumulate) {
  __m512 acc[M][N];
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j) acc[i][j] = _mm512_setzero_ps();
  for (int p = 0; p < k; p += 16) {
    __mmask16 mask = k - p >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (k - p)) - 1u);
    __m512 wv[N];
    for (int j = 0; j < N; ++j) {
      _mm_prefetch(reinterpret_cast<const char*>(w + j * ldw + p) + kTilePrefetchBytes, _MM_HINT_T0);
      wv[j] = load_f32(w + j * ldw + p, mask);
    }
    for (int i = 0; i < M; ++i) {
      __m512 xv = load_f32(x + i * ldx + p, mask);
      for (int j = 0; j < N; ++j) acc[i][j] = _mm512_fmadd_ps(xv, wv[j], acc[i][j]);
    }
  }
  GLM4RT_UNROLL for (int i = 0; i < M; ++i)
    GLM4RT_UNROLL for (int j = 0; j < N; ++j) {
      float v = _mm512_reduce_add_ps(acc[i][j]);
      c[i * ldc + j] = accumulate ? c[i * ldc + j] + v : v;
    }
}

template <int M, typename W>
void tile_m(const float* x, size_t ldx, const W* w, size_t ldw, float* c, size_t ldc, int n, int k,
            bool acc) {
  switch (n) {
    case 1: tile<M, 1>(x, ldx, w, ldw, c, ldc, k, acc); break;
    case 2: tile<M, 2>(x, ldx, w, ldw, c, ldc, k, acc); break;
    case 3: tile<M, 3>(x, ldx, w, ldw, c, ldc, k, acc); break;
    default: tile<M, 4>(x, ldx, w, ldw, c, ldc, k, acc); break;
  }
}

template <typename W>
void gemm_tile(const float* x, size_t ldx, const W* w, size_t ldw, float* c, size_t ldc, int m,
               int n, int k, bool acc) {
  switch (m) {
    case 1: tile_m<1>(x, ldx, w, ldw, c, ldc, n, k, acc); break;
    case 2: tile_m<2>(x, ldx, w, ldw, c, ldc, n, k, acc); break;
    case 3: tile_m<3>(x, ldx, w, ldw, c, ldc, n, k, acc); break;
    default: tile_m<4>(x, ldx, w, ldw, c, ldc, n, k, acc); break;
  }
}

float dot_f32(const float* a, const float* b, int n) {
  __m512 acc = _mm512_setzero_ps();
  for (int p = 0; p < n; p += 16) {
    __mmask16 mask = n - p >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - p)) - 1u);
    acc = _mm512_fmadd_ps(load_f32(a + p, mask), load_f32(b + p, mask), acc);
  }
  return _mm512_reduce_add_ps(acc);
}

uint64_t read_xor(const uint8_t* data, size_t n_bytes) {
  __m512i a[4] = {_mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512()};
  size_t i = 0;
  for (; i + 256 <= n_bytes; i += 256)
    for (int j = 0; j < 4; ++j) a[j] = _mm512_xor_si512(a[j], _mm512_loadu_si512(data + i + 64 * j));
  for (; i < n_bytes; i += 64) a[0] = _mm512_xor_si512(a[0], _mm512_loadu_si512(data + i));
  const __m512i v = _mm512_xor_si512(_mm512_xor_si512(a[0], a[1]), _mm512_xor_si512(a[2], a[3]));
  alignas(64) uint64_t w[8];
  _mm512_store_si512(w, v);
  return w[0] ^ w[1] ^ w[2] ^ w[3] ^ w[4] ^ w[5] ^ w[6] ^ w[7];
}

// Scores for blocks of 16 keys: the block is transposed once into kt [d, 16], then 8 query rows
// at a time accumulate q[r, c] * kt[c] in 8 zmm (the broadcast folded into the FMA).
void attn_qk(const float* q, size_t ldq, int R, const float* k, int n, int d, float* s, size_t lds) {
  alignas(64) float kt[kMaxHeadDim * 16];
  for (int s0 = 0; s0 < n; s0 += 16) {
    const int nk = n - s0 < 16 ? n - s0 : 16;
    for (int c0 = 0; c0 < d; c0 += 16) {
      const __mmask16 cm = tail_mask(d - c0);
      __m512i r[16];
      for (int i = 0; i < 16; ++i)
        r[i] = i < nk ? _mm512_castps_si512(_mm512_maskz_loadu_ps(cm, k + static_cast<size_t>(s0 + i) * d + c0))
                      : _mm512_setzero_si512();
      transpose16(r);
      for (int c = 0; c < 16 && c0 + c < d; ++c) _mm512_store_si512(kt + (c0 + c) * 16, r[c]);
    }
    const __mmask16 km = tail_mask(nk);
    for (int r0 = 0; r0 < R; r0 += 8) {
      const int nr = R - r0 < 8 ? R - r0 : 8;
      __m512 acc[8];
      for (int i = 0; i < 8; ++i) acc[i] = _mm512_setzero_ps();
      for (int c = 0; c < d; ++c) {
        const __m512 kc = _mm512_load_ps(kt + c * 16);
        for (int i = 0; i < 8; ++i)
          if (i < nr) acc[i] = _mm512_fmadd_ps(_mm512_set1_ps(q[(r0 + i) * ldq + c]), kc, acc[i]);
      }
      for (int i = 0; i < nr; ++i) _mm512_mask_storeu_ps(s + (r0 + i) * lds + s0, km, acc[i]);
    }
  }
}

// out[G, d] = P[G, S] @ V[S, d]: for each block of 64 keys (V rows stay in L1) and each head,
// up to 128 output columns live in 8 zmm accumulators.
void attn_pv(const float* p, size_t ldp, int G, const float* v, int S, int d, float* out) {
  constexpr int kKeys = 64;
  for (int j = 0; j < G; ++j)
    for (int c = 0; c < d; ++c) out[static_cast<size_t>(j) * d + c] = 0.0f;
  for (int s0 = 0; s0 < S; s0 += kKeys) {
    const int s1 = s0 + kKeys < S ? s0 + kKeys : S;
    for (int j = 0; j < G; ++j)
      for (int c0 = 0; c0 < d; c0 += 128) {
        const int nc = d - c0 < 128 ? d - c0 : 128;
        __m512 acc[8];
        __mmask16 mask[8];
        float* o = out + static_cast<size_t>(j) * d + c0;
        for (int i = 0; i < 8; ++i) {
          const int left = nc - 16 * i;
          mask[i] = left >= 16 ? (__mmask16)0xFFFF : left > 0 ? (__mmask16)((1u << left) - 1u) : (__mmask16)0;
          acc[i] = _mm512_maskz_loadu_ps(mask[i], o + 16 * i);
        }
        for (int s = s0; s < s1; ++s) {
          const __m512 pj = _mm512_set1_ps(p[j * ldp + s]);
          const float* vs = v + static_cast<size_t>(s) * d + c0;
          for (int i = 0; i < 8; ++i)
            if (mask[i]) acc[i] = _mm512_fmadd_ps(pj, _mm512_maskz_loadu_ps(mask[i], vs + 16 * i), acc[i]);
        }
        for (int i = 0; i < 8; ++i) _mm512_mask_storeu_ps(o + 16 * i, mask[i], acc[i]);
      }
  }
}

struct Vec16 {  // the decode attention's vector (attn_decode_impl.h)
  using R = __m512;
  static constexpr int W = 16;
  static R zero() { return _mm512_setzero_ps(); }
  static R set1(float x) { return _mm512_set1_ps(x); }
  static R load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, R r) { _mm512_storeu_ps(p, r); }
  static R bcast(const float* p) { return _mm512_set1_ps(*p); }
  static R fma(R a, R b, R c) { return _mm512_fmadd_ps(a, b, c); }
  static R mul(R a, R b) { return _mm512_mul_ps(a, b); }
  static R add(R a, R b) { return _mm512_add_ps(a, b); }
  static R max(R a, R b) { return _mm512_max_ps(a, b); }
  static R finite_or_zero(R m) { return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(m, set1(kNegInf), _CMP_NEQ_OQ), m); }
  static R exp_visible(R s, R m) {
    return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(s, set1(kNegInf), _CMP_NEQ_OQ), exp16(_mm512_sub_ps(s, m)));
  }
};

void softmax(float* x, int n) {
  const __m512 neg_inf = _mm512_set1_ps(kNegInf);
  __m512 mx = neg_inf;
  for (int i = 0; i < n; i += 16) mx = _mm512_max_ps(mx, _mm512_mask_loadu_ps(neg_inf, tail_mask(n - i), x + i));
  const float m = _mm512_reduce_max_ps(mx);
  if (m == kNegInf) {
    for (int i = 0; i < n; ++i) x[i] = 0.0f;
    return;
  }
  const __m512 mv = _mm512_set1_ps(m);
  __m512 sum = _mm512_setzero_ps();
  for (int i = 0; i < n; i += 16) {
    const __mmask16 k = tail_mask(n - i);
    const __m512 v = _mm512_mask_loadu_ps(neg_inf, k, x + i);
    const __mmask16 finite = _mm512_cmp_ps_mask(v, neg_inf, _CMP_NEQ_OQ);
    const __m512 e = _mm512_maskz_mov_ps(finite, exp16(_mm512_sub_ps(v, mv)));
    _mm512_mask_storeu_ps(x + i, k, e);
    sum = _mm512_add_ps(sum, e);
  }
  const __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(sum));
  for (int i = 0; i < n; i += 16) {
    const __mmask16 k = tail_mask(n - i);
    _mm512_mask_storeu_ps(x + i, k, _mm512_mul_ps(_mm512_maskz_loadu_ps(k, x + i), inv));
  }
}

void silu_mul(const float* gate, const float* up, float* out, int n) {
  const __m512 one = _mm512_set1_ps(1.0f);
  for (int i = 0; i < n; i += 16) {
    const __mmask16 k = tail_mask(n - i);
    const __m512 g = _mm512_maskz_loadu_ps(k, gate + i);
    const __m512 s = _mm512_div_ps(g, _mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), g))));
    _mm512_mask_storeu_ps(out + i, k, _mm512_mul_ps(_mm512_maskz_loadu_ps(k, up + i), s));
  }
}

// ---- quantized weights (layout in quant.h): VNNI dot products, 16 rows per zmm -------------

// acc += dot4(w (u8), broadcast of the 4 bytes at x (s8)): the broadcast is folded into the
// instruction ({1to16} memory operand), which the compiler does not do by itself.
inline __m512i dpbusd_bcast(__m512i acc, __m512i w, const int8_t* x) {
#if defined(__GNUC__)
  __asm__("vpdpbusd %[x]%{1to16%}, %[w], %[acc]" : [acc] "+v"(acc) : [w] "v"(w), [x] "m"(*reinterpret_cast<const int32_t*>(x)));
  return acc;
#else  // MSVC: no GNU inline assembly; the same instruction after a separate broadcast
  int32_t x4;
  std::memcpy(&x4, x, sizeof x4);
  return _mm512_dpbusd_epi32(acc, w, _mm512_set1_epi32(x4));
#endif
}

// mt tokens x 16 rows (x G groups). Each 64-byte load holds 4 consecutive k of all 16 rows (one
// row per 32-bit lane), so one broadcast of 4 activation bytes feeds 16 rows per vpdpbusd, and
// G = 2 groups share every broadcast when decoding a single token.
template <int MT, int G, QFormat F, bool kPrefetchL1 = false>
void qtile(const uint8_t* group, size_t group_bytes, int n_blocks, const int8_t* xq, const float* xs,
           const int32_t* xsum, size_t ldq, size_t lds, float* y, size_t ldy, int rows) {
  constexpr bool kInt4 = F != QFormat::Int8;  // q4k: int4's codes (same bytes, same block size)
  using Block = QBlock<kInt4>;
  static_assert(sizeof(Block) == sizeof(Q4KBlock) || !kInt4, "q4k blocks read as int4 blocks");
  auto block = [&](int g, int b) { return q_block<kInt4>(group + g * group_bytes, b); };  // of group g
  // Few rows x tokens leave vpdpbusd's latency exposed: split each sum into independent chains
  // (at least one: int4 with MT * G = 3 would otherwise round 2 / 3 down to none).
  constexpr int kChains = MT * G >= (kInt4 ? 2 : 4) ? 1 : (kInt4 ? 2 : 4) / (MT * G);
  static_assert(kChains >= 1, "every sum needs a chain");
  const __m512i low4 = _mm512_set1_epi8(0x0f), high4 = _mm512_set1_epi8(static_cast<char>(0xf0));
  __m512 acc[G][MT];
  for (int g = 0; g < G; ++g)
    for (int m = 0; m < MT; ++m) acc[g][m] = _mm512_setzero_ps();
  __m512 super_d[G], super_m[G];  // q4k: D and M of the current super-block, per group
  for (int b = 0; b < n_blocks; ++b) {
    // Software prefetch a few blocks ahead in every group stream: decoding one token, the hardware
    // prefetchers alone leave bandwidth unused. Two settings, chosen per CPU (CpuTuning in
    // kernels.h), each the distance that streamed fastest where it was tuned
    // (benchmarks/kernel-notes.md): into L2, ~2 KiB ahead (the default, Zen 4), or into L1,
    // ~3 KiB ahead (Zen 5, whose 48 KiB L1 holds that much next to the working set).
    constexpr int kAhead = kPrefetchL1 ? (kInt4 ? 10 : 6) : (kInt4 ? 6 : 4);
    for (int g = 0; g < G; ++g)
      for (size_t off = 0; off < sizeof(Block); off += 64)
        _mm_prefetch(reinterpret_cast<const char*>(block(g, b + kAhead)) + off,
                     kPrefetchL1 ? _MM_HINT_T0 : _MM_HINT_T1);
    if constexpr (F == QFormat::Q4K) {
      // q4k: each group's super-block headers are a second stream (at the group's end), one
      // 64-byte line per 8 blocks; fetched a super-block ahead, and read once per super-block.
      if (b % kQ4KSuper == 0) {
        for (int g = 0; g < G; ++g) {
          const uint8_t* grp = group + g * group_bytes;
          if (b / kQ4KSuper + 1 < q4k_supers(n_blocks))
            _mm_prefetch(reinterpret_cast<const char*>(q4k_header(grp, n_blocks, b / kQ4KSuper + 1)), _MM_HINT_T0);
          const uint8_t* header = q4k_header(grp, n_blocks, b / kQ4KSuper);
          super_d[g] = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(header)));
          super_m[g] = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(header + kQ4KHeaderBytes / 2)));
        }
      }
    }
    __m512i isum[G][MT][kChains], isum_hi[G][MT][kChains];
    for (int g = 0; g < G; ++g)
      for (int m = 0; m < MT; ++m)
        for (int j = 0; j < kChains; ++j) isum[g][m][j] = isum_hi[g][m][j] = _mm512_setzero_si512();
    if (kInt4) {
      // High nibbles are used in place (16 x q, one AND instead of shift + AND) in their own
      // chains, which are divided by 16 (exactly) once per block.
      for (int c = 0; c < 4; ++c) {
        __m512i lo[G], hi16[G];
        for (int g = 0; g < G; ++g) {
          const __m512i v = _mm512_loadu_si512(block(g, b)->codes + Block::code_byte(0, 4 * c));
          lo[g] = _mm512_and_si512(v, low4);     // k = 4c .. 4c+3
          hi16[g] = _mm512_and_si512(v, high4);  // 16 x (k = 16+4c ..)
        }
        for (int m = 0; m < MT; ++m) {
          const int8_t* x = xq + m * ldq + b * 32;
          for (int g = 0; g < G; ++g) {
            __m512i& a0 = isum[g][m][c % kChains];
            __m512i& a1 = isum_hi[g][m][c % kChains];
            a0 = dpbusd_bcast(a0, lo[g], x + 4 * c);
            a1 = dpbusd_bcast(a1, hi16[g], x + 16 + 4 * c);
          }
        }
      }
      for (int g = 0; g < G; ++g)
        for (int m = 0; m < MT; ++m)
          for (int j = 0; j < kChains; ++j)
            isum[g][m][j] = _mm512_add_epi32(isum[g][m][j], _mm512_srai_epi32(isum_hi[g][m][j], 4));
    } else {
      for (int c = 0; c < 8; ++c) {
        __m512i v[G];
        for (int g = 0; g < G; ++g) v[g] = _mm512_loadu_si512(block(g, b)->codes + Block::code_byte(0, 4 * c));
        for (int m = 0; m < MT; ++m)
          for (int g = 0; g < G; ++g)
            isum[g][m][c % kChains] = dpbusd_bcast(isum[g][m][c % kChains], v[g], xq + m * ldq + b * 32 + 4 * c);
      }
    }
    for (int g = 0; g < G; ++g) {
      if constexpr (F == QFormat::Q4K) {
        // xs (D sc isum - M mn xsum): 16 rows' scales and minimums widened from bytes.
        const Q4KBlock* blk = reinterpret_cast<const Q4KBlock*>(block(g, b));
        const __m512 scale = _mm512_mul_ps(
            super_d[g], _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk->sc)))));
        const __m512 offset = _mm512_mul_ps(
            super_m[g], _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk->mn)))));
        for (int m = 0; m < MT; ++m) {
          __m512i s = isum[g][m][0];
          for (int j = 1; j < kChains; ++j) s = _mm512_add_epi32(s, isum[g][m][j]);
          const float xsb = xs[m * lds + b];
          acc[g][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_mul_ps(scale, _mm512_set1_ps(xsb)), acc[g][m]);
          acc[g][m] = _mm512_fnmadd_ps(offset, _mm512_set1_ps(xsb * static_cast<float>(xsum[m * lds + b])), acc[g][m]);
        }
      } else {
        const __m512 d = _mm512_cvtph_ps(
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(block(g, b)->scales)));
        for (int m = 0; m < MT; ++m) {
          __m512i s = _mm512_set1_epi32(-Block::kCodeOffset * xsum[m * lds + b]);
          for (int j = 0; j < kChains; ++j) s = _mm512_add_epi32(s, isum[g][m][j]);
          acc[g][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_mul_ps(d, _mm512_set1_ps(xs[m * lds + b])),
                                      acc[g][m]);
        }
      }
    }
  }
  for (int g = 0; g < G; ++g) {
    const int r = rows - 16 * g;
    if (r <= 0) break;
    const __mmask16 mask = r >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << r) - 1u);
    for (int m = 0; m < MT; ++m) _mm512_mask_storeu_ps(y + m * ldy + 16 * g, mask, acc[g][m]);
  }
}

// kPrefetchL1: the prefetch setting of the one-token (decode) tiles; the tiles of several tokens
// read each weight block for every token of the tile and keep the L2 setting.
template <QFormat F, bool kPrefetchL1>
void qgemm_tile(const uint8_t* group, size_t group_bytes, int n_groups, int n_blocks, const int8_t* xq,
                const float* xs, const int32_t* xsum, size_t ldq, size_t lds, int mt, float* y,
                size_t ldy, int rows) {
#define GLM4RT_QTILE(MT, G) \
  qtile<MT, G, F, kPrefetchL1 && (MT) == 1>(group, group_bytes, n_blocks, xq, xs, xsum, ldq, lds, y, ldy, rows)
  if (n_groups == 2 && mt == 1 && rows > 16) {
    GLM4RT_QTILE(1, 2);
    return;
  }
  for (int g = 0; g < n_groups && rows > 16 * g; ++g, group += group_bytes, y += 16, rows -= 16) {
    switch (mt) {
      case 1: GLM4RT_QTILE(1, 1); break;
      case 2: GLM4RT_QTILE(2, 1); break;
      case 3: GLM4RT_QTILE(3, 1); break;
      case 4: GLM4RT_QTILE(4, 1); break;
      case 5: GLM4RT_QTILE(5, 1); break;
      case 6: GLM4RT_QTILE(6, 1); break;
      case 7: GLM4RT_QTILE(7, 1); break;
      default: GLM4RT_QTILE(8, 1); break;
    }
  }
#undef GLM4RT_QTILE
}

}  // namespace
}  // namespace avx512

const KernelTable& avx512_kernels() {
  static const KernelTable table = [] {
    const bool l1 = cpu_tuning().decode_prefetch_l1;
    KernelTable t;
    t.name = "avx512";
    t.mr = 4;
    t.nr = 4;
    t.gemm_tile_f32 = avx512::gemm_tile<float>;
    t.gemm_tile_bf16 = avx512::gemm_tile<uint16_t>;
    t.dot_f32 = avx512::dot_f32;
    t.read_xor = avx512::read_xor;
    t.attn_qk = avx512::attn_qk;
    t.attn_pv = avx512::attn_pv;
    t.attn_decode = attn_decode::attn_decode<avx512::Vec16, 16>;
    t.softmax = avx512::softmax;
    t.silu_mul = avx512::silu_mul;
    t.qmt = 8;
    t.qgemm_int8 = l1 ? avx512::qgemm_tile<QFormat::Int8, true> : avx512::qgemm_tile<QFormat::Int8, false>;
    t.qgemm_int4 = l1 ? avx512::qgemm_tile<QFormat::Int4, true> : avx512::qgemm_tile<QFormat::Int4, false>;
    t.qgemm_q4k = l1 ? avx512::qgemm_tile<QFormat::Q4K, true> : avx512::qgemm_tile<QFormat::Q4K, false>;
    t.quantize_int4 = quantize_int4_avx512;
    t.quantize_q4k = quantize_q4k_avx512;
    // Prefill with fp32 / bf16 weights (where AVX512-BF16 is absent): the AVX2 panel GEMM (its
    // 6 x 16 ymm tile; every AVX-512 CPU runs AVX2 code).
    t.f32_panel = avx2_kernels().f32_panel;
    t.f32_pack = avx2_kernels().f32_pack;
    t.f32_pack_bf16 = avx2_kernels().f32_pack_bf16;
    return t;
  }();
  return table;
}

}  // namespace glm4rt
