// AVX512-BF16 kernels: bf16 activations x bf16 weights with vdpbf16ps (32 products per
// instruction, fp32 sums). The table is the avx512 one with the bf16 entries filled in; called only
// when CPUID reports AVX512_BF16 next to the avx512 level's features (Zen 4, Cooper Lake,
// Sapphire Rapids and later).
#include <immintrin.h>

#include "../kernels.h"
#include "x86_avx512_transpose.h"

namespace glm4rt {
namespace avx512_bf16 {
namespace {

inline __m512 dot2(__m512 acc, __m512i a, __m512i b) {
  return _mm512_dpbf16_ps(acc, reinterpret_cast<__m512bh&>(a), reinterpret_cast<__m512bh&>(b));
}

// ---- dot form: a tile of M tokens x N rows, each sum along the whole row ---------------------

template <int M, int N>
void dtile(const uint16_t* x, size_t ldx, const uint16_t* w, size_t ldw, float* c, size_t ldc,
           int k, bool accumulate) {
  __m512 acc[M][N];
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j) acc[i][j] = _mm512_setzero_ps();
  for (int p = 0; p < k; p += 32) {
    const __mmask32 mask = k - p >= 32 ? ~0u : (1u << (k - p)) - 1u;  // zeros beyond k
    __m512i wv[N];
    for (int j = 0; j < N; ++j) {
      _mm_prefetch(reinterpret_cast<const char*>(w + j * ldw + p) + kTilePrefetchBytes, _MM_HINT_T0);
      wv[j] = _mm512_maskz_loadu_epi16(mask, w + j * ldw + p);
    }
    for (int i = 0; i < M; ++i) {
      const __m512i xv = _mm512_maskz_loadu_epi16(mask, x + i * ldx + p);
      for (int j = 0; j < N; ++j) acc[i][j] = dot2(acc[i][j], xv, wv[j]);
    }
  }
  GLM4RT_UNROLL for (int i = 0; i < M; ++i)
    GLM4RT_UNROLL for (int j = 0; j < N; ++j) {
      const float v = _mm512_reduce_add_ps(acc[i][j]);
      c[i * ldc + j] = accumulate ? c[i * ldc + j] + v : v;
    }
}

template <int M>
void dtile_m(const uint16_t* x, size_t ldx, const uint16_t* w, size_t ldw, float* c, size_t ldc,
             int n, int k, bool acc) {
  switch (n) {
    case 1: dtile<M, 1>(x, ldx, w, ldw, c, ldc, k, acc); break;
    case 2: dtile<M, 2>(x, ldx, w, ldw, c, ldc, k, acc); break;
    case 3: dtile<M, 3>(x, ldx, w, ldw, c, ldc, k, acc); break;
    default: dtile<M, 4>(x, ldx, w, ldw, c, ldc, k, acc); break;
  }
}

// One token: R rows at a time, one after another, so that the weights are read as (nearly) one
// sequential stream (what the hardware prefetchers follow best); 4 chains per row.
// kPrefetchL1 (CpuTuning in kernels.h): also prefetch each row's stream 4 KiB ahead into L1, where
// Zen 5's prefetchers alone leave bandwidth unused (into L2 did not help: benchmarks/kernel-notes.md).
constexpr int kPrefetchAhead = 2048;  // bf16 values (4 KiB)

template <int R, bool kPrefetchL1>
void gemv_rows(const uint16_t* x, const uint16_t* w, size_t ldw, float* c, int k, bool accumulate) {
  __m512 acc[R][4];
  for (int j = 0; j < R; ++j)
    for (int u = 0; u < 4; ++u) acc[j][u] = _mm512_setzero_ps();
  int p = 0;
  for (; p + 128 <= k; p += 128) {
    if (kPrefetchL1)
      for (int j = 0; j < R; ++j)
        for (int u = 0; u < 4; ++u)
          _mm_prefetch(reinterpret_cast<const char*>(w + j * ldw + p + kPrefetchAhead + 32 * u), _MM_HINT_T0);
    for (int u = 0; u < 4; ++u) {
      const __m512i xv = _mm512_loadu_si512(x + p + 32 * u);
      for (int j = 0; j < R; ++j) acc[j][u] = dot2(acc[j][u], xv, _mm512_loadu_si512(w + j * ldw + p + 32 * u));
    }
  }
  for (; p < k; p += 32) {
    const __mmask32 mask = k - p >= 32 ? ~0u : (1u << (k - p)) - 1u;
    const __m512i xv = _mm512_maskz_loadu_epi16(mask, x + p);
    for (int j = 0; j < R; ++j) acc[j][0] = dot2(acc[j][0], xv, _mm512_maskz_loadu_epi16(mask, w + j * ldw + p));
  }
  for (int j = 0; j < R; ++j) {
    const float v = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[j][0], acc[j][1]), _mm512_add_ps(acc[j][2], acc[j][3])));
    c[j] = accumulate ? c[j] + v : v;
  }
}

