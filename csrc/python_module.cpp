// fastclip._C as a Python module: the helper that summarises a list of tensors for backend
// selection, and the direct entries that call the operators' functions without the dispatcher.
// Importing the module loads the library, which registers the operators (fastclip_ops.cpp,
// fastclip_cuda_ops.cpp). Plain CPython API; no pybind11.
#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <Python.h>
#include <torch/csrc/Device.h>
#include <torch/csrc/DynamicTypes.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/autograd/variable.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <thread>
#include <vector>

#include "cpu/chunks.h"
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

// The address of the first byte of each element of a strided tensor, ascending.
std::vector<uintptr_t> element_addresses(const at::Tensor& t) {
  std::vector<uintptr_t> addresses;
  addresses.reserve(t.numel());
  const int64_t dims = t.dim(), element = static_cast<int64_t>(t.element_size());
  std::vector<int64_t> index(dims, 0);
  const auto base = reinterpret_cast<uintptr_t>(t.data_ptr());
  for (int64_t n = 0; n < t.numel(); ++n) {
    int64_t offset = 0;
    for (int64_t d = 0; d < dims; ++d) offset += index[d] * t.stride(d);
    addresses.push_back(base + static_cast<uintptr_t>(offset * element));
    for (int64_t d = dims - 1; d >= 0 && ++index[d] == t.size(d); --d) index[d] = 0;  // the next index
  }
  std::sort(addresses.begin(), addresses.end());
  return addresses;
}

// Elements compared, at most, per call of first_shared_memory (two address lists of this many
// elements hold 128 MiB): beyond, two strided tensors whose extents meet count as sharing, and the
// caller refuses them.
constexpr int64_t kMaxElementsCompared = int64_t{1} << 23;

// Whether a and b (non-empty, neither overlapping itself), whose extents meet, share a byte. A
// dense tensor covers every byte of its extent, so two dense ones do. Otherwise the bytes of every
// element are compared (two interleaved strided views share none; a strided view and a slice over
// one of its elements do); `budget` is what is left of kMaxElementsCompared. (ATen's
// get_overlap_status answers "too hard" for any tensor that is not dense, and "no" for two storages
// at the same address: neither says whether they share.)
bool share_elements(const at::Tensor& a, const at::Tensor& b, int64_t& budget) {
  if (a.is_non_overlapping_and_dense() && b.is_non_overlapping_and_dense()) return true;
  budget -= a.numel() + b.numel();
  if (budget < 0) return true;
  const std::vector<uintptr_t> in_a = element_addresses(a), in_b = element_addresses(b);
  const auto size_a = static_cast<uintptr_t>(a.element_size()), size_b = static_cast<uintptr_t>(b.element_size());
  for (size_t i = 0, j = 0; i < in_a.size() && j < in_b.size();) {
    if (in_a[i] + size_a <= in_b[j]) ++i;
    else if (in_b[j] + size_b <= in_a[i]) ++j;
    else return true;
  }
  return false;
}

