// Registers fastclip's operators with PyTorch's dispatcher (torch.ops.fastclip.*) and binds the
// CPU kernels to them. The kernels themselves (cpu/) know nothing of torch; this file translates
// tensors into (pointer, numel, dtype) tables and ATen's thread pool into a ParallelFor.
#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <Python.h>
#include <torch/csrc/Device.h>
#include <torch/csrc/DynamicTypes.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

#include "cpu/agc_kernels.h"
#include "cpu/clip_kernels.h"
#include "cpu/value_clip_kernels.h"
#include "op_helpers.h"

namespace fastclip {
namespace {

// The CPU kernels' view of a list of tensors (see DenseTensors).
struct KernelTensors : DenseTensors {
  std::vector<cpu::TensorView> views;

  // coefficient_type: the dtype of the clip coefficient the tensors will be scaled by.
  KernelTensors(at::TensorList tensors, at::ScalarType coefficient_type) : DenseTensors(tensors, at::kCPU) {
    views.reserve(tensors.size());
    for (size_t i = 0; i < tensors.size(); ++i) {
      const bool scale_in_double = tensors[i].dim() == 0 && coefficient_type == at::kDouble;
      views.push_back({dense[i]->data_ptr(), dense[i]->numel(), kernel_dtype(tensors[i].scalar_type()), scale_in_double});
    }
  }
};

const cpu::ParallelFor& aten_parallel_for() {
  static const cpu::ParallelFor parallel_for =
      [](int64_t begin, int64_t end, int64_t grain, const std::function<void(int64_t, int64_t)>& body) {
        at::parallel_for(begin, end, grain, body);
      };
  return parallel_for;
}

// The overflow-safe total norm (cpu::overflow_safe_norm) rounded to its dtype, which is that of
// torch's total norm widened to at least float32 (see overflow_safe_total_type).
at::Tensor overflow_safe_total(const KernelTensors& kernel_tensors, Norm norm, at::ScalarType type) {
  const double total = cpu::overflow_safe_norm(kernel_tensors.views.data(), kernel_tensors.views.size(), norm,
                                               aten_parallel_for());
  return at::scalar_tensor(total, at::TensorOptions().dtype(at::kDouble)).to(type);
}

// torch's norm (per-tensor norms rounded to their dtypes, then the norm of those) and the scaling;
// the per-tensor norms also go to tensor_norms_out (one double per gradient) if it is not null.
at::Tensor clip_with_torch_norms(at::TensorList grads, double max_norm, Norm norm, double* tensor_norms_out) {
  const at::ScalarType total_type = total_norm_type(grads);
  KernelTensors kernel_tensors(grads, total_type);
  const cpu::ClipResult result = cpu::clip(kernel_tensors.views.data(), kernel_tensors.views.size(), norm,
                                           kernel_dtype(total_type), max_norm, aten_parallel_for(), tensor_norms_out);
  if (result.coefficient != 1.0) kernel_tensors.write_back();
  return at::scalar_tensor(result.total_norm, at::TensorOptions().dtype(total_type));
}

// torch's total norm of tensors, from their per-tensor norms, which go to tensor_norms_out (one double
// per tensor, each rounded to its tensor's dtype).
at::Tensor torch_total_norm(at::TensorList tensors, Norm norm, double* tensor_norms_out) {
  const at::ScalarType total_type = total_norm_type(tensors);
  KernelTensors kernel_tensors(tensors, total_type);
  cpu::tensor_norms(kernel_tensors.views.data(), kernel_tensors.views.size(), norm, aten_parallel_for(),
                    tensor_norms_out);
  const double total = cpu::total_norm(tensor_norms_out, tensors.size(), norm, kernel_dtype(total_type));
  return at::scalar_tensor(total, at::TensorOptions().dtype(total_type));
}

at::Tensor total_norm_cpu(at::TensorList tensors, double norm_type, bool overflow_safe) {
  const Norm norm = checked_norm(tensors, norm_type, "total_norm");
  if (overflow_safe) {
    const at::ScalarType type = overflow_safe_total_type(tensors);
    return overflow_safe_total(KernelTensors(tensors, type), norm, type);
  }
  std::vector<double> norms(tensors.size());
  return torch_total_norm(tensors, norm, norms.data());
}

std::tuple<at::Tensor, at::Tensor> tensor_norms_cpu(at::TensorList tensors, double norm_type) {
  const Norm norm = checked_norm(tensors, norm_type, "tensor_norms");
  at::Tensor norms = at::empty({static_cast<int64_t>(tensors.size())}, at::TensorOptions().dtype(at::kDouble));
  at::Tensor total = torch_total_norm(tensors, norm, norms.data_ptr<double>());
  return {total, norms};
}

at::Tensor clip_cpu(at::TensorList grads, double max_norm, double norm_type, bool overflow_safe) {
  const Norm norm = checked_norm(grads, norm_type, "clip_");
  if (overflow_safe) {
    const at::ScalarType type = overflow_safe_total_type(grads);
    KernelTensors kernel_tensors(grads, type);
    at::Tensor total = overflow_safe_total(kernel_tensors, norm, type);
    const double coefficient = cpu::clip_coefficient(total.item<double>(), max_norm, kernel_dtype(type));
    cpu::scale(kernel_tensors.views.data(), kernel_tensors.views.size(), coefficient, aten_parallel_for());
    if (coefficient != 1.0) kernel_tensors.write_back();
    return total;
  }
  return clip_with_torch_norms(grads, max_norm, norm, nullptr);
}

std::tuple<at::Tensor, at::Tensor> clip_with_tensor_norms_cpu(at::TensorList grads, double max_norm, double norm_type) {
  const Norm norm = checked_norm(grads, norm_type, "clip_with_tensor_norms_");
  at::Tensor tensor_norms = at::empty({static_cast<int64_t>(grads.size())}, at::TensorOptions().dtype(at::kDouble));
  at::Tensor total = clip_with_torch_norms(grads, max_norm, norm, tensor_norms.data_ptr<double>());
  return {total, tensor_norms};
}

void scale_with_norm_cpu(at::TensorList grads, double max_norm, const at::Tensor& total_norm) {
  TORCH_CHECK(total_norm.numel() == 1, "fastclip: total_norm must have one element");
  const double coefficient =
      cpu::clip_coefficient(total_norm.item<double>(), max_norm, kernel_dtype(total_norm.scalar_type()));
  KernelTensors kernel_tensors(grads, total_norm.scalar_type());
  cpu::scale(kernel_tensors.views.data(), kernel_tensors.views.size(), coefficient, aten_parallel_for());
  if (coefficient != 1.0) kernel_tensors.write_back();
}

void clamp_values_cpu(at::TensorList grads, double clip_value) {
  KernelTensors kernel_tensors(grads, at::kFloat);  // no coefficient: the type is not used
  cpu::clamp_values(kernel_tensors.views.data(), kernel_tensors.views.size(), clip_value, aten_parallel_for());
  kernel_tensors.write_back();
}

// Each gradient clipped by its own norm, as torch's clip_grad_norm_ called on it alone: the norms from
// one parallel pass over all of them (float64 vector, each rounded to its gradient's dtype), then
// each gradient whose coefficient is below 1 scaled, in its own dtype's arithmetic.
at::Tensor clip_per_tensor_cpu(at::TensorList grads, double max_norm, double norm_type) {
  const Norm norm = checked_norm(grads, norm_type, "clip_per_tensor_");
  DenseTensors dense(grads, at::kCPU);
  std::vector<cpu::TensorView> views;
  for (size_t i = 0; i < grads.size(); ++i)
    views.push_back({dense.dense[i]->data_ptr(), dense.dense[i]->numel(), kernel_dtype(grads[i].scalar_type())});
  at::Tensor norms = at::empty({static_cast<int64_t>(grads.size())}, at::TensorOptions().dtype(at::kDouble));
  double* out = norms.data_ptr<double>();
  cpu::tensor_norms(views.data(), static_cast<int64_t>(views.size()), norm, aten_parallel_for(), out);
  // clip_grad_norm_ of one gradient: its total norm is |its norm|, in its dtype.
  std::vector<double> coefficients(views.size());
  bool scaled = false;
  for (size_t i = 0; i < views.size(); ++i) {
    coefficients[i] = cpu::clip_coefficient(std::abs(out[i]), max_norm, views[i].dtype);
    scaled = scaled || coefficients[i] != 1.0;
  }
  cpu::scale_each(views.data(), static_cast<int64_t>(views.size()), coefficients.data(), aten_parallel_for());
  if (scaled) dense.write_back();
  return norms;
}

// Each gradient multiplied by a given float64 coefficient (one for all, or one per gradient), as
// torch's mul_ by a 0-dim float64 tensor: the coefficient in the gradient's arithmetic type, a 0-dim
// gradient in double. A gradient whose coefficient is 1 is neither read nor written (x * 1 == x).
void scale_by_cpu(at::TensorList grads, const at::Tensor& coefficients) {
  const int64_t count = static_cast<int64_t>(grads.size());
  TORCH_CHECK(coefficients.scalar_type() == at::kDouble && coefficients.device().is_cpu(),
              "fastclip: scale_by_ expects float64 CPU coefficients, got ", coefficients.scalar_type(), " on ",
              coefficients.device());
  TORCH_CHECK(coefficients.numel() == 1 || coefficients.numel() == count, "fastclip: scale_by_ expects one coefficient ",
              "or one per gradient (", count, "), got ", coefficients.numel());
  const at::Tensor values = coefficients.contiguous();
  const double* c = values.data_ptr<double>();
  KernelTensors kernel_tensors(grads, at::kDouble);
  if (values.numel() == 1) {
    cpu::scale(kernel_tensors.views.data(), count, c[0], aten_parallel_for());
  } else {
    cpu::scale_each(kernel_tensors.views.data(), count, c, aten_parallel_for());
  }
  if (std::any_of(c, c + values.numel(), [](double k) { return k != 1.0; })) kernel_tensors.write_back();
}

// AGC: parameters and gradients as row-major contiguous buffers (units are rows of dimension 0);
// a gradient that is not contiguous is clipped in a copy and written back.
void adaptive_clip_cpu(at::TensorList params, at::TensorList grads, double clip_factor, double eps) {
  TORCH_CHECK(params.size() == grads.size(), "fastclip: adaptive_clip_ needs one gradient per parameter");
  std::vector<at::Tensor> param_buffers, grad_buffers;
  std::vector<std::pair<at::Tensor, at::Tensor>> copies;
  std::vector<cpu::AgcTensor> views;
  for (size_t i = 0; i < grads.size(); ++i) {
    const at::Tensor& p = params[i];
    const at::Tensor& g = grads[i];
    TORCH_CHECK(p.sizes() == g.sizes() && p.scalar_type() == g.scalar_type(), "fastclip: adaptive_clip_: parameter ",
                i, " (", p.sizes(), ", ", p.scalar_type(), ") and its gradient (", g.sizes(), ", ", g.scalar_type(),
                ") differ in shape or dtype");
    TORCH_CHECK(p.device().is_cpu() && g.device().is_cpu() && p.layout() == at::kStrided && g.layout() == at::kStrided,
                "fastclip: adaptive_clip_ expects strided CPU tensors");
    param_buffers.push_back(p.contiguous());
    if (g.is_contiguous()) {
      grad_buffers.push_back(g);
    } else {
      grad_buffers.push_back(g.contiguous());
      copies.emplace_back(g, grad_buffers.back());
    }
    const int64_t units = g.dim() <= 1 ? 1 : g.size(0);
    if (g.numel() == 0) continue;
    views.push_back({param_buffers.back().data_ptr(), grad_buffers.back().data_ptr(), units, g.numel() / units,
                     kernel_dtype(g.scalar_type())});
  }
  cpu::adaptive_clip(views.data(), static_cast<int64_t>(views.size()), clip_factor, eps, aten_parallel_for());
  for (auto& [original, copy] : copies) original.copy_(copy);
}

}  // namespace

CudaFunctions& cuda_functions() {
  static CudaFunctions functions;
  return functions;
}

TORCH_LIBRARY(fastclip, m) {
  m.def("total_norm(Tensor[] tensors, float norm_type, bool overflow_safe=False) -> Tensor");
  // total_norm that also returns each tensor's norm (float64, as torch's per-tensor norms, rounded to
  // the tensor's dtype), writing nothing: the per-tensor clippers' (AdaGC's) one read.
  m.def("tensor_norms(Tensor[] tensors, float norm_type) -> (Tensor, Tensor)");
  m.def("clip_(Tensor(a!)[] grads, float max_norm, float norm_type, bool overflow_safe=False) -> Tensor");
  m.def("scale_with_norm_(Tensor(a!)[] grads, float max_norm, Tensor total_norm) -> ()");
  // clip_ that also returns each gradient's norm (float64, as torch's per-tensor norms, rounded to
  // the gradient's dtype): from the same pass, for monitoring.
  m.def("clip_with_tensor_norms_(Tensor(a!)[] grads, float max_norm, float norm_type) -> (Tensor, Tensor)");
  // clip_grad_value_: every element clamped to [-clip_value, clip_value], in one pass.
  m.def("clamp_values_(Tensor(a!)[] grads, float clip_value) -> ()");
  // Each gradient clipped by its own norm (torch's clip_grad_norm_ on each alone); returns the norms
  // (float64, one per gradient).
  m.def("clip_per_tensor_(Tensor(a!)[] grads, float max_norm, float norm_type) -> Tensor");
  // Adaptive gradient clipping (timm's unit-wise rule), CPU only.
  m.def("adaptive_clip_(Tensor[] params, Tensor(a!)[] grads, float clip_factor, float eps) -> ()");
  // Each gradient times a float64 coefficient computed elsewhere (one, or one per gradient), skipping
  // those whose coefficient is 1: the adaptive clippers' scaling. CPU only.
  m.def("scale_by_(Tensor(a!)[] grads, Tensor coefficients) -> ()");
}

TORCH_LIBRARY_IMPL(fastclip, CPU, m) {
  m.impl("total_norm", &total_norm_cpu);
  m.impl("tensor_norms", &tensor_norms_cpu);
  m.impl("clip_", &clip_cpu);
  m.impl("scale_with_norm_", &scale_with_norm_cpu);
  m.impl("clip_with_tensor_norms_", &clip_with_tensor_norms_cpu);
  m.impl("clamp_values_", &clamp_values_cpu);
  m.impl("adaptive_clip_", &adaptive_clip_cpu);
  m.impl("clip_per_tensor_", &clip_per_tensor_cpu);
  m.impl("scale_by_", &scale_by_cpu);
}

}  // namespace fastclip

