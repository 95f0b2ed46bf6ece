// fastclip._C as a Python module: the helper that summarises a list of tensors for backend
// selection, and the direct entries that call the operators' functions without the dispatcher.
// Importing the module loads the library, which registers the operators (fastclip_ops.cpp,
// fastclip_cuda_ops.cpp). Plain CPython API; no pybind11.
#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <Python.h>
#include <torch/csrc/Device.h>
#include <torch/csrc/DynamicTypes.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu/clip_kernels.h"
#include "op_helpers.h"

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

// Sorts extents by their first byte. Gradients come mostly in address order, or in its reverse
// (backward allocates them from the last layer to the first), with jumps where the allocator reused
// memory (10,000 gradients of 1.6 KB: 72 ascending runs; allocated in reverse: 38 descending ones):
// a natural merge sort takes those runs as they are (descending ones reversed) and merges them
// pairwise, n log(runs) moves: 10,000 one-element gradients, 2,056 runs, 0.16 ms with std::sort,
// 0.055 ms so (AMD EPYC).
void sort_by_address(std::vector<MemoryExtent>& extents) {
  const auto by_address = [](const MemoryExtent& a, const MemoryExtent& b) { return a.begin < b.begin; };
  const size_t n = extents.size();
  std::vector<size_t> bounds{0};  // run r is [bounds[r], bounds[r + 1])
  for (size_t i = 0; i < n;) {
    size_t j = i + 1;
    if (j < n && by_address(extents[j], extents[i])) {
      while (j < n && by_address(extents[j], extents[j - 1])) ++j;
      std::reverse(extents.begin() + i, extents.begin() + j);
    } else {
      while (j < n && !by_address(extents[j], extents[j - 1])) ++j;
    }
    bounds.push_back(j);
    i = j;
  }
  if (bounds.size() <= 2) return;  // one run
  std::vector<MemoryExtent> merged(n);
  while (bounds.size() > 2) {
    std::vector<size_t> merged_bounds{0};
    size_t r = 0;
    for (; r + 2 < bounds.size(); r += 2) {  // runs r and r + 1
      std::merge(extents.begin() + bounds[r], extents.begin() + bounds[r + 1], extents.begin() + bounds[r + 1],
                 extents.begin() + bounds[r + 2], merged.begin() + bounds[r], by_address);
      merged_bounds.push_back(bounds[r + 2]);
    }
    if (r + 1 < bounds.size()) {  // an odd run out
      std::copy(extents.begin() + bounds[r], extents.end(), merged.begin() + bounds[r]);
      merged_bounds.push_back(n);
    }
    extents.swap(merged);
    bounds.swap(merged_bounds);
  }
}

