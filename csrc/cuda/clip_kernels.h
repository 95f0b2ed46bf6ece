// fastclip's CUDA kernels: the global norm of many gradients and their in-place scaling, with
// torch's arithmetic, in ONE launch (a persistent cooperative kernel) or two where a cooperative
// launch is impossible.
//
// Torch-free: this header needs only the CUDA runtime, so the registration layer
// (csrc/fastclip_cuda_ops.cpp) and any trainer that vendors the kernels can call them. Everything
// the kernels read about the gradients is one device-resident table (see TableLayout), built on
// the host once and cached by the caller: a CUDA graph that captured a launch replays it validly.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "../common/clip_types.h"

namespace fastclip::cuda {

// Elements per chunk: the unit of work of one block, and the fixed order in which partials are
// combined, so results do not depend on the grid size or on scheduling.
constexpr int64_t kChunkElements = 65536;

// How a gradient is multiplied by the clip coefficient, following torch's _foreach_mul_ on CUDA.
enum class ScaleMode : int32_t {
  // The coefficient is first converted to the gradient's dtype (torch's fast path reads the 0-dim
  // coefficient as the gradient's type; its slow path casts it to the common dtype, which for a
  // gradient with dimensions is the gradient's), then g = T(math(g) * math(T(coef))).
  kCoefficientInGradType = 0,
  // A 0-dim gradient whose dtype differs from the coefficient's: two 0-dim operands promote, so
  // the product is computed in the promoted type's arithmetic (double if either is fp64).
  kPromoted = 1,
};

// One gradient: `numel` contiguous elements of `dtype` at `data` (device memory).
struct GradEntry {
  void* data;
  int64_t numel;
  DType dtype;
  ScaleMode scale_mode;
};

// Elements [begin, end) of gradient `tensor`.
struct ChunkEntry {
  int64_t begin;
  int64_t end;
  int64_t tensor;
};

// The table, one buffer: GradEntry[num_tensors], ChunkEntry[num_chunks], then
// int64 first_chunk[num_tensors + 1] (tensor t owns chunks first_chunk[t] .. first_chunk[t+1]).
struct TableLayout {
  int64_t num_tensors = 0;
  int64_t num_chunks = 0;
  size_t chunks_offset = 0;
  size_t first_chunk_offset = 0;
  size_t bytes = 0;
};

// The layout for these gradients (host only; counts their chunks).
TableLayout table_layout(const GradEntry* grads, int64_t num_tensors);

// Writes the table into `host_buffer` (layout.bytes bytes); the caller copies it to the device.
void fill_table(const GradEntry* grads, const TableLayout& layout, void* host_buffer);

// Device scratch for one call: `partials` has layout.num_chunks doubles, `tensor_norms`
// layout.num_tensors doubles, `coefficient` one double. `arrival_counter` (one unsigned int, this
// call's own) is used by the two-launch fallback, which zeroes it on the stream before its launches.
struct Scratch {
  double* partials;
  double* tensor_norms;
  double* coefficient;
  unsigned int* arrival_counter;
};

struct ClipArgs {
  const void* table;  // device copy of the table
  TableLayout layout;
  Norm norm;
  DType total_dtype;  // dtype of the total norm: the promotion of all gradient dtypes
  double max_norm;
  // What to do: compute the norm (writing one total_dtype element to total_out) and/or scale.
  bool compute_norm;
  bool scale;
  void* total_out;
  // With compute_norm false: the total norm to scale by (one element of given_total_dtype, device).
  const void* given_total;
  DType given_total_dtype;
  Scratch scratch;
};

// Runs the requested phases on `stream` of the current device. Norm and scale together take one
// cooperative launch when the device supports it (and FASTCLIP_CUDA_COOPERATIVE is not "0"), else
// two launches. The scale phase writes nothing when the coefficient is 1; that is decided on the
// device, so the host never waits for the GPU.
// `cooperative_refused`, if given, is set to whether the single cooperative launch was refused at
// launch time and the two-launch path ran instead.
cudaError_t launch(const ClipArgs& args, cudaStream_t stream, bool* cooperative_refused = nullptr);

}  // namespace fastclip::cuda
