// CPU adaptive gradient clipping: see agc_kernels.h for the contract.
#include "agc_kernels.h"

#include <algorithm>
#include <vector>

#include "float_convert.h"

namespace fastclip::cpu {
namespace {

// A run of whole units of one tensor: the unit of parallel work.
struct UnitRun {
  int64_t tensor;
  int64_t first_unit, end_unit;
};

// Runs of at least ~kChunkElements elements (or one unit, when a unit is larger), so that small
// units share a task and the pool's overhead stays small.
std::vector<UnitRun> make_runs(const AgcTensor* tensors, int64_t count) {
  std::vector<UnitRun> runs;
  for (int64_t t = 0; t < count; ++t) {
    const int64_t size = std::max<int64_t>(tensors[t].unit_size, 1);
    const int64_t per_run = std::max<int64_t>(1, kChunkElements / size);
    for (int64_t u = 0; u < tensors[t].units; u += per_run) runs.push_back({t, u, std::min(u + per_run, tensors[t].units)});
  }
  return runs;
}

// A value as the dtype holds it (fp32: float; 16-bit: through float; fp64: itself), as ATen
// converts a Scalar, and the results of float arithmetic in the 16-bit dtypes.
double in_dtype(DType dtype, double v) {
  switch (dtype) {
    case DType::kFloat64: return v;
    case DType::kFloat32: return static_cast<float>(v);
    case DType::kFloat16: return fp16_to_float(float_to_fp16(static_cast<float>(v)));
    case DType::kBFloat16: return bf16_to_float(float_to_bf16(static_cast<float>(v)));
  }
  return v;
}

// clamp(min=bound) with NaN kept, as torch's clamp_min.
double clamp_min(double x, double bound) { return x != x ? x : std::max(x, bound); }

// The multiplier of one unit's gradient, or 1 when it does not clip: timm's arithmetic, each
// operation in the dtype's arithmetic (float for all but fp64) and rounded to the dtype.
double unit_ratio(DType dtype, double param_norm, double grad_norm, double clip_factor, double eps) {
  const bool wide = dtype == DType::kFloat64;
  const double limit_base = clamp_min(param_norm, in_dtype(dtype, eps));
  const double limit = wide ? limit_base * clip_factor
                            : in_dtype(dtype, static_cast<float>(limit_base) * static_cast<float>(clip_factor));
  if (grad_norm < limit) return 1.0;
  const double floor = clamp_min(grad_norm, in_dtype(dtype, 1e-6));
  return wide ? limit / floor : in_dtype(dtype, static_cast<float>(limit) / static_cast<float>(floor));
}

}  // namespace

void adaptive_clip(const AgcTensor* tensors, int64_t count, double clip_factor, double eps,
                   const ParallelFor& parallel_for) {
  const std::vector<UnitRun> runs = make_runs(tensors, count);
  const Norm l2{NormKind::kL2, 2.0};
  const int64_t element_bytes[] = {4, 2, 2, 8};  // by DType
  parallel_for(0, static_cast<int64_t>(runs.size()), 4, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const AgcTensor& t = tensors[runs[r].tensor];
      const int64_t bytes = t.unit_size * element_bytes[static_cast<int>(t.dtype)];
      for (int64_t u = runs[r].first_unit; u < runs[r].end_unit; ++u) {
        const void* p = static_cast<const char*>(t.param) + u * bytes;
        void* g = static_cast<char*>(t.grad) + u * bytes;
        const double ratio = unit_ratio(t.dtype, span_norm(t.dtype, p, t.unit_size, l2),
                                        span_norm(t.dtype, g, t.unit_size, l2), clip_factor, eps);
        if (ratio != 1.0) span_scale(t.dtype, g, t.unit_size, ratio);
      }
    }
  });
}

}  // namespace fastclip::cpu
