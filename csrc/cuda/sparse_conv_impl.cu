// SparseConv GPU kernels and their C ABI launcher (see sparse_conv_impl.cuh for the design, sparse_conv_cuda.h for
// the calls). Pure CUDA runtime: no onnxruntime here, so a ctypes harness can load it on its own.
#include <cuda_runtime.h>

#include <cstdio>
#include <new>
#include <string>

#include "cuda/sparse_conv_cuda.h"
#include "cuda/sparse_conv_impl.cuh"

namespace ctprune {
namespace cuda {
namespace sparse {
namespace {

// Grid: pixel tile major, position minor (neighbouring blocks share the tile's input in L2).
template <int BLOCK>
__global__ void __launch_bounds__(kThreads) SparseConvKernel(const __grid_constant__ Params p) {
  const long long block = blockIdx.x;
  const int position = static_cast<int>(block % p.num_blocks);
  const long long tile = block / p.num_blocks;
  ConvPixel<BLOCK>(p, position, tile * kThreads + threadIdx.x);
}

// One warp per (position, image): lanes split the rows, then a fixed shuffle tree adds their sums.
template <int BLOCK>
__global__ void __launch_bounds__(kThreads) SparseFcKernel(const __grid_constant__ Params p) {
  const long long pair = static_cast<long long>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  if (pair >= static_cast<long long>(p.num_blocks) * p.N) return;  // whole warps leave together
  const int position = static_cast<int>(pair % p.num_blocks), n = static_cast<int>(pair / p.num_blocks);
  const int lane = threadIdx.x % 32;
  float acc[BLOCK];
  FcLane<BLOCK>(p, position, n, lane, acc);
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) {
#pragma unroll
    for (int b = 0; b < BLOCK; ++b) acc[b] += __shfl_down_sync(0xffffffffu, acc[b], offset);
  }
  if (lane == 0) FcFinish<BLOCK>(p, position, n, acc);
}

__global__ void __launch_bounds__(kThreads) NonFiniteKernel(const __grid_constant__ Params p) {
  const long long stride = static_cast<long long>(gridDim.x) * kThreads;
  for (long long i = static_cast<long long>(blockIdx.x) * kThreads + threadIdx.x; i < p.x_size; i += stride)
    NonFiniteInput(p, i);
}

template <int BLOCK>
cudaError_t LaunchBlock(const Params& p, cudaStream_t stream) {
  if (p.fc) {
    const long long warps = static_cast<long long>(p.num_blocks) * p.N;
    const long long blocks = (warps + kWarpsPerBlock - 1) / kWarpsPerBlock;
    if (blocks > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
    SparseFcKernel<BLOCK><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(p);
  } else {
    const long long blocks = p.pixel_tiles * p.num_blocks;
    if (blocks > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
    SparseConvKernel<BLOCK><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

cudaError_t Launch(const Params& p, cudaStream_t stream) {
  cudaError_t status = cudaErrorInvalidValue;
  switch (p.block) {
    case 1: status = LaunchBlock<1>(p, stream); break;
    case 2: status = LaunchBlock<2>(p, stream); break;
    case 4: status = LaunchBlock<4>(p, stream); break;
    case 8: status = LaunchBlock<8>(p, stream); break;
    default: return cudaErrorInvalidValue;
  }
  if (status != cudaSuccess) return status;
  // The non-finite pass: a grid-stride scan of X (memory-bound; almost every thread just checks and leaves).
  const long long wanted = (p.x_size + kThreads - 1) / kThreads;
  const unsigned blocks = static_cast<unsigned>(wanted < 1024 ? (wanted < 1 ? 1 : wanted) : 1024);
  NonFiniteKernel<<<blocks, kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace
}  // namespace sparse
}  // namespace cuda
}  // namespace ctprune

struct CtpruneSparseConvGpu {
  ctprune::cuda::PackedSparseConv packed;  // host copy: plans read the spec
  int device = -1;
  int* buffer = nullptr;  // device: rows | row_begin | first | channels | group_of | columns
  const int* rows = nullptr;
  const int* row_begin = nullptr;
  const int* first = nullptr;
  const int* channels = nullptr;
  const int* group_of = nullptr;
  const int* columns = nullptr;
};

extern "C" int ctprune_sparse_conv_cuda_prepare(const CtpruneSparseConvDesc* desc, CtpruneSparseConvGpu** out,
                                                char* err, int err_len) {
  using namespace ctprune::cuda;
  if (out) *out = nullptr;
  auto fail = [&](const std::string& message) {
    if (err && err_len > 0) std::snprintf(err, static_cast<size_t>(err_len), "%s", message.c_str());
    return CTPRUNE_CUDA_INVALID_ATTRIBUTES;
  };
  if (!desc || !out) return fail("desc and out must not be null");
  CtpruneSparseConvGpu* gpu = new (std::nothrow) CtpruneSparseConvGpu();
  if (!gpu) return static_cast<int>(cudaErrorMemoryAllocation);
  const std::string problem = PackSparseConv(*desc, gpu->packed);
  if (!problem.empty()) {
    delete gpu;
    return fail(problem);
  }
  const PackedSparseConv& pk = gpu->packed;
  const size_t sizes[6] = {pk.rows.size(), pk.row_begin.size(), pk.first.size(), pk.channels.size(),
                           pk.group_of.size(), pk.columns.size()};
  const int* sources[6] = {pk.rows.data(), pk.row_begin.data(), pk.first.data(), pk.channels.data(),
                           pk.group_of.data(), pk.columns.data()};
  size_t total = 1;
  for (size_t s : sizes) total += s;
  cudaError_t status = cudaGetDevice(&gpu->device);
  if (status == cudaSuccess) status = cudaMalloc(&gpu->buffer, total * sizeof(int));
  const int* parts[6] = {};
  size_t at = 0;
  for (int i = 0; i < 6 && status == cudaSuccess; ++i) {
    parts[i] = gpu->buffer + at;
    if (sizes[i]) status = cudaMemcpy(gpu->buffer + at, sources[i], sizes[i] * sizeof(int), cudaMemcpyHostToDevice);
    at += sizes[i];
  }
  if (status != cudaSuccess) {
    if (gpu->buffer) cudaFree(gpu->buffer);
    delete gpu;
    return static_cast<int>(status);
  }
  gpu->rows = parts[0];
  gpu->row_begin = parts[1];
  gpu->first = parts[2];
  gpu->channels = parts[3];
  gpu->group_of = parts[4];
  gpu->columns = parts[5];
  *out = gpu;
  return 0;
}

extern "C" int ctprune_sparse_conv_cuda_output_size(const CtpruneSparseConvGpu* gpu, int64_t h, int64_t width,
                                                    int64_t* oh, int64_t* ow) {
  using namespace ctprune::cuda;
  if (!gpu) return CTPRUNE_CUDA_INVALID_SHAPE;
  const ctprune::ops::SparseConvSpec& s = gpu->packed.spec;
  sparse::Params p{};
  if (!sparse::PlanSparse(p, gpu->packed, 1, s.fc ? s.group_channels : s.group * s.group_channels, h, width))
    return CTPRUNE_CUDA_INVALID_SHAPE;
  if (oh) *oh = p.OH;
  if (ow) *ow = p.OW;
  return 0;
}

extern "C" int ctprune_sparse_conv_cuda(const CtpruneSparseConvGpu* gpu, const float* x, const float* w,
                                        const float* b, const float* z, int64_t z_elements, float* y, int64_t n,
                                        int64_t c, int64_t h, int64_t width, void* stream) {
  using namespace ctprune::cuda;
  if (!gpu || !x || !y || (!w && gpu->packed.num_rows > 0)) return static_cast<int>(cudaErrorInvalidValue);
  int device = -1;
  if (cudaGetDevice(&device) != cudaSuccess || device != gpu->device) return static_cast<int>(cudaErrorInvalidDevice);
  sparse::Params p{};
  if (!sparse::PlanSparse(p, gpu->packed, n, c, h, width)) return CTPRUNE_CUDA_INVALID_SHAPE;
  const long long y_size = p.pixels * p.O;
  if (z && z_elements != 1 && z_elements != y_size) return CTPRUNE_CUDA_INVALID_SHAPE;
  p.x = x;
  p.w = w;
  p.b = b;
  p.z = z;
  p.z_full = z && z_elements != 1 ? 1 : 0;
  p.y = y;
  p.rows = gpu->rows;
  p.row_begin = gpu->row_begin;
  p.first = gpu->first;
  p.channels = gpu->channels;
  p.group_of = gpu->group_of;
  p.columns = gpu->columns;
  return static_cast<int>(sparse::Launch(p, static_cast<cudaStream_t>(stream)));
}

extern "C" void ctprune_sparse_conv_cuda_release(CtpruneSparseConvGpu* gpu) {
  if (!gpu) return;
  int current = -1;
  const bool switched = cudaGetDevice(&current) == cudaSuccess && current != gpu->device &&
                        cudaSetDevice(gpu->device) == cudaSuccess;
  if (gpu->buffer) cudaFree(gpu->buffer);  // errors here (driver shutting down) leave nothing to do
  if (switched) cudaSetDevice(current);
  delete gpu;
}

extern "C" const char* ctprune_sparse_conv_cuda_status_string(int status) {
  if (status == CTPRUNE_CUDA_INVALID_ATTRIBUTES) return "invalid SparseConv attributes";
  if (status == CTPRUNE_CUDA_INVALID_SHAPE)
    return "X's shape does not fit the layer, the output would be empty or too large, or Z is neither one element "
           "nor the output's size";
  return cudaGetErrorString(static_cast<cudaError_t>(status));
}
