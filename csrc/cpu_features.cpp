// CPU feature detection with cpuid + xgetbv. A feature is usable only if the CPU has it AND the
// OS saves the matching register state (XCR0); a hypervisor or kernel can disable AVX-512 state
// even when cpuid reports the instructions.
#include "cpu_features.h"

#include <cstdlib>
#include <cstring>
#include <stdexcept>

#if defined(__x86_64__) || defined(_M_X64) || defined(__i386__)
#define DK_X86 1
#include <cpuid.h>
#endif
#if defined(__linux__) && defined(__x86_64__)
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#endif

#include <pybind11/pybind11.h>
namespace py = pybind11;

namespace deploykit {
namespace {

#ifdef DK_X86
void cpuid(unsigned leaf, unsigned sub, unsigned r[4]) {
  __cpuid_count(leaf, sub, r[0], r[1], r[2], r[3]);
}
unsigned long long xgetbv0() {
  unsigned eax, edx;
  __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
  return (static_cast<unsigned long long>(edx) << 32) | eax;
}
#endif

// Linux hands out AMX tile state only on request: without it the first tile instruction of any
// thread faults (llama.cpp's crash on such machines). The permission is per process, so one
// request before any kernel runs covers the thread pool's workers too.
void request_amx(CpuFeatures& f) {
  if (!f.os_amx) {
    f.amx_note = "the OS does not enable AMX tile state (XCR0 bits 17/18)";
    return;
  }
#if defined(__linux__) && defined(__x86_64__)
  constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  if (syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0) {
    f.amx_permission = true;
  } else {
    f.amx_note = std::string("the kernel refused the AMX tile permission (arch_prctl ARCH_REQ_XCOMP_PERM: ") +
                 std::strerror(errno) + "); AMX kernels are off, avx512vnni is used";
    std::fprintf(stderr, "deploykit: %s\n", f.amx_note.c_str());
  }
#else
  f.amx_note = "AMX permission requests are implemented for Linux x86-64 only";
#endif
}

CpuFeatures detect() {
  CpuFeatures f;
#ifdef DK_X86
  unsigned r[4];
  cpuid(0, 0, r);
  unsigned max_leaf = r[0];
  char vendor[13] = {0};
  std::memcpy(vendor + 0, &r[1], 4);  // ebx, edx, ecx spell the vendor string
  std::memcpy(vendor + 4, &r[3], 4);
  std::memcpy(vendor + 8, &r[2], 4);
  f.vendor = vendor;

  cpuid(0x80000000u, 0, r);
  if (r[0] >= 0x80000004u) {
    char brand[49] = {0};
    for (unsigned i = 0; i < 3; ++i) {
      cpuid(0x80000002u + i, 0, r);
      std::memcpy(brand + 16 * i, r, 16);
    }
    f.brand = brand;
    auto b = f.brand.find_first_not_of(' ');
    auto e = f.brand.find_last_not_of(' ');
    f.brand = b == std::string::npos ? "" : f.brand.substr(b, e - b + 1);
  }

  cpuid(1, 0, r);
  const unsigned ecx1 = r[2];
  f.sse4_2 = ecx1 & (1u << 20);
  f.fma = ecx1 & (1u << 12);
  f.f16c = ecx1 & (1u << 29);
  const bool osxsave = ecx1 & (1u << 27);
  const bool avx_cpu = ecx1 & (1u << 28);
  unsigned long long xcr0 = osxsave ? xgetbv0() : 0;
  f.os_ymm = (xcr0 & 0x6) == 0x6;                 // bits 1 (SSE), 2 (AVX)
  f.os_zmm = f.os_ymm && (xcr0 & 0xE0) == 0xE0;   // bits 5..7: opmask, ZMM_Hi256, Hi16_ZMM
  f.avx = avx_cpu && f.os_ymm;
  f.fma = f.fma && f.os_ymm;
  f.f16c = f.f16c && f.os_ymm;

  if (max_leaf >= 7) {
    cpuid(7, 0, r);
    const unsigned ebx7 = r[1], ecx7 = r[2];
    f.avx2 = (ebx7 & (1u << 5)) && f.os_ymm;
    f.avx512f = (ebx7 & (1u << 16)) && f.os_zmm;
    f.avx512dq = (ebx7 & (1u << 17)) && f.os_zmm;
    f.avx512bw = (ebx7 & (1u << 30)) && f.os_zmm;
    f.avx512vl = (ebx7 & (1u << 31)) && f.os_zmm;
    f.avx512_vnni = (ecx7 & (1u << 11)) && f.os_zmm;
    const unsigned edx7 = r[3];
    f.amx_tile = edx7 & (1u << 24);
    f.amx_int8 = edx7 & (1u << 25);
    cpuid(7, 1, r);
    f.avx_vnni = (r[0] & (1u << 4)) && f.os_ymm;
  }
  f.os_amx = (xcr0 & (3ull << 17)) == (3ull << 17);
  if (f.amx_tile && f.amx_int8) request_amx(f);
#endif
  return f;
}

}  // namespace

const CpuFeatures& cpu_features() {
  static const CpuFeatures f = detect();
  return f;
}

bool isa_supported(Isa isa) {
  const auto& f = cpu_features();
  switch (isa) {
    case Isa::Scalar: return true;
    case Isa::Avx2: return f.avx2 && f.fma;
    case Isa::Avx512Vnni: return f.avx512f && f.avx512bw && f.avx512vl && f.avx512_vnni;
    case Isa::Amx:
      return isa_supported(Isa::Avx512Vnni) && f.amx_tile && f.amx_int8 && f.amx_permission;
  }
  return false;
}

Isa best_isa() {
  if (isa_supported(Isa::Avx512Vnni)) return Isa::Avx512Vnni;
  if (isa_supported(Isa::Avx2)) return Isa::Avx2;
  return Isa::Scalar;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::Scalar: return "scalar";
    case Isa::Avx2: return "avx2";
    case Isa::Avx512Vnni: return "avx512vnni";
    case Isa::Amx: return "amx";
  }
  return "?";
}

