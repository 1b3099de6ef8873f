// Portable scalar kernels: the twin of every SIMD kernel and the path for non-x86 CPUs.
// Reductions use 8 independent partial sums (fixed order), like the SIMD lanes of the fast paths.
#include <cstring>

#include "../kernels.h"

namespace glm4rt {
namespace generic {
namespace {

inline float bf16_to_f32(uint16_t bits) {
  uint32_t u = static_cast<uint32_t>(bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

template <typename W>
inline float load_weight(const W* w, int i);
template <>
inline float load_weight<float>(const float* w, int i) { return w[i]; }
template <>
inline float load_weight<uint16_t>(const uint16_t* w, int i) { return bf16_to_f32(w[i]); }

template <typename W>
float dot(const float* a, const W* b, int n) {
  float lanes[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int i = 0;
  for (; i + 8 <= n; i += 8)
    for (int l = 0; l < 8; ++l) lanes[l] += a[i + l] * load_weight(b, i + l);
  float tail = 0.f;
  for (; i < n; ++i) tail += a[i] * load_weight(b, i);
  return ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5])) +
         ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7])) + tail;
}

template <typename W>
void gemm_tile(const float* x, size_t ldx, const W* w, size_t ldw, float* c, size_t ldc, int m,
               int n, int k, bool accumulate) {
  for (int i = 0; i < m; ++i)
    for (int j = 0; j < n; ++j) {
      float v = dot(x + i * ldx, w + j * ldw, k);
      c[i * ldc + j] = accumulate ? c[i * ldc + j] + v : v;
    }
}

float dot_f32(const float* a, const float* b, int n) { return dot<float>(a, b, n); }

void axpy_f32(float alpha, const float* x, float* y, int n) {
  for (int i = 0; i < n; ++i) y[i] += alpha * x[i];
}

}  // namespace
}  // namespace generic

const KernelTable& generic_kernels() {
  static const KernelTable table = {
      "generic", 4, 4, generic::gemm_tile<float>, generic::gemm_tile<uint16_t>,
      generic::dot_f32, generic::axpy_f32,
  };
  return table;
}

}  // namespace glm4rt
