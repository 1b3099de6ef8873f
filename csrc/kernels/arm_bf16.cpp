// ARM64 with the bf16 instructions (FEAT_BF16, Armv8.6: Neoverse V1 / N2, Graviton 3, Apple M2 and
// later; every such CPU also has FEAT_I8MM): the i8mm table with BFDOT tiles for bf16 weights.
// Compiled with -march=armv8.2-a+dotprod+i8mm+bf16, chosen only where the CPU has both.
//
// As on x86 with AVX512-BF16 (kernels.h, GemmTileBF16x), bf16 weights take activations rounded to
// bf16. BFDOT adds the two exact products of a pair of k to each fp32 lane; without FEAT_EBF16 it
// rounds those sums to odd and flushes denormal inputs and results to zero, a few ulps from the
// fp32 path's sums (tests/test_kernels.py). One tile computes every output from the same sequence
// of instructions whatever m and n, so the tile serves one token too (batch-invariant mode).
#include <arm_neon.h>

#include <cstring>

#include "../kernels.h"

namespace glm4rt {
namespace {

constexpr int kTile = 4;  // tokens and weight rows per tile (the neon table's mr / nr)

inline bfloat16x8_t load8(const uint16_t* p) { return vreinterpretq_bf16_u16(vld1q_u16(p)); }

// The last k % 8 values of a row and zeros: the tail goes through BFDOT like the rest (same
// rounding and flushing for every element).
inline bfloat16x8_t load_tail(const uint16_t* p, int n) {
  uint16_t buf[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  std::memcpy(buf, p, sizeof(uint16_t) * n);
  return load8(buf);
}

// C[m, n] (+)= X[m, :k] . W[n, :k], m, n <= 4, x and w in bf16: 16 accumulators of 4 lanes (lane l
// sums the pairs 2l, 2l + 1 of every 8 k), one horizontal sum each at the end.
void gemm_tile_bf16x(const uint16_t* x, size_t ldx, const uint16_t* w, size_t ldw, float* c, size_t ldc, int m,
                     int n, int k, bool accumulate) {
  const uint16_t* xr[kTile];
  const uint16_t* wr[kTile];
  for (int i = 0; i < kTile; ++i) xr[i] = x + static_cast<size_t>(i < m ? i : m - 1) * ldx;
  for (int j = 0; j < kTile; ++j) wr[j] = w + static_cast<size_t>(j < n ? j : n - 1) * ldw;
  float32x4_t acc[kTile][kTile];
  for (int i = 0; i < kTile; ++i)
    for (int j = 0; j < kTile; ++j) acc[i][j] = vdupq_n_f32(0.0f);
  int p = 0;
  for (; p + 8 <= k; p += 8) {
    bfloat16x8_t xv[kTile], wv[kTile];
    for (int i = 0; i < kTile; ++i) xv[i] = load8(xr[i] + p);
    for (int j = 0; j < kTile; ++j) wv[j] = load8(wr[j] + p);
    for (int i = 0; i < kTile; ++i)
      for (int j = 0; j < kTile; ++j) acc[i][j] = vbfdotq_f32(acc[i][j], xv[i], wv[j]);
  }
  if (p < k) {
    bfloat16x8_t xv[kTile], wv[kTile];
    for (int i = 0; i < kTile; ++i) xv[i] = load_tail(xr[i] + p, k - p);
    for (int j = 0; j < kTile; ++j) wv[j] = load_tail(wr[j] + p, k - p);
    for (int i = 0; i < kTile; ++i)
      for (int j = 0; j < kTile; ++j) acc[i][j] = vbfdotq_f32(acc[i][j], xv[i], wv[j]);
  }
  for (int i = 0; i < m; ++i)
    for (int j = 0; j < n; ++j) {
      const float v = vaddvq_f32(acc[i][j]);
      c[i * ldc + j] = accumulate ? c[i * ldc + j] + v : v;
    }
}

}  // namespace

const KernelTable& bf16_kernels() {
  static const KernelTable table = [] {
    KernelTable t = i8mm_kernels();
    t.name = "bf16";
    t.gemm_tile_bf16x = gemm_tile_bf16x;
    t.gemm_tile_bf16x_dot = gemm_tile_bf16x;
    return t;
  }();
  return table;
}

}  // namespace glm4rt
