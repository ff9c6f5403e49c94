// Run-time CPU feature detection and the one-time choice of kernel variant (ISA).
#pragma once
#include <string>

namespace deploykit {

// Amx: AMX-INT8 tiles (Sapphire Rapids and later), usable only after the kernel granted this
// process the tile-data permission (arch_prctl ARCH_REQ_XCOMP_PERM). Opt-in for now
// (DEPLOYKIT_NATIVE_ISA=amx or isa="amx"): best_isa() does not pick it until the kernel has been
// verified on such a machine (it was written on one without AMX).
enum class Isa { Scalar = 0, Avx2 = 1, Avx512Vnni = 2, Amx = 3 };
constexpr Isa kAllIsas[] = {Isa::Scalar, Isa::Avx2, Isa::Avx512Vnni, Isa::Amx};

struct CpuFeatures {
  std::string vendor, brand;
  bool sse4_2 = false, avx = false, avx2 = false, fma = false, f16c = false;
  bool avx512f = false, avx512bw = false, avx512vl = false, avx512dq = false;
  bool avx512_vnni = false, avx_vnni = false;
  bool os_ymm = false;  // XCR0 has SSE+AVX state enabled (the OS saves ymm registers)
  bool os_zmm = false;  // XCR0 also has opmask + zmm state enabled
  bool amx_tile = false, amx_int8 = false;  // cpuid leaf 7 edx bits 24, 25
  bool os_amx = false;       // XCR0 bits 17 (XTILECFG) and 18 (XTILEDATA)
  bool amx_permission = false;  // arch_prctl(ARCH_REQ_XCOMP_PERM, XTILEDATA) granted
  std::string amx_note;      // why AMX is not usable, when the CPU has it
};

const CpuFeatures& cpu_features();      // detected once
bool isa_supported(Isa isa);            // CPU and OS both support the variant
Isa best_isa();                         // best supported variant, ignoring the env override
Isa selected_isa();                     // chosen once: DEPLOYKIT_NATIVE_ISA or best_isa()
const char* isa_name(Isa isa);
Isa parse_isa(const std::string& name);  // throws std::invalid_argument naming valid values
// Resolve an optional per-call override ("" = selected); throws if the CPU cannot run it.
Isa resolve_isa(const std::string& name);

}  // namespace deploykit
