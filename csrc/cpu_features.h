// Run-time CPU feature detection and the one-time choice of kernel variant (ISA).
#pragma once
#include <string>

namespace deploykit {

enum class Isa { Scalar = 0, Avx2 = 1, Avx512Vnni = 2 };

struct CpuFeatures {
  std::string vendor, brand;
  bool sse4_2 = false, avx = false, avx2 = false, fma = false, f16c = false;
  bool avx512f = false, avx512bw = false, avx512vl = false, avx512dq = false;
  bool avx512_vnni = false, avx_vnni = false;
  bool os_ymm = false;  // XCR0 has SSE+AVX state enabled (the OS saves ymm registers)
  bool os_zmm = false;  // XCR0 also has opmask + zmm state enabled
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