// A pair of tensors that share elements, or (-1, -1). Extents are sorted, and each is compared with
// every earlier one that reaches past its start (for gradients that do not overlap, at most the one
// before it). tensor(i) is the tensor of index i.
template <class TensorAt>
std::pair<Py_ssize_t, Py_ssize_t> first_shared_memory(std::vector<MemoryExtent>& extents, TensorAt tensor) {
  sort_by_address(extents);
  std::vector<const MemoryExtent*> reaching;  // earlier extents that end after the current one starts
  uintptr_t furthest = 0;  // the largest end among them
  int64_t budget = kMaxElementsCompared;
  for (const MemoryExtent& e : extents) {
    if (e.begin >= furthest) {  // clear of every earlier extent: the usual case, one comparison
      reaching.clear();
    } else {
      reaching.erase(std::remove_if(reaching.begin(), reaching.end(), [&e](const MemoryExtent* r) { return r->end <= e.begin; }),
                     reaching.end());
    }
    furthest = std::max(furthest, e.end);
    for (const MemoryExtent* r : reaching)
      if (share_elements(tensor(r->index), tensor(e.index), budget))
        return {std::min(r->index, e.index), std::max(r->index, e.index)};
    reaching.push_back(&e);
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
    // Tensors on one device can share memory (on another the same address is other memory); meta
    // tensors have none.
    if (t.layout() == at::kStrided && t.numel() > 0 && t.has_storage() && t.device() == devices[0] && !t.is_meta())
      extents.push_back(extent_of(t, i));
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
// the checks and the kernels for the data pointer). When they are not in cache, as after the
// backward pass or any large kernel, each link costs a DRAM access, and one parameter's links
// are serial. So while parameter i is taken, the links of later parameters are loaded in stages,
// each stage one link further on, for a parameter whose previous link the stage before brought in;
// each link is followed once, its address kept in a ring until the next stage needs it. Measured in
// the benchmark's conditions (gradients just written, so none of these objects cached), 2 AMD EPYC
// cores, two runs: clip_ 2-3% faster on 2,000 gradients of 8K, 4-9% on 10,000 of 419; with all of
// them cached, -5% to +3% (noise) on 2,000 and 10,000 gradients, down to one element each.
// (The same for a plain list of tensors, with its shorter chain, gained nothing measurable.)
// Stages 10 parameters apart rather than 4: on an Intel Xeon VM (2 cores), where the walk is the
// calling thread's share of clipping 10,000 gradients of 419, 4 apart left most of its time on
// loads of links still in flight (walk 0.74-0.91 -> 0.69-0.76 ms, clip_ 1.13-1.25 -> 1.05-1.14 ms,
// three alternating runs).
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
      const auto* meta = impl != nullptr ? static_cast<const torch::autograd::AutogradMeta*>(impl->autograd_meta()) : nullptr;
      c10::TensorImpl* grad = meta != nullptr ? meta->grad_.unsafeGetTensorImpl() : nullptr;
      grads_[j % kRing] = grad != c10::UndefinedTensorImpl::singleton() ? grad : nullptr;  // no gradient: the singleton
      if (grads_[j % kRing] != nullptr) prefetch_lines(grads_[j % kRing], 4);
    }
    if (Py_ssize_t j = i + kStorageAhead; j >= 0 && j < size_) {
      c10::TensorImpl* grad = grads_[j % kRing];
      if (grad != nullptr && grad->has_storage()) prefetch_lines(grad->storage().unsafeGetStorageImpl(), 2);
    }
  }

 private:
  static constexpr Py_ssize_t kObjectAhead = 40, kImplAhead = 30, kMetaAhead = 20, kGradAhead = 10, kStorageAhead = 5;
  static constexpr Py_ssize_t kRing = 32;  // > kImplAhead - kStorageAhead: a slot is reused only once its parameter is done

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

// What clip_parameters needs to know of the gradients, gathered in the walk that takes them, so that
// nothing walks them again: whether the fused kernels here serve them exactly as fastclip.clip_'s
// general path would have them served by the cpp backend (one device with kernels, float dtypes,
// strided layouts, none overlapping itself or another: the general path refuses those), and, for
// the common case on CPU (every gradient dense, i.e. contiguous or a permutation of it), the CPU
// kernels' views of them. The separate walks this replaces (the checks, the promotion of the
// dtypes, the operator's table KernelTensors) took 0.34 ms on 10,000 gradients of 1.6 KB (AMD EPYC),
// against ~0.15 ms for this.
struct GradientChecks {
  std::vector<MemoryExtent> extents;  // of the non-empty gradients, by index into the taken list
  std::vector<fastclip::cpu::TensorView> views;  // while cpu_views is true
  at::Device device = at::kCPU;  // the first gradient's
  at::ScalarType total_type = at::ScalarType::Undefined;  // torch's total norm's: the dtypes' promotion
  bool servable = true;
  bool cpu_views = true;
  bool any_empty = false;
  size_t count = 0;

  void reserve(size_t size) {
    extents.reserve(size);
    views.reserve(size);
  }

