// Portable scalar kernels: the twin of every SIMD kernel and the path for non-x86 CPUs.
// Reductions use 8 independent partial sums (fixed order), like the SIMD lanes of the fast paths.
#include <cmath>
#include <cstring>
#include <limits>

#include "../kernels.h"
#include "../quant.h"
#include "attn_decode_impl.h"

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

uint64_t read_xor(const uint8_t* data, size_t n_bytes) {
  uint64_t a[8] = {0, 0, 0, 0, 0, 0, 0, 0};  // 8 independent chains: the loop is load-bound
  for (size_t i = 0; i < n_bytes; i += 64)
    for (int j = 0; j < 8; ++j) {
      uint64_t w;
      std::memcpy(&w, data + i + 8 * j, sizeof w);
      a[j] ^= w;
    }
  return a[0] ^ a[1] ^ a[2] ^ a[3] ^ a[4] ^ a[5] ^ a[6] ^ a[7];
}

void attn_qk(const float* q, size_t ldq, int R, const float* k, int n, int d, float* s, size_t lds) {
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < n; ++j) s[r * lds + j] = dot<float>(q + r * ldq, k + static_cast<size_t>(j) * d, d);
}

void attn_pv(const float* p, size_t ldp, int G, const float* v, int S, int d, float* out) {
  for (int j = 0; j < G; ++j) {
    float* o = out + static_cast<size_t>(j) * d;
    for (int c = 0; c < d; ++c) o[c] = 0.0f;
    for (int s = 0; s < S; ++s) axpy_f32(p[j * ldp + s], v + static_cast<size_t>(s) * d, o, d);
  }
}

// One lane: the reference form of the decode attention (attn_decode_impl.h).
struct Vec1 {
  using R = float;
  static constexpr int W = 1;
  static R zero() { return 0.0f; }
  static R set1(float x) { return x; }
  static R load(const float* p) { return *p; }
  static void store(float* p, R r) { *p = r; }
  static R bcast(const float* p) { return *p; }
  static R fma(R a, R b, R c) { return a * b + c; }
  static R mul(R a, R b) { return a * b; }
  static R add(R a, R b) { return a + b; }
  static R max(R a, R b) { return a > b ? a : b; }
  static R exp_visible(R s, R m) { return s == -std::numeric_limits<float>::infinity() ? 0.0f : std::exp(s - m); }
  static R finite_or_zero(R m) { return m == -std::numeric_limits<float>::infinity() ? 0.0f : m; }
};

void softmax(float* x, int n) {
  const float neg_inf = -std::numeric_limits<float>::infinity();
  float mx = neg_inf;
  for (int i = 0; i < n; ++i) mx = x[i] > mx ? x[i] : mx;
  if (mx == neg_inf) {
    for (int i = 0; i < n; ++i) x[i] = 0.0f;
    return;
  }
  float sum = 0.0f;
  for (int i = 0; i < n; ++i) {
    x[i] = x[i] == neg_inf ? 0.0f : std::exp(x[i] - mx);
    sum += x[i];
  }
  const float inv = 1.0f / sum;
  for (int i = 0; i < n; ++i) x[i] *= inv;
}

void silu_mul(const float* gate, const float* up, float* out, int n) {
  for (int i = 0; i < n; ++i) out[i] = up[i] * (gate[i] / (1.0f + std::exp(-gate[i])));
}

// ---- quantized weights: the scalar reading of the packed layout (quant.h) -------------------

template <bool kInt4>
void qgemm_group(const uint8_t* group, int n_blocks, const int8_t* xq, const float* xs,
                 const int32_t* xsum, size_t ldq, size_t lds, int mt, float* y, size_t ldy, int rows) {
  for (int m = 0; m < mt; ++m)
    for (int r = 0; r < rows; ++r) {
      float acc = 0.0f;
      for (int b = 0; b < n_blocks; ++b) {
        const QBlock<kInt4>* blk = q_block<kInt4>(group, b);
        const int8_t* x = xq + m * ldq + b * kQBlock;
        int32_t isum = 0;
        for (int k = 0; k < kQBlock; ++k) isum += blk->code(r, k) * x[k];
        if (kInt4) isum -= 8 * xsum[m * lds + b];
        acc += static_cast<float>(isum) * (blk->scale(r) * xs[m * lds + b]);
      }
      y[m * ldy + r] = acc;
    }
}

// q4k: sum_b xs * (D sc * sum_k q x - M mn * sum_k x), the codes unsigned.
void qgemm_group_q4k(const uint8_t* group, int n_blocks, const int8_t* xq, const float* xs,
                     const int32_t* xsum, size_t ldq, size_t lds, int mt, float* y, size_t ldy, int rows) {
  for (int m = 0; m < mt; ++m)
    for (int r = 0; r < rows; ++r) {
      float acc = 0.0f;
      for (int b = 0; b < n_blocks; ++b) {
        const Q4KBlock* blk = q4k_block(group, b);
        const uint8_t* header = q4k_header(group, n_blocks, b / kQ4KSuper);
        const int8_t* x = xq + m * ldq + b * kQBlock;
        int32_t isum = 0;
        for (int k = 0; k < kQBlock; ++k) isum += blk->code(r, k) * x[k];
        const float scale = q4k_header_d(header, r) * blk->sc[r], offset = q4k_header_m(header, r) * blk->mn[r];
        const float s = xs[m * lds + b];
        acc += static_cast<float>(isum) * (scale * s) - offset * (s * static_cast<float>(xsum[m * lds + b]));
      }
      y[m * ldy + r] = acc;
    }
}

template <QFormat F>
void qgemm_tile(const uint8_t* group, size_t group_bytes, int n_groups, int n_blocks, const int8_t* xq,
                const float* xs, const int32_t* xsum, size_t ldq, size_t lds, int mt, float* y,
                size_t ldy, int rows) {
  for (int g = 0; g < n_groups && rows > g * kQGroupRows; ++g) {
    const int r = rows - g * kQGroupRows < kQGroupRows ? rows - g * kQGroupRows : kQGroupRows;
    if (F == QFormat::Q4K)
      qgemm_group_q4k(group + g * group_bytes, n_blocks, xq, xs, xsum, ldq, lds, mt, y + g * kQGroupRows, ldy, r);
    else
      qgemm_group<F == QFormat::Int4>(group + g * group_bytes, n_blocks, xq, xs, xsum, ldq, lds, mt,
                                      y + g * kQGroupRows, ldy, r);
  }
}

}  // namespace
}  // namespace generic

const KernelTable& generic_kernels() {
  static const KernelTable table = [] {
    KernelTable t;
    t.name = "generic";
    t.mr = 4;
    t.nr = 4;
    t.gemm_tile_f32 = generic::gemm_tile<float>;
    t.gemm_tile_bf16 = generic::gemm_tile<uint16_t>;
    t.dot_f32 = generic::dot_f32;
    t.read_xor = generic::read_xor;
    t.attn_qk = generic::attn_qk;
    t.attn_pv = generic::attn_pv;
    t.attn_decode = attn_decode::attn_decode<generic::Vec1, 16>;
    t.softmax = generic::softmax;
    t.silu_mul = generic::silu_mul;
    t.qmt = 4;
    t.qgemm_int8 = generic::qgemm_tile<QFormat::Int8>;
    t.qgemm_int4 = generic::qgemm_tile<QFormat::Int4>;
    t.qgemm_q4k = generic::qgemm_tile<QFormat::Q4K>;
    t.quantize_int4 = quantize_int4_group_ref;
    t.quantize_q4k = quantize_q4k_super_ref;
    return t;
  }();
  return table;
}

}  // namespace glm4rt
