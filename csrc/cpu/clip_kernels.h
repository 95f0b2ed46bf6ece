// fastclip's CPU kernels: the global norm of many tensors and their in-place scaling, in one pass
// over a table of all gradients (every float dtype together), with torch's arithmetic.
//
// Torch-free: the kernels see raw pointers, element counts and dtype tags, and get their thread
// pool as a callback, so they build and are unit-tested without torch (CMakeLists.txt) and are easy
// to vendor. csrc/fastclip_ops.cpp binds them to torch.ops.fastclip.
#pragma once

#include <cstdint>
#include <functional>

#include "../common/clip_types.h"

namespace fastclip::cpu {

struct TensorView {
  void* data;  // numel contiguous elements of dtype
  int64_t numel;
  DType dtype;
  // Scale in double rather than the dtype's own arithmetic (float for all but fp64). Torch does so
  // for a 0-dim gradient with an fp64 coefficient: two 0-dim operands promote to fp64.
  bool scale_in_double = false;
};

// Runs body(begin, end) over [begin, end) in pieces of at least `grain`, possibly in parallel.
using ParallelFor =
    std::function<void(int64_t begin, int64_t end, int64_t grain, const std::function<void(int64_t, int64_t)>& body)>;

// Elements per chunk: the unit of work, and the fixed order in which partial results are combined,
// so results never depend on the number of threads.
constexpr int64_t kChunkElements = 65536;

// Per-tensor norms, each rounded to its tensor's dtype as torch's _foreach_norm returns it (values
// stored as double); a one-element tensor's norm is |x|, as torch's on CPU. norms_out has `count`
// entries.
void tensor_norms(const TensorView* tensors, int64_t count, Norm norm, const ParallelFor& parallel_for,
                  double* norms_out);

// The norm of n contiguous elements of one dtype, as tensor_norms gives a tensor's norm (the same
// chunks, combined in the same order, so the same bits): for the units of adaptive clipping, which
// are rows of a tensor. Serial: the caller parallelises over spans.
double span_norm(DType dtype, const void* x, int64_t n, Norm norm);

// Multiplies n contiguous elements of one dtype in place, as scale() multiplies a gradient.
void span_scale(DType dtype, void* x, int64_t n, double coefficient);

// The total norm: the norm of the per-tensor norms, rounded to `total_dtype` (the promotion of all
// gradient dtypes, as torch.stack gives); |norm| when there is one.
double total_norm(const double* tensor_norms, int64_t count, Norm norm, DType total_dtype);

// The p-norm (or inf norm) of every element of every tensor as one vector, safe from overflow and
// underflow: each chunk is scaled by a power of two near its largest magnitude before its powers
// are summed, as BLAS nrm2 scales (fastclip's `overflow_safe=True`). Unlike torch's norm it rounds
// nothing per tensor; the result is in double, unrounded, and is infinite only if the true norm
// exceeds double's range (or a gradient holds inf).
double overflow_safe_norm(const TensorView* tensors, int64_t count, Norm norm, const ParallelFor& parallel_for);

// min(max_norm / (total + 1e-6), 1) with torch's roundings in `total_dtype`: reciprocal of
// (total + 1e-6), times max_norm, clamped at 1 with NaN propagated.
double clip_coefficient(double total, double max_norm, DType total_dtype);

// Multiplies every element in place: g = G(math(g) * math(coefficient)) with math the dtype's
// arithmetic (or double, see TensorView), as torch's _foreach_mul_ with a 0-dim coefficient tensor
// does. Writes nothing when coefficient == 1.
void scale(const TensorView* tensors, int64_t count, double coefficient, const ParallelFor& parallel_for);

// scale() with a coefficient per tensor (coefficients[t]), in one parallel pass; a tensor whose
// coefficient is 1 is neither read nor written.
void scale_each(const TensorView* tensors, int64_t count, const double* coefficients, const ParallelFor& parallel_for);

struct ClipResult {
  double total_norm;
  double coefficient;
};

// Norm, coefficient and scaling in one call; per-tensor norms go to norms_out if it is not null.
ClipResult clip(const TensorView* tensors, int64_t count, Norm norm, DType total_dtype, double max_norm,
                const ParallelFor& parallel_for, double* norms_out);

// Norms that a caller computed while it was still gathering the tensors: those of the first `count`
// tensors, each as span_norm gives it (the same bits as tensor_norms). If `worker` is not null,
// worker[t] < workers names the thread that read tensor t, as the index k of the piece [k, k + 1)
// that parallel_for(0, workers, 1, ...) runs on that thread: the same thread then scales it, from
// its own caches.
struct KnownNorms {
  int64_t count = 0;
  const uint16_t* worker = nullptr;
  int workers = 0;
};

// clip() where norms[0, known.count) are already computed (KnownNorms): the rest go to
// norms[known.count, count).
ClipResult clip_with_norms_from(const TensorView* tensors, int64_t count, const KnownNorms& known, double* norms, Norm norm,
                                DType total_dtype, double max_norm, const ParallelFor& parallel_for);

}  // namespace fastclip::cpu