  // The next gradient, index `count` of the taken list.
  void add(const at::Tensor& g) {
    const Py_ssize_t index = static_cast<Py_ssize_t>(count++);
    if (!servable) return;
    const at::ScalarType type = g.scalar_type();
    const at::Device g_device = g.device();
    if (index == 0) device = g_device;
    if (g_device != device || g.layout() != at::kStrided || !g.has_storage() || !has_kernel_dtype(type)) {
      servable = false;
      return;
    }
    if (index == 0) total_type = type;
    else if (type != total_type) total_type = c10::promoteTypes(total_type, type);  // (a call: most lists have one dtype)
    const int64_t numel = g.numel();
    any_empty = any_empty || numel == 0;
    if (g.is_non_overlapping_and_dense()) {
      if (cpu_views && device.is_cpu()) {
        // A 0-dim gradient scales in double when the coefficient is fp64 (KernelTensors): known only
        // after the last dtype, so 0-dim is noted here and resolved in cpu_views_ready().
        views.push_back({g.data_ptr(), numel, fastclip::kernel_dtype(type), g.dim() == 0});
        if (numel > 0) {  // extent_of's, without its second data_ptr() and walk over the dimensions
          // (a dense tensor's elements fill its extent): 3-9% of the whole call on 10,000 x 1.6 KB
          const auto begin = reinterpret_cast<uintptr_t>(views.back().data);
          extents.push_back({begin, begin + static_cast<uintptr_t>(numel * g.element_size()), index});
        }
        return;
      }
    } else {
      cpu_views = false;  // a copy to make: the operator's KernelTensors does it
      if (!g.is_contiguous() && at::has_internal_overlap(g) == at::MemOverlap::Yes) {
        servable = false;
        return;
      }
    }
    if (numel > 0) extents.push_back(extent_of(g, index));
  }

  // Whether the fused kernels serve the gradients (see above); `tensor(i)` is the taken gradient i.
  template <class TensorAt>
  bool served(bool overflow_safe, TensorAt tensor) {
    if (count == 0 || !servable) return false;
    if (!(device.is_cpu() || (device.is_cuda() && fastclip::cuda_functions().clip != nullptr && !overflow_safe)))
      return false;
    return first_shared_memory(extents, tensor).first < 0;
  }

  // Whether `views` serve clip_ (after served()) with this norm type, not overflow-safe: the inf norm
  // of an empty gradient is an error, which the operator raises.
  bool cpu_views_ready(double norm_type, bool overflow_safe) {
    if (!device.is_cpu() || !cpu_views || overflow_safe || (std::isinf(norm_type) && any_empty)) return false;
    for (fastclip::cpu::TensorView& view : views) view.scale_in_double = view.scale_in_double && total_type == at::kDouble;
    return true;
  }
};

// Lets the CPU spinning in a wait loop give way to its sibling hyperthread.
inline void spin_pause() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

// Requests the first lines of a view's elements, at most kPrefetchBytes. NormsWhileTaking asks for
// the next gradient's before it reduces one: a small gradient is over before the hardware
// prefetchers pick up its stream, so its lines came one latency at a time (no clipping, in-process,
// alternating, AMD EPYC: 10,000 x 1.6 KB fp32 -10 to -14%, allocated by backward -8 to -11%, bf16
// -4 to -11%; 2,000 x 32 KB within 2%). Prefetches never fault.
inline void prefetch_first_lines(const fastclip::cpu::TensorView& view) {
  constexpr int64_t kPrefetchBytes = 2048;
  const int64_t bytes = std::min<int64_t>(view.numel * static_cast<int64_t>(fastclip::cpu::element_size(view.dtype)), kPrefetchBytes);
  for (int64_t offset = 0; offset < bytes; offset += 64) __builtin_prefetch(static_cast<const char*>(view.data) + offset);
}

// The norms of gradients computed by the pool's other threads while the calling thread is still
// taking them: taking needs the GIL, which only the calling thread holds, and on 10,000 gradients
// of 1.6 KB it costs about as much as reading them, while the other cores sat idle. The walker
// publishes how many views it has made (the views are reserved to their full number beforehand,
// so a published view never moves); each other thread claims blocks of published views and writes
// their norms with cpu::span_norm, which gives the bits of cpu::tensor_norms. Only gradients of one
// chunk (kChunkElements) are taken so: at the first larger one the threads stop and leave it and
// the rest to the kernels' pass after the walk, where every thread shares its chunks. What the
// threads computed is a prefix of the views, [0, known()).
// Aligned to cache lines, and the threads read its fields into locals: it lies on the stack next to
// the walker's vectors, whose end pointers change with every gradient, and sharing a line with them
// made every view cost the other threads a line fetched from the walker's core (10,000 one-element
// gradients 0.46 -> 0.90 ms in processes whose stack put them on one line).
class alignas(64) NormsWhileTaking {
 public:
  NormsWhileTaking(const fastclip::cpu::TensorView* views, fastclip::Norm norm) : views_(views), norm_(norm) {}

