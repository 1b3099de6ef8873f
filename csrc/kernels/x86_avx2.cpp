// AVX2 + FMA kernels, for x86-64 CPUs without AVX-512. Same rules as x86_avx512.cpp: only
// <immintrin.h>, everything internal to this file. k tails are finished with scalar code.
#include <immintrin.h>

#include <cstring>

#include "../kernels.h"
#include "../quant.h"
#include "attn_decode_impl.h"

namespace glm4rt {
namespace avx2 {
namespace {

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const uint16_t* p) {
  __m128i half = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(half), 16));
}
inline float load1(const float* p) { return *p; }
inline float load1(const uint16_t* p) {
  union {
    unsigned int u;
    float f;
  } v;
  v.u = static_cast<unsigned int>(*p) << 16;
  return v.f;
}

// v + sum_p x[p] * w[p] over a k tail (n < 8), one fused multiply-add per element in order. The
// operands pass through in_register (kernels.h: QEMU faults on memory-operand scalar FMAs).
inline float tail_dot(const float* x, const float* w, int n, float v) {
  for (int p = 0; p < n; ++p) v += in_register(x[p]) * in_register(w[p]);
  return v;
}
inline float tail_dot(const float* x, const uint16_t* w, int n, float v) {
  for (int p = 0; p < n; ++p) v += in_register(x[p]) * in_register(load1(w + p));
  return v;
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 0x55));
  return _mm_cvtss_f32(s);
}

