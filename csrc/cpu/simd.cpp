// Choice of the instruction-set variant of the CPU kernels: see simd.h.
#include "simd.h"

#include <cstdlib>
#include <cstring>
#include <initializer_list>

namespace fastclip::cpu::simd {
namespace {

Isa best_supported_isa() {
#if FASTCLIP_X86_VARIANTS
  __builtin_cpu_init();
  if (__builtin_cpu_supports("x86-64-v4")) return Isa::kAvx512;
  if (__builtin_cpu_supports("x86-64-v3")) return Isa::kAvx2;
#endif
  return Isa::kGeneric;
}

Isa requested_isa(Isa best) {
  const char* requested = std::getenv("FASTCLIP_CPU_CAPABILITY");
  if (requested == nullptr) return best;
  for (Isa isa : {Isa::kGeneric, Isa::kAvx2, Isa::kAvx512})
    if (std::strcmp(requested, isa_name(isa)) == 0 && isa <= best) return isa;
  return best;
}

}  // namespace

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    case Isa::kGeneric: break;
  }
  return "generic";
}

namespace {
Isa& active_isa_storage() {
  static Isa isa = requested_isa(best_supported_isa());
  return isa;
}
}  // namespace

Isa active_isa() { return active_isa_storage(); }

Isa set_active_isa_for_testing(Isa isa) {
  const Isa best = best_supported_isa();
  return active_isa_storage() = isa <= best ? isa : best;
}

}  // namespace fastclip::cpu::simd