  // One per view, sized by prepare(): the norm, and the pool thread (at::get_thread_num()) that
  // computed it, which then scales the view (cpu::KnownNorms).
  std::vector<double> norms;
  std::vector<uint16_t> workers;

  // Before the threads start: room for `views` views, computed by a pool of `threads`.
  void prepare(int64_t views, int threads) {
    norms.resize(views);
    workers.resize(views);
    threads_ = threads;
  }

  // The walker: views [0, count) are made. Published a block at a time: each store takes the line
  // back from the threads that poll it, which cost about as much as taking a gradient.
  void publish(int64_t count) {
    if (count % kBlock == 0) published_.store(count, std::memory_order_release);
  }
  // The walker: no more views will come (it has taken every gradient, or given up); the last
  // `count` - published ones are published with this.
  void finish(int64_t count) {
    published_.store(count, std::memory_order_release);
    walk_over_.store(true, std::memory_order_release);
  }
  // The walker: the views made so far will not be used (a gradient that they do not serve).
  void give_up() { stopped_.store(true, std::memory_order_relaxed); }

  // Every thread, the walker once it has finished: claims and reduces published views until none is
  // left after finish(), give_up(), a large gradient, or, while the walk goes on, kMaxIdle without
  // one to claim. Leaving early is always safe (the kernels' pass computes what is missing), and the
  // wait is bounded so that threads spinning where the pool has more threads than the process has
  // cores do not keep the walker from running (8 threads on 2 cores, 10,000 gradients: 9.96 ms when
  // they waited until the walk ended, 0.88 ms so).
  void compute() {
    const fastclip::cpu::TensorView* const views = views_;
    double* const out = norms.data();
    uint16_t* const worker_out = workers.data();
    const auto worker = static_cast<uint16_t>(at::get_thread_num());
    const fastclip::Norm norm = norm_;
    std::chrono::steady_clock::time_point idle_since{};
    int64_t spins = 0;
    while (!stopped_.load(std::memory_order_relaxed)) {
      // walk_over_ read first: once it is seen, so is the last count published before it.
      const bool walk_over = walk_over_.load(std::memory_order_acquire);
      int64_t begin = claimed_.load(std::memory_order_relaxed);
      const int64_t available = published_.load(std::memory_order_acquire);
      if (begin >= available) {  // (another thread may have claimed views not yet seen published here)
        if (walk_over) return;  // every view claimed
        if (spins++ == 0) idle_since = std::chrono::steady_clock::now();
        else if (spins % 64 == 0 && std::chrono::steady_clock::now() - idle_since > kMaxIdle) return;
        spin_pause();
        continue;
      }
      spins = 0;
      if (views[begin].numel > fastclip::cpu::kChunkElements) {
        stopped_.store(true, std::memory_order_relaxed);
        return;
      }
      const int64_t limit = std::min(available, begin + kBlock);
      int64_t end = begin + 1;
      while (end < limit && views[end].numel <= fastclip::cpu::kChunkElements) ++end;
      if (!claimed_.compare_exchange_weak(begin, end, std::memory_order_relaxed)) continue;
      std::fill(worker_out + begin, worker_out + end, worker);
      // In ascending address order, which the prefetchers follow (backward allocates gradients
      // from the last layer to the first, at descending addresses down the list).
      const bool descending = std::less<const void*>()(views[end - 1].data, views[begin].data);
      for (int64_t k = 0; k < end - begin; ++k) {
        const fastclip::cpu::TensorView& view = views[descending ? end - 1 - k : begin + k];
        if (k + 1 < end - begin) prefetch_first_lines(views[descending ? end - 2 - k : begin + k + 1]);
        out[&view - views] = fastclip::cpu::span_norm(view.dtype, view.data, view.numel, norm);
      }
    }
  }

  // How many norms were computed, norms[0, known()); read once every thread has returned.
  int64_t known() const { return claimed_.load(std::memory_order_relaxed); }
  // The same, with who computed each (for the scaling); nothing where the walk ran alone.
  fastclip::cpu::KnownNorms known_norms() const {
    if (known() == 0) return {};
    return {known(), workers.data(), threads_};
  }

 private:
  static constexpr int64_t kBlock = 32;  // views per claim: ~50 KB of 1.6 KB gradients
  // The walker publishes a block every ~1.5 us (AMD EPYC); a wait 10 times as long means it is not
  // running, or not making views.
  static constexpr std::chrono::microseconds kMaxIdle{20};

