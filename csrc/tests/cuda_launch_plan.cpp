// The CUDA kernels' launch plan, checked without a GPU: csrc/cuda/*.cu compiled by nvcc as usual,
// linked against the stand-in CUDA runtime below instead of libcudart. The stand-in records what
// the host code asks for (which kernel, grid, block, memsets) and answers device queries as an
// H100-like GPU would; no kernel runs. tests/test_launch_plan.py builds this and reads its output.
//
// Prints one line per scenario: `name launches=K;K;... memsets=N refused=0|1 grids=G;G;...`, each K
// a launch, as c(ooperative)/n(orm)/s(cale)/v(alue clamp) followed by the kernel's NormKind.
//
// Device 0 supports cooperative launches, device 1 does not (MIG, MPS: cudaDevAttrCooperativeLaunch
// is 0 there). Every tensor's data pointer is fake: nothing is dereferenced on the host.
#include <cuda_runtime_api.h>

#include <cstdio>
#include <cstring>
#include <map>
#include <string>
#include <vector>

#include "cuda/clip_kernels.h"
#include "cuda/value_clip_kernels.h"

namespace {

constexpr int kSms = 132;            // H100 SXM
constexpr int kBlocksPerSm = 2;      // what the occupancy query answers for every kernel

struct Launch {
  std::string kernel;  // the device function's mangled name
  bool cooperative;
  unsigned grid, block;
};

// Host stub -> device name, filled by registration, which runs in the kernels' objects' static
// initialisers, possibly before this file's: constructed on first use.
std::map<const void*, std::string>& kernel_names() {
  static std::map<const void*, std::string> names;
  return names;
}
std::vector<Launch> g_launches;
int g_memsets = 0;
int g_device = 0;
cudaError_t g_cooperative_answer = cudaSuccess;
dim3 g_pushed_grid, g_pushed_block;

}  // namespace

// The registration entry points that nvcc's generated host code calls at load time.
extern "C" {
void** __cudaRegisterFatBinary(void*) {
  static void* handle = nullptr;
  return &handle;
}
void __cudaRegisterFatBinaryEnd(void**) {}
void __cudaUnregisterFatBinary(void**) {}
void __cudaRegisterFunction(void**, const char* host_function, char*, const char* device_name, int, uint3*, uint3*,
                            dim3*, dim3*, int*) {
  kernel_names()[host_function] = device_name;
}
void __cudaRegisterVar(void**, char*, char*, const char*, int, size_t, int, int) {}
unsigned __cudaPushCallConfiguration(dim3 grid, dim3 block, size_t, void*) {
  g_pushed_grid = grid;
  g_pushed_block = block;
  return 0;
}
cudaError_t __cudaPopCallConfiguration(dim3* grid, dim3* block, size_t* shared, void* stream) {
  *grid = g_pushed_grid;
  *block = g_pushed_block;
  *shared = 0;
  *static_cast<cudaStream_t*>(stream) = nullptr;
  return cudaSuccess;
}

// The runtime API functions the host code calls.
cudaError_t cudaGetDevice(int* device) {
  *device = g_device;
  return cudaSuccess;
}
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attribute, int device) {
  if (attribute == cudaDevAttrMultiProcessorCount) *value = kSms;
  else if (attribute == cudaDevAttrCooperativeLaunch) *value = device == 0 ? 1 : 0;
  else *value = 0;
  return cudaSuccess;
}
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, const void*, int, size_t) {
  *blocks = kBlocksPerSm;
  return cudaSuccess;
}
cudaError_t cudaLaunchKernel(const void* function, dim3 grid, dim3 block, void**, size_t, cudaStream_t) {
  g_launches.push_back({kernel_names()[function], false, grid.x, block.x});
  return cudaSuccess;
}
// CUDA 13's generated launch code resolves the kernel handle once, then launches through it (the
// handle here is the host stub itself).
cudaError_t __cudaGetKernel(cudaKernel_t* kernel, const void* function) {
  *kernel = reinterpret_cast<cudaKernel_t>(const_cast<void*>(function));
  return cudaSuccess;
}
cudaError_t __cudaLaunchKernel(cudaKernel_t kernel, dim3 grid, dim3 block, void** args, size_t shared,
                               cudaStream_t stream) {
  return cudaLaunchKernel(reinterpret_cast<const void*>(kernel), grid, block, args, shared, stream);
}
cudaError_t cudaLaunchCooperativeKernel(const void* function, dim3 grid, dim3 block, void**, size_t, cudaStream_t) {
  g_launches.push_back({kernel_names()[function], true, grid.x, block.x});
  return g_cooperative_answer;
}
cudaError_t cudaMemsetAsync(void*, int, size_t, cudaStream_t) {
  ++g_memsets;
  return cudaSuccess;
}
cudaError_t cudaGetLastError() { return cudaSuccess; }
}

