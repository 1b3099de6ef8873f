// AVX-VNNI (VEX-encoded 256-bit vpdpbusd): compiled with -mavx2 -mfma -mf16c -mavxvnni.
#include "../kernels.h"

#define GLM4RT_DPBUSD _mm256_dpbusd_avx_epi32
#include "x86_avx_vnni_impl.h"

namespace glm4rt {

const KernelTable& avx_vnni_kernels() {
  static const KernelTable table = avx_vnni::with_vnni_tiles(avx2_kernels(), "avx_vnni");
  return table;
}

}  // namespace glm4rt