template <int M, int N, typename W>
void tile(const float* x, size_t ldx, const W* w, size_t ldw, float* c, size_t ldc, int k,
          bool accumulate) {
  __m256 acc[M][N];
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j) acc[i][j] = _mm256_setzero_ps();
  int k8 = k & ~7;
  for (int p = 0; p < k8; p += 8) {
    __m256 wv[N];
    for (int j = 0; j < N; ++j) {
      _mm_prefetch(reinterpret_cast<const char*>(w + j * ldw + p) + kTilePrefetchBytes, _MM_HINT_T0);
      wv[j] = load8(w + j * ldw + p);
    }
    for (int i = 0; i < M; ++i) {
      __m256 xv = load8(x + i * ldx + p);
      for (int j = 0; j < N; ++j) acc[i][j] = _mm256_fmadd_ps(xv, wv[j], acc[i][j]);
    }
  }
  GLM4RT_UNROLL for (int i = 0; i < M; ++i)
    GLM4RT_UNROLL for (int j = 0; j < N; ++j) {
      float v = hsum(acc[i][j]);
      v = tail_dot(x + i * ldx + k8, w + j * ldw + k8, k - k8, v);
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

// 3 tokens x 4 rows = 12 accumulators: fits the 16 ymm registers with the loads.
template <typename W>
void gemm_tile(const float* x, size_t ldx, const W* w, size_t ldw, float* c, size_t ldc, int m,
               int n, int k, bool acc) {
  switch (m) {
    case 1: tile_m<1>(x, ldx, w, ldw, c, ldc, n, k, acc); break;
    case 2: tile_m<2>(x, ldx, w, ldw, c, ldc, n, k, acc); break;
    default: tile_m<3>(x, ldx, w, ldw, c, ldc, n, k, acc); break;
  }
}

float dot_f32(const float* a, const float* b, int n) {
  __m256 acc = _mm256_setzero_ps();
  int n8 = n & ~7;
  for (int p = 0; p < n8; p += 8) acc = _mm256_fmadd_ps(load8(a + p), load8(b + p), acc);
  return tail_dot(a + n8, b + n8, n - n8, hsum(acc));
}

void axpy_f32(float alpha, const float* x, float* y, int n) {
  __m256 av = _mm256_set1_ps(alpha);
  int n8 = n & ~7;
  for (int p = 0; p < n8; p += 8)
    _mm256_storeu_ps(y + p, _mm256_fmadd_ps(av, load8(x + p), load8(y + p)));
  for (int p = n8; p < n; ++p) y[p] = in_register(y[p]) + alpha * in_register(x[p]);
}

uint64_t read_xor(const uint8_t* data, size_t n_bytes) {
  __m256i a[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256()};
  size_t i = 0;
  for (; i + 128 <= n_bytes; i += 128)
    for (int j = 0; j < 4; ++j)
      a[j] = _mm256_xor_si256(a[j], _mm256_loadu_si256(reinterpret_cast<const __m256i*>(data + i + 32 * j)));
  for (; i < n_bytes; i += 32)
    a[0] = _mm256_xor_si256(a[0], _mm256_loadu_si256(reinterpret_cast<const __m256i*>(data + i)));
  const __m256i v = _mm256_xor_si256(_mm256_xor_si256(a[0], a[1]), _mm256_xor_si256(a[2], a[3]));
  return static_cast<uint64_t>(_mm256_extract_epi64(v, 0) ^ _mm256_extract_epi64(v, 1) ^
                               _mm256_extract_epi64(v, 2) ^ _mm256_extract_epi64(v, 3));
}

// 8 x 8 transpose: in r[i] = row i, out r[c] = column c.
inline void transpose8(__m256 r[8]) {
  __m256 t[8], u[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int g = 0; g < 8; g += 4) {
    u[g] = _mm256_shuffle_ps(t[g], t[g + 2], 0x44);
    u[g + 1] = _mm256_shuffle_ps(t[g], t[g + 2], 0xEE);
    u[g + 2] = _mm256_shuffle_ps(t[g + 1], t[g + 3], 0x44);
    u[g + 3] = _mm256_shuffle_ps(t[g + 1], t[g + 3], 0xEE);
  }
  for (int j = 0; j < 4; ++j) {
    r[j] = _mm256_permute2f128_ps(u[j], u[4 + j], 0x20);
    r[4 + j] = _mm256_permute2f128_ps(u[j], u[4 + j], 0x31);
  }
}

// Scores for blocks of 8 keys: the block is transposed once into kt [d, 8], then 8 query rows at
// a time accumulate q[r, c] * kt[c] in 8 ymm.
void attn_qk(const float* q, size_t ldq, int R, const float* k, int n, int d, float* s, size_t lds) {
  alignas(32) float kt[kMaxHeadDim * 8];
  for (int s0 = 0; s0 < n; s0 += 8) {
    const int nk = n - s0 < 8 ? n - s0 : 8;
    for (int c0 = 0; c0 < d; c0 += 8) {
      __m256 r[8];
      for (int i = 0; i < 8; ++i) {
        if (i < nk && c0 + 8 <= d) {
          r[i] = _mm256_loadu_ps(k + static_cast<size_t>(s0 + i) * d + c0);
        } else {
          alignas(32) float tmp[8] = {0, 0, 0, 0, 0, 0, 0, 0};
          for (int c = c0; i < nk && c < d && c < c0 + 8; ++c) tmp[c - c0] = k[static_cast<size_t>(s0 + i) * d + c];
          r[i] = _mm256_load_ps(tmp);
        }
      }
      transpose8(r);
      for (int c = 0; c < 8 && c0 + c < d; ++c) _mm256_store_ps(kt + (c0 + c) * 8, r[c]);
    }
    for (int r0 = 0; r0 < R; r0 += 8) {
      const int nr = R - r0 < 8 ? R - r0 : 8;
      __m256 acc[8];
      for (int i = 0; i < 8; ++i) acc[i] = _mm256_setzero_ps();
      for (int c = 0; c < d; ++c) {
        const __m256 kc = _mm256_load_ps(kt + c * 8);
        for (int i = 0; i < 8; ++i)
          if (i < nr) acc[i] = _mm256_fmadd_ps(_mm256_broadcast_ss(q + (r0 + i) * ldq + c), kc, acc[i]);
      }
      for (int i = 0; i < nr; ++i) {
        float* out = s + (r0 + i) * lds + s0;
        if (nk == 8) {
          _mm256_storeu_ps(out, acc[i]);
        } else {
          alignas(32) float tmp[8];
          _mm256_store_ps(tmp, acc[i]);
          for (int j = 0; j < nk; ++j) out[j] = tmp[j];
        }
      }
    }
  }
}

// out[G, d] = P[G, S] @ V[S, d]: blocks of 64 keys, up to 64 output columns in 8 ymm accumulators.
void attn_pv(const float* p, size_t ldp, int G, const float* v, int S, int d, float* out) {
  constexpr int kKeys = 64;
  for (int j = 0; j < G; ++j)
    for (int c = 0; c < d; ++c) out[static_cast<size_t>(j) * d + c] = 0.0f;
  for (int s0 = 0; s0 < S; s0 += kKeys) {
    const int s1 = s0 + kKeys < S ? s0 + kKeys : S;
    for (int j = 0; j < G; ++j) {
      float* o = out + static_cast<size_t>(j) * d;
      int c0 = 0;
      for (; c0 + 64 <= d; c0 += 64) {
        __m256 acc[8];
        for (int i = 0; i < 8; ++i) acc[i] = _mm256_loadu_ps(o + c0 + 8 * i);
        for (int s = s0; s < s1; ++s) {
          const __m256 pj = _mm256_set1_ps(p[j * ldp + s]);
          const float* vs = v + static_cast<size_t>(s) * d + c0;
          for (int i = 0; i < 8; ++i) acc[i] = _mm256_fmadd_ps(pj, _mm256_loadu_ps(vs + 8 * i), acc[i]);
        }
        for (int i = 0; i < 8; ++i) _mm256_storeu_ps(o + c0 + 8 * i, acc[i]);
      }
      for (int s = s0; s < s1 && c0 < d; ++s) axpy_f32(p[j * ldp + s], v + static_cast<size_t>(s) * d + c0, o + c0, d - c0);
    }
  }
}

// exp(x) for fp32 lanes: x = n ln2 + r, |r| <= ln2 / 2, e^r by the Cephes expf polynomial
// (relative error ~1e-7), 2^n through the exponent bits. Arguments are clamped to
// [-87.3, 88.7], so the result is finite and positive (callers zero the -inf entries).
inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.33654f)), _mm256_set1_ps(88.72283f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

struct Vec8 {  // the decode attention's vector (attn_decode_impl.h)
  using R = __m256;
  static constexpr int W = 8;
  static R zero() { return _mm256_setzero_ps(); }
  static R set1(float x) { return _mm256_set1_ps(x); }
  static R load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, R r) { _mm256_storeu_ps(p, r); }
  static R bcast(const float* p) { return _mm256_broadcast_ss(p); }
  static R fma(R a, R b, R c) { return _mm256_fmadd_ps(a, b, c); }
  static R mul(R a, R b) { return _mm256_mul_ps(a, b); }
  static R add(R a, R b) { return _mm256_add_ps(a, b); }
  static R max(R a, R b) { return _mm256_max_ps(a, b); }
  static R finite_or_zero(R m) { return _mm256_and_ps(_mm256_cmp_ps(m, set1(kNegInf), _CMP_NEQ_OQ), m); }
  static R exp_visible(R s, R m) {
    return _mm256_and_ps(_mm256_cmp_ps(s, set1(kNegInf), _CMP_NEQ_OQ), exp8(_mm256_sub_ps(s, m)));
  }
};

