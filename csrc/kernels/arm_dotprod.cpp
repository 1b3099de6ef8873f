// ARM64 with the dot product instructions (FEAT_DotProd, Armv8.2 optional, every Armv8.4 CPU:
// Cortex-A76 / Neoverse N1 and later, Apple M1 and later): the NEON table with SDOT quantized
// tiles (arm_dotprod_impl.h). Compiled with -march=armv8.2-a+dotprod, chosen only where the CPU
// says it has the instructions (dispatch.cpp).
#include "../kernels.h"
#include "../quant.h"
#include "arm_dotprod_impl.h"

namespace glm4rt {
namespace {

template <QFormat F>
void qgemm_tile(const uint8_t* group, size_t group_bytes, int n_groups, int n_blocks, const int8_t* xq,
                const float* xs, const int32_t* xsum, size_t ldq, size_t lds, int mt, float* y, size_t ldy,
                int rows) {
  arm_quant::for_each_group(group, group_bytes, n_groups, y, rows, [&](const uint8_t* gp, float* yg, int r) {
    arm_dot::sdot_group<F>(gp, n_blocks, xq, xs, xsum, ldq, lds, 0, mt, yg, ldy, r);
  });
}

}  // namespace

const KernelTable& dotprod_kernels() {
  static const KernelTable table = [] {
    KernelTable t = neon_kernels();
    t.name = "dotprod";
    t.qgemm_int8 = qgemm_tile<QFormat::Int8>;
    t.qgemm_int4 = qgemm_tile<QFormat::Int4>;
    t.qgemm_q4k = qgemm_tile<QFormat::Q4K>;
    return t;
  }();
  return table;
}

}  // namespace glm4rt
