// Decode attention (one query token) for the query heads that share one kv head, over a range of
// keys, with an online softmax. Included by the ISA files, each with a vector type:
//
//   struct Vec {                       // W fp32 lanes (W = 1, 8 or 16)
//     using R = ...;  static constexpr int W = ...;
//     static R zero();  static R set1(float);  static R load(const float*);  static void store(float*, R);
//     static R bcast(const float*);    // *p in every lane
//     static R fma(R a, R b, R c);     // a * b + c
//     static R mul(R, R);  static R add(R, R);  static R max(R, R);
//     static R exp_visible(R s, R m);  // exp(s - m), exactly 0 where s == -inf
//     static R finite_or_zero(R m);    // 0 where m == -inf
//   };
//
// The scores are key-major: for each key, 16 / W vectors hold the scores of up to 16 heads, so
// that Q K^T needs no transpose (a broadcast of one element of the key row times a column of
// q^T), the softmax statistics are per-lane maxima and sums (no horizontal reductions), and P V
// broadcasts a probability per head against a slice of the V row. Every K and V row is read once
// for all the heads of the group: GLM-4-9B has 16 query heads per kv head.
#pragma once
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <limits>

namespace glm4rt {
namespace {
namespace attn_decode {

constexpr int kHeads = 16;  // heads per pass (the scores of one key: 16 floats)
constexpr int kChunk = 64;  // keys per online-softmax step

// Software prefetch of a key's K and V rows this many keys ahead (the hardware prefetchers alone
// leave the long-context cache reads far below the memory bandwidth).
constexpr int kPrefetchKeys = 16;

inline void prefetch_row(const float* row, int d) {
  const char* p = reinterpret_cast<const char*>(row);
  for (int off = 0; off < d * static_cast<int>(sizeof(float)); off += 64) GLM4RT_PREFETCH(p + off, 3);
}

// Scores of the keys [s0, s0 + ns) of one chunk: sc[j * 16 + h] = scale * q_h . k_{s0+j}, -inf
// for masked keys. qt [d][16] is q transposed (heads in the lanes).
template <class V>
void chunk_scores(const float* qt, const float* k, int s0, int ns, int n, int d, const float* v,
                  const uint8_t* key_mask, float scale, float* sc) {
  constexpr int NV = kHeads / V::W;                 // vectors per key
  constexpr int KB = NV >= 8 ? 1 : 8 / NV;          // keys per step (8 accumulator vectors)
  const typename V::R vscale = V::set1(scale), ninf = V::set1(-std::numeric_limits<float>::infinity());
  for (int j0 = 0; j0 < ns; j0 += KB) {
    const int nk = std::min(KB, ns - j0);
    const float* rows[KB];
    for (int jj = 0; jj < KB; ++jj) rows[jj] = k + static_cast<size_t>(s0 + j0 + std::min(jj, nk - 1)) * d;
    for (int jj = 0; jj < nk; ++jj) {
      const int ahead = s0 + j0 + jj + kPrefetchKeys;
      if (ahead < n) {
        prefetch_row(k + static_cast<size_t>(ahead) * d, d);
        prefetch_row(v + static_cast<size_t>(ahead) * d, d);
      }
    }
    typename V::R acc[KB][NV];
    for (int jj = 0; jj < KB; ++jj)
      for (int u = 0; u < NV; ++u) acc[jj][u] = V::zero();
    for (int c = 0; c < d; ++c) {
      typename V::R qc[NV];
      for (int u = 0; u < NV; ++u) qc[u] = V::load(qt + c * kHeads + u * V::W);
      for (int jj = 0; jj < KB; ++jj) {
        const typename V::R kc = V::bcast(rows[jj] + c);
        for (int u = 0; u < NV; ++u) acc[jj][u] = V::fma(kc, qc[u], acc[jj][u]);
      }
    }
    for (int jj = 0; jj < nk; ++jj) {
      const bool masked = key_mask != nullptr && key_mask[s0 + j0 + jj] == 0;
      for (int u = 0; u < NV; ++u)
        V::store(sc + (j0 + jj) * kHeads + u * V::W, masked ? ninf : V::mul(acc[jj][u], vscale));
    }
  }
}

// out[h][c] (+)= sum_j p[j][h] v[j][c] for heads [h0, h0 + NH) (out rows d apart, already scaled).
template <class V, int NH>
void chunk_values(const float* p, const float* v, int ns, int d, float* out, int h0) {
  int c0 = 0;
  for (; c0 + V::W <= d; c0 += V::W) {
    typename V::R acc[NH];
    for (int h = 0; h < NH; ++h) acc[h] = V::load(out + static_cast<size_t>(h0 + h) * d + c0);
    for (int j = 0; j < ns; ++j) {
      const typename V::R vj = V::load(v + static_cast<size_t>(j) * d + c0);
      for (int h = 0; h < NH; ++h) acc[h] = V::fma(V::bcast(p + j * kHeads + h0 + h), vj, acc[h]);
    }
    for (int h = 0; h < NH; ++h) V::store(out + static_cast<size_t>(h0 + h) * d + c0, acc[h]);
  }
  for (; c0 < d; ++c0)  // the columns past the last full vector
    for (int h = 0; h < NH; ++h) {
      float s = out[static_cast<size_t>(h0 + h) * d + c0];
      for (int j = 0; j < ns; ++j)  // (in_register: kernels.h)
        s += in_register(p[j * kHeads + h0 + h]) * in_register(v[static_cast<size_t>(j) * d + c0]);
      out[static_cast<size_t>(h0 + h) * d + c0] = s;
    }
}

// chunk_values for nh <= N heads, the accumulators of all of them in registers.
template <class V, int N>
void values_for_heads(int nh, const float* p, const float* v, int ns, int d, float* out, int h0) {
  if constexpr (N > 1) {
    if (nh < N) {
      values_for_heads<V, N - 1>(nh, p, v, ns, d, out, h0);
      return;
    }
  }
  chunk_values<V, N>(p, v, ns, d, out, h0);
}

// The AttnDecode entry of the kernel table (see kernels.h).
template <class V, int kValueHeads>
void attn_decode(const float* q, int G, const float* k, const float* v, int n, int d,
                 const uint8_t* key_mask, float scale, float* out, float* m_out, float* l_out) {
  using R = typename V::R;
  constexpr int NV = kHeads / V::W;
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  alignas(64) float qt[kMaxHeadDim * kHeads];
  alignas(64) float sc[kChunk * kHeads];
  alignas(64) float acc[kHeads * kMaxHeadDim];  // unnormalised outputs of the pass's heads [16][d]
  alignas(64) float m[kHeads], l[kHeads], alpha[kHeads];
  for (int g0 = 0; g0 < G; g0 += kHeads) {
    const int gs = std::min(kHeads, G - g0);
    for (int c = 0; c < d; ++c)
      for (int h = 0; h < kHeads; ++h) qt[c * kHeads + h] = h < gs ? q[static_cast<size_t>(g0 + h) * d + c] : 0.0f;
    std::fill(acc, acc + kHeads * d, 0.0f);
    std::fill(m, m + kHeads, kNegInf);
    std::fill(l, l + kHeads, 0.0f);
    for (int s0 = 0; s0 < n; s0 += kChunk) {
      const int ns = std::min(kChunk, n - s0);
      chunk_scores<V>(qt, k, s0, ns, n, d, v, key_mask, scale, sc);
      // Running maximum per head; the sums and outputs so far are rescaled by exp(m_old - m_new).
      for (int u = 0; u < NV; ++u) {
        R mx = V::load(m + u * V::W);
        const R m_old = mx;
        for (int j = 0; j < ns; ++j) mx = V::max(mx, V::load(sc + j * kHeads + u * V::W));
        const R m_ref = V::finite_or_zero(mx);  // a head with no visible key yet: p = 0 anyway
        R sum = V::zero();
        for (int j = 0; j < ns; ++j) {
          const R p = V::exp_visible(V::load(sc + j * kHeads + u * V::W), m_ref);
          V::store(sc + j * kHeads + u * V::W, p);
          sum = V::add(sum, p);
        }
        const R a = V::exp_visible(m_old, m_ref);
        V::store(alpha + u * V::W, a);
        V::store(l + u * V::W, V::fma(V::load(l + u * V::W), a, sum));
        V::store(m + u * V::W, mx);
      }
      for (int h = 0; h < gs; ++h)
        if (alpha[h] != 1.0f)
          for (int c = 0; c < d; ++c) acc[h * d + c] *= alpha[h];
      const float* vc = v + static_cast<size_t>(s0) * d;
      for (int h0 = 0; h0 < gs; h0 += kValueHeads)
        values_for_heads<V, kValueHeads>(std::min(kValueHeads, gs - h0), sc, vc, ns, d, acc, h0);
    }
    for (int h = 0; h < gs; ++h) {
      std::copy(acc + h * d, acc + (h + 1) * d, out + static_cast<size_t>(g0 + h) * d);
      m_out[g0 + h] = m[h];
      l_out[g0 + h] = l[h];
    }
  }
}

}  // namespace attn_decode
}  // namespace
}  // namespace glm4rt