void softmax(float* x, int n) {
  const float neg_inf = kNegInf;
  float m = neg_inf;
  for (int i = 0; i < n; ++i) m = x[i] > m ? x[i] : m;
  if (m == neg_inf) {
    for (int i = 0; i < n; ++i) x[i] = 0.0f;
    return;
  }
  const __m256 mv = _mm256_set1_ps(m), ninf = _mm256_set1_ps(neg_inf);
  __m256 sum = _mm256_setzero_ps();
  int i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    const __m256 e = _mm256_and_ps(_mm256_cmp_ps(v, ninf, _CMP_NEQ_OQ), exp8(_mm256_sub_ps(v, mv)));
    _mm256_storeu_ps(x + i, e);
    sum = _mm256_add_ps(sum, e);
  }
  float total = hsum(sum);
  for (; i < n; ++i) {
    float tail[8] = {x[i] - m, 0, 0, 0, 0, 0, 0, 0};
    const float e = x[i] == neg_inf ? 0.0f : _mm256_cvtss_f32(exp8(_mm256_loadu_ps(tail)));
    x[i] = e;
    total += e;
  }
  const float inv = 1.0f / total;
  for (int j = 0; j < n; ++j) x[j] *= inv;
}

void silu_mul(const float* gate, const float* up, float* out, int n) {
  const __m256 one = _mm256_set1_ps(1.0f);
  int i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 g = _mm256_loadu_ps(gate + i);
    const __m256 s = _mm256_div_ps(g, _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), g))));
    _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_loadu_ps(up + i), s));
  }
  for (; i < n; ++i) {
    float tail[8] = {-gate[i], 0, 0, 0, 0, 0, 0, 0};
    out[i] = up[i] * (gate[i] / (1.0f + _mm256_cvtss_f32(exp8(_mm256_loadu_ps(tail)))));
  }
}

