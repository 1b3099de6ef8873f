// ISA-neutral kernel drivers: OpenMP threading, cache tiling, and the transformer ops built on the
// primitives of the active KernelTable. No model logic here; every pointer is only used during
// the call. Shapes are row-major; [a, b] means b is contiguous.
#pragma once
#include <cstddef>
#include <cstdint>

#include "quant.h"

namespace glm4rt {

// The thresholds of the path choice (ops.cpp, matmul_path and attention_path); the measurements
// behind them are in benchmarks/kernel-notes.md.
// From this many tokens on, matmuls run on packed weight panels where the ISA has them: below,
// packing a panel costs about as much as a few tokens' products in the dot form.
constexpr int kPanelMinTokens = 16;
// From this many tokens on, matmul_bf16 and qmatmul run on the AMX tiles where the ISA has them.
// Quantized weights are dequantized to bf16 on every call, which fewer tokens do not repay.
constexpr int kAmxMinTokensBf16 = 16;
constexpr int kAmxMinTokensQuant = 40;
// From this many query tokens and visible keys on (and without probabilities asked for), attention
// runs on the AMX tiles as split products, as exact as fp32 (kernels.h), where the ISA has them:
// fewer do not repay packing K and V into tiles and the three-part products.
constexpr int kAmxMinQueriesAttn = 16;
constexpr int kAmxMinKeysAttn = 128;

// y[M, N] = x[M, K] @ w[N, K]^T (+ bias[N]). fp32 accumulation.
void matmul_f32(const float* x, int M, int K, const float* w, int N, const float* bias, float* y);
// bf16 weights (raw uint16 bit patterns) with bf16 activations: y = sum_k bf16(x[m, k]) * w[n, k]
// (x rounded to nearest even), products exact, sums fp32 -- on every ISA; AVX512-BF16 runs it
// with vdpbf16ps. (For fp32 activations, widen the weights and use matmul_f32.)
void matmul_bf16(const float* x, int M, int K, const uint16_t* w, int N, const float* bias,
                 float* y);

// y[M, N] = x[M, K] @ W^T (+ bias) for a packed quantized W [N, K] (quant.h): the activations are
// quantized to int8 per block of 32, then integer dot products, fp32 accumulation across blocks.
// On AMX CPUs (the "amx" ISA), from kAmxMinTokensQuant tokens on, it computes instead what
// matmul_bf16 computes for the dequantized weights rounded to bf16 (bf16(d * q), nearest even):
// the tile unit multiplies bf16 there without rescaling every block of 32, and it is the more
// exact product (an activation rounded to bf16 errs far less than one quantized to int8 per block).
void qmatmul(QFormat f, const float* x, int M, int K, const uint8_t* packed, int N,
             const float* bias, float* y);

// Quantize rows [row0, row0 + n_rows) of an [N, K] matrix into `packed` (the whole matrix's
// buffer of q_packed_bytes), block by block with the active table's quantize_int4 (int4) or
// quantize_int8_group_ref (int8), super-block by super-block with quantize_q4k_super_ref (q4k,
// weighting weight k's error by importance[k] where given; null = all 1). Exactly one of w_f32 /
// w_bf16 is given and points at row row0. row0 must be a multiple of kQGroupRows; rows past N in
// the last group are zero.
void quantize_pack(QFormat f, const float* w_f32, const uint16_t* w_bf16, int N, int K, int row0,
                   int n_rows, uint8_t* packed, const float* importance = nullptr);

// Activations quantized for the integer dot products, quantize_acts_row_ref (quant.h) per token:
//   q [M, n_blocks * 32] (zero past K), scale [M, n_blocks], sum [M, n_blocks]
void quantize_acts(const float* x, int M, int K, int8_t* q, float* scale, int32_t* sum);

// y[M, H] = weight * (x * rsqrt(mean(x^2) + eps)); statistics in fp32; y may alias x.
void rms_norm(const float* x, const float* weight, float* y, int M, int H, float eps);

// In place on x[n_tokens, n_heads, head_dim]: interleaved (GPT-J) rotary on the first rot_dim
// dims of each head, angle[t, i] = float(pos[t]) * inv_freq[i] for i < rot_dim / 2.
void rotary_interleaved(float* x, int n_tokens, int n_heads, int head_dim, const int64_t* pos,
                        const float* inv_freq, int rot_dim);

// out[M, I] = gate_up[M, I:2I] * silu(gate_up[M, :I])
void silu_mul(const float* gate_up, float* out, int M, int I);

// Causal attention with grouped KV heads over a cache.
//   q     [B, T, n_heads, d]          k, v [B, n_kv_heads, capacity, d] (first n_keys rows valid)
//   q_pos [T] cache position of each query: key s is visible iff s <= q_pos[t]
//   key_mask [B, n_keys] 1 = attend, 0 = padding (nullptr: all keys)
//   out   [B, T, n_heads, d]          probs [B, n_heads, T, n_keys] or nullptr
// A query with no visible key gets zeros. Scores, softmax and sums in fp32 (on AMX, prompts of
// kAmxMinQueriesAttn tokens on: products of bf16 parts that add up to the fp32 values, kernels.h).
// Rows of several sequences (the serving engine's batch): with q_slot, q and out are
// [1, n_rows, n_heads, d], query t belongs to cache sequence q_slot[t] of k and v
// [n_sequences, n_kv_heads, capacity, d] and sees its keys 0 .. q_pos[t] (no key_mask, no probs).
// Each query then runs on its own (the decode kernel), as in batch-invariant mode.
struct AttentionArgs {
  const float* q;
  const float* k;
  const float* v;
  const int64_t* q_pos;
  const int64_t* q_slot;  // nullptr: query t of sequence b reads sequence b's keys
  const uint8_t* key_mask;
  float* out;
  float* probs;
  int batch, n_queries, n_heads, n_kv_heads, head_dim, capacity, n_keys;
  float scale;
};
void attention(const AttentionArgs& a);

// Reads n_bytes from data with all threads (each thread a contiguous slice) and returns a checksum,
// so the memory system's read bandwidth can be measured with the same threads the kernels use.
uint64_t stream_read(const uint8_t* data, size_t n_bytes);

}  // namespace glm4rt
