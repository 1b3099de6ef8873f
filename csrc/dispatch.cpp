#include "dispatch.h"

#include <atomic>
#include <cstdlib>
#include <cstring>

#include "check.h"

#if defined(_OPENMP)
#include <omp.h>
#endif

#if defined(GLM4RT_X86) && defined(_MSC_VER)
#include <intrin.h>  // __cpuidex, _xgetbv
#elif defined(GLM4RT_X86)
#include <cpuid.h>
#endif
#if defined(GLM4RT_AMX)
#include <sys/syscall.h>
#include <unistd.h>
#endif
#if defined(GLM4RT_ARM64) && defined(__linux__)
#include <sys/auxv.h>  // getauxval
#elif defined(GLM4RT_ARM64) && defined(__APPLE__)
#include <sys/sysctl.h>
#endif
#if defined(_WIN32)
#include <stdlib.h>  // _environ
#elif defined(__APPLE__)
#include <crt_externs.h>  // _NSGetEnviron
#else
extern char** environ;  // POSIX: the process environment (declared by <unistd.h> only with _GNU_SOURCE)
#endif

namespace glm4rt {
namespace {

struct CpuFeatures {
  bool avx2 = false;
  bool avx_vnni = false;  // 256-bit VNNI, VEX-encoded (CPUID.(7, 1):EAX bit 4)
  bool avx512 = false;
  bool avx512_bf16 = false;
  bool amx = false;  // AMX-TILE + AMX-BF16, tile state enabled by the OS and granted to this process
  bool dotprod = false;  // ARM64 SDOT / UDOT (FEAT_DotProd)
  bool i8mm = false;     // ARM64 SMMLA (FEAT_I8MM)
  bool bf16 = false;     // ARM64 BFDOT / BFMMLA (FEAT_BF16), with FEAT_I8MM (both Armv8.6)
};

#if defined(GLM4RT_AMX)
// Linux (5.16+) hands out the AMX tile data state only to processes that ask for it; until then a
// tile instruction faults. Granted once for the whole process (every thread).
bool request_amx_permission() {
  constexpr int kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
}
#endif

#if defined(GLM4RT_X86)
// CPUID leaf / sub-leaf into r = {eax, ebx, ecx, edx}; false where the CPU lacks the leaf.
bool cpuid(unsigned int leaf, unsigned int sub, unsigned int (&r)[4]) {
#if defined(_MSC_VER)
  int regs[4];
  __cpuid(regs, static_cast<int>(leaf & 0x80000000u));  // the highest leaf of this range
  if (static_cast<unsigned int>(regs[0]) < leaf) return false;
  __cpuidex(regs, static_cast<int>(leaf), static_cast<int>(sub));
  for (int i = 0; i < 4; ++i) r[i] = static_cast<unsigned int>(regs[i]);
  return true;
#else
  return __get_cpuid_count(leaf, sub, &r[0], &r[1], &r[2], &r[3]) != 0;
#endif
}

// XCR0: which register states the OS saves (and so allows).
unsigned long long xgetbv0() {
#if defined(_MSC_VER)
  return _xgetbv(0);
#else
  unsigned int eax, edx;
  __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
  return (static_cast<unsigned long long>(edx) << 32) | eax;
#endif
}
#endif

#if defined(GLM4RT_X86)
X86Cpuid read_x86_cpuid() {
  X86Cpuid c;
  unsigned int r[4];
  if (!cpuid(1, 0, r)) return c;
  c.leaf1_ecx = r[2];
  if (c.leaf1_ecx & (1u << 27)) c.xcr0 = xgetbv0();  // XGETBV exists where OSXSAVE is set
  if (cpuid(7, 0, r)) c.leaf7_ebx = r[1], c.leaf7_ecx = r[2], c.leaf7_edx = r[3];
  if (cpuid(7, 1, r)) c.leaf7_1_eax = r[0];
  return c;
}
#endif

#if defined(GLM4RT_ARM64) && defined(__APPLE__)
bool sysctl_flag(const char* name) {  // hw.optional.arm.FEAT_*: 1 where the CPU has it
  int value = 0;
  size_t size = sizeof value;
  return sysctlbyname(name, &value, &size, nullptr, 0) == 0 && value == 1;
}
#endif

// The x86 kernel sets that CPUID's feature bits and the OS's XCR0 allow: an instruction set counts
// only where the OS also saves its registers (YMM for AVX2; opmask and ZMM for AVX-512; the tile
// state for AMX, which Linux further grants per process: grant_amx, asked last, may be null).
// Pure bit logic, also reachable from Python for the tests (x86_isas_for).
CpuFeatures x86_features(const X86Cpuid& c, bool (*grant_amx)()) {
  CpuFeatures f;
  const bool osxsave = c.leaf1_ecx & (1u << 27), fma = c.leaf1_ecx & (1u << 12), f16c = c.leaf1_ecx & (1u << 29);
  if (!osxsave) return f;  // no XGETBV: the OS saves no AVX state
  const bool os_avx = (c.xcr0 & 0x6) == 0x6;         // XMM and YMM state saved by the OS
  const bool os_avx512 = (c.xcr0 & 0xE6) == 0xE6;    // + opmask, ZMM_Hi256, Hi16_ZMM
  const bool os_amx = (c.xcr0 & 0x60000) == 0x60000;  // XTILECFG and XTILEDATA
  const unsigned int ebx = c.leaf7_ebx, ecx = c.leaf7_ecx, edx = c.leaf7_edx;
  const bool avx2 = ebx & (1u << 5);
  const bool avx512f = ebx & (1u << 16), avx512dq = ebx & (1u << 17);
  const bool avx512bw = ebx & (1u << 30), avx512vl = ebx & (1u << 31), avx512vnni = ecx & (1u << 11);
  const bool amx_bf16 = edx & (1u << 22), amx_tile = edx & (1u << 24);
  f.avx2 = os_avx && avx2 && fma && f16c;
  // The avx512 kernels use VNNI for the quantized dot products (Ice Lake, Zen 4 and later);
  // AVX-512 CPUs without it (Skylake-X) run the avx2 kernels.
  f.avx512 = f.avx2 && os_avx512 && avx512f && avx512dq && avx512bw && avx512vl && avx512vnni;
  f.avx_vnni = f.avx2 && (c.leaf7_1_eax & (1u << 4));
  // bf16 dot products (vdpbf16ps) for bf16 weights: CPUID.(7, 1):EAX bit 5.
  f.avx512_bf16 = f.avx512 && (c.leaf7_1_eax & (1u << 5));
  // The amx table extends the avx512_bf16 one (its packing kernels convert with AVX512-BF16).
  f.amx = f.avx512_bf16 && amx_tile && amx_bf16 && os_amx && grant_amx != nullptr && grant_amx();
  return f;
}

// The names of the sets `f` allows, best last.
std::vector<std::string> isas_of(const CpuFeatures& f) {
  std::vector<std::string> out{"generic"};
#if defined(GLM4RT_ARM64)
  out.push_back("neon");  // Advanced SIMD: every AArch64 CPU
  if (f.dotprod) out.push_back("dotprod");
  if (f.i8mm) out.push_back("i8mm");
  if (f.bf16) out.push_back("bf16");
#endif
  if (f.avx2) out.push_back("avx2");
#if defined(GLM4RT_AVXVNNI)
  const bool vex_vnni = f.avx_vnni;
#else
  const bool vex_vnni = false;
#endif
  if (vex_vnni || f.avx512) out.push_back("avx_vnni");
  if (f.avx512) out.push_back("avx512");
  if (f.avx512_bf16) out.push_back("avx512_bf16");
  if (f.amx) out.push_back("amx");
  return out;
}

CpuFeatures detect() {
  CpuFeatures f;
#if defined(GLM4RT_ARM64) && defined(__linux__)
  // The kernel's hardware capability words (asm/hwcap.h): HWCAP_ASIMDDP, HWCAP2_I8MM.
  constexpr unsigned long kHwcapAsimdDp = 1ul << 20, kHwcap2I8mm = 1ul << 13, kHwcap2Bf16 = 1ul << 14;
  f.dotprod = (getauxval(AT_HWCAP) & kHwcapAsimdDp) != 0;
  f.i8mm = f.dotprod && (getauxval(AT_HWCAP2) & kHwcap2I8mm) != 0;
  f.bf16 = f.i8mm && (getauxval(AT_HWCAP2) & kHwcap2Bf16) != 0;
#elif defined(GLM4RT_ARM64) && defined(__APPLE__)
  f.dotprod = sysctl_flag("hw.optional.arm.FEAT_DotProd");
  f.i8mm = f.dotprod && sysctl_flag("hw.optional.arm.FEAT_I8MM");
  f.bf16 = f.i8mm && sysctl_flag("hw.optional.arm.FEAT_BF16");
#endif
#if defined(GLM4RT_X86)
#if defined(GLM4RT_AMX)
  f = x86_features(read_x86_cpuid(), request_amx_permission);
#else
  f = x86_features(read_x86_cpuid(), nullptr);
#endif
#endif
  return f;
}

// CPUID leaf 0's vendor string (EBX, EDX, ECX), e.g. "GenuineIntel", "AuthenticAMD".
bool vendor_is(const char (&name)[13]) {
#if defined(GLM4RT_X86)
  unsigned int r[4];
  if (!cpuid(0, 0, r)) return false;
  const unsigned int regs[3] = {r[1], r[3], r[2]};  // EBX, EDX, ECX
  char vendor[12];
  std::memcpy(vendor, regs, sizeof vendor);
  return std::memcmp(vendor, name, sizeof vendor) == 0;
#else
  (void)name;
  return false;
#endif
}

// AMD family 0x1A (Zen 5) and later.
bool detect_zen5_or_later() {
#if defined(GLM4RT_X86)
  unsigned int r[4];
  if (!vendor_is("AuthenticAMD") || !cpuid(1, 0, r)) return false;
  const unsigned int eax = r[0];
  unsigned int family = (eax >> 8) & 0xF;
  if (family == 0xF) family += (eax >> 20) & 0xFF;
  return family >= 0x1A;
#else
  return false;
#endif
}

const CpuFeatures& cpu() {
  static const CpuFeatures features = detect();
  return features;
}

const KernelTable* table_for(const std::string& name) {
  if (name == "generic") return &generic_kernels();
#if defined(GLM4RT_ARM64)
  if (name == "neon") return &neon_kernels();
  if (name == "dotprod" && cpu().dotprod) return &dotprod_kernels();
  if (name == "i8mm" && cpu().i8mm) return &i8mm_kernels();
  if (name == "bf16" && cpu().bf16) return &bf16_kernels();
#endif
#if defined(GLM4RT_X86)
  if (name == "avx2" && cpu().avx2) return &avx2_kernels();
  if (name == "avx_vnni") {
#if defined(GLM4RT_AVXVNNI)
    if (cpu().avx_vnni) return &avx_vnni_kernels();
#endif
    // AVX512-VNNI CPUs run the same 256-bit code EVEX-encoded (never chosen by default there:
    // avx512 ranks higher; forcing it tests the path AVX-VNNI CPUs take).
    if (cpu().avx512) return &avx_vnni_evex_kernels();
  }
  if (name == "avx512" && cpu().avx512) return &avx512_kernels();
  if (name == "avx512_bf16" && cpu().avx512_bf16) return &avx512_bf16_kernels();
#if defined(GLM4RT_AMX)
  if (name == "amx" && cpu().amx) return &amx_kernels();
#endif
#endif
  return nullptr;
}

std::string supported_list() {
  std::string out;
  for (const std::string& name : supported_isas()) out += (out.empty() ? "" : ", ") + name;
  return out;
}

const KernelTable* initial_table() {
  const char* env = std::getenv("GLM4RT_ISA");
  if (env != nullptr && *env != '\0' && std::string(env) != "auto") {
    const KernelTable* t = table_for(env);
    GLM4RT_CHECK(t != nullptr) << "GLM4RT_ISA=" << env << " is not available on this CPU or unknown;"
                               << " this CPU supports: " << supported_list();
    return t;
  }
  return table_for(supported_isas().back());
}

std::atomic<const KernelTable*> g_table{nullptr};
std::atomic<int> g_threads{0};
thread_local int t_thread_cap = 0;
thread_local bool t_batch_invariant = false;

}  // namespace

namespace {

// A developer override of a CPU tuning: the environment variable `var`, one of the settings a and
// b; true when it is `yes` (a or b), unset or empty -> cpu_default; anything else throws.
bool dev_setting(const char* var, const char* a, const char* b, const char* yes, bool cpu_default) {
  const char* env = std::getenv(var);
  const std::string v = env != nullptr ? env : "";
  GLM4RT_CHECK(v.empty() || v == a || v == b) << var << " must be " << a << " or " << b << ", got '" << v << "'";
  return v.empty() ? cpu_default : v == yes;
}

constexpr const char* kDevSettings[] = {"GLM4RT_DEV_DECODE_PREFETCH", "GLM4RT_DEV_BF16_GEMV_ROWS"};

// Every GLM4RT_DEV_* variable must be one of kDevSettings: a misspelt override would otherwise
// be ignored, and a benchmark would measure the default without saying so.
void reject_unknown_dev_settings() {
#if defined(_WIN32)
  char** const env = _environ;
#elif defined(__APPLE__)
  char** const env = *_NSGetEnviron();
#else
  char** const env = environ;
#endif
  constexpr char kPrefix[] = "GLM4RT_DEV_";
  for (char** e = env; e != nullptr && *e != nullptr; ++e) {
    if (std::strncmp(*e, kPrefix, sizeof kPrefix - 1) != 0) continue;
    const std::string name(*e, std::strcspn(*e, "="));
    bool known = false;
    std::string list;
    for (const char* s : kDevSettings) {
      known = known || name == s;
      list += (list.empty() ? "" : ", ") + std::string(s);
    }
    GLM4RT_CHECK(known) << "unknown developer setting " << name << " (known: " << list << ")";
  }
}

CpuTuning read_cpu_tuning() {
  reject_unknown_dev_settings();
  CpuTuning t;
  t.decode_prefetch_l1 = dev_setting(kDevSettings[0], "l1", "l2", "l1", detect_zen5_or_later());
  t.bf16_gemv_four_rows = dev_setting(kDevSettings[1], "1", "4", "4", vendor_is("GenuineIntel"));
  return t;
}

}  // namespace

const CpuTuning& cpu_tuning() {
  static const CpuTuning tuning = read_cpu_tuning();
  return tuning;
}

void read_settings() {
  cpu_tuning();
  kernels();
}

std::vector<std::string> supported_isas() { return isas_of(cpu()); }

X86Cpuid x86_cpuid() {
#if defined(GLM4RT_X86)
  return read_x86_cpuid();
#else
  return X86Cpuid{};
#endif
}

std::vector<std::string> x86_isas_for(const X86Cpuid& c, bool amx_granted) {
  bool (*const grant)() = [] { return true; };
  CpuFeatures f = x86_features(c, amx_granted ? grant : nullptr);
#if !defined(GLM4RT_AMX)
  f.amx = false;  // this build has no AMX kernels (not Linux, or the compiler lacks AMX)
#endif
#if !defined(GLM4RT_X86)
  f = CpuFeatures{};  // no x86 kernel sets in this build
#endif
  return isas_of(f);
}

void set_isa(const std::string& name) {
  const KernelTable* t = name == "auto" ? table_for(supported_isas().back()) : table_for(name);
  GLM4RT_CHECK(t != nullptr) << "ISA '" << name << "' is not available on this CPU or unknown;"
                             << " this CPU supports: " << supported_list();
  g_table.store(t);
}

std::string active_isa() { return kernels().name; }

const KernelTable& kernels() {
  const KernelTable* t = g_table.load();
  if (t == nullptr) {
    t = initial_table();
    g_table.store(t);
  }
  return *t;
}

void set_num_threads(int n) {
  GLM4RT_CHECK(n >= 0) << "number of threads must be >= 1 (or 0 for the default), got " << n;
  g_threads.store(n);
}

bool num_threads_is_default() { return g_threads.load() == 0; }

void set_thread_cap(int n) {
  GLM4RT_CHECK(n >= 0) << "thread cap must be >= 0, got " << n;
  t_thread_cap = n;
}

void set_batch_invariant(bool on) { t_batch_invariant = on; }

bool batch_invariant() { return t_batch_invariant; }

int get_num_threads() {
  int n = g_threads.load();
  if (n <= 0) {
#if defined(_OPENMP)
    n = omp_get_max_threads();
#else
    n = 1;
#endif
  }
  return t_thread_cap > 0 && t_thread_cap < n ? t_thread_cap : n;
}

}  // namespace glm4rt