// ---- panel form: 6 tokens x 16 rows in 12 accumulators ---------------------------------------

// Per k: two loads of the packed weights (16 rows), then for each token one broadcast of x[i, k]
// feeding both: 12 FMAs to 8 loads, within Zen 3's / Haswell's 2 FMAs + 2-3 loads per cycle.
// Six tokens always: a tile of m < 6 repeats its last row in the missing ones and stores only m.
// The 12 accumulators are named variables: as an array (acc[M][2], M >= 5) GCC keeps them in
// memory and stores every one of them on every k.
void f32_panel(const float* x, size_t ldx, const float* wp, int kc, float* c, size_t ldc, int m,
               int n, bool accumulate) {
  const float* x0 = x;
  const float* x1 = x + (m > 1 ? 1 : 0) * ldx;
  const float* x2 = x + (m > 2 ? 2 : m - 1) * ldx;
  const float* x3 = x + (m > 3 ? 3 : m - 1) * ldx;
  const float* x4 = x + (m > 4 ? 4 : m - 1) * ldx;
  const float* x5 = x + (m > 5 ? 5 : m - 1) * ldx;
  __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00;
  __m256 c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
  for (int k = 0; k < kc; ++k) {
    const __m256 w0 = _mm256_load_ps(wp + 16 * k), w1 = _mm256_load_ps(wp + 16 * k + 8);
    __m256 xb = _mm256_broadcast_ss(x0 + k);
    c00 = _mm256_fmadd_ps(xb, w0, c00), c01 = _mm256_fmadd_ps(xb, w1, c01);
    xb = _mm256_broadcast_ss(x1 + k);
    c10 = _mm256_fmadd_ps(xb, w0, c10), c11 = _mm256_fmadd_ps(xb, w1, c11);
    xb = _mm256_broadcast_ss(x2 + k);
    c20 = _mm256_fmadd_ps(xb, w0, c20), c21 = _mm256_fmadd_ps(xb, w1, c21);
    xb = _mm256_broadcast_ss(x3 + k);
    c30 = _mm256_fmadd_ps(xb, w0, c30), c31 = _mm256_fmadd_ps(xb, w1, c31);
    xb = _mm256_broadcast_ss(x4 + k);
    c40 = _mm256_fmadd_ps(xb, w0, c40), c41 = _mm256_fmadd_ps(xb, w1, c41);
    xb = _mm256_broadcast_ss(x5 + k);
    c50 = _mm256_fmadd_ps(xb, w0, c50), c51 = _mm256_fmadd_ps(xb, w1, c51);
  }
  // The last panel of a matrix (n < 16 weight rows) goes through a buffer and touches only the n
  // columns of c: no vmaskmovps. Intel suppresses faults on masked-out lanes, but AMD leaves
  // that implementation dependent, and QEMU's TCG loads all 32 bytes of a masked load before it
  // applies the mask (SIGSEGV under .ci/emulate when c ends within 44 bytes of an unmapped page).
  const __m256 acc[6][2] = {{c00, c01}, {c10, c11}, {c20, c21}, {c30, c31}, {c40, c41}, {c50, c51}};
  for (int i = 0; i < m; ++i) {
    float* ci = c + i * ldc;
    if (n == 16) {
      __m256 a0 = acc[i][0], a1 = acc[i][1];
      if (accumulate) {
        a0 = _mm256_add_ps(a0, _mm256_loadu_ps(ci));
        a1 = _mm256_add_ps(a1, _mm256_loadu_ps(ci + 8));
      }
      _mm256_storeu_ps(ci, a0);
      _mm256_storeu_ps(ci + 8, a1);
    } else {
      alignas(32) float t[16];
      _mm256_store_ps(t, acc[i][0]);
      _mm256_store_ps(t + 8, acc[i][1]);
      for (int j = 0; j < n; ++j) ci[j] = accumulate ? ci[j] + t[j] : t[j];
    }
  }
}