namespace {

// The bytes a strided tensor can touch: [begin, end).
struct MemoryExtent {
  uintptr_t begin;
  uintptr_t end;
  Py_ssize_t index;
};

MemoryExtent extent_of(const at::Tensor& t, Py_ssize_t index) {
  int64_t last = 0;  // offset of the last element, in elements (torch strides are never negative)
  for (int64_t d = 0; d < t.dim(); ++d) last += (t.size(d) - 1) * t.stride(d);
  const auto begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  return {begin, begin + static_cast<uintptr_t>((last + 1) * t.element_size()), index};
}

// The first pair of tensors (in list order) that share elements, or (-1, -1). Extents are sorted
// and each compared with the one reaching furthest before it; where extents meet, ATen decides
// whether elements are shared (two interleaved strided views share none; "too hard" counts as no).
std::pair<Py_ssize_t, Py_ssize_t> first_shared_memory(std::vector<MemoryExtent>& extents, PyObject* tensors) {
  std::sort(extents.begin(), extents.end(), [](const MemoryExtent& a, const MemoryExtent& b) { return a.begin < b.begin; });
  const MemoryExtent* furthest = nullptr;
  for (const MemoryExtent& e : extents) {
    if (furthest != nullptr && e.begin < furthest->end) {
      const at::Tensor& a = THPVariable_Unpack(PyList_GET_ITEM(tensors, furthest->index));
      const at::Tensor& b = THPVariable_Unpack(PyList_GET_ITEM(tensors, e.index));
      const at::MemOverlapStatus status = at::get_overlap_status(a, b);
      if (status == at::MemOverlapStatus::Full || status == at::MemOverlapStatus::Partial)
        return {std::min(furthest->index, e.index), std::max(furthest->index, e.index)};
    }
    if (furthest == nullptr || e.end > furthest->end) furthest = &e;
  }
  return {-1, -1};
}

// fastclip._C.summarize(tensors: list) -> (devices, dtypes, layouts, self_overlapping, shared) | None
//
// The distinct devices, dtypes and layouts of a list of plain tensors, as three Python sets, and
// whether any of them overlaps itself in memory (an expanded view, which cannot be scaled in place)
// and the first pair that share elements (or None), which must not both be scaled: what
// backend selection asks on every step about every gradient, in one C++ pass (a few ns per tensor
// instead of ~300 ns of Python attribute lookups). None for anything but a list of exact
// torch.Tensor/Parameter objects (subclasses may answer differently), and the caller then asks
// in Python.
PyObject* summarize(PyObject* /*module*/, PyObject* tensors) {
  if (!PyList_Check(tensors)) Py_RETURN_NONE;
  std::vector<at::Device> devices;
  std::vector<at::ScalarType> dtypes;
  std::vector<at::Layout> layouts;
  bool self_overlapping = false;
  std::vector<MemoryExtent> extents;
  const Py_ssize_t size = PyList_GET_SIZE(tensors);
  for (Py_ssize_t i = 0; i < size; ++i) {
    PyObject* item = PyList_GET_ITEM(tensors, i);
    if (!THPVariable_CheckExact(item)) Py_RETURN_NONE;
    const at::Tensor& t = THPVariable_Unpack(item);
    if (std::find(devices.begin(), devices.end(), t.device()) == devices.end()) devices.push_back(t.device());
    if (std::find(dtypes.begin(), dtypes.end(), t.scalar_type()) == dtypes.end()) dtypes.push_back(t.scalar_type());
    if (std::find(layouts.begin(), layouts.end(), t.layout()) == layouts.end()) layouts.push_back(t.layout());
    if (t.layout() == at::kStrided && !t.is_contiguous())  // contiguous tensors never overlap themselves
      self_overlapping |= at::has_internal_overlap(t) == at::MemOverlap::Yes;
    if (t.layout() == at::kStrided && t.numel() > 0 && t.has_storage()) extents.push_back(extent_of(t, i));
  }
  const auto [first, second] = first_shared_memory(extents, tensors);
  PyObject* sets[3] = {PySet_New(nullptr), PySet_New(nullptr), PySet_New(nullptr)};
  bool ok = sets[0] && sets[1] && sets[2];
  for (const at::Device& d : devices) {
    PyObject* object = ok ? THPDevice_New(d) : nullptr;
    ok = object != nullptr && PySet_Add(sets[0], object) == 0;
    Py_XDECREF(object);
  }
  for (at::ScalarType t : dtypes) ok = ok && PySet_Add(sets[1], reinterpret_cast<PyObject*>(torch::getTHPDtype(t))) == 0;
  for (at::Layout l : layouts) ok = ok && PySet_Add(sets[2], reinterpret_cast<PyObject*>(torch::getTHPLayout(l))) == 0;
  if (!ok) {
    for (PyObject* set : sets) Py_XDECREF(set);
    return nullptr;
  }
  if (first < 0) return Py_BuildValue("(NNNOO)", sets[0], sets[1], sets[2], self_overlapping ? Py_True : Py_False, Py_None);
  return Py_BuildValue("(NNNO(nn))", sets[0], sets[1], sets[2], self_overlapping ? Py_True : Py_False, first, second);
}

// Direct entries for eager calls: the same functions the operators bind, called
// without the dispatcher. Passing a list of N tensors through torch.ops converts each to an IValue
// and, as the op runs without the GIL, retakes the GIL to release each one afterwards: ~0.13 us per
// tensor, more than the kernels' own work on small gradients. Here the list's tensors are borrowed
// (BorrowedTensors); the kernels still run without the GIL. Each entry returns NotImplemented
// for anything but a list of exact torch.Tensor/Parameter objects, and the caller then uses the
// operator (cpp_backend.py also does for traced code, active modes and the profiler).

// at::Tensor handles to the tensors of a Python list, borrowed as c10::MaybeOwned borrows them: no
// reference count changes. A new reference to a tensor that has a Python object also takes a
// reference to that object (with the GIL), ~20 ns per tensor each way. The list, which the caller
// holds, keeps every tensor alive meanwhile; the handles are released, not destroyed.
struct BorrowedTensors {
  std::vector<at::Tensor> tensors;

