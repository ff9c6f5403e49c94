// Argument checks for the bindings: every error names the function, the argument, what was
// expected and what was given. Kernels take raw pointers, so these checks are the contract.
#pragma once
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace deploykit {
namespace py = pybind11;

inline std::string shape_str(const py::array& a) {
  std::ostringstream s;
  s << "(";
  for (py::ssize_t i = 0; i < a.ndim(); ++i) s << (i ? ", " : "") << a.shape(i);
  s << (a.ndim() == 1 ? ",)" : ")");
  return s.str();
}

// dims: expected sizes, -1 = any. Requires C-contiguous, exact dtype, writable if out.
template <typename T>
T* check_array(const py::array& a, const char* fn, const char* name, std::vector<int64_t> dims,
               bool writable = false) {
  const auto want = py::dtype::of<T>();
  std::ostringstream err;
  if (!a.dtype().is(want)) {
    err << fn << ": argument '" << name << "' must have dtype " << py::str(want).cast<std::string>()
        << ", got " << py::str(a.dtype()).cast<std::string>();
    throw py::type_error(err.str());
  }
  bool shape_ok = a.ndim() == static_cast<py::ssize_t>(dims.size());
  for (size_t i = 0; shape_ok && i < dims.size(); ++i)
    shape_ok = dims[i] < 0 || a.shape(i) == dims[i];
  if (!shape_ok) {
    err << fn << ": argument '" << name << "' must have shape (";
    for (size_t i = 0; i < dims.size(); ++i) {
      err << (i ? ", " : "");
      if (dims[i] < 0) err << "*"; else err << dims[i];
    }
    err << (dims.size() == 1 ? ",)" : ")") << ", got " << shape_str(a);
    throw py::value_error(err.str());
  }
  if (!(a.flags() & py::array::c_style)) {
    err << fn << ": argument '" << name << "' must be C-contiguous (got strides";
    for (py::ssize_t i = 0; i < a.ndim(); ++i) err << " " << a.strides(i);
    err << " for shape " << shape_str(a) << "); pass a contiguous copy (.contiguous() / np.ascontiguousarray)";
    throw py::value_error(err.str());
  }
  if (writable && !a.writeable()) {
    err << fn << ": output argument '" << name << "' is read-only";
    throw py::value_error(err.str());
  }
  // Alignment is not required: kernels use unaligned loads (a view at an odd offset is fine).
  return static_cast<T*>(const_cast<void*>(a.data()));
}

}  // namespace deploykit
