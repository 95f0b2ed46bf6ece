// Registers fastclip's operators with PyTorch's dispatcher (torch.ops.fastclip.*) and binds the
// CPU kernels to them. The kernels themselves (cpu/) know nothing of torch; this file translates
// tensors into (pointer, numel, dtype) tables and ATen's thread pool into a ParallelFor. The Python
// module fastclip._C itself (its helpers and direct entries) is python_module.cpp.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

#include "cpu/agc_kernels.h"
#include "cpu/clip_kernels.h"
#include "cpu/pieces.h"
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

// ATen's thread pool as a ParallelFor: each thread owns a contiguous run of the pieces and takes the
// other runs' last pieces once its own are done (StealingRuns). A pass over the same tensors thus
// gives a thread the same memory as the pass before it, which it has in its own caches: the scale
// pass of a clip follows the norm pass over the same chunks. Handing the pieces out from one shared
// counter made the two threads read neighbouring pieces, each of them half of what the other
// thread had just read; where this VM's two cores sit on separate last-level caches (the state in
// which it streams memory fastest) that cost up to 40% of a clip (resnet-50 fp32 5.26 -> 3.02 ms,
// 8 x 32 MiB 11.5 -> 7.8 ms; AMD EPYC, in-process, alternating). Results do not change: every
// chunk's partial has its own slot, combined in chunk order after, and every thread works in the
// caller's floating-point environment (CallerFloatingPoint).
const cpu::ParallelFor& aten_parallel_for() {
  static const cpu::ParallelFor parallel_for =
      [](int64_t begin, int64_t end, int64_t grain, const std::function<void(int64_t, int64_t)>& body) {
        const int64_t pieces = (end - begin + grain - 1) / grain;
        const int64_t threads = std::min<int64_t>(at::get_num_threads(), pieces);
        if (threads <= 1 || at::in_parallel_region()) return body(begin, end);
        cpu::StealingRuns runs(pieces, static_cast<int>(threads));
        const CallerFloatingPoint floating_point;
        // Thread k of the pool takes run k (at::parallel_for gives it [k, k + 1) where it has as many
        // threads as runs; a thread given several indices takes their runs in turn).
        at::parallel_for(0, threads, 1, [&](int64_t first, int64_t last) {
          const CallerFloatingPoint::InThisThread same(floating_point);
          for (int64_t run = first; run < last; ++run)
            runs.work(static_cast<int>(run), [&](int64_t piece) { body(begin + piece * grain, std::min(end, begin + (piece + 1) * grain)); });
        });
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
cpu::ClipResult clip_with_torch_norms(const std::vector<cpu::TensorView>& views, at::ScalarType total_type,
                                      double max_norm, Norm norm, double* tensor_norms_out) {
  return cpu::clip(views.data(), static_cast<int64_t>(views.size()), norm, kernel_dtype(total_type), max_norm,
                   aten_parallel_for(), tensor_norms_out);
}

at::Tensor clip_with_torch_norms(at::TensorList grads, double max_norm, Norm norm, double* tensor_norms_out) {
  const at::ScalarType total_type = total_norm_type(grads);
  KernelTensors kernel_tensors(grads, total_type);
  const cpu::ClipResult result = clip_with_torch_norms(kernel_tensors.views, total_type, max_norm, norm, tensor_norms_out);
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

}  // namespace

// The operators' CPU kernels (those that python_module.cpp's direct entries call are declared in
// op_helpers.h).

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

at::Tensor clip_views_cpu(const std::vector<cpu::TensorView>& views, const cpu::KnownNorms& known, double* norms,
                          at::ScalarType total_type, double max_norm, double norm_type) {
  const cpu::ClipResult result =
      cpu::clip_with_norms_from(views.data(), static_cast<int64_t>(views.size()), known, norms, kernel_norm(norm_type),
                                kernel_dtype(total_type), max_norm, aten_parallel_for());
  return at::scalar_tensor(result.total_norm, at::TensorOptions().dtype(total_type));
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

// On CPU torch's foreach clamps take the per-tensor route whatever `foreach` says: one semantics.
void clamp_values_cpu(at::TensorList grads, double clip_value, bool /*foreach*/) {
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
  // With foreach, the bits of torch's clip_grad_value_(foreach=None), else of foreach=False: on CUDA
  // they differ in the sign of zero results when clip_value is 0 (cuda/value_clip_kernels.cu).
  m.def("clamp_values_(Tensor(a!)[] grads, float clip_value, bool foreach=True) -> ()");
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
