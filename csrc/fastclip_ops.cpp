// Registers fastclip's operators with PyTorch's dispatcher (torch.ops.fastclip.*) and binds the
// CPU kernels to them. The kernels themselves (cpu/) know nothing of torch; this file translates
// tensors into (pointer, numel, dtype) tables and ATen's thread pool into a ParallelFor.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <Python.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "cpu/clip_kernels.h"
#include "op_helpers.h"

namespace fastclip {
namespace {

// The kernels' view of a list of tensors. A non-overlapping, dense tensor (contiguous, transposed,
// channels-last) is used in place as one flat span; any other layout is copied to a contiguous
// buffer that is written back after scaling.
struct KernelTensors {
  std::vector<cpu::TensorView> views;
  std::vector<std::pair<at::Tensor, at::Tensor>> copies;  // (original, contiguous copy)

  // coefficient_type: the dtype of the clip coefficient the tensors will be scaled by.
  KernelTensors(at::TensorList tensors, at::ScalarType coefficient_type) {
    views.reserve(tensors.size());
    for (const at::Tensor& t : tensors) {
      TORCH_CHECK(t.device().is_cpu(), "fastclip: expected CPU tensors, got one on ", t.device());
      TORCH_CHECK(t.layout() == at::kStrided, "fastclip: sparse gradients have no fused kernel");
      at::Tensor dense = t;
      if (!t.is_non_overlapping_and_dense()) {
        dense = t.contiguous();
        copies.emplace_back(t, dense);
      }
      const bool scale_in_double = t.dim() == 0 && coefficient_type == at::kDouble;
      views.push_back({dense.data_ptr(), dense.numel(), kernel_dtype(t.scalar_type()), scale_in_double});
    }
  }

  void write_back() {
    for (auto& [original, copy] : copies) original.copy_(copy);
  }
};

const cpu::ParallelFor& aten_parallel_for() {
  static const cpu::ParallelFor parallel_for =
      [](int64_t begin, int64_t end, int64_t grain, const std::function<void(int64_t, int64_t)>& body) {
        at::parallel_for(begin, end, grain, body);
      };
  return parallel_for;
}

at::Tensor total_norm_cpu(at::TensorList tensors, double norm_type) {
  TORCH_CHECK(!tensors.empty(), "fastclip: total_norm needs at least one tensor");
  const Norm norm = kernel_norm(norm_type);
  check_inf_norm_of_empty(tensors, norm);
  const at::ScalarType total_type = total_norm_type(tensors);
  KernelTensors kernel_tensors(tensors, total_type);
  std::vector<double> norms(tensors.size());
  cpu::tensor_norms(kernel_tensors.views.data(), kernel_tensors.views.size(), norm, aten_parallel_for(), norms.data());
  const double total = cpu::total_norm(norms.data(), norms.size(), norm, kernel_dtype(total_type));
  return at::scalar_tensor(total, at::TensorOptions().dtype(total_type));
}

at::Tensor clip_cpu(at::TensorList grads, double max_norm, double norm_type) {
  TORCH_CHECK(!grads.empty(), "fastclip: clip_ needs at least one gradient");
  const Norm norm = kernel_norm(norm_type);
  check_inf_norm_of_empty(grads, norm);
  const at::ScalarType total_type = total_norm_type(grads);
  KernelTensors kernel_tensors(grads, total_type);
  const cpu::ClipResult result = cpu::clip(kernel_tensors.views.data(), kernel_tensors.views.size(), norm,
                                           kernel_dtype(total_type), max_norm, aten_parallel_for(), nullptr);
  if (result.coefficient != 1.0) kernel_tensors.write_back();
  return at::scalar_tensor(result.total_norm, at::TensorOptions().dtype(total_type));
}

void scale_with_norm_cpu(at::TensorList grads, double max_norm, const at::Tensor& total_norm) {
  TORCH_CHECK(total_norm.numel() == 1, "fastclip: total_norm must have one element");
  const double coefficient =
      cpu::clip_coefficient(total_norm.item<double>(), max_norm, kernel_dtype(total_norm.scalar_type()));
  KernelTensors kernel_tensors(grads, total_norm.scalar_type());
  cpu::scale(kernel_tensors.views.data(), kernel_tensors.views.size(), coefficient, aten_parallel_for());
  if (coefficient != 1.0) kernel_tensors.write_back();
}

}  // namespace

TORCH_LIBRARY(fastclip, m) {
  m.def("total_norm(Tensor[] tensors, float norm_type) -> Tensor");
  m.def("clip_(Tensor(a!)[] grads, float max_norm, float norm_type) -> Tensor");
  m.def("scale_with_norm_(Tensor(a!)[] grads, float max_norm, Tensor total_norm) -> ()");
}

TORCH_LIBRARY_IMPL(fastclip, CPU, m) {
  m.impl("total_norm", &total_norm_cpu);
  m.impl("clip_", &clip_cpu);
  m.impl("scale_with_norm_", &scale_with_norm_cpu);
}

}  // namespace fastclip

// Importing fastclip._C from Python loads this library, which registers the operators above; the
// module itself is empty (no pybind11 needed).
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