// wp [kc, 16] from n <= 16 rows: 8 x 8 blocks transposed in registers; rows past n are zeros,
// a kc tail (kc % 8) goes element by element.
template <typename W>
void f32_pack(const W* w, size_t ldw, int n, int kc, float* wp) {
  const int k8 = kc & ~7;
  for (int h = 0; h < 16; h += 8) {
    for (int k0 = 0; k0 < k8; k0 += 8) {
      __m256 r[8];
      for (int i = 0; i < 8; ++i) r[i] = h + i < n ? load8(w + (h + i) * ldw + k0) : _mm256_setzero_ps();
      transpose8(r);
      for (int j = 0; j < 8; ++j) _mm256_store_ps(wp + 16 * (k0 + j) + h, r[j]);
    }
    // Row by row, the test outside the k loop: as `h + i < n ? load1(..) : 0` per element, GCC
    // if-converts the loop into vmaskmovps loads of the rows past n, past the end of w (QEMU's
    // TCG loads masked-out lanes: SIGSEGV under .ci/emulate when w ends before an unmapped page).
    for (int i = 0; i < 8; ++i)
      if (h + i < n)
        for (int k = k8; k < kc; ++k) wp[16 * k + h + i] = load1(w + (h + i) * ldw + k);
      else
        for (int k = k8; k < kc; ++k) wp[16 * k + h + i] = 0.0f;
  }
}

// ---- quantized weights (layout in quant.h): 16 rows as two ymm halves -----------------------
// No VNNI here: vpmaddubsw (u8 x s8 -> pairs of i16) + vpmaddwd. int4 quants (0..15) are the
// unsigned operand directly (no saturation: 2 * 15 * 127 < 32767) and a block's products are
// summed in int16 before one vpmaddwd; int8 uses the sign trick |x| * sign(w, x), which keeps
// both operands within 127.

