// Binds the CUDA kernels (cuda/clip_kernels.cu, cuda/value_clip_kernels.cu, torch-free) to torch.ops.fastclip.* for CUDA
// tensors. Built only when torch has CUDA and nvcc is found (setup.py).
//
// The kernels read the gradients from a device-resident table. Building and uploading it costs a
// host loop and a copy, so tables are cached, keyed by the gradients' (pointer, size, dtype, scale
// mode) and device: a training loop whose gradients keep their storage (the usual case, and a
// requirement of CUDA graphs anyway) pays for it once. A table used while a stream is being
// captured is never evicted, so the captured graph stays valid for as long as the process lives.
// Nothing here waits for the GPU: no .item(), no synchronising copies.
#include <ATen/ATen.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstring>
#include <algorithm>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <unordered_map>
#include <vector>

#include "cuda/clip_kernels.h"
#include "cuda/value_clip_kernels.h"
#include "op_helpers.h"

namespace fastclip {
namespace {

constexpr size_t kMaxCachedTables = 64;

struct CachedTable {
  at::Tensor host;                // pinned; kept alive because a captured graph may copy from it again
  at::Tensor device;              // the table the kernels read
  cuda::TableLayout layout;
  bool used_in_capture = false;   // never evicted then
  std::vector<c10::StreamId> streams;  // the streams it has been used on (the first allocated it)
};

class TableCache {
 public:
  // Shared, so that another thread's eviction never frees a table while this call uses it.
  std::shared_ptr<const CachedTable> get(const std::vector<cuda::GradEntry>& grads, const at::Device& device,
                                         const c10::cuda::CUDAStream& stream, bool capturing) {
    std::string key(reinterpret_cast<const char*>(grads.data()), grads.size() * sizeof(cuda::GradEntry));
    key.append(reinterpret_cast<const char*>(&device), sizeof device);
    std::lock_guard<std::mutex> lock(mutex_);
    auto found = tables_.find(key);
    if (found == tables_.end()) {
      // Built during a capture, the table's host-to-device copy would be recorded into the graph,
      // not run: later eager calls would read an unfilled table. Capture after one eager call.
      TORCH_CHECK(!capturing,
                  "fastclip: these gradients were not seen before this CUDA graph capture; call fastclip once on "
                  "the same tensors before capturing (warm-up). Non-contiguous gradients cannot be captured: each "
                  "call clips a new contiguous copy of them, so make them contiguous first");
      evict_if_full();
      found = tables_.emplace(key, build(grads, device, stream)).first;
      order_.push_back(key);
    }
    CachedTable& table = *found->second;
    table.used_in_capture |= capturing;
    if (!capturing && std::find(table.streams.begin(), table.streams.end(), stream.id()) == table.streams.end()) {
      // Used on a stream other than the one that allocated it: the caching allocator must not reuse
      // its memory, once evicted, before this stream's work on it is done. (A table used in a
      // capture is never evicted.)
      c10::cuda::CUDACachingAllocator::recordStream(table.device.storage().data_ptr(), stream);
      table.streams.push_back(stream.id());
    }
    return found->second;
  }

  // Drops the tables used in CUDA graph captures (their graphs are gone, says the caller); returns
  // how many. A call still holding one keeps it alive through its shared_ptr.
  int64_t release_captured() {
    std::lock_guard<std::mutex> lock(mutex_);
    return erase_oldest_while([](const CachedTable& table) { return table.used_in_capture; }, [] { return true; });
  }

 private:
  static std::shared_ptr<CachedTable> build(const std::vector<cuda::GradEntry>& grads, const at::Device& device,
                                            const c10::cuda::CUDAStream& stream) {
    auto built = std::make_shared<CachedTable>();
    CachedTable& table = *built;
    table.streams.push_back(stream.id());
    table.layout = cuda::table_layout(grads.data(), static_cast<int64_t>(grads.size()));
    const auto bytes = static_cast<int64_t>(table.layout.bytes);
    table.host = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
    cuda::fill_table(grads.data(), table.layout, table.host.data_ptr());
    table.device = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).device(device));
    table.device.copy_(table.host, /*non_blocking=*/true);  // stream-ordered, no host wait
    return built;
  }

  void evict_if_full() {
    erase_oldest_while([](const CachedTable& table) { return !table.used_in_capture; },
                       [this] { return tables_.size() >= kMaxCachedTables; });
  }

  // Erases, oldest first, the tables that `erasable` accepts, as long as `more` says so; returns how
  // many. The caller holds the mutex.
  template <class Erasable, class More>
  int64_t erase_oldest_while(Erasable erasable, More more) {
    int64_t erased = 0;
    for (auto it = order_.begin(); it != order_.end() && more();) {
      auto table = tables_.find(*it);
      if (erasable(*table->second)) {
        tables_.erase(table);
        it = order_.erase(it);
        ++erased;
      } else {
        ++it;
      }
    }
    return erased;
  }

