// The table of ISA-specific primitives. Every ISA (generic, avx2, avx512) fills one table;
// dispatch.cpp picks one at import time. The drivers in ops.cpp (threads, tiling, attention,
// norms) are ISA-neutral and call through this table.
#pragma once
#include <cstddef>
#include <cstdint>

namespace glm4rt {

// C[m, n] (+)= sum_k X[m, k] * W[n, k]  for a tile of m <= mr tokens and n <= nr weight rows.
//   x: [m, k] with row stride ldx     w: [n, k] with row stride ldw     c: [m, n] with row stride ldc
// accumulate=false overwrites C, true adds to it (used for blocks of k after the first).
using GemmTileF32 = void (*)(const float* x, size_t ldx, const float* w, size_t ldw, float* c,
                             size_t ldc, int m, int n, int k, bool accumulate);
// Same with bf16 weights (raw uint16 bit patterns), widened to fp32 exactly; fp32 accumulation.
using GemmTileBF16 = void (*)(const float* x, size_t ldx, const uint16_t* w, size_t ldw, float* c,
                              size_t ldc, int m, int n, int k, bool accumulate);
// sum_i a[i] * b[i]
using DotF32 = float (*)(const float* a, const float* b, int n);
// y[i] += alpha * x[i]
using AxpyF32 = void (*)(float alpha, const float* x, float* y, int n);

struct KernelTable {
  const char* name;  // "generic", "avx2", "avx512"
  int mr;            // tokens per gemm tile
  int nr;            // weight rows per gemm tile
  GemmTileF32 gemm_tile_f32;
  GemmTileBF16 gemm_tile_bf16;
  DotF32 dot_f32;
  AxpyF32 axpy_f32;
};

// One function per ISA file; each returns its static table.
const KernelTable& generic_kernels();
#if defined(GLM4RT_X86)
const KernelTable& avx2_kernels();
const KernelTable& avx512_kernels();
#endif

}  // namespace glm4rt