  const fastclip::cpu::TensorView* views_;
  fastclip::Norm norm_;
  int threads_ = 0;
  // On lines of their own: the walker writes published_ and walk_over_, the others claimed_ and stopped_.
  alignas(64) std::atomic<int64_t> published_{0};
  std::atomic<bool> walk_over_{false};
  alignas(64) std::atomic<int64_t> claimed_{0};
  std::atomic<bool> stopped_{false};
};

// Whether the first parameter with a gradient has it on CPU (false if none has, or an item is not
// an exact tensor): only CPU gradients are worth reducing while they are taken.
bool first_gradient_on_cpu(PyObject* parameters) {
  for (Py_ssize_t i = 0; i < PyList_GET_SIZE(parameters); ++i) {
    PyObject* item = PyList_GET_ITEM(parameters, i);
    if (!THPVariable_CheckExact(item)) return false;
    const at::Tensor& parameter = THPVariable_Unpack(item);
    if (!parameter.is_leaf()) return false;  // as in take(): grad() warns for those
    const at::Tensor& grad = parameter.grad();
    if (grad.defined()) return grad.is_cpu();
  }
  return false;
}

// The gradients of a list of parameters, as torch's [p.grad for p in parameters if p.grad is not
// None] takes them, each held by a reference to its Python object (made, as reading p.grad in Python
// makes it, if the gradient has none yet) and borrowed as an at::Tensor, and checked (GradientChecks).
struct GradientsOf {
  BorrowedTensors borrowed;  // declared first: released last, after the references below
  std::vector<PyObject*> objects;
  GradientChecks checks;

  // For at most `size` gradients: nothing moves while they are taken.
  explicit GradientsOf(Py_ssize_t size) {
    objects.reserve(size);
    checks.reserve(size);
    borrowed.tensors.reserve(size);
  }
  GradientsOf(const GradientsOf&) = delete;
  GradientsOf& operator=(const GradientsOf&) = delete;
  ~GradientsOf() {
    for (PyObject* object : objects) Py_DECREF(object);
  }

  // Takes the gradients; false (the caller answers NotImplemented) unless every parameter and every
  // gradient is an exact torch.Tensor/Parameter object. Each view made is published to `norms`.
  bool take(PyObject* parameters, NormsWhileTaking* norms = nullptr) {
    const Py_ssize_t size = PyList_GET_SIZE(parameters);
    ChainPrefetcher prefetcher(parameters);
    for (Py_ssize_t i = 0; i < size; ++i) {
      prefetcher.advance(i);
      PyObject* item = PyList_GET_ITEM(parameters, i);
      if (!THPVariable_CheckExact(item)) return false;
      // The parameter's autograd metadata read directly, as torch's is_leaf() and grad() read it
      // behind calls into libtorch, a virtual one each (and grad() asks is_leaf() again, to warn):
      // the walk took 0.45-0.55 ms -> 0.38-0.41 on 10,000 parameters (one thread, AMD EPYC).
      const auto* meta = static_cast<const torch::autograd::AutogradMeta*>(
          THPVariable_Unpack(item).unsafeGetTensorImpl()->autograd_meta());
      if (meta == nullptr) continue;  // no autograd metadata: a leaf without a gradient
      if (meta->grad_fn_) return false;  // not a leaf: Python's p.grad warns for those, the general path reads it
      const at::Tensor& grad = meta->grad_;
      if (!grad.defined()) continue;
      PyObject* object = THPVariable_Wrap(grad);
      if (object == nullptr) throw python_error();
      objects.push_back(object);
      if (!THPVariable_CheckExact(object)) return false;
      checks.add(grad);
      if (norms != nullptr) {
        if (!checks.servable || !checks.cpu_views) norms->give_up();
        norms->publish(static_cast<int64_t>(checks.views.size()));
      }
      // (the object's tensor is grad's: held by the object's reference)
      borrowed.tensors.emplace_back(c10::intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>::reclaim(
          grad.unsafeGetTensorImpl()));
    }
    return true;
  }