  std::mutex mutex_;
  std::unordered_map<std::string, std::shared_ptr<CachedTable>> tables_;
  std::deque<std::string> order_;  // insertion order, oldest first
};

// Never destroyed: as a static its tensors (pinned host and device memory) were freed by the exit
// handlers, after torch's CUDA state was torn down, and every process that had used the CUDA kernels
// died on exit (seen on an H200: "Unrecognized stream" or "invalid resource handle" from
// ~TensorImpl, exit status 134 or 139 after all its work was done). The OS reclaims the memory.
TableCache& table_cache() {
  static TableCache* cache = new TableCache();
  return *cache;
}

// The CUDA kernels' view of a list of tensors (see DenseTensors), with each one's scale mode.
struct CudaKernelTensors : DenseTensors {
  std::vector<cuda::GradEntry> grads;

  CudaKernelTensors(at::TensorList tensors, at::ScalarType coefficient_type)
      : DenseTensors(tensors, tensors[0].device()) {
    grads.reserve(tensors.size());
    for (size_t i = 0; i < tensors.size(); ++i) {
      const at::Tensor& t = tensors[i];
      const auto mode = t.dim() == 0 && t.scalar_type() != coefficient_type ? cuda::ScaleMode::kPromoted
                                                                             : cuda::ScaleMode::kCoefficientInGradType;
      grads.push_back({dense[i]->data_ptr(), dense[i]->numel(), kernel_dtype(t.scalar_type()), mode});
    }
  }
};

bool is_capturing(cudaStream_t stream) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &status));
  return status != cudaStreamCaptureStatusNone;
}

// Runs the kernels: norm (into a new 0-dim tensor of total_type, returned) and/or scale.
// With tensor_norms_out, also sets it to the per-tensor norms (float64, a tensor of their own).
at::Tensor run(at::TensorList tensors, const Norm& norm, at::ScalarType total_type, double max_norm, bool compute_norm,
               bool scale, const at::Tensor* given_total, at::Tensor* tensor_norms_out = nullptr) {
  const at::Device device = tensors[0].device();
  TORCH_CHECK(device.is_cuda(), "fastclip: expected CUDA tensors, got one on ", device);
  const c10::cuda::CUDAGuard guard(device);
  const c10::cuda::CUDAStream current = c10::cuda::getCurrentCUDAStream(device.index());
  const cudaStream_t stream = current.stream();
  const at::ScalarType coefficient_type = given_total != nullptr ? given_total->scalar_type() : total_type;
  CudaKernelTensors kernel_tensors(tensors, coefficient_type);
  const std::shared_ptr<const CachedTable> cached = table_cache().get(kernel_tensors.grads, device, current,
                                                                      is_capturing(stream));
  const CachedTable& table = *cached;

  const at::TensorOptions float64 = at::TensorOptions().dtype(at::kDouble).device(device);
  // Partials, the coefficient, and the fallback's arrival counter (in the last double's bytes).
  at::Tensor scratch = at::empty({table.layout.num_chunks + 2}, float64);
  // The per-tensor norms in an allocation of their own: clip_with_tensor_norms_ returns them, and a
  // view into the scratch would differ from the fake kernel's fresh tensor (storage offset,
  // aliasing; opcheck fails) and keep the whole scratch alive as long as the user keeps the norms.
  at::Tensor tensor_norms = at::empty({table.layout.num_tensors}, float64);
  at::Tensor total = at::empty({}, at::TensorOptions().dtype(total_type).device(device));
  double* base = scratch.data_ptr<double>();

  cuda::ClipArgs args{};
  args.table = table.device.data_ptr();
  args.layout = table.layout;
  args.norm = norm;
  args.total_dtype = kernel_dtype(total_type);
  args.max_norm = max_norm;
  args.compute_norm = compute_norm;
  args.scale = scale;
  args.total_out = total.data_ptr();
  args.given_total = given_total != nullptr ? given_total->data_ptr() : nullptr;
  args.given_total_dtype = given_total != nullptr ? kernel_dtype(given_total->scalar_type()) : args.total_dtype;
  args.scratch = {base, tensor_norms.data_ptr<double>(), base + table.layout.num_chunks,
                  reinterpret_cast<unsigned int*>(base + table.layout.num_chunks + 1)};
  bool cooperative_refused = false;
  C10_CUDA_CHECK(cuda::launch(args, stream, &cooperative_refused));
  if (cooperative_refused) {
    TORCH_WARN_ONCE("fastclip: the GPU refused the single cooperative launch (MPS, MIG, or its SMs held by another "
                    "process); using the two-launch path, which gives the same results");
  }
  // Always written back: whether the kernel scaled is known only on the device, and the host must
  // not ask. Only non-dense gradients have copies; they are rare.
  if (scale) kernel_tensors.write_back();
  if (tensor_norms_out != nullptr) *tensor_norms_out = tensor_norms;
  return total;
}