  BorrowedTensors() = default;
  BorrowedTensors(const BorrowedTensors&) = delete;
  BorrowedTensors& operator=(const BorrowedTensors&) = delete;
  ~BorrowedTensors() {
    for (at::Tensor& t : tensors) t.unsafeReleaseTensorImpl();
  }

  // Borrows the tensors of `list`; false if it is not a list of exact tensors.
  bool borrow(PyObject* list) {
    if (!PyList_Check(list)) return false;
    const Py_ssize_t size = PyList_GET_SIZE(list);
    tensors.reserve(size);
    for (Py_ssize_t i = 0; i < size; ++i) {
      PyObject* item = PyList_GET_ITEM(list, i);
      if (!THPVariable_CheckExact(item)) return false;
      tensors.emplace_back(c10::intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>::reclaim(
          THPVariable_Unpack(item).unsafeGetTensorImpl()));
    }
    return true;
  }
};

// Whether the call is for the CPU kernels (an empty list is, for their error message); otherwise
// the CUDA ones, which check the device themselves.
bool on_cpu(const BorrowedTensors& tensors) {
  return tensors.tensors.empty() || tensors.tensors[0].is_cpu();
}

// body() run with the GIL released (restored before any exception goes on).
template <typename Body>
auto without_gil(Body body) -> decltype(body()) {
  PyThreadState* state = PyEval_SaveThread();
  try {
    auto result = body();
    PyEval_RestoreThread(state);
    return result;
  } catch (...) {
    PyEval_RestoreThread(state);
    throw;
  }
}

bool parse_doubles(PyObject* const* args, Py_ssize_t first, Py_ssize_t count, double* out) {
  for (Py_ssize_t i = 0; i < count; ++i) {
    out[i] = PyFloat_AsDouble(args[first + i]);
    if (out[i] == -1.0 && PyErr_Occurred()) return false;
  }
  return true;
}

// _C.clip_(grads: list, max_norm: float, norm_type: float, overflow_safe: bool) -> Tensor (CPU or CUDA)
PyObject* direct_clip(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  TORCH_CHECK(nargs == 4, "fastclip._C.clip_ takes 4 arguments");
  BorrowedTensors grads;
  double numbers[2];
  if (!grads.borrow(args[0])) Py_RETURN_NOTIMPLEMENTED;
  if (!parse_doubles(args, 1, 2, numbers)) return nullptr;
  const bool overflow_safe = PyObject_IsTrue(args[3]) == 1;
  const auto clip = on_cpu(grads) ? &fastclip::clip_cpu : fastclip::cuda_functions().clip;
  if (clip == nullptr) Py_RETURN_NOTIMPLEMENTED;
  at::Tensor total = without_gil([&] { return clip(grads.tensors, numbers[0], numbers[1], overflow_safe); });
  return THPVariable_Wrap(std::move(total));
  END_HANDLE_TH_ERRORS
}

// _C.total_norm(tensors: list, norm_type: float, overflow_safe: bool) -> Tensor (CPU or CUDA)
PyObject* direct_total_norm(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  TORCH_CHECK(nargs == 3, "fastclip._C.total_norm takes 3 arguments");
  BorrowedTensors tensors;
  double norm_type;
  if (!tensors.borrow(args[0])) Py_RETURN_NOTIMPLEMENTED;
  if (!parse_doubles(args, 1, 1, &norm_type)) return nullptr;
  const bool overflow_safe = PyObject_IsTrue(args[2]) == 1;
  const auto total_norm = on_cpu(tensors) ? &fastclip::total_norm_cpu : fastclip::cuda_functions().total_norm;
  if (total_norm == nullptr) Py_RETURN_NOTIMPLEMENTED;
  at::Tensor total = without_gil([&] { return total_norm(tensors.tensors, norm_type, overflow_safe); });
  return THPVariable_Wrap(std::move(total));
  END_HANDLE_TH_ERRORS
}

// _C.scale_by_(grads: list, coefficients: Tensor) -> None (CPU: the operator has no CUDA kernel)
PyObject* direct_scale_by(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  TORCH_CHECK(nargs == 2, "fastclip._C.scale_by_ takes 2 arguments");
  BorrowedTensors grads;
  if (!grads.borrow(args[0]) || !on_cpu(grads) || !THPVariable_Check(args[1])) Py_RETURN_NOTIMPLEMENTED;
  const at::Tensor& coefficients = THPVariable_Unpack(args[1]);
  without_gil([&] { fastclip::scale_by_cpu(grads.tensors, coefficients); return 0; });
  Py_RETURN_NONE;
  END_HANDLE_TH_ERRORS
}

PyMethodDef methods[] = {
    {"summarize", summarize, METH_O, "(devices, dtypes, layouts, self_overlapping, shared pair) of a list of plain tensors, or None"},
    {"clip_", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(direct_clip)), METH_FASTCALL,
     "fastclip::clip_ on a list of CPU tensors without the dispatcher, or NotImplemented"},
    {"total_norm", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(direct_total_norm)), METH_FASTCALL,
     "fastclip::total_norm on a list of CPU tensors without the dispatcher, or NotImplemented"},
    {"scale_by_", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(direct_scale_by)), METH_FASTCALL,
     "fastclip::scale_by_ on a list of CPU tensors without the dispatcher, or NotImplemented"},
    {nullptr, nullptr, 0, nullptr},
};

}  // namespace

// The GPU architectures the CUDA kernels were compiled for (setup.py passes TORCH_CUDA_ARCH_LIST as
// e.g. 80_90_100); empty in a CPU-only build.
#define FASTCLIP_STRINGIFY(x) #x
#define FASTCLIP_STRING(x) FASTCLIP_STRINGIFY(x)
#ifdef FASTCLIP_CUDA_ARCHS
constexpr const char* kCudaArchs = FASTCLIP_STRING(FASTCLIP_CUDA_ARCHS);
#else
constexpr const char* kCudaArchs = "";
#endif

// Importing fastclip._C from Python loads this library, which registers the operators above, and
// gives the module its one helper and ``cuda_archs`` (plain CPython API; no pybind11 needed).
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  PyObject* m = PyModule_Create(&module);
  if (m != nullptr && PyModule_AddStringConstant(m, "cuda_archs", kCudaArchs) != 0) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
