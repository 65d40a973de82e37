#include "cpu/dispatch.h"

#include <cpuid.h>

#include <cstdlib>
#include <cstring>

namespace ctprune {
namespace cpu {
namespace {

struct CpuFeatures {
  bool avx2 = false;    // AVX2 + FMA, and the OS saves ymm state
  bool avx512 = false;  // AVX-512 F + VL, and the OS saves opmask and zmm state
};

unsigned long long ReadXcr0() {
  unsigned int lo = 0, hi = 0;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (static_cast<unsigned long long>(hi) << 32) | lo;
}

CpuFeatures DetectCpu() {
  CpuFeatures f;
  unsigned int eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (!__get_cpuid(1, &eax, &ebx, &ecx, &edx)) return f;
  const bool osxsave = (ecx >> 27) & 1, avx = (ecx >> 28) & 1, fma = (ecx >> 12) & 1;
  if (!osxsave || !avx) return f;
  const unsigned long long xcr0 = ReadXcr0();
  const bool ymm_state = (xcr0 & 0x6) == 0x6;     // SSE and AVX state
  const bool zmm_state = (xcr0 & 0xe6) == 0xe6;   // plus opmask, ZMM_Hi256, Hi16_ZMM
  if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return f;
  const bool avx2 = (ebx >> 5) & 1, avx512f = (ebx >> 16) & 1, avx512vl = (ebx >> 31) & 1;
  f.avx2 = avx2 && fma && ymm_state;
  f.avx512 = f.avx2 && avx512f && avx512vl && zmm_state;
  return f;
}

struct Selection {
  KernelTable table;
  std::string error;
};

KernelTable WithSparse(KernelTable table, SparseKernels sparse) {
  table.sparse = sparse;
  return table;
}

// CTPRUNE_FORCE_ISA's value, or nullptr when it is unset or empty (the tier is then chosen from the CPU).
const char* ForcedIsa() {
  const char* forced = std::getenv("CTPRUNE_FORCE_ISA");
  return forced != nullptr && *forced != '\0' ? forced : nullptr;
}

// A tier's own functions (even Table(), compiled under its target pragma) may use that tier's instructions, so a
// tier's table is built only on a CPU that runs it. The CPU is probed once; the override is read on every call so a
// process can pin a tier before creating a session.
Selection Select() {
  static const CpuFeatures cpu = DetectCpu();
  const auto generic_table = [] { return WithSparse(generic::Table(), generic::SparseTable()); };
  const auto avx2_table = [] { return WithSparse(avx2::Table(), avx2::SparseTable()); };
  const auto avx512_table = [] { return WithSparse(avx512::Table(), avx512::SparseTable()); };
  const auto best = [&] { return cpu.avx512 ? avx512_table() : cpu.avx2 ? avx2_table() : generic_table(); };

  const char* forced = ForcedIsa();
  if (forced == nullptr) return {best(), ""};
  if (std::strcmp(forced, "generic") == 0) return {generic_table(), ""};
  if (std::strcmp(forced, "generic16") == 0) return {WithSparse(generic::Table16(), generic::SparseTable16()), ""};
  if (std::strcmp(forced, "avx2") == 0) {
    if (cpu.avx2) return {avx2_table(), ""};
    return {best(), "CTPRUNE_FORCE_ISA=avx2 but this CPU or OS does not support AVX2 with FMA"};
  }
  if (std::strcmp(forced, "avx512") == 0) {
    if (cpu.avx512) return {avx512_table(), ""};
    return {best(), "CTPRUNE_FORCE_ISA=avx512 but this CPU or OS does not support AVX-512 (F and VL)"};
  }
  return {best(), std::string("CTPRUNE_FORCE_ISA=") + forced + " is not one of generic, generic16, avx2, avx512"};
}

}  // namespace

KernelTable NarrowPlaneKernels(const KernelTable& chosen) {
  // An AVX-512 table is only ever chosen on a CPU that also runs AVX2 (DetectCpu requires it).
  if (ForcedIsa() != nullptr || std::strcmp(chosen.isa, "avx512") != 0) return chosen;
  return avx512::NarrowTable(WithSparse(avx2::Table(), avx2::SparseTable()));
}

KernelTable Kernels(std::string* error) {
  Selection selection = Select();
  if (error) *error = selection.error;
  return selection.table;
}

}  // namespace cpu
}  // namespace ctprune