// The first pair of tensors (in list order) that share elements, or (-1, -1). Extents are sorted
// and each compared with the one reaching furthest before it; where extents meet, ATen decides
// whether elements are shared (two interleaved strided views share none; "too hard" counts as no).
// tensor(i) is the tensor of index i.
template <class TensorAt>
std::pair<Py_ssize_t, Py_ssize_t> first_shared_memory(std::vector<MemoryExtent>& extents, TensorAt tensor) {
  sort_by_address(extents);
  const MemoryExtent* furthest = nullptr;
  for (const MemoryExtent& e : extents) {
    if (furthest != nullptr && e.begin < furthest->end) {
      const at::Tensor& a = tensor(furthest->index);
      const at::Tensor& b = tensor(e.index);
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
  const auto [first, second] = first_shared_memory(
      extents, [tensors](Py_ssize_t i) -> const at::Tensor& { return THPVariable_Unpack(PyList_GET_ITEM(tensors, i)); });
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

// A kernel of a direct entry that returns a tensor: (tensors, the entry's float arguments, overflow_safe).
using NormKernel = at::Tensor (*)(at::TensorList tensors, const double* numbers, bool overflow_safe);

// The direct entry name(tensors: list, kNumbers floats, overflow_safe: bool) -> Tensor, running
// `cpu` or `cuda` by the tensors' device (NotImplemented where that kernel is null).
template <int kNumbers>
PyObject* norm_entry(PyObject* const* args, Py_ssize_t nargs, const char* name, NormKernel cpu, NormKernel cuda) {
  HANDLE_TH_ERRORS
  TORCH_CHECK(nargs == kNumbers + 2, "fastclip._C.", name, " takes ", kNumbers + 2, " arguments");
  BorrowedTensors tensors;
  double numbers[kNumbers];
  if (!tensors.borrow(args[0])) Py_RETURN_NOTIMPLEMENTED;
  if (!parse_doubles(args, 1, kNumbers, numbers)) return nullptr;
  const bool overflow_safe = PyObject_IsTrue(args[kNumbers + 1]) == 1;
  const NormKernel kernel = on_cpu(tensors) ? cpu : cuda;
  if (kernel == nullptr) Py_RETURN_NOTIMPLEMENTED;
  at::Tensor result = without_gil([&] { return kernel(tensors.tensors, numbers, overflow_safe); });
  return THPVariable_Wrap(std::move(result));
  END_HANDLE_TH_ERRORS
}

// _C.clip_(grads: list, max_norm: float, norm_type: float, overflow_safe: bool) -> Tensor (CPU or CUDA)
PyObject* direct_clip(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  const NormKernel cpu = [](at::TensorList t, const double* n, bool safe) { return fastclip::clip_cpu(t, n[0], n[1], safe); };
  const NormKernel cuda = [](at::TensorList t, const double* n, bool safe) {
    return fastclip::cuda_functions().clip(t, n[0], n[1], safe);
  };
  return norm_entry<2>(args, nargs, "clip_", cpu, fastclip::cuda_functions().clip != nullptr ? cuda : nullptr);
}

// _C.total_norm(tensors: list, norm_type: float, overflow_safe: bool) -> Tensor (CPU or CUDA)
PyObject* direct_total_norm(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  const NormKernel cpu = [](at::TensorList t, const double* n, bool safe) { return fastclip::total_norm_cpu(t, n[0], safe); };
  const NormKernel cuda = [](at::TensorList t, const double* n, bool safe) {
    return fastclip::cuda_functions().total_norm(t, n[0], safe);
  };
  return norm_entry<1>(args, nargs, "total_norm", cpu, fastclip::cuda_functions().total_norm != nullptr ? cuda : nullptr);
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

// Taking a parameter's gradient follows a chain of objects: the parameter's Python object, its
// TensorImpl, its autograd metadata, the gradient's TensorImpl, and the gradient's storage (read by
// served_here and the kernels for the data pointer). When they are not in cache, as after the
// backward pass or any large kernel, each link costs a DRAM access, and one parameter's links
// are serial. So while parameter i is taken, the links of later parameters are loaded in stages,
// each stage one link further on, for a parameter whose previous link the stage before brought in;
// each link is followed once, its address kept in a ring until the next stage needs it. Measured in
// the benchmark's conditions (gradients just written, so none of these objects cached), 2 AMD EPYC
// cores, two runs: clip_ 2-3% faster on 2,000 gradients of 8K, 4-9% on 10,000 of 419; with all of
// them cached, -5% to +3% (noise) on 2,000 and 10,000 gradients, down to one element each.
// (The same for a plain list of tensors, with its shorter chain, gained nothing measurable.)
class ChainPrefetcher {
 public:
  explicit ChainPrefetcher(PyObject* parameters)
      : items_(reinterpret_cast<PyListObject*>(parameters)->ob_item), size_(PyList_GET_SIZE(parameters)) {
    for (Py_ssize_t i = -kObjectAhead; i < 0; ++i) advance(i);  // the first parameters' stages
  }

  // Advances every stage by one parameter, as parameter i is about to be taken.
  void advance(Py_ssize_t i) {
    if (i + kObjectAhead < size_) __builtin_prefetch(items_[i + kObjectAhead]);
    if (Py_ssize_t j = i + kImplAhead; j >= 0 && j < size_) {
      PyObject* item = items_[j];
      c10::TensorImpl* impl = THPVariable_CheckExact(item) ? THPVariable_Unpack(item).unsafeGetTensorImpl() : nullptr;
      impls_[j % kRing] = impl;
      if (impl != nullptr) prefetch_lines(impl, 2);
    }
    if (Py_ssize_t j = i + kMetaAhead; j >= 0 && j < size_) {
      c10::TensorImpl* impl = impls_[j % kRing];
      c10::AutogradMetaInterface* meta = impl != nullptr ? impl->autograd_meta() : nullptr;
      if (meta != nullptr) prefetch_lines(meta, 3);
      else impls_[j % kRing] = nullptr;  // no gradient to follow
    }
    if (Py_ssize_t j = i + kGradAhead; j >= 0 && j < size_) {
      c10::TensorImpl* impl = impls_[j % kRing];
      c10::TensorImpl* grad = impl != nullptr ? impl->grad().unsafeGetTensorImpl() : nullptr;
      grads_[j % kRing] = grad != c10::UndefinedTensorImpl::singleton() ? grad : nullptr;  // no gradient: the singleton
      if (grads_[j % kRing] != nullptr) prefetch_lines(grads_[j % kRing], 4);
    }
    if (Py_ssize_t j = i + kStorageAhead; j >= 0 && j < size_) {
      c10::TensorImpl* grad = grads_[j % kRing];
      if (grad != nullptr && grad->has_storage()) prefetch_lines(grad->storage().unsafeGetStorageImpl(), 2);
    }
  }

 private:
  static constexpr Py_ssize_t kObjectAhead = 16, kImplAhead = 12, kMetaAhead = 8, kGradAhead = 4, kStorageAhead = 2;
  static constexpr Py_ssize_t kRing = 16;  // > kImplAhead - kStorageAhead: a slot is reused only once its parameter is done

  static void prefetch_lines(const void* p, int lines) {
    for (int l = 0; l < lines; ++l) __builtin_prefetch(static_cast<const char*>(p) + 64 * l);
  }

  PyObject** items_;
  Py_ssize_t size_;
  c10::TensorImpl* impls_[kRing] = {};
  c10::TensorImpl* grads_[kRing] = {};
};

// Whether the fused kernels have a loop for this dtype.
bool has_kernel_dtype(at::ScalarType type) {
  return type == at::kFloat || type == at::kBFloat16 || type == at::kHalf || type == at::kDouble;
}

// The CPU kernels' views of gradients, built as GradientsOf takes them, for the common case: every
// gradient dense (contiguous or a permutation of it) on the CPU in a float dtype, none sharing
// memory with another. Then nothing walks the gradients again before the kernels: served_here's
// checks, the promotion of their dtypes and the operator's table (KernelTensors) each did, 0.34 ms
// together on 10,000 gradients of 1.6 KB (AMD EPYC), against ~0.15 ms for this table. Anything
// else (another device or layout, a copy to make, shared memory) sets `usable` false and the
// general checks decide, as before; they give the same views for the gradients accepted here.
struct DenseCpuViews {
  std::vector<fastclip::cpu::TensorView> views;
  std::vector<MemoryExtent> extents;  // of the non-empty gradients, by index into the taken list
  at::ScalarType total_type = at::ScalarType::Undefined;  // torch's total norm's: the dtypes' promotion
  bool usable = true;
  bool any_empty = false;

  // The next gradient, index `index` of the taken list.
  void add(const at::Tensor& g, Py_ssize_t index) {
    if (!usable) return;
    const at::ScalarType type = g.scalar_type();
    if (!g.is_cpu() || g.layout() != at::kStrided || !g.has_storage() || !has_kernel_dtype(type) ||
        !g.is_non_overlapping_and_dense()) {
      usable = false;
      return;
    }
    total_type = views.empty() ? type : c10::promoteTypes(total_type, type);
    const int64_t numel = g.numel();
    // A 0-dim gradient scales in double when the coefficient is fp64 (KernelTensors): which is known
    // only after the last dtype, so 0-dim is noted here and resolved in ready().
    views.push_back({g.data_ptr(), numel, fastclip::kernel_dtype(type), g.dim() == 0});
    if (numel == 0) {
      any_empty = true;
    } else {
      const auto begin = reinterpret_cast<uintptr_t>(views.back().data);
      extents.push_back({begin, begin + static_cast<uintptr_t>(numel * g.element_size()), index});
    }
  }

  // Whether the views serve clip_ with this norm type (not overflow-safe): the inf norm of an empty
  // gradient is an error, which the general path raises. `tensor(i)` is the taken gradient i.
  template <class TensorAt>
  bool ready(double norm_type, TensorAt tensor) {
    if (!usable || views.empty() || (std::isinf(norm_type) && any_empty)) return false;
    if (first_shared_memory(extents, tensor).first >= 0) return false;
    for (fastclip::cpu::TensorView& view : views) view.scale_in_double = view.scale_in_double && total_type == at::kDouble;
    return true;
  }
};

// The gradients of a list of parameters, as torch's [p.grad for p in parameters if p.grad is not
// None] takes them, each held by a reference to its Python object (made, as reading p.grad in Python
// makes it, if the gradient has none yet) and borrowed as an at::Tensor.
struct GradientsOf {
  BorrowedTensors borrowed;  // declared first: released last, after the references below
  std::vector<PyObject*> objects;
  DenseCpuViews dense_cpu;  // the kernels' views, if they serve these gradients (see DenseCpuViews)

  GradientsOf() = default;
  GradientsOf(const GradientsOf&) = delete;
  GradientsOf& operator=(const GradientsOf&) = delete;
  ~GradientsOf() {
    for (PyObject* object : objects) Py_DECREF(object);
  }

  // Takes the gradients; false (the caller answers NotImplemented) unless every parameter and every
  // gradient is an exact torch.Tensor/Parameter object.
  bool take(PyObject* parameters) {
    const Py_ssize_t size = PyList_GET_SIZE(parameters);
    objects.reserve(size);
    dense_cpu.views.reserve(size);
    dense_cpu.extents.reserve(size);
    borrowed.tensors.reserve(size);
    ChainPrefetcher prefetcher(parameters);
    for (Py_ssize_t i = 0; i < size; ++i) {
      prefetcher.advance(i);
      PyObject* item = PyList_GET_ITEM(parameters, i);
      if (!THPVariable_CheckExact(item)) return false;
      const at::Tensor& parameter = THPVariable_Unpack(item);
      if (!parameter.is_leaf()) return false;  // Python's p.grad warns for those: the general path reads it
      const at::Tensor& grad = parameter.grad();
      if (!grad.defined()) continue;
      PyObject* object = THPVariable_Wrap(grad);
      if (object == nullptr) throw python_error();
      objects.push_back(object);
      if (!THPVariable_CheckExact(object)) return false;
      dense_cpu.add(grad, static_cast<Py_ssize_t>(borrowed.tensors.size()));
      borrowed.tensors.emplace_back(c10::intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>::reclaim(
          THPVariable_Unpack(object).unsafeGetTensorImpl()));
    }
    return true;
  }
};

// Whether the fused kernels here serve these gradients exactly as fastclip.clip_'s general path would
// have them served by the cpp backend: one device with kernels, float dtypes, strided layouts, none
// overlapping itself or another (the general path refuses those), the overflow-safe norm on CPU only.
bool served_here(const std::vector<at::Tensor>& grads, bool overflow_safe) {
  if (grads.empty()) return false;
  const at::Device device = grads[0].device();
  if (!(device.is_cpu() || (device.is_cuda() && fastclip::cuda_functions().clip != nullptr && !overflow_safe)))
    return false;
  std::vector<MemoryExtent> extents;
  extents.reserve(grads.size());
  for (size_t i = 0; i < grads.size(); ++i) {
    const at::Tensor& g = grads[i];
    const at::ScalarType type = g.scalar_type();
    if (g.device() != device || g.layout() != at::kStrided || !g.has_storage() || !has_kernel_dtype(type)) return false;
    if (!g.is_contiguous() && at::has_internal_overlap(g) == at::MemOverlap::Yes) return false;
    if (g.numel() > 0) extents.push_back(extent_of(g, static_cast<Py_ssize_t>(i)));
  }
  return first_shared_memory(extents, [&grads](Py_ssize_t i) -> const at::Tensor& { return grads[i]; }).first < 0;
}

// fastclip._C.clip_parameters(parameters: list, max_norm: float, norm_type: float, overflow_safe: bool)
//     -> Tensor | NotImplemented
//
// fastclip.clip_'s whole call where the cpp backend serves it, in one pass over the parameters: the
// gradients taken in C++ (GradientsOf), checked (served_here) and clipped by the operator's function,
// without the GIL. Taking the gradients and the checks in Python cost ~0.17 us per parameter, more
// than clipping a small gradient. NotImplemented for anything else (a norm type without a kernel, no
// gradients, a tensor subclass, any gradient served_here refuses): fastclip.clip_ then takes its
// general path, which raises, or picks a backend, as it always has.
PyObject* clip_parameters(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  TORCH_CHECK(nargs == 4, "fastclip._C.clip_parameters takes 4 arguments");
  double numbers[2];
  if (!parse_doubles(args, 1, 2, numbers)) return nullptr;
  const double max_norm = numbers[0], norm_type = numbers[1];
  const bool overflow_safe = PyObject_IsTrue(args[3]) == 1;
  if (!PyList_Check(args[0]) || !(norm_type > 0)) Py_RETURN_NOTIMPLEMENTED;  // p <= 0 and NaN: no kernel
  GradientsOf grads;
  if (!grads.take(args[0])) Py_RETURN_NOTIMPLEMENTED;
  const auto taken = [&grads](Py_ssize_t i) -> const at::Tensor& { return grads.borrowed.tensors[i]; };
  if (!overflow_safe && grads.dense_cpu.ready(norm_type, taken)) {
    const DenseCpuViews& dense = grads.dense_cpu;
    at::Tensor total = without_gil([&] { return fastclip::clip_views_cpu(dense.views, dense.total_type, max_norm, norm_type); });
    return THPVariable_Wrap(std::move(total));
  }
  if (!served_here(grads.borrowed.tensors, overflow_safe)) Py_RETURN_NOTIMPLEMENTED;
  const auto clip = grads.borrowed.tensors[0].is_cpu() ? &fastclip::clip_cpu : fastclip::cuda_functions().clip;
  at::Tensor total = without_gil([&] { return clip(grads.borrowed.tensors, max_norm, norm_type, overflow_safe); });
  return THPVariable_Wrap(std::move(total));
  END_HANDLE_TH_ERRORS
}

// _C.release_captured_tables() -> int: drops the CUDA tables kept for captured graphs (0 without CUDA).
PyObject* release_captured_tables(PyObject* /*module*/, PyObject* /*unused*/) {
  HANDLE_TH_ERRORS
  const auto release = fastclip::cuda_functions().release_captured_tables;
  return PyLong_FromLongLong(release != nullptr ? release() : 0);
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
    {"clip_parameters", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(clip_parameters)), METH_FASTCALL,
     "fastclip.clip_ of a list of parameters in one pass where the cpp backend serves it, or NotImplemented"},
    {"release_captured_tables", release_captured_tables, METH_NOARGS,
     "drops the CUDA gradient tables kept for captured graphs; returns how many"},
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
