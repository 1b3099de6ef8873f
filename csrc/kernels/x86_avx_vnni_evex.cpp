// The AVX-VNNI kernels in EVEX encoding (-mavx512vnni -mavx512vl): the same 256-bit code, run
// where the CPU has AVX512-VNNI but not AVX-VNNI, so that the ymm VNNI path is tested there too.
#include "../kernels.h"

#define GLM4RT_DPBUSD _mm256_dpbusd_epi32
#include "x86_avx_vnni_impl.h"

namespace glm4rt {

const KernelTable& avx_vnni_evex_kernels() {
  static const KernelTable table = avx_vnni::with_vnni_tiles(avx2_kernels(), "avx_vnni");
  return table;
}

}  // namespace glm4rt