// The CUDA kernel has no overflow-safe variant yet; the Python backend routes such calls to the
// Triton kernels, so this is reached only by a direct torch.ops.fastclip call.
void check_not_overflow_safe(bool overflow_safe) {
  TORCH_CHECK(!overflow_safe, "fastclip: the CUDA kernel has no overflow_safe variant (use the Triton backend)");
}

at::Tensor total_norm_cuda(at::TensorList tensors, double norm_type, bool overflow_safe) {
  check_not_overflow_safe(overflow_safe);
  const Norm norm = checked_norm(tensors, norm_type, "total_norm");
  return run(tensors, norm, total_norm_type(tensors), 0.0, /*compute_norm=*/true, /*scale=*/false, nullptr);
}

at::Tensor clip_cuda(at::TensorList grads, double max_norm, double norm_type, bool overflow_safe) {
  check_not_overflow_safe(overflow_safe);
  const Norm norm = checked_norm(grads, norm_type, "clip_");
  return run(grads, norm, total_norm_type(grads), max_norm, /*compute_norm=*/true, /*scale=*/true, nullptr);
}

std::tuple<at::Tensor, at::Tensor> tensor_norms_cuda(at::TensorList tensors, double norm_type) {
  const Norm norm = checked_norm(tensors, norm_type, "tensor_norms");
  at::Tensor tensor_norms;
  at::Tensor total = run(tensors, norm, total_norm_type(tensors), 0.0, /*compute_norm=*/true, /*scale=*/false, nullptr,
                         &tensor_norms);
  return {total, tensor_norms};
}

std::tuple<at::Tensor, at::Tensor> clip_with_tensor_norms_cuda(at::TensorList grads, double max_norm, double norm_type) {
  const Norm norm = checked_norm(grads, norm_type, "clip_with_tensor_norms_");
  at::Tensor tensor_norms;
  at::Tensor total = run(grads, norm, total_norm_type(grads), max_norm, /*compute_norm=*/true, /*scale=*/true, nullptr,
                         &tensor_norms);
  return {total, tensor_norms};
}

void scale_with_norm_cuda(at::TensorList grads, double max_norm, const at::Tensor& total_norm) {
  TORCH_CHECK(!grads.empty(), "fastclip: scale_with_norm_ needs at least one gradient");
  TORCH_CHECK(total_norm.numel() == 1, "fastclip: total_norm must have one element");
  TORCH_CHECK(total_norm.device() == grads[0].device(), "fastclip: total_norm must be on the gradients' device");
  const at::Tensor total = total_norm.reshape({});
  run(grads, Norm{NormKind::kL2, 2.0}, total.scalar_type(), max_norm, /*compute_norm=*/false, /*scale=*/true, &total);
}

// clip_grad_value_: one launch over the cached table (the same one the norm kernels use), with the
// arithmetic of the route torch's foreach clamp takes for each dtype: the fused one when `foreach` and
// every gradient of the dtype is dense, else the per-tensor one (cuda/value_clip_kernels.cu).
void clamp_values_cuda(at::TensorList grads, double clip_value, bool foreach) {
  TORCH_CHECK(!grads.empty(), "fastclip: clamp_values_ needs at least one gradient");
  const at::Device device = grads[0].device();
  TORCH_CHECK(device.is_cuda(), "fastclip: expected CUDA tensors, got one on ", device);
  const c10::cuda::CUDAGuard guard(device);
  const c10::cuda::CUDAStream current = c10::cuda::getCurrentCUDAStream(device.index());
  CudaKernelTensors kernel_tensors(grads, at::kFloat);  // no coefficient: the scale modes are not read
  const std::shared_ptr<const CachedTable> cached = table_cache().get(kernel_tensors.grads, device, current,
                                                                      is_capturing(current.stream()));
  // Without foreach every dtype takes the per-tensor route; else those of the gradients that are not
  // dense, which DenseTensors copied.
  unsigned per_tensor_route_dtypes = foreach ? 0u : ~0u;
  for (const auto& copied : kernel_tensors.copies) {
    per_tensor_route_dtypes |= 1u << static_cast<int>(kernel_dtype(copied.first.scalar_type()));
  }
  C10_CUDA_CHECK(cuda::launch_clamp(cached->device.data_ptr(), cached->layout, clip_value, per_tensor_route_dtypes,
                                    current.stream()));
  kernel_tensors.write_back();
}

// For the direct entries: set while the library loads, before Python can call them.
[[maybe_unused]] const bool kCudaFunctionsSet = [] {
  cuda_functions() = {&clip_cuda, &total_norm_cuda, [] { return table_cache().release_captured(); }};
  return true;
}();

}  // namespace

TORCH_LIBRARY_IMPL(fastclip, CUDA, m) {
  m.impl("total_norm", &total_norm_cuda);
  m.impl("tensor_norms", &tensor_norms_cuda);
  m.impl("clip_", &clip_cuda);
  m.impl("scale_with_norm_", &scale_with_norm_cuda);
  m.impl("clip_with_tensor_norms_", &clip_with_tensor_norms_cuda);
  m.impl("clamp_values_", &clamp_values_cuda);
}

}  // namespace fastclip