  // take(), then `after_walk()` if every gradient was taken; meanwhile the pool's other threads
  // compute the norms of the CPU gradients taken (NormsWhileTaking) where that pays (`norms` is
  // left untouched otherwise): they go on with the views left when the walk ends while the caller
  // runs after_walk() (the checks that need every gradient), and the caller then joins them, so
  // that neither core waits for the other.
  template <class AfterWalk>
  void take_computing_norms(PyObject* parameters, NormsWhileTaking& norms, AfterWalk after_walk) {
#if AT_PARALLEL_OPENMP  // thread 0 of an OpenMP team is the calling thread, which holds the GIL
    const int threads = at::get_num_threads();
    if (threads > 1 && !at::in_parallel_region() && PyList_GET_SIZE(parameters) >= kMinimumToShare &&
        first_gradient_on_cpu(parameters)) {
      norms.prepare(PyList_GET_SIZE(parameters), threads);
      const std::thread::id caller = std::this_thread::get_id();
      const fastclip::CallerFloatingPoint floating_point;  // the caller's, e.g. flush-to-zero
      bool taken = false;
      at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
        if (std::this_thread::get_id() != caller) {
          const fastclip::CallerFloatingPoint::InThisThread same(floating_point);
          return norms.compute();
        }
        {
          struct Finish {  // even if taking throws
            NormsWhileTaking& norms;
            const GradientsOf& grads;
            const bool& taken;
            ~Finish() {
              if (!taken) norms.give_up();  // (the views made will not be used)
              norms.finish(static_cast<int64_t>(grads.checks.views.size()));
            }
          } finish{norms, *this, taken};
          taken = take(parameters, &norms);
        }
        if (!taken) return;
        after_walk();
        norms.compute();
      });
      return;
    }
#endif
    if (take(parameters)) after_walk();
  }

  // Fewer parameters are taken in less time than the pool's threads take to wake.
  static constexpr Py_ssize_t kMinimumToShare = 256;
};

// fastclip._C.clip_parameters(parameters: list, max_norm: float, norm_type: float, overflow_safe: bool)
//     -> Tensor | NotImplemented
//
// fastclip.clip_'s whole call where the cpp backend serves it, in one pass over the parameters: the
// gradients taken and checked in C++ (GradientsOf; the norms of CPU gradients computed meanwhile by
// the other threads, NormsWhileTaking) and clipped by the operator's function (dense CPU gradients
// straight from their views), without the GIL. Taking the gradients and the checks in
// Python cost ~0.17 us per parameter, more than clipping a small gradient. NotImplemented for
// anything else (a norm type without a kernel, no gradients, a tensor subclass, any gradient the
// checks refuse): fastclip.clip_ then takes its general path, which raises, or picks a backend, as
// it always has.
PyObject* clip_parameters(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  TORCH_CHECK(nargs == 4, "fastclip._C.clip_parameters takes 4 arguments");
  double numbers[2];
  if (!parse_doubles(args, 1, 2, numbers)) return nullptr;
  const double max_norm = numbers[0], norm_type = numbers[1];
  const bool overflow_safe = PyObject_IsTrue(args[3]) == 1;
  if (!PyList_Check(args[0]) || !(norm_type > 0)) Py_RETURN_NOTIMPLEMENTED;  // p <= 0 and NaN: no kernel
  GradientsOf grads(PyList_GET_SIZE(args[0]));
  const auto taken = [&grads](Py_ssize_t i) -> const at::Tensor& { return grads.borrowed.tensors[i]; };
  NormsWhileTaking norms(grads.checks.views.data(), fastclip::kernel_norm(norm_type));
  bool served = false;
  const auto check = [&] { served = grads.checks.served(overflow_safe, taken); };
  if (overflow_safe) {  // (the overflow-safe norm is not made of per-tensor norms)
    if (grads.take(args[0])) check();
  } else {
    grads.take_computing_norms(args[0], norms, check);
  }
  if (!served) Py_RETURN_NOTIMPLEMENTED;  // (false too where a gradient was not taken)
  GradientChecks& checks = grads.checks;
  at::Tensor total;
  if (checks.cpu_views_ready(norm_type, overflow_safe)) {
    norms.norms.resize(checks.views.size());  // (where the walk ran alone: known() is 0)
    total = without_gil([&] {
      return fastclip::clip_views_cpu(checks.views, norms.known_norms(), norms.norms.data(), checks.total_type, max_norm, norm_type);
    });
  } else {
    const auto clip = checks.device.is_cpu() ? &fastclip::clip_cpu : fastclip::cuda_functions().clip;
    total = without_gil([&] { return clip(grads.borrowed.tensors, max_norm, norm_type, overflow_safe); });
  }
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
