#include "ops.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "dispatch.h"

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace glm4rt {
namespace {

// Tile sizes of the cache blocking: a [kBlockM, kBlockK] slice of x (128 KiB) stays in L2 while
// every weight tile of nr rows x kBlockK (8 KiB) streams through L1 once per block of tokens.
constexpr int kBlockM = 64;
constexpr int kBlockK = 512;
// Below this many multiply-adds a matmul runs on the calling thread.
constexpr long long kParallelWork = 1 << 15;

// Work is handed out in claims (OpenMP's dynamic schedule) rather than split evenly up front:
// when another program keeps a core busy, the thread that shares it runs at a fraction of its
// speed and is descheduled for whole time slices, and an even split makes every operation wait
// for that thread's half. With claims, the running thread takes over whatever the late one has
// not started. Each output element is still computed by one thread with the same code, so the
// results stay the same bits whichever thread takes which claim. ~8 claims per thread keep the
// hand-out cost (an atomic increment each) negligible while leaving the late share small.
inline int claim_size(long long n_items, int threads) {
  return static_cast<int>(std::max<long long>(1, n_items / (8LL * threads)));
}

inline int thread_index() {
#if defined(_OPENMP)
  return omp_get_thread_num();
#else
  return 0;
#endif
}

// Scratch of the calling thread, kept between calls (it grows, never shrinks): a multi-MB buffer
// allocated afresh on every call is fresh pages, and page faults, every time. Sized before any
// parallel region (an exception must not escape one). Each calling thread has its own, so
// concurrent calls from several Python threads do not share it. kSlot tells apart the buffers of
// one type that a call holds at the same time; calls never nest, so they may share a slot.
template <typename T, int kSlot>
T* reused_scratch(size_t n) {
  thread_local std::vector<T> buf;
  if (buf.size() < n) buf.resize(n);
  return buf.data();
}

template <typename X, typename W, typename Tile>
void matmul_impl(const X* x, int M, int K, const W* w, int N, const float* bias, float* y,
                 Tile tile, int mr, int nr, int block_k) {
  const int n_tiles = (N + nr - 1) / nr;
  const bool parallel = static_cast<long long>(M) * N * K >= kParallelWork;
  const int threads = get_num_threads(), claim = claim_size(n_tiles, threads);
#pragma omp parallel num_threads(threads) if (parallel)
  for (int m0 = 0; m0 < M; m0 += kBlockM) {
    const int mb = std::min(kBlockM, M - m0);
#pragma omp for schedule(dynamic, claim) nowait
    for (int t = 0; t < n_tiles; ++t) {
      const int n0 = t * nr, nn = std::min(nr, N - n0);
      for (int k0 = 0; k0 < K; k0 += block_k) {
        const int kb = std::min(block_k, K - k0);
        for (int i = 0; i < mb; i += mr)
          tile(x + static_cast<size_t>(m0 + i) * K + k0, K, w + static_cast<size_t>(n0) * K + k0,
               K, y + static_cast<size_t>(m0 + i) * N + n0, N, std::min(mr, mb - i), nn, kb,
               k0 > 0);
      }
      if (bias != nullptr)
        for (int i = 0; i < mb; ++i)
          for (int j = 0; j < nn; ++j) y[static_cast<size_t>(m0 + i) * N + n0 + j] += bias[n0 + j];
    }
  }
}

// fp32 -> bf16 bits, round to nearest even; NaN stays a (quiet) NaN. The same rounding on every
// ISA, so that only the order of the fp32 sums differs between them.
inline uint16_t to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

inline float bf16_value(float f) {
  const uint32_t u = static_cast<uint32_t>(to_bf16(f)) << 16;
  float r;
  std::memcpy(&r, &u, sizeof r);
  return r;
}

// x [M, K] rounded to bf16 and widened back to fp32 (exact), in this thread's scratch: the
// activations of the bf16-weight paths that multiply in fp32.
const float* bf16_rounded(const float* x, int M, int K) {
  const size_t n = static_cast<size_t>(M) * K;
  float* xr = reused_scratch<float, 0>(n);
  for (size_t i = 0; i < n; ++i) xr[i] = bf16_value(x[i]);
  return xr;
}

// Bf16 pair (k, k+1) of row `row` (uint16 [.., K]); k + 1 == K pads with zero.
inline uint32_t bf16_pair(const uint16_t* row, int k, int K) {
  return row[k] | (k + 1 < K ? static_cast<uint32_t>(row[k + 1]) << 16 : 0u);
}

// Many tokens on AVX512-BF16: x is converted once into panels of 12 tokens ([chunk, pair, 12]);
// each thread takes panels of 32 weight rows, packs a block of kPanelPairs pairs of them
// ([pair, 32], in L2) and runs every chunk of a block of tokens over it. Blocks of
// kPanelBlockChunks chunks (~516 tokens, 2 MiB of packed x per block of pairs) keep the tokens
// a panel meets in L3: a 4096-token prompt would otherwise stream all its 32 MiB of packed x
// from memory for every panel.
constexpr int kPanelPairs = 1024;
constexpr int kPanelBlockChunks = 43;

void matmul_bf16_panels(const KernelTable& kt, const float* x, int M, int K, const uint16_t* w,
                        int N, const float* bias, float* y) {
  constexpr int T = kBf16PanelTokens, R = kBf16PanelRows;
  const int P = (K + 1) / 2, n_chunks = (M + T - 1) / T, n_panels = (N + R - 1) / R;
  const int threads = get_num_threads();
  // Scratch allocated outside the parallel regions (see rotary_interleaved).
  uint32_t* xp = reused_scratch<uint32_t, 0>(static_cast<size_t>(n_chunks) * P * T);  // [chunk, pair, token]
  uint32_t* wbuf = reused_scratch<uint32_t, 1>(static_cast<size_t>(threads) * kPanelPairs * R);
#pragma omp parallel num_threads(threads)
  {
#pragma omp for schedule(dynamic, 1)  // (its barrier: every chunk is packed before any is read)
    for (int c = 0; c < n_chunks; ++c)
      kt.bf16_pack_x(x + static_cast<size_t>(c) * T * K, K, std::min(T, M - c * T), K,
                     xp + static_cast<size_t>(c) * P * T);
    uint32_t* buf = wbuf + static_cast<size_t>(thread_index()) * kPanelPairs * R;
    for (int c0 = 0; c0 < n_chunks; c0 += kPanelBlockChunks) {
      const int c1 = std::min(n_chunks, c0 + kPanelBlockChunks);
#pragma omp for schedule(dynamic, 1) nowait
      for (int panel = 0; panel < n_panels; ++panel) {
        const int n0 = panel * R, nn = std::min(R, N - n0);
        for (int p0 = 0; p0 < P; p0 += kPanelPairs) {
          const int np = std::min(kPanelPairs, P - p0);
          if (nn == R && 2 * (p0 + np) <= K) {
            kt.bf16_pack(w + static_cast<size_t>(n0) * K + 2 * p0, K, np, buf);
          } else {  // the last rows of the matrix, or an odd K's last pair
            for (int r = 0; r < R; ++r) {
              const uint16_t* wr = w + static_cast<size_t>(n0 + r) * K;
              for (int p = 0; p < np; ++p)
                buf[static_cast<size_t>(p) * R + r] = r < nn ? bf16_pair(wr, 2 * (p0 + p), K) : 0u;
            }
          }
          for (int c = c0; c < c1; ++c)
            kt.bf16_panel(xp + (static_cast<size_t>(c) * P + p0) * T, buf, np,
                          y + static_cast<size_t>(c) * T * N + n0, N, std::min(T, M - c * T), nn, p0 > 0);
        }
        if (bias != nullptr)
          for (int t = c0 * T; t < std::min(M, c1 * T); ++t)
            for (int j = 0; j < nn; ++j) y[static_cast<size_t>(t) * N + n0 + j] += bias[n0 + j];
      }
    }
  }
}

// 64-byte aligned start inside a scratch buffer allocated 64 bytes longer (for aligned SIMD
// loads, and AMX tile rows: one that straddles two cache lines costs two loads).
template <typename T>
T* align64(T* p) {
  const uintptr_t u = reinterpret_cast<uintptr_t>(p);
  return reinterpret_cast<T*>((u + 63) & ~static_cast<uintptr_t>(63));
}

// Many tokens with the fp32 panel form (kernels.h; AVX2): each thread takes panels of 16 weight
// rows; per block of kF32PanelK columns it packs them once ([kc, 16] fp32, 24 KiB, in L1) and
// runs every tile of 6 tokens of a block of kF32BlockTokens tokens over it (their [192, kc]
// slice of x, 288 KiB, stays in L2; kc from 256 to 512 runs alike, benchmarks/kernel-notes.md).
// Blocks of tokens bound what a panel meets to L2 / L3 for long prompts; the weights are then
// read once per block (a 512-token prompt: 3 times).
constexpr int kF32PanelK = 384;
constexpr int kF32BlockTokens = 32 * kF32PanelTokens;

template <typename W, typename Pack>
void matmul_f32_panels(const KernelTable& kt, Pack pack, const float* x, int M, int K, const W* w,
                       int N, const float* bias, float* y) {
  constexpr int T = kF32PanelTokens, R = kF32PanelRows, kPanelFloats = kF32PanelK * R;
  const int n_panels = (N + R - 1) / R;
  const int threads = get_num_threads();
  // One packed panel per thread, aligned for the kernels' aligned loads (kPanelFloats: 64-byte multiple).
  float* wbuf = align64(reused_scratch<float, 1>(static_cast<size_t>(threads) * kPanelFloats + 16));
  const bool parallel = static_cast<long long>(M) * N * K >= kParallelWork;
#pragma omp parallel num_threads(threads) if (parallel)
  {
    float* buf = wbuf + static_cast<size_t>(thread_index()) * kPanelFloats;
    for (int m0 = 0; m0 < M; m0 += kF32BlockTokens) {
      const int mb = std::min(kF32BlockTokens, M - m0);
#pragma omp for schedule(dynamic, 1) nowait
      for (int panel = 0; panel < n_panels; ++panel) {
        const int n0 = panel * R, nn = std::min(R, N - n0);
        for (int k0 = 0; k0 < K; k0 += kF32PanelK) {
          const int kb = std::min(kF32PanelK, K - k0);
          pack(w + static_cast<size_t>(n0) * K + k0, K, nn, kb, buf);
          if (k0 + kb < K)  // the next block's rows, into L2 while the tiles run
            for (int r = 0; r < nn; ++r)
              for (size_t off = 0; off < kF32PanelK * sizeof(W); off += 64)
                GLM4RT_PREFETCH(reinterpret_cast<const char*>(w + static_cast<size_t>(n0 + r) * K + k0 + kb) + off, 2);
          for (int i = 0; i < mb; i += T)
            kt.f32_panel(x + static_cast<size_t>(m0 + i) * K + k0, K, buf, kb,
                         y + static_cast<size_t>(m0 + i) * N + n0, N, std::min(T, mb - i), nn, k0 > 0);
        }
        if (bias != nullptr)
          for (int i = m0; i < m0 + mb; ++i)
            for (int j = 0; j < nn; ++j) y[static_cast<size_t>(i) * N + n0 + j] += bias[n0 + j];
      }
    }
  }
}

// Many tokens on AMX (kernels.h): x is converted once into bf16 x tiles, [span of `span` k
// blocks][block of 32 tokens][k block in the span][2][16][32], so that a span's tiles for up to
// kAmxTokens tokens are one contiguous block (spread over all of K, the token blocks would sit
// a multiple of L2's set period apart and evict each other). Each thread takes chunks of up to
// kAmxChunkRows weight rows; per chunk and span it packs each 32-row panel's w tiles (16 KiB for
// a span of 8: they stay in L1 while every block of 32 tokens runs over them, their x tiles
// streaming from L2) and accumulates into its [tokens, chunk] fp32 buffer (512 KiB, in L2),
// which goes to y (+ bias) when the chunk is done. Weights are packed (quantized ones
// dequantized to bf16) once per kAmxTokens tokens. The span changes no result (C tiles carry
// fp32 sums from one span to the next unrounded): kAmxKBlocks (8), except for row-major bf16
// weights and at most kAmxFewTokens tokens, which take kAmxKBlocksFewTokens (64): their rows
// are then read 4 KiB at a time rather than 512 bytes, which few tokens need more than they lose
// in L1 reuse; more tokens, and the quantized groups (contiguous already), run faster with 8
// (benchmarks/kernel-notes.md).
constexpr int kAmxTokens = 512;
constexpr int kAmxChunkRows = 256;
constexpr int kAmxKBlocks = 8;
constexpr int kAmxKBlocksFewTokens = 64;
constexpr int kAmxFewTokens = 256;

// span: k blocks per span (see above);
// pack_w(row0, n, b0, kb, wa): the w tiles of rows row0 .. row0 + n (n <= 32), k blocks b0 .. b0 + kb;
// prefetch_w(row0, n, b): prefetches the weights of k block b of those rows into L2.
template <typename PackW, typename PrefetchW>
void matmul_amx(const KernelTable& kt, const float* x, int M, int K, int N, int span, PackW pack_w,
                PrefetchW prefetch_w, const float* bias, float* y) {
  constexpr int B = kAmxBlock;
  constexpr size_t kBlockElems = 2 * kAmxTileElems;  // one k block of 32 tokens or 32 rows
  const int KB = (K + B - 1) / B, n_tb = (M + B - 1) / B;
  const int threads = get_num_threads();
  // Chunks of a multiple of 32 rows, small enough for every thread to get one.
  const int per_thread = (N + threads - 1) / threads;
  const int chunk = std::min(kAmxChunkRows, std::max(B, (per_thread + B - 1) / B * B));
  const int n_chunks = (N + chunk - 1) / chunk;
  const size_t wa_elems = span * kBlockElems, c_elems = static_cast<size_t>(kAmxTokens) * chunk;
  uint16_t* xa = align64(reused_scratch<uint16_t, 0>(static_cast<size_t>(n_tb) * KB * kBlockElems + 32));
  uint16_t* wbuf = align64(reused_scratch<uint16_t, 1>(threads * 2 * wa_elems + 32));
  float* cbuf = align64(reused_scratch<float, 2>(threads * c_elems + 16));
  const bool parallel = static_cast<long long>(M) * N * K >= kParallelWork;
#pragma omp parallel num_threads(threads) if (parallel)
  {
    uint16_t* wa = wbuf + thread_index() * 2 * wa_elems;  // two halves: the unit computed, the next
    float* c = cbuf + thread_index() * c_elems;
    // The x tiles of token block tb, span starting at block b0 (of kb blocks).
    auto x_tiles = [&](int tb, int b0, int kb) { return xa + (static_cast<size_t>(b0) * n_tb + static_cast<size_t>(tb) * kb) * kBlockElems; };
#pragma omp for schedule(static)
    for (int tb = 0; tb < n_tb; ++tb)
      for (int b0 = 0; b0 < KB; b0 += span) {
        const int kb = std::min(span, KB - b0);
        kt.amx_pack_x(x + static_cast<size_t>(tb) * B * K, K, std::min(B, M - tb * B), K, b0, kb, x_tiles(tb, b0, kb));
      }
    kt.amx_begin();
    for (int t0 = 0; t0 < n_tb; t0 += kAmxTokens / B) {  // blocks of up to kAmxTokens tokens
      const int t1 = std::min(n_tb, t0 + kAmxTokens / B);
#pragma omp for schedule(static)
      for (int ch = 0; ch < n_chunks; ++ch) {
        const int n0 = ch * chunk, nn = std::min(chunk, N - n0);
        // Work units (span, panel) in order; each unit's w tiles are packed, one k block at a
        // time, between the tile products of the unit before (into the other half of wa), so
        // that the packing's loads and arithmetic overlap the tile unit's work.
        const int n_panels = (nn + B - 1) / B, n_units = (KB + span - 1) / span * n_panels;
        auto pack_unit = [&](int u, int first, int last) {  // k blocks first .. last of unit u
          const int b0 = u / n_panels * span, p = u % n_panels * B;
          for (int j = first; j < last; ++j)
            pack_w(n0 + p, std::min(B, nn - p), b0 + j, 1, wa + (u % 2) * wa_elems + j * kBlockElems);
        };
        auto unit_blocks = [&](int u) { return std::min(span, KB - u / n_panels * span); };
        pack_unit(0, 0, unit_blocks(0));
        for (int u = 0; u < n_units; ++u) {
          const int b0 = u / n_panels * span, kb = unit_blocks(u), p = u % n_panels * B;
          const int next_kb = u + 1 < n_units ? unit_blocks(u + 1) : 0;
          int packed = 0;
          for (int tb = t0; tb < t1; ++tb) {
            kt.amx_gemm(x_tiles(tb, b0, kb), wa + (u % 2) * wa_elems, kb,
                        c + static_cast<size_t>(tb - t0) * B * chunk + p, chunk, std::min(B, M - tb * B), b0 > 0);
            const int want = next_kb * (tb - t0 + 1) / (t1 - t0);
            pack_unit(u + 1, packed, want);
            packed = want;
            // The weights of the unit after next, one k block per tile product, into L2.
            if (u + 2 < n_units && tb - t0 < unit_blocks(u + 2)) {
              const int u2 = u + 2, p2 = u2 % n_panels * B;
              prefetch_w(n0 + p2, std::min(B, nn - p2), u2 / n_panels * span + (tb - t0));
            }
          }
        }
        for (int i = t0 * B; i < std::min(M, t1 * B); ++i) {
          const float* src = c + static_cast<size_t>(i - t0 * B) * chunk;
          float* dst = y + static_cast<size_t>(i) * N + n0;
          if (bias != nullptr)
            for (int j = 0; j < nn; ++j) dst[j] = src[j] + bias[n0 + j];
          else
            std::copy(src, src + nn, dst);
        }
      }
    }
    kt.amx_end();
  }
}

// ---- the path choice ------------------------------------------------------------------------

// How a matmul runs, by the weights' format, the number of tokens M and what the ISA's table has
// (the thresholds are in ops.h; what each path computes, in the comments of matmul_bf16 and
// qmatmul there).
enum class MatmulPath {
  kTiles,       // dot-form tiles of mr tokens x nr rows over blocks of k (one token: a GEMV)
  kBf16Tiles,   // the same with bf16 x bf16 dot products along whole rows (AVX512-BF16)
  kBf16DotTiles,  // the same tiles for one token too (batch-invariant; no 4-chain GEMV)
  kF32Panels,   // packed panels of 16 weight rows, fp32 FMAs (AVX2)
  kBf16Panels,  // packed panels of 32 weight rows, bf16 pair dot products (AVX512-BF16)
  kAmx,         // AMX tiles, weights packed (quantized ones dequantized) to bf16
  kQuantTiles,  // int8 activations x the packed quantized groups (quant.h)
};
enum class Weights { kF32, kBf16, kQuant };

MatmulPath matmul_path(const KernelTable& kt, Weights w, int M) {
  // Batch-invariant: only the dot-form tiles, whose sums for one token run in the same order for
  // any number of tokens (one token's GEMV included). Panels sum along k in another order, the
  // AVX512-BF16 GEMV in 4 chains where its tiles use 1 (so its dot tiles serve one token too
  // there), and quantized weights on AMX compute another product (bf16 weights), so each would
  // change a token's bits with the batch size.
  if (batch_invariant()) {
    if (w == Weights::kQuant) return MatmulPath::kQuantTiles;
    if (w == Weights::kBf16 && kt.gemm_tile_bf16x_dot != nullptr) return MatmulPath::kBf16DotTiles;
    return MatmulPath::kTiles;
  }
  const bool panels = M >= kPanelMinTokens;
  switch (w) {
    case Weights::kF32:
      return kt.f32_panel != nullptr && panels ? MatmulPath::kF32Panels : MatmulPath::kTiles;
    case Weights::kBf16:
      if (kt.amx_gemm != nullptr && M >= kAmxMinTokensBf16) return MatmulPath::kAmx;
      if (kt.bf16_panel != nullptr && panels) return MatmulPath::kBf16Panels;
      if (kt.f32_panel != nullptr && panels) return MatmulPath::kF32Panels;
      return kt.gemm_tile_bf16x != nullptr ? MatmulPath::kBf16Tiles : MatmulPath::kTiles;
    case Weights::kQuant:
      return kt.amx_gemm != nullptr && M >= kAmxMinTokensQuant ? MatmulPath::kAmx : MatmulPath::kQuantTiles;
  }
  return MatmulPath::kTiles;
}

// How attention runs: decode (one query token, no probabilities asked for), the AMX split
// products (prompts on AMX, kernels.h), or the fp32 kernels.
enum class AttentionPath { kDecode, kAmx, kF32 };

// Keys 0 .. visible_keys(a) - 1 are visible (by causality) to at least one query.
int visible_keys(const AttentionArgs& a) {
  int64_t last = -1;
  for (int t = 0; t < a.n_queries; ++t) last = std::max(last, a.q_pos[t]);
  return static_cast<int>(std::clamp<int64_t>(last + 1, 0, a.n_keys));
}

AttentionPath attention_path(const KernelTable& kt, const AttentionArgs& a) {
  // The decode kernel computes each query on its own (batch-invariant: the same bits whatever
  // the other queries of the call); rows of several sequences (q_slot) only run there.
  if (a.probs == nullptr && (a.n_queries == 1 || a.q_slot != nullptr || batch_invariant()))
    return AttentionPath::kDecode;
  if (kt.amx_attn_rows != nullptr && a.probs == nullptr && a.n_queries >= kAmxMinQueriesAttn &&
      a.head_dim % 32 == 0 && visible_keys(a) >= kAmxMinKeysAttn)
    return AttentionPath::kAmx;
  return AttentionPath::kF32;
}

}  // namespace

void matmul_f32(const float* x, int M, int K, const float* w, int N, const float* bias, float* y) {
  const KernelTable& kt = kernels();
  if (matmul_path(kt, Weights::kF32, M) == MatmulPath::kF32Panels)
    matmul_f32_panels(kt, kt.f32_pack, x, M, K, w, N, bias, y);
  else
    matmul_impl(x, M, K, w, N, bias, y, kt.gemm_tile_f32, kt.mr, kt.nr, kBlockK);
}

void matmul_bf16(const float* x, int M, int K, const uint16_t* w, int N, const float* bias,
                 float* y) {
  const KernelTable& kt = kernels();
  const MatmulPath path = matmul_path(kt, Weights::kBf16, M);
  switch (path) {
    case MatmulPath::kAmx:
      matmul_amx(kt, x, M, K, N, M <= kAmxFewTokens ? kAmxKBlocksFewTokens : kAmxKBlocks,
                 [&](int row0, int n, int b0, int kb, uint16_t* wa) {
        kt.amx_pack_bf16(w + static_cast<size_t>(row0) * K, K, n, K, b0, kb, wa);
      }, [&](int row0, int n, int b) {  // 64 bytes of each row (w rows are not 64-byte aligned: 2 lines)
        for (int r = 0; r < n; ++r) {
          const char* p = reinterpret_cast<const char*>(w + static_cast<size_t>(row0 + r) * K + 32 * b);
          GLM4RT_PREFETCH(p, 2);
          GLM4RT_PREFETCH(p + 63, 2);
        }
      }, bias, y);
      break;
    case MatmulPath::kBf16Panels:
      matmul_bf16_panels(kt, x, M, K, w, N, bias, y);
      break;
    case MatmulPath::kF32Panels:
      matmul_f32_panels(kt, kt.f32_pack_bf16, bf16_rounded(x, M, K), M, K, w, N, bias, y);
      break;
    case MatmulPath::kBf16Tiles:
    case MatmulPath::kBf16DotTiles: {
      const size_t n = static_cast<size_t>(M) * K;
      uint16_t* xb = reused_scratch<uint16_t, 0>(n);
      for (size_t i = 0; i < n; ++i) xb[i] = to_bf16(x[i]);
      matmul_impl(xb, M, K, w, N, bias, y,
                  path == MatmulPath::kBf16Tiles ? kt.gemm_tile_bf16x : kt.gemm_tile_bf16x_dot, kt.mr, kt.nr, K);
      break;
    }
    default:  // the same products in fp32
      matmul_impl(bf16_rounded(x, M, K), M, K, w, N, bias, y, kt.gemm_tile_bf16, kt.mr, kt.nr, kBlockK);
  }
}

void qmatmul(QFormat f, const float* x, int M, int K, const uint8_t* packed, int N,
             const float* bias, float* y) {
  const KernelTable& kt = kernels();
  const int nb = q_blocks(K), Kp = nb * kQBlock, n_groups = q_groups(N);
  const size_t block_bytes = q_block_bytes(f), group_bytes = q_group_bytes(f, K);
  if (matmul_path(kt, Weights::kQuant, M) == MatmulPath::kAmx) {  // bf16 activations x weights dequantized to bf16
    const AmxPackQ pack = f == QFormat::Int8 ? kt.amx_pack_int8 : kt.amx_pack_int4;
    matmul_amx(kt, x, M, K, N, kAmxKBlocks, [&](int row0, int, int b0, int kb, uint16_t* wa) {
      const int g = row0 / kQGroupRows;
      if (f == QFormat::Q4K)
        kt.amx_pack_q4k(packed + g * group_bytes, group_bytes, std::min(2, n_groups - g), nb, b0, kb, wa);
      else
        pack(packed + g * group_bytes, group_bytes, std::min(2, n_groups - g), b0, kb, wa);
    }, [&](int row0, int n, int b) {
      for (int g = row0 / kQGroupRows; g < (row0 + n + kQGroupRows - 1) / kQGroupRows; ++g)
        for (size_t off = 0; off < block_bytes; off += 64)
          GLM4RT_PREFETCH(packed + g * group_bytes + b * block_bytes + off, 2);
    }, bias, y);
    return;
  }
  int8_t* xq = reused_scratch<int8_t, 0>(static_cast<size_t>(M) * Kp);    // [M, Kp]
  float* xs = reused_scratch<float, 0>(static_cast<size_t>(M) * nb);       // [M, nb]
  int32_t* xsum = reused_scratch<int32_t, 0>(static_cast<size_t>(M) * nb); // [M, nb]
  quantize_acts(x, M, K, xq, xs, xsum);  // writes every element, the padding of K too
  const QGemmTile tile = f == QFormat::Int8 ? kt.qgemm_int8 : f == QFormat::Int4 ? kt.qgemm_int4 : kt.qgemm_q4k;
  const int mt = kt.qmt;
  const bool parallel = static_cast<long long>(M) * N * K >= kParallelWork;
  // One token (decode): pairs of groups per tile share the activation broadcasts.
  const int groups_per_tile = M == 1 ? 2 : 1;
  const int n_tiles = (n_groups + groups_per_tile - 1) / groups_per_tile;
  const int threads = get_num_threads(), claim = claim_size(n_tiles, threads);
#pragma omp parallel num_threads(threads) if (parallel)
  for (int m0 = 0; m0 < M; m0 += kBlockM) {  // a block of tokens stays in L2 across all groups
    const int mb = std::min(kBlockM, M - m0);
#pragma omp for schedule(dynamic, claim) nowait
    for (int t = 0; t < n_tiles; ++t) {
      const int g = t * groups_per_tile;
      const int rows = std::min(kQGroupRows * groups_per_tile, N - g * kQGroupRows);
      float* yg = y + static_cast<size_t>(m0) * N + static_cast<size_t>(g) * kQGroupRows;
      for (int i = 0; i < mb; i += mt)
        tile(packed + g * group_bytes, group_bytes, std::min(groups_per_tile, n_groups - g), nb,
             xq + static_cast<size_t>(m0 + i) * Kp, xs + static_cast<size_t>(m0 + i) * nb,
             xsum + static_cast<size_t>(m0 + i) * nb, Kp, nb, std::min(mt, mb - i),
             yg + static_cast<size_t>(i) * N, N, rows);
      if (bias != nullptr)
        for (int i = 0; i < mb; ++i)
          for (int r = 0; r < rows; ++r) yg[static_cast<size_t>(i) * N + r] += bias[g * kQGroupRows + r];
    }
  }
}

void quantize_pack(QFormat f, const float* w_f32, const uint16_t* w_bf16, int N, int K, int row0,
                   int n_rows, uint8_t* packed, const float* importance) {
  const int nb = q_blocks(K);
  const size_t bb = q_block_bytes(f), gb = q_group_bytes(f, K);
  const int g0 = row0 / kQGroupRows, g1 = q_groups(row0 + n_rows);
  const QuantizeInt4 quantize_int4 = kernels().quantize_int4;  // the references or their SIMD twins
  const QuantizeQ4K quantize_q4k = kernels().quantize_q4k;
  // Blocks at a time: one, or a q4k super-block (its sub-scales share the header's D and M).
  const int step = f == QFormat::Q4K ? kQ4KSuper : 1;
#pragma omp parallel for num_threads(get_num_threads()) schedule(dynamic, 1)
  for (int g = g0; g < g1; ++g) {
    uint8_t* group = packed + static_cast<size_t>(g) * gb;
    for (int b0 = 0; b0 < nb; b0 += step) {
      const int kb = std::min(step, nb - b0);
      // wt [kb * 32][16]: the blocks' weights k-major, zeros past the matrix and past K
      float wt[kQ4KSuper * kQBlock * kQGroupRows] = {};
      float v[kQ4KSuper * kQBlock];  // importance, 0 past K
      for (int k = 0; k < kb * kQBlock; ++k)
        v[k] = b0 * kQBlock + k >= K ? 0.0f : importance != nullptr ? importance[b0 * kQBlock + k] : 1.0f;
      for (int r = 0; r < kQGroupRows; ++r) {
        const int row = g * kQGroupRows + r;
        if (row >= N || row >= row0 + n_rows) continue;
        for (int k = 0; k < kb * kQBlock && b0 * kQBlock + k < K; ++k) {
          const size_t idx = static_cast<size_t>(row - row0) * K + b0 * kQBlock + k;
          if (w_f32 != nullptr) {
            wt[k * kQGroupRows + r] = w_f32[idx];
          } else {
            const uint32_t bits = static_cast<uint32_t>(w_bf16[idx]) << 16;
            std::memcpy(&wt[k * kQGroupRows + r], &bits, sizeof bits);
          }
        }
      }
      uint8_t* blk = group + static_cast<size_t>(b0) * bb;
      if (f == QFormat::Q4K)
        quantize_q4k(wt, kb, v, reinterpret_cast<Q4KBlock*>(blk),
                               group + static_cast<size_t>(nb) * bb + static_cast<size_t>(b0 / kQ4KSuper) * kQ4KHeaderBytes);
      else if (f == QFormat::Int4)
        quantize_int4(wt, reinterpret_cast<Q4Block*>(blk));
      else
        quantize_int8_group_ref(wt, reinterpret_cast<Q8Block*>(blk));
    }
  }
}

void quantize_acts(const float* x, int M, int K, int8_t* q, float* scale, int32_t* sum) {
  const int nb = q_blocks(K);
  const size_t Kp = static_cast<size_t>(nb) * kQBlock;
#pragma omp parallel for num_threads(get_num_threads()) schedule(dynamic) if (static_cast<long long>(M) * K >= (1 << 16))
  for (int m = 0; m < M; ++m)
    quantize_acts_row_ref(x + static_cast<size_t>(m) * K, K, q + m * Kp, scale + static_cast<size_t>(m) * nb,
                          sum + static_cast<size_t>(m) * nb);
}

void rms_norm(const float* x, const float* weight, float* y, int M, int H, float eps) {
  const KernelTable& kt = kernels();
  const int threads = get_num_threads();
#pragma omp parallel for num_threads(threads) schedule(dynamic, claim_size(M, threads)) \
    if (static_cast<long long>(M) * H >= kParallelWork)
  for (int m = 0; m < M; ++m) {
    const float* xr = x + static_cast<size_t>(m) * H;
    float* yr = y + static_cast<size_t>(m) * H;
    const float mean_sq = kt.dot_f32(xr, xr, H) / static_cast<float>(H);
    const float inv_rms = 1.0f / std::sqrt(mean_sq + eps);
    for (int i = 0; i < H; ++i) yr[i] = weight[i] * (xr[i] * inv_rms);
  }
}

void rotary_interleaved(float* x, int n_tokens, int n_heads, int head_dim, const int64_t* pos,
                        const float* inv_freq, int rot_dim) {
  const int half = rot_dim / 2;
  const int threads = get_num_threads();
  // Scratch is allocated here, not inside the parallel region: an exception (bad_alloc) must not
  // escape an OpenMP region, where it would terminate the process.
  std::vector<float> scratch(static_cast<size_t>(threads) * 2 * half);  // [threads, cos|sin, half]
#pragma omp parallel num_threads(threads) if (static_cast<long long>(n_tokens) * n_heads * head_dim >= kParallelWork)
  {
    float* cos_t = scratch.data() + static_cast<size_t>(thread_index()) * 2 * half;
    float* sin_t = cos_t + half;
#pragma omp for schedule(dynamic, claim_size(n_tokens, threads))
    for (int t = 0; t < n_tokens; ++t) {
      for (int i = 0; i < half; ++i) {
        const float angle = static_cast<float>(pos[t]) * inv_freq[i];  // fp32, as transformers
        cos_t[i] = std::cos(angle);
        sin_t[i] = std::sin(angle);
      }
      for (int h = 0; h < n_heads; ++h) {
        float* xh = x + (static_cast<size_t>(t) * n_heads + h) * head_dim;
        for (int i = 0; i < half; ++i) {  // adjacent pairs (2i, 2i+1), not NeoX halves
          const float x0 = xh[2 * i], x1 = xh[2 * i + 1];
          xh[2 * i] = x0 * cos_t[i] - x1 * sin_t[i];
          xh[2 * i + 1] = x1 * cos_t[i] + x0 * sin_t[i];
        }
      }
    }
  }
}

void silu_mul(const float* gate_up, float* out, int M, int I) {
  const KernelTable& kt = kernels();
  const int threads = get_num_threads();
#pragma omp parallel for num_threads(threads) schedule(dynamic, claim_size(M, threads)) \
    if (static_cast<long long>(M) * I >= kParallelWork)
  for (int m = 0; m < M; ++m) {
    const float* gate = gate_up + static_cast<size_t>(m) * 2 * I;
    kt.silu_mul(gate, gate + I, out + static_cast<size_t>(m) * I, I);
  }
}

// Queries per attention work item: the rows of kAttnQueries consecutive tokens x the query heads
// of one kv head share every transposed key block and every V row read.
constexpr int kAttnQueries = 4;

// Decoding (one query token, no probabilities asked for; or every query, each on its own, when
// batch-invariant): per (sequence, query, kv head, range of kDecodeSplitKeys keys) one
// attn_decode call, which reads each K and V row once for the whole group of query heads; then
// the ranges are merged by their softmax statistics. Ranges split a long context between the
// threads even when there are fewer kv heads than threads; their size is fixed, so the result
// does not depend on the thread count, nor on the other queries.
constexpr int kDecodeSplitKeys = 1024;

void attention_decode(const KernelTable& kt, const AttentionArgs& a) {
  const int group = a.n_heads / a.n_kv_heads, d = a.head_dim, S = a.n_keys, T = a.n_queries;
  auto n_vis = [&](int t) {  // causal: keys 0 .. q_pos
    return static_cast<int>(std::clamp<int64_t>(a.q_pos[t] + 1, 0, S));
  };
  auto splits = [](int vis) { return std::max(1, (vis + kDecodeSplitKeys - 1) / kDecodeSplitKeys); };
  const int n_splits = splits(visible_keys(a));  // per query: the most any query needs
  const long long n_items = static_cast<long long>(a.batch) * T * a.n_kv_heads * n_splits;
  const size_t per_item = static_cast<size_t>(group) * (d + 2);  // out [group, d], m [group], l [group]
  float* part = reused_scratch<float, 0>(static_cast<size_t>(n_items) * per_item);
  const long long n_rows = static_cast<long long>(a.batch) * T * a.n_heads;
  const int threads = get_num_threads();
#pragma omp parallel num_threads(threads) if (static_cast<long long>(a.batch) * T * S * d * a.n_heads >= kParallelWork)
  {
#pragma omp for schedule(dynamic, 1)
    for (long long item = 0; item < n_items; ++item) {
      const int split = static_cast<int>(item % n_splits);
      const long long btg = item / n_splits;  // (b * T + t) * n_kv_heads + g
      const int g = static_cast<int>(btg % a.n_kv_heads);
      const long long bt = btg / a.n_kv_heads;
      const int b = static_cast<int>(bt / T), t = static_cast<int>(bt % T);
      const int vis = n_vis(t);
      if (split >= splits(vis)) continue;  // past this query's keys (the merge skips it)
      const int s0 = split * kDecodeSplitKeys, ns = std::max(0, std::min(kDecodeSplitKeys, vis - s0));
      const int64_t seq = a.q_slot != nullptr ? a.q_slot[t] : b;  // the cache sequence
      const size_t kv_off = ((static_cast<size_t>(seq) * a.n_kv_heads + g) * a.capacity + s0) * d;
      float* out = part + static_cast<size_t>(item) * per_item;
      kt.attn_decode(a.q + (static_cast<size_t>(bt) * a.n_heads + static_cast<size_t>(g) * group) * d, group,
                     a.k + kv_off, a.v + kv_off, ns, d,
                     a.key_mask ? a.key_mask + static_cast<size_t>(b) * S + s0 : nullptr, a.scale,
                     out, out + static_cast<size_t>(group) * d, out + static_cast<size_t>(group) * (d + 1));
    }
    // Merge: out_h = sum_i e^(m_i - M) out_i / sum_i e^(m_i - M) l_i, M = max_i m_i; zeros
    // for a head that sees no key.
#pragma omp for schedule(dynamic, claim_size(n_rows, threads))
    for (long long row = 0; row < n_rows; ++row) {  // row = (b * T + t) * n_heads + head
      const int head = static_cast<int>(row % a.n_heads), h = head % group;
      const long long bt = row / a.n_heads;
      const int ns = splits(n_vis(static_cast<int>(bt % T)));
      const long long first = (bt * a.n_kv_heads + head / group) * n_splits;
      const float* p0 = part + static_cast<size_t>(first) * per_item;
      float M = -std::numeric_limits<float>::infinity();
      for (int i = 0; i < ns; ++i) M = std::max(M, p0[i * per_item + static_cast<size_t>(group) * d + h]);
      float* dst = a.out + static_cast<size_t>(row) * d;
      std::fill(dst, dst + d, 0.0f);
      if (M == -std::numeric_limits<float>::infinity()) continue;
      float L = 0.0f;
      for (int i = 0; i < ns; ++i) {
        const float* pi = p0 + i * per_item;
        const float w = std::exp(pi[static_cast<size_t>(group) * d + h] - M);  // 0 for a range with no visible key
        L += w * pi[static_cast<size_t>(group) * (d + 1) + h];
        for (int c = 0; c < d; ++c) dst[c] += w * pi[static_cast<size_t>(h) * d + c];
      }
      const float inv = 1.0f / L;
      for (int c = 0; c < d; ++c) dst[c] *= inv;
    }
  }
}

// Prompts on AMX (kernels.h: the split products are as exact as fp32): K and V of every
// (sequence, kv head) are packed once into blocks of 32 keys, then each work item -- up to
// kAmxAttnRows query rows (token, head) of one kv head, the group's heads of consecutive tokens --
// runs an online softmax over the key blocks its rows see. Items are taken longest first (the
// last tokens see the most keys) by whichever thread is free; an item's result does not depend
// on the thread that computes it.
void attention_amx(const KernelTable& kt, const AttentionArgs& a) {
  const int group = a.n_heads / a.n_kv_heads, d = a.head_dim, S = a.n_keys, T = a.n_queries;
  const int n_vis = visible_keys(a);
  const int n_kb = (n_vis + 31) / 32, n_bg = a.batch * a.n_kv_heads;
  const size_t block = amx_attn_block_elems(d);
  const int rows = T * group, n_chunks = (rows + kAmxAttnRows - 1) / kAmxAttnRows;
  const long long n_items = static_cast<long long>(n_bg) * n_chunks;
  const int threads = get_num_threads();
  const size_t scratch_bytes = (amx_attn_scratch_bytes(d) + 63) / 64 * 64;
  uint16_t* kv = reused_scratch<uint16_t, 0>(2 * static_cast<size_t>(n_bg) * n_kb * block);  // [bg][K | V][block]
  unsigned char* scratch = align64(reused_scratch<unsigned char, 0>(threads * scratch_bytes + 64));
#pragma omp parallel num_threads(threads)
  {
#pragma omp for schedule(static)
    for (long long i = 0; i < static_cast<long long>(n_bg) * n_kb; ++i) {
      const int bg = static_cast<int>(i / n_kb), kb = static_cast<int>(i % n_kb);
      const size_t off = (static_cast<size_t>(bg) * a.capacity + 32 * kb) * d;
      uint16_t* dst = kv + (static_cast<size_t>(bg) * 2 * n_kb + kb) * block;
      kt.amx_attn_pack(a.k + off, a.v + off, std::min(32, S - 32 * kb), d, dst, dst + n_kb * block);
    }
    const float* q_rows[kAmxAttnRows];
    float* out_rows[kAmxAttnRows];
    int row_vis[kAmxAttnRows];
    kt.amx_begin();
#pragma omp for schedule(dynamic, 1)
    for (long long item = 0; item < n_items; ++item) {
      const int bg = static_cast<int>(item % n_bg), chunk = n_chunks - 1 - static_cast<int>(item / n_bg);
      const int b = bg / a.n_kv_heads, g = bg % a.n_kv_heads;
      const int r0 = chunk * kAmxAttnRows, nr = std::min(kAmxAttnRows, rows - r0);
      for (int i = 0; i < nr; ++i) {  // row r = (token r / group, head g * group + r % group)
        const int t = (r0 + i) / group, h = g * group + (r0 + i) % group;
        const size_t off = ((static_cast<size_t>(b) * T + t) * a.n_heads + h) * d;
        q_rows[i] = a.q + off;
        out_rows[i] = a.out + off;
        row_vis[i] = static_cast<int>(std::clamp<int64_t>(a.q_pos[t] + 1, 0, S));
      }
      const uint16_t* ka = kv + static_cast<size_t>(bg) * 2 * n_kb * block;
      AmxAttnRows args{q_rows, out_rows, row_vis, nr, ka, ka + n_kb * block,
                       a.key_mask ? a.key_mask + static_cast<size_t>(b) * S : nullptr, d, a.scale,
                       scratch + thread_index() * scratch_bytes};
      kt.amx_attn_rows(args);
    }
    kt.amx_end();
  }
}

void attention(const AttentionArgs& a) {
  const KernelTable& kt = kernels();
  switch (attention_path(kt, a)) {
    case AttentionPath::kDecode:
      attention_decode(kt, a);
      return;
    case AttentionPath::kAmx:
      attention_amx(kt, a);
      return;
    case AttentionPath::kF32:
      break;
  }
  const int group = a.n_heads / a.n_kv_heads;  // query heads sharing one kv head
  const int d = a.head_dim, S = a.n_keys;
  const int n_tblocks = (a.n_queries + kAttnQueries - 1) / kAttnQueries;
  const long long n_items = static_cast<long long>(a.batch) * a.n_kv_heads * n_tblocks;
  const float neg_inf = -std::numeric_limits<float>::infinity();
  const int threads = get_num_threads();
  const int max_rows = kAttnQueries * group;
  // Per thread: scores [rows, S], q rows [rows, d], outputs [rows, d].
  const size_t per_thread = static_cast<size_t>(max_rows) * (S + 2 * d);
  float* scratch = reused_scratch<float, 0>(static_cast<size_t>(threads) * per_thread);
#pragma omp parallel num_threads(threads) if (static_cast<long long>(a.batch) * a.n_queries * S * d * a.n_heads >= kParallelWork)
  {
    float* scores = scratch + static_cast<size_t>(thread_index()) * per_thread;
    float* qbuf = scores + static_cast<size_t>(max_rows) * S;
    float* obuf = qbuf + static_cast<size_t>(max_rows) * d;
#pragma omp for schedule(dynamic, 1)
    for (long long item = 0; item < n_items; ++item) {
      const int tb = static_cast<int>(item % n_tblocks);
      const int g = static_cast<int>((item / n_tblocks) % a.n_kv_heads);
      const int b = static_cast<int>(item / (static_cast<long long>(n_tblocks) * a.n_kv_heads));
      const int t0 = tb * kAttnQueries, nt = std::min(kAttnQueries, a.n_queries - t0);
      const int rows = nt * group;  // row r = (token t0 + r / group, head g * group + r % group)
      const size_t kv_off = (static_cast<size_t>(b) * a.n_kv_heads + g) * a.capacity * d;
      const float* kb = a.k + kv_off;  // [capacity, d]
      const float* vb = a.v + kv_off;
      const uint8_t* mask = a.key_mask ? a.key_mask + static_cast<size_t>(b) * S : nullptr;
      // q, out of (token t, head h): [B, T, n_heads, d]; the group's heads are consecutive.
      auto head_row = [&](int t) { return ((static_cast<size_t>(b) * a.n_queries + t) * a.n_heads + g * group) * d; };
      int n_vis = 0;  // keys 0 .. n_vis-1 are visible to at least one query of the block
      for (int i = 0; i < nt; ++i) {
        std::copy(a.q + head_row(t0 + i), a.q + head_row(t0 + i) + static_cast<size_t>(group) * d,
                  qbuf + static_cast<size_t>(i) * group * d);
        n_vis = std::max(n_vis, static_cast<int>(std::min<int64_t>(a.q_pos[t0 + i], S - 1)) + 1);
      }
      // Scores [rows, n_vis] (each key row read once for all rows), then the causal and padding
      // masks and the scale; softmax per row (a row with no visible key gets all zeros).
      kt.attn_qk(qbuf, d, rows, kb, n_vis, d, scores, S);
      for (int r = 0; r < rows; ++r) {
        const int64_t last = a.q_pos[t0 + r / group];  // causal limit of this row's token
        float* sr = scores + static_cast<size_t>(r) * S;
        for (int s = 0; s < n_vis; ++s)
          sr[s] = s <= last && (mask == nullptr || mask[s] != 0) ? sr[s] * a.scale : neg_inf;
        kt.softmax(sr, n_vis);  // keys from n_vis on are invisible to the whole block
        if (a.probs != nullptr) std::fill(sr + n_vis, sr + S, 0.0f);
      }
      // out [rows, d] = probs [rows, n_vis] @ V [n_vis, d]
      kt.attn_pv(scores, S, rows, vb, n_vis, d, obuf);
      for (int i = 0; i < nt; ++i)
        std::copy(obuf + static_cast<size_t>(i) * group * d, obuf + static_cast<size_t>(i + 1) * group * d,
                  a.out + head_row(t0 + i));
      if (a.probs != nullptr)
        for (int r = 0; r < rows; ++r) {
          const int t = t0 + r / group, h = g * group + r % group;
          float* dst = a.probs + ((static_cast<size_t>(b) * a.n_heads + h) * a.n_queries + t) * S;
          std::copy(scores + static_cast<size_t>(r) * S, scores + static_cast<size_t>(r + 1) * S, dst);
        }
    }
  }
}

uint64_t stream_read(const uint8_t* data, size_t n_bytes) {
  const KernelTable& kt = kernels();
  const size_t n_lines = n_bytes / 64;
  uint64_t total = 0;
#pragma omp parallel num_threads(get_num_threads()) reduction(^ : total)
  {
#if defined(_OPENMP)
    const size_t t = static_cast<size_t>(omp_get_thread_num()), n = static_cast<size_t>(omp_get_num_threads());
#else
    const size_t t = 0, n = 1;
#endif
    const size_t begin = n_lines * t / n, end = n_lines * (t + 1) / n;  // one contiguous slice each
    total ^= kt.read_xor(data + begin * 64, (end - begin) * 64);
  }
  for (size_t i = n_lines * 64; i < n_bytes; ++i) total ^= data[i];
  return total;
}

}  // namespace glm4rt