// Whether one token streams its rows 4 at a time. Rows longer than 8192 weights do, each stream
// then long enough by itself, and x (which no longer fits L1 next to the weight stream) is loaded
// once for 4 rows. Shorter rows stream faster one at a time on AMD and 4 at a time on Intel
// (kFourRows, CpuTuning in kernels.h; benchmarks/kernel-notes.md).
template <bool kFourRows>
constexpr bool four_rows_at_a_time(int k) { return kFourRows || k > 8192; }

template <bool kPrefetchL1, bool kFourRows>
void gemv(const uint16_t* x, const uint16_t* w, size_t ldw, float* c, int n, int k, bool accumulate) {
  int j = 0;
  if (four_rows_at_a_time<kFourRows>(k))
    for (; j + 4 <= n; j += 4) gemv_rows<4, kPrefetchL1>(x, w + j * ldw, ldw, c + j, k, accumulate);
  for (; j < n; ++j) gemv_rows<1, kPrefetchL1>(x, w + j * ldw, ldw, c + j, k, accumulate);
}

template <bool kPrefetchL1, bool kFourRows>
void gemm_tile_bf16x(const uint16_t* x, size_t ldx, const uint16_t* w, size_t ldw, float* c,
                     size_t ldc, int m, int n, int k, bool acc) {
  switch (m) {
    case 1: gemv<kPrefetchL1, kFourRows>(x, w, ldw, c, n, k, acc); break;
    case 2: dtile_m<2>(x, ldx, w, ldw, c, ldc, n, k, acc); break;
    case 3: dtile_m<3>(x, ldx, w, ldw, c, ldc, n, k, acc); break;
    default: dtile_m<4>(x, ldx, w, ldw, c, ldc, n, k, acc); break;
  }
}

// Batch-invariant: dot tiles for every m, one token included, so that every sum runs in dtile's
// order whatever m (one chain per row: the GEMV's 4 chains would sum in another order). One token
// streams its rows one at a time or 4 at a time as the GEMV does (four_rows_at_a_time).
template <bool kFourRows>
void gemm_tile_bf16x_dot(const uint16_t* x, size_t ldx, const uint16_t* w, size_t ldw, float* c,
                         size_t ldc, int m, int n, int k, bool acc) {
  switch (m) {
    case 1:
      if (four_rows_at_a_time<kFourRows>(k))
        dtile_m<1>(x, ldx, w, ldw, c, ldc, n, k, acc);
      else
        for (int j = 0; j < n; ++j) dtile<1, 1>(x, ldx, w + j * ldw, ldw, c + j, ldc, k, acc);
      break;
    case 2: dtile_m<2>(x, ldx, w, ldw, c, ldc, n, k, acc); break;
    case 3: dtile_m<3>(x, ldx, w, ldw, c, ldc, n, k, acc); break;
    default: dtile_m<4>(x, ldx, w, ldw, c, ldc, n, k, acc); break;
  }
}

// ---- panel form: 12 tokens x 32 rows in 24 accumulators --------------------------------------

// acc += pairwise dot of w with the bf16 pair at x broadcast to every lane.
inline __m512 dot2_bcast(__m512 acc, __m512i w, const uint32_t* x) {
  return dot2(acc, w, _mm512_set1_epi32(static_cast<int>(*x)));
}

// Per pair of k: two 64-byte loads of the packed weights (32 rows), then for each token one
// broadcast of its bf16 pair feeding both. The tokens' pairs come from L3 (a panel meets every
// chunk of tokens in turn), so they are prefetched into L1 32 pairs (1.5 KiB) ahead.
constexpr int kPrefetchPairs = 32;

template <int M>
void ptile(const uint32_t* xp, const uint32_t* wp, int npairs, float* c, size_t ldc, int n,
           bool accumulate) {
  __m512 acc[M][2];
  for (int i = 0; i < M; ++i) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
  for (int p = 0; p < npairs; ++p) {
    const uint32_t* wr = wp + static_cast<size_t>(p) * kBf16PanelRows;
    const uint32_t* xr = xp + static_cast<size_t>(p) * kBf16PanelTokens;
    _mm_prefetch(reinterpret_cast<const char*>(xr + kPrefetchPairs * kBf16PanelTokens), _MM_HINT_T0);
    const __m512i w0 = _mm512_loadu_si512(wr), w1 = _mm512_loadu_si512(wr + 16);
    for (int i = 0; i < M; ++i) {
      acc[i][0] = dot2_bcast(acc[i][0], w0, xr + i);
      acc[i][1] = dot2_bcast(acc[i][1], w1, xr + i);
    }
  }
  const __mmask16 m0 = n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1u);
  const __mmask16 m1 = n >= 32 ? (__mmask16)0xFFFF : n > 16 ? (__mmask16)((1u << (n - 16)) - 1u) : (__mmask16)0;
  for (int i = 0; i < M; ++i) {
    float* ci = c + i * ldc;
    if (accumulate) {
      acc[i][0] = _mm512_add_ps(acc[i][0], _mm512_maskz_loadu_ps(m0, ci));
      acc[i][1] = _mm512_add_ps(acc[i][1], _mm512_maskz_loadu_ps(m1, ci + 16));
    }
    _mm512_mask_storeu_ps(ci, m0, acc[i][0]);
    _mm512_mask_storeu_ps(ci + 16, m1, acc[i][1]);
  }
}

