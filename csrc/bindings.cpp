// deploykit._native: the module only gathers the areas; each area binds itself.
#include <pybind11/pybind11.h>
namespace py = pybind11;

namespace deploykit {
void register_cpu_features(py::module_& m);
void register_int8(py::module_& m);
void register_int4(py::module_& m);
void register_moe(py::module_& m);
void register_engine(py::module_& m);
}

PYBIND11_MODULE(_native, m) {
  m.doc() = "deploykit CPU kernels: int8 and int4 linears, MoE routing and the decode engine (see deploykit.native)";
  m.attr("__version__") = DEPLOYKIT_VERSION;
  deploykit::register_cpu_features(m);
  deploykit::register_int8(m);
  deploykit::register_int4(m);
  deploykit::register_moe(m);
  deploykit::register_engine(m);
}
