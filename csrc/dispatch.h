// Runtime CPU dispatch: detect the ISA once (CPUID + XGETBV), allow an override
// (GLM4RT_ISA=generic|avx2|avx_vnni|avx512|avx512_bf16|amx or set_isa()), and hand out the chosen
// kernel table.
#pragma once
#include <string>
#include <vector>

#include "kernels.h"

namespace glm4rt {

// ISAs this CPU (and its OS) can run, best last: always starts with "generic".
std::vector<std::string> supported_isas();

// What x86's CPUID (leaf 1 ECX; leaf 7 EBX, ECX, EDX; leaf 7.1 EAX) and XGETBV(0) report.
struct X86Cpuid {
  unsigned int leaf1_ecx = 0, leaf7_ebx = 0, leaf7_ecx = 0, leaf7_edx = 0, leaf7_1_eax = 0;
  unsigned long long xcr0 = 0;
};
// The ISAs supported_isas() would list for these register values (amx_granted: whether Linux
// would grant the AMX tile state), for the tests of the OS checks (an OS that does not save
// AVX-512 or AMX state). Only the sets of this build.
std::vector<std::string> x86_isas_for(const X86Cpuid& c, bool amx_granted);
// This CPU's values (zeros on other architectures).
X86Cpuid x86_cpuid();
// Select the kernel table by name; throws if the name is unknown or the CPU cannot run it.
void set_isa(const std::string& name);
// Name of the active table.
std::string active_isa();
// The active table (chosen on first use from GLM4RT_ISA or the best supported ISA).
const KernelTable& kernels();
// Reads and validates every environment setting of this file now (GLM4RT_ISA and the developer
// overrides GLM4RT_DEV_*, cpu_tuning() in kernels.h); throws on a bad value. Called when the
// module is imported, so that a bad value fails the import on every CPU, whichever table it
// concerns.
void read_settings();

// Threads used by every parallel kernel: a process-wide setting (0 = the OpenMP default, all
// CPUs), lowered for the calling thread only by set_thread_cap (the decode loop's load-following
// thread count, glm4rt/autothreads.py; per calling thread so concurrent generations do not fight).
void set_num_threads(int n);
int get_num_threads();
// True while set_num_threads has not chosen a count (or was reset with 0).
bool num_threads_is_default();
// At most n threads for kernels called from this thread; 0 removes the cap.
void set_thread_cap(int n);

// Batch-invariant mode of the calling thread (the serving engine's): while on, every matmul and
// attention computes each token's result with the same operations in the same order whatever
// the number of tokens beside it, so a request's output does not depend on what else is batched
// with it. Off by default: the faster paths it avoids are the ones whose sums run in another
// order (ops.cpp, matmul_path and attention_path).
void set_batch_invariant(bool on);
bool batch_invariant();

}  // namespace glm4rt