inline int32_t load_i32(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// MT tokens x 16 rows x G groups. Each 64-byte chunk holds 4 consecutive k of all 16 rows (bytes
// 0-31 rows 0-7, bytes 32-63 rows 8-15, one row per 32-bit lane), so one broadcast of 4
// activation bytes feeds 8 rows per instruction, and G = 2 groups share every broadcast when
// decoding one token.
template <int MT, int G, QFormat F>
void qtile(const uint8_t* group, size_t group_bytes, int n_blocks, const int8_t* xq, const float* xs,
           const int32_t* xsum, size_t ldq, size_t lds, float* y, size_t ldy, int rows) {
  constexpr bool kInt4 = F != QFormat::Int8;  // q4k: int4's codes (same bytes, same block size)
  constexpr int kOffset = F == QFormat::Int4 ? 8 : 0;  // q4k's codes are used as stored
  using Block = QBlock<kInt4>;
  auto block = [&](int g, int b) { return q_block<kInt4>(group + g * group_bytes, b); };  // of group g
  const __m256i low4 = _mm256_set1_epi8(0x0f), flip = _mm256_set1_epi8(static_cast<char>(0x80));
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[G][2][MT];
  for (int g = 0; g < G; ++g)
    for (int m = 0; m < MT; ++m) acc[g][0][m] = acc[g][1][m] = _mm256_setzero_ps();
  for (int b = 0; b < n_blocks; ++b) {
    // Decoding one int4 token: software prefetch 8 blocks (2.3 KiB) ahead into L1 in every group
    // stream, which the hardware prefetchers alone leave short of the memory bandwidth; int8
    // gains nothing from it (benchmarks/kernel-notes.md).
    constexpr int kAhead = 8;
    if (kInt4 && MT == 1)
      for (int g = 0; g < G; ++g)
        for (size_t off = 0; off < sizeof(Block); off += 64)
          _mm_prefetch(reinterpret_cast<const char*>(block(g, b + kAhead)) + off, _MM_HINT_T0);
    __m256i isum[G][2][MT];
    if (kInt4) {
      // int16 sums over the 4 chunks: each chunk adds at most 4 * 15 * 127 = 7620 per lane.
      __m256i s16[G][2][MT];
      for (int g = 0; g < G; ++g)
        for (int h = 0; h < 2; ++h)
          for (int m = 0; m < MT; ++m) s16[g][h][m] = _mm256_setzero_si256();
      for (int c = 0; c < 4; ++c) {
        __m256i xlo[MT], xhi[MT];
        for (int m = 0; m < MT; ++m) {
          const int8_t* x = xq + m * ldq + b * 32;
          xlo[m] = _mm256_set1_epi32(load_i32(x + 4 * c));       // k = 4c .. 4c+3
          xhi[m] = _mm256_set1_epi32(load_i32(x + 16 + 4 * c));  // k = 16+4c ..
        }
        for (int g = 0; g < G; ++g)
          for (int h = 0; h < 2; ++h) {
            const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(block(g, b)->codes + Block::code_byte(8 * h, 4 * c)));
            const __m256i lo = _mm256_and_si256(v, low4);
            const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
            for (int m = 0; m < MT; ++m)
              s16[g][h][m] = _mm256_add_epi16(s16[g][h][m], _mm256_add_epi16(_mm256_maddubs_epi16(lo, xlo[m]),
                                                                              _mm256_maddubs_epi16(hi, xhi[m])));
          }
      }
      for (int g = 0; g < G; ++g)
        for (int h = 0; h < 2; ++h)
          for (int m = 0; m < MT; ++m)
            isum[g][h][m] = _mm256_sub_epi32(_mm256_madd_epi16(s16[g][h][m], ones), _mm256_set1_epi32(kOffset * xsum[m * lds + b]));
    } else {
      for (int g = 0; g < G; ++g)
        for (int h = 0; h < 2; ++h)
          for (int m = 0; m < MT; ++m) isum[g][h][m] = _mm256_setzero_si256();
      for (int c = 0; c < 8; ++c) {
        __m256i xv[MT], xa[MT];
        for (int m = 0; m < MT; ++m) {
          xv[m] = _mm256_set1_epi32(load_i32(xq + m * ldq + b * 32 + 4 * c));
          xa[m] = _mm256_abs_epi8(xv[m]);
        }
        for (int g = 0; g < G; ++g)
          for (int h = 0; h < 2; ++h) {
            const __m256i w = _mm256_xor_si256(
                _mm256_loadu_si256(reinterpret_cast<const __m256i*>(block(g, b)->codes + Block::code_byte(8 * h, 4 * c))), flip);  // s8 q
            for (int m = 0; m < MT; ++m) {
              const __m256i p = _mm256_maddubs_epi16(xa[m], _mm256_sign_epi8(w, xv[m]));
              isum[g][h][m] = _mm256_add_epi32(isum[g][h][m], _mm256_madd_epi16(p, ones));
            }
          }
      }
    }
    for (int g = 0; g < G; ++g)
      for (int h = 0; h < 2; ++h) {
        if constexpr (F == QFormat::Q4K) {  // xs (D sc isum - M mn xsum), rows 8h .. 8h + 7
          const Q4KBlock* blk = reinterpret_cast<const Q4KBlock*>(block(g, b));
          const uint8_t* header = q4k_header(group + g * group_bytes, n_blocks, b / kQ4KSuper);
          const __m256 scale = _mm256_mul_ps(
              _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(header + 16 * h))),
              _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(blk->sc + 8 * h)))));
          const __m256 offset = _mm256_mul_ps(
              _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(header + kQ4KHeaderBytes / 2 + 16 * h))),
              _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(blk->mn + 8 * h)))));
          for (int m = 0; m < MT; ++m) {
            const float xsb = xs[m * lds + b];
            acc[g][h][m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[g][h][m]), _mm256_mul_ps(scale, _mm256_set1_ps(xsb)),
                                           acc[g][h][m]);
            acc[g][h][m] = _mm256_fnmadd_ps(offset, _mm256_set1_ps(xsb * static_cast<float>(xsum[m * lds + b])),
                                            acc[g][h][m]);
          }
        } else {
          const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(block(g, b)->scales + sizeof(uint16_t) * 8 * h)));
          for (int m = 0; m < MT; ++m)
            acc[g][h][m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[g][h][m]),
                                           _mm256_mul_ps(d, _mm256_set1_ps(xs[m * lds + b])), acc[g][h][m]);
        }
      }
  }
  for (int g = 0; g < G; ++g) {
    const int r = rows - 16 * g;
    if (r <= 0) break;
    for (int m = 0; m < MT; ++m) {
      float out[16];
      _mm256_storeu_ps(out, acc[g][0][m]);
      _mm256_storeu_ps(out + 8, acc[g][1][m]);
      for (int i = 0; i < r && i < 16; ++i) y[m * ldy + 16 * g + i] = out[i];
    }
  }
}

