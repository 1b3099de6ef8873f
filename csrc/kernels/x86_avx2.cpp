// AVX2 + FMA kernels, for x86-64 CPUs without AVX-512. Same rules as x86_avx512.cpp: only
// <immintrin.h>, everything internal to this file. k tails are finished with scalar code.
#include <immintrin.h>

#include "../kernels.h"

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
    for (int j = 0; j < N; ++j) wv[j] = load8(w + j * ldw + p);
    for (int i = 0; i < M; ++i) {
      __m256 xv = load8(x + i * ldx + p);
      for (int j = 0; j < N; ++j) acc[i][j] = _mm256_fmadd_ps(xv, wv[j], acc[i][j]);
    }
  }
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j) {
      float v = hsum(acc[i][j]);
      for (int p = k8; p < k; ++p) v += x[i * ldx + p] * load1(w + j * ldw + p);
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
  float v = hsum(acc);
  for (int p = n8; p < n; ++p) v += a[p] * b[p];
  return v;
}

void axpy_f32(float alpha, const float* x, float* y, int n) {
  __m256 av = _mm256_set1_ps(alpha);
  int n8 = n & ~7;
  for (int p = 0; p < n8; p += 8)
    _mm256_storeu_ps(y + p, _mm256_fmadd_ps(av, load8(x + p), load8(y + p)));
  for (int p = n8; p < n; ++p) y[p] += alpha * x[p];
}

}  // namespace
}  // namespace avx2

const KernelTable& avx2_kernels() {
  static const KernelTable table = {
      "avx2", 3, 4, avx2::gemm_tile<float>, avx2::gemm_tile<uint16_t>,
      avx2::dot_f32, avx2::axpy_f32,
  };
  return table;
}

}  // namespace glm4rt
