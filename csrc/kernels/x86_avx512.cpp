// AVX-512 (F + BW + VL) kernels. Compiled with AVX-512 flags, called only when CPUID says the CPU
// and OS support it. Only <immintrin.h> is included, and everything is internal to this file, so
// no AVX-512 code can leak into the generic path through a shared inline function.
#include <immintrin.h>

#include "../kernels.h"

namespace glm4rt {
namespace avx512 {
namespace {

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
    for (int j = 0; j < N; ++j) wv[j] = load_f32(w + j * ldw + p, mask);
    for (int i = 0; i < M; ++i) {
      __m512 xv = load_f32(x + i * ldx + p, mask);
      for (int j = 0; j < N; ++j) acc[i][j] = _mm512_fmadd_ps(xv, wv[j], acc[i][j]);
    }
  }
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j) {
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

void axpy_f32(float alpha, const float* x, float* y, int n) {
  __m512 av = _mm512_set1_ps(alpha);
  for (int p = 0; p < n; p += 16) {
    __mmask16 mask = n - p >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - p)) - 1u);
    __m512 yv = _mm512_fmadd_ps(av, load_f32(x + p, mask), load_f32(y + p, mask));
    _mm512_mask_storeu_ps(y + p, mask, yv);
  }
}

}  // namespace
}  // namespace avx512

const KernelTable& avx512_kernels() {
  static const KernelTable table = {
      "avx512", 4, 4, avx512::gemm_tile<float>, avx512::gemm_tile<uint16_t>,
      avx512::dot_f32, avx512::axpy_f32,
  };
  return table;
}

}  // namespace glm4rt