template <QFormat F>
void qgemm_tile(const uint8_t* group, size_t group_bytes, int n_groups, int n_blocks, const int8_t* xq,
                const float* xs, const int32_t* xsum, size_t ldq, size_t lds, int mt, float* y,
                size_t ldy, int rows) {
  if (n_groups == 2 && mt == 1 && rows > 16) {
    qtile<1, 2, F>(group, group_bytes, n_blocks, xq, xs, xsum, ldq, lds, y, ldy, rows);
    return;
  }
  for (int g = 0; g < n_groups && rows > 16 * g; ++g) {
    const int r = rows - 16 * g < 16 ? rows - 16 * g : 16;
    if (mt == 1)
      qtile<1, 1, F>(group + g * group_bytes, group_bytes, n_blocks, xq, xs, xsum, ldq, lds, y + 16 * g, ldy, r);
    else
      qtile<2, 1, F>(group + g * group_bytes, group_bytes, n_blocks, xq, xs, xsum, ldq, lds, y + 16 * g, ldy, r);
  }
}

}  // namespace
}  // namespace avx2

const KernelTable& avx2_kernels() {
  static const KernelTable table = [] {
    KernelTable t;
    t.name = "avx2";
    t.mr = 3;
    t.nr = 4;
    t.gemm_tile_f32 = avx2::gemm_tile<float>;
    t.gemm_tile_bf16 = avx2::gemm_tile<uint16_t>;
    t.dot_f32 = avx2::dot_f32;
    t.read_xor = avx2::read_xor;
    t.attn_qk = avx2::attn_qk;
    t.attn_pv = avx2::attn_pv;
    t.attn_decode = attn_decode::attn_decode<avx2::Vec8, 8>;
    t.softmax = avx2::softmax;
    t.silu_mul = avx2::silu_mul;
    t.qmt = 2;
    t.qgemm_int8 = avx2::qgemm_tile<QFormat::Int8>;
    t.qgemm_int4 = avx2::qgemm_tile<QFormat::Int4>;
    t.qgemm_q4k = avx2::qgemm_tile<QFormat::Q4K>;
    t.quantize_int4 = quantize_int4_avx2;
    t.quantize_q4k = quantize_q4k_super_ref;  // no AVX2 twin yet: the scalar specification
    t.f32_panel = avx2::f32_panel;
    t.f32_pack = avx2::f32_pack<float>;
    t.f32_pack_bf16 = avx2::f32_pack<uint16_t>;
    return t;
  }();
  return table;
}

}  // namespace glm4rt