Isa parse_isa(const std::string& name) {
  if (name == "scalar") return Isa::Scalar;
  if (name == "avx2") return Isa::Avx2;
  if (name == "avx512vnni") return Isa::Avx512Vnni;
  if (name == "amx") return Isa::Amx;
  throw std::invalid_argument("unknown ISA '" + name +
                              "'; valid values: scalar, avx2, avx512vnni, amx");
}

static Isa checked(Isa isa, const char* origin) {
  if (!isa_supported(isa))
    throw std::runtime_error(std::string(origin) + " asks for ISA '" + isa_name(isa) +
                             "' but this CPU/OS does not support it (best here: '" +
                             isa_name(best_isa()) + "')");
  return isa;
}

Isa selected_isa() {
  // Chosen once per process. A bad DEPLOYKIT_NATIVE_ISA raises on every call (not only the
  // first) so the error is never swallowed by a cached value.
  static const Isa* chosen = [] {
    const char* env = std::getenv("DEPLOYKIT_NATIVE_ISA");
    if (env && *env) {
      try {
        static Isa v = checked(parse_isa(env), "DEPLOYKIT_NATIVE_ISA");
        return static_cast<const Isa*>(&v);
      } catch (...) {
        return static_cast<const Isa*>(nullptr);
      }
    }
    static Isa v = best_isa();
    return static_cast<const Isa*>(&v);
  }();
  if (!chosen) {
    const char* env = std::getenv("DEPLOYKIT_NATIVE_ISA");
    checked(parse_isa(env ? env : "?"), "DEPLOYKIT_NATIVE_ISA");  // rethrows the real reason
  }
  return *chosen;
}

Isa resolve_isa(const std::string& name) {
  if (name.empty()) return selected_isa();
  return checked(parse_isa(name), "isa argument");
}

void register_cpu_features(py::module_& m) {
  m.def(
      "cpu_features",
      [] {
        const auto& f = cpu_features();
        py::dict d;
        d["vendor"] = f.vendor;
        d["brand"] = f.brand;
        d["sse4_2"] = f.sse4_2;
        d["avx"] = f.avx;
        d["avx2"] = f.avx2;
        d["fma"] = f.fma;
        d["f16c"] = f.f16c;
        d["avx512f"] = f.avx512f;
        d["avx512dq"] = f.avx512dq;
        d["avx512bw"] = f.avx512bw;
        d["avx512vl"] = f.avx512vl;
        d["avx512_vnni"] = f.avx512_vnni;
        d["avx_vnni"] = f.avx_vnni;
        d["os_ymm"] = f.os_ymm;
        d["os_zmm"] = f.os_zmm;
        d["amx_tile"] = f.amx_tile;
        d["amx_int8"] = f.amx_int8;
        d["os_amx"] = f.os_amx;
        d["amx_permission"] = f.amx_permission;
        d["amx_note"] = f.amx_note.empty() ? py::object(py::none()) : py::object(py::str(f.amx_note));
        py::list sup;
        for (Isa i : kAllIsas)
          if (isa_supported(i)) sup.append(isa_name(i));
        d["supported_isas"] = sup;
        d["best_isa"] = isa_name(best_isa());
        const char* env = std::getenv("DEPLOYKIT_NATIVE_ISA");
        d["forced_isa"] = env && *env ? py::object(py::str(env)) : py::object(py::none());
        try {
          d["selected_isa"] = isa_name(selected_isa());
        } catch (const std::exception& e) {
          d["selected_isa"] = py::none();
          d["selection_error"] = std::string(e.what());
        }
        return d;
      },
      "CPU features seen by cpuid, masked by what the OS enables (xgetbv), and the kernel "
      "variant chosen for this process.");
  m.def("selected_isa", [] { return std::string(isa_name(selected_isa())); },
        "Kernel variant used when no isa= argument is given (DEPLOYKIT_NATIVE_ISA overrides).");
  m.def("supported_isas", [] {
    py::list sup;
    for (Isa i : kAllIsas)
      if (isa_supported(i)) sup.append(isa_name(i));
    return sup;
  }, "Variants this CPU and OS can run, scalar first.");
}

}  // namespace deploykit