void bf16_panel(const uint32_t* xp, const uint32_t* wp, int npairs, float* c, size_t ldc, int m,
                int n, bool acc) {
  switch (m) {
    case 1: ptile<1>(xp, wp, npairs, c, ldc, n, acc); break;
    case 2: ptile<2>(xp, wp, npairs, c, ldc, n, acc); break;
    case 3: ptile<3>(xp, wp, npairs, c, ldc, n, acc); break;
    case 4: ptile<4>(xp, wp, npairs, c, ldc, n, acc); break;
    case 5: ptile<5>(xp, wp, npairs, c, ldc, n, acc); break;
    case 6: ptile<6>(xp, wp, npairs, c, ldc, n, acc); break;
    case 7: ptile<7>(xp, wp, npairs, c, ldc, n, acc); break;
    case 8: ptile<8>(xp, wp, npairs, c, ldc, n, acc); break;
    case 9: ptile<9>(xp, wp, npairs, c, ldc, n, acc); break;
    case 10: ptile<10>(xp, wp, npairs, c, ldc, n, acc); break;
    case 11: ptile<11>(xp, wp, npairs, c, ldc, n, acc); break;
    default: ptile<12>(xp, wp, npairs, c, ldc, n, acc); break;
  }
}

void bf16_pack(const uint16_t* w, size_t ldw, int npairs, uint32_t* wp) {
  for (int p0 = 0; p0 < npairs; p0 += 16) {
    const int np = npairs - p0 < 16 ? npairs - p0 : 16;
    const __mmask16 mask = np == 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << np) - 1u);
    for (int h = 0; h < kBf16PanelRows; h += 16) {
      __m512i r[16];
      for (int i = 0; i < 16; ++i) r[i] = _mm512_maskz_loadu_epi32(mask, w + (h + i) * ldw + 2 * p0);
      transpose16(r);
      for (int c = 0; c < np; ++c)
        _mm512_storeu_si512(wp + static_cast<size_t>(p0 + c) * kBf16PanelRows + h, r[c]);
    }
  }
}

// Per block of 32 k: each token's 32 values become 16 bf16 pairs in one zmm (vcvtne2ps2bf16,
// round to nearest even), and a 16 x 16 transpose turns token rows into pair rows.
void bf16_pack_x(const float* x, size_t ldx, int m, int K, uint32_t* xp) {
  const int P = (K + 1) / 2;
  for (int k0 = 0; k0 < K; k0 += 32) {
    const int nk = K - k0 < 32 ? K - k0 : 32;
    const __mmask16 lo = nk >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << nk) - 1u);
    const __mmask16 hi = nk >= 32 ? (__mmask16)0xFFFF : nk > 16 ? (__mmask16)((1u << (nk - 16)) - 1u) : (__mmask16)0;
    __m512i r[16];
    for (int i = 0; i < 16; ++i) {
      if (i < m) {
        const float* xi = x + i * ldx + k0;
        const __m512bh v = _mm512_cvtne2ps_pbh(_mm512_maskz_loadu_ps(hi, xi + 16), _mm512_maskz_loadu_ps(lo, xi));
        r[i] = reinterpret_cast<const __m512i&>(v);
      } else {
        r[i] = _mm512_setzero_si512();
      }
    }
    transpose16(r);  // r[c] = pair k0 / 2 + c of tokens 0..15
    const int np = (nk + 1) / 2;
    for (int c = 0; c < np && k0 / 2 + c < P; ++c)
      _mm512_mask_storeu_epi32(xp + static_cast<size_t>(k0 / 2 + c) * kBf16PanelTokens, (__mmask16)0x0FFF, r[c]);
  }
}

}  // namespace
}  // namespace avx512_bf16

const KernelTable& avx512_bf16_kernels() {
  static const KernelTable table = [] {
    KernelTable t = avx512_kernels();
    t.name = "avx512_bf16";
    const bool l1 = cpu_tuning().decode_prefetch_l1, four = cpu_tuning().bf16_gemv_four_rows;
    t.gemm_tile_bf16x = l1 ? (four ? avx512_bf16::gemm_tile_bf16x<true, true> : avx512_bf16::gemm_tile_bf16x<true, false>)
                           : (four ? avx512_bf16::gemm_tile_bf16x<false, true> : avx512_bf16::gemm_tile_bf16x<false, false>);
    t.gemm_tile_bf16x_dot = four ? avx512_bf16::gemm_tile_bf16x_dot<true> : avx512_bf16::gemm_tile_bf16x_dot<false>;
    t.bf16_panel = avx512_bf16::bf16_panel;
    t.bf16_pack = avx512_bf16::bf16_pack;
    t.bf16_pack_x = avx512_bf16::bf16_pack_x;
    return t;
  }();
  return table;
}

}  // namespace glm4rt