namespace {

using namespace fastclip::cuda;
using fastclip::DType;
using fastclip::NormKind;

// A launch as the output line writes it: its kind letter and the NormKind template argument.
std::string describe(const Launch& launch) {
  const std::string& name = launch.kernel;
  char kind = '?';
  if (name.find("clip_cooperative_kernel") != std::string::npos) kind = 'c';
  else if (name.find("norm_kernel") != std::string::npos) kind = 'n';
  else if (name.find("scale_kernel") != std::string::npos) kind = 's';
  else if (name.find("clamp_kernel") != std::string::npos) kind = 'v';
  // A kernel templated on NormKind has the argument in its mangled name: "...NormKindE<value>E...".
  std::string norm;
  const size_t at = name.find("NormKindE");
  if (at != std::string::npos && at + 9 < name.size()) norm = name.substr(at + 9, 1);
  return std::string(1, kind) + norm;
}

// Gradients: `count` tensors of mixed dtypes and sizes (a few spanning several 64K chunks).
std::vector<GradEntry> gradients(int count) {
  std::vector<GradEntry> grads;
  const DType dtypes[] = {DType::kFloat32, DType::kBFloat16, DType::kFloat16, DType::kFloat64};
  for (int i = 0; i < count; ++i) {
    const int64_t numel = i % 7 == 3 ? 200000 + i : 1 + 997 * i % 70000;
    grads.push_back({reinterpret_cast<void*>(uintptr_t{1} << 40 | static_cast<uintptr_t>(i) << 24), numel,
                     dtypes[i % 4], ScaleMode::kCoefficientInGradType});
  }
  return grads;
}

// One output line: the scenario, its table's chunk count, the error returned, and what was recorded.
void print_result(const char* name, const TableLayout& layout, cudaError_t error, bool refused) {
  std::printf("%s chunks=%lld error=%d launches=", name, static_cast<long long>(layout.num_chunks), static_cast<int>(error));
  for (size_t i = 0; i < g_launches.size(); ++i) std::printf("%s%s", i ? ";" : "", describe(g_launches[i]).c_str());
  std::printf(" memsets=%d refused=%d grids=", g_memsets, refused ? 1 : 0);
  for (size_t i = 0; i < g_launches.size(); ++i) std::printf("%s%ux%u", i ? ";" : "", g_launches[i].grid, g_launches[i].block);
  std::printf("\n");
}

// Starts a scenario: nothing recorded yet, `device` current, the cooperative launch answered with
// `cooperative_answer`; fills `table` with the table of `count` gradients and returns its layout.
TableLayout start(int device, int count, cudaError_t cooperative_answer, std::vector<char>& table) {
  g_launches.clear();
  g_memsets = 0;
  g_device = device;
  g_cooperative_answer = cooperative_answer;
  const std::vector<GradEntry> grads = gradients(count);
  const TableLayout layout = table_layout(grads.data(), count);
  table.resize(layout.bytes);
  fill_table(grads.data(), layout, table.data());
  return layout;
}

void run(const char* name, int device, int count, NormKind kind, bool compute_norm, bool scale,
         cudaError_t cooperative_answer = cudaSuccess) {
  std::vector<char> table;
  const TableLayout layout = start(device, count, cooperative_answer, table);
  static double scratch[4];
  ClipArgs args{};
  args.table = table.data();
  args.layout = layout;
  args.norm = {kind, kind == NormKind::kP ? 3.0 : 2.0};
  args.total_dtype = DType::kFloat32;
  args.max_norm = 1.0;
  args.compute_norm = compute_norm;
  args.scale = scale;
  args.total_out = scratch;
  args.given_total = compute_norm ? nullptr : scratch;
  args.given_total_dtype = DType::kFloat32;
  args.scratch = {scratch, scratch, scratch, reinterpret_cast<unsigned int*>(scratch)};
  bool refused = false;
  const cudaError_t error = launch(args, nullptr, &refused);
  print_result(name, layout, error, refused);
}

void run_clamp(const char* name, int count) {
  std::vector<char> table;
  const TableLayout layout = start(0, count, cudaSuccess, table);
  print_result(name, layout, launch_clamp(table.data(), layout, 1.0, /*per_tensor_route_dtypes=*/0, nullptr), false);
}

}  // namespace

int main() {
  std::printf("sms=%d blocks_per_sm=%d\n", kSms, kBlocksPerSm);
  const NormKind kinds[] = {NormKind::kL2, NormKind::kL1, NormKind::kInf, NormKind::kP};
  const char* kind_names[] = {"l2", "l1", "inf", "p"};
  for (int count : {1, 3, 300, 5000}) {
    for (int k = 0; k < 4; ++k) {
      const std::string suffix = std::string(kind_names[k]) + "/" + std::to_string(count);
      run(("clip/cooperative/" + suffix).c_str(), 0, count, kinds[k], true, true);
      run(("norm/cooperative/" + suffix).c_str(), 0, count, kinds[k], true, false);
      run(("clip/no-cooperative/" + suffix).c_str(), 1, count, kinds[k], true, true);
      run(("norm/no-cooperative/" + suffix).c_str(), 1, count, kinds[k], true, false);
      run(("clip/refused/" + suffix).c_str(), 0, count, kinds[k], true, true, cudaErrorCooperativeLaunchTooLarge);
    }
    const std::string suffix = std::to_string(count);
    run(("scale-by-given/cooperative/" + suffix).c_str(), 0, count, NormKind::kL2, false, true);
    run(("scale-by-given/no-cooperative/" + suffix).c_str(), 1, count, NormKind::kL2, false, true);
    run_clamp(("clamp/" + suffix).c_str(), count);
  }
  run("clip/failed/l2/3", 0, 3, NormKind::kL2, true, true, cudaErrorLaunchOutOfResources);
  return 0;
}
