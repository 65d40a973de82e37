// PatternConv GPU kernel and its C ABI launcher (see pattern_conv_impl.cuh for the design, pattern_conv_cuda.h for
// the calls). Pure CUDA runtime: no onnxruntime here, so a ctypes harness can load it on its own.
#include <cuda_runtime.h>

#include <cstdio>
#include <cstring>
#include <mutex>
#include <new>
#include <string>
#include <vector>

#include "cuda/pattern_conv_cuda.h"
#include "cuda/pattern_conv_impl.cuh"
#include "cuda/pattern_conv_plan.h"

namespace ctprune {
namespace cuda {
namespace {

// At least 3 blocks per SM (<= 85 registers): without it ptxas settles at 64 registers and spills a few.
template <int FT, int PX>
__global__ void __launch_bounds__(kBlockThreads, 3) PatternConvKernel(const __grid_constant__ PatternConvParams p) {
  extern __shared__ float smem[];
  __shared__ int last_arrival;
  const BlockCoord bc = DecodeBlock(p, blockIdx.x);
  ThreadState<FT, PX> st;
  InitThread(st, p, bc, threadIdx.x);
  int non_finite = 0;  // the same in every thread: some thread of the block staged a NaN or +-Inf
  for (int c0 = bc.c_begin; c0 < bc.c_end; c0 += p.CC) {
    const int c1 = min(c0 + p.CC, bc.c_end);
    const bool staged_non_finite = StageChunk(p, bc, c0, c1 - c0, threadIdx.x, kBlockThreads, smem);
    non_finite |= __syncthreads_or(staged_non_finite);  // the barrier the staging needs anyway
    ComputeChunk(st, p, c0, c1, smem);
    __syncthreads();  // before the next chunk overwrites the tile
  }
  if (non_finite) MarkNonFinite(st, NonFiniteOutputs<FT, PX>(p, bc, threadIdx.x));
  if (p.splits == 1) {
    FinishThread(st, p);
    return;
  }
  // Split over channels: publish the partial sums, take a ticket; the tile's last block reduces.
  StorePartial(st, p, bc.split);
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) {
    const int arrived = atomicAdd(p.tickets + bc.ticket, 1);
    last_arrival = arrived == p.splits - 1;
    if (last_arrival) p.tickets[bc.ticket] = 0;  // every split has arrived: ready for the next launch
  }
  __syncthreads();
  if (last_arrival) {
    __threadfence();
    ReducePartials(st, p);
  }
}

template <int FT, int PX>
cudaError_t Launch(const PatternConvParams& p, cudaStream_t stream) {
  const size_t smem_bytes = static_cast<size_t>(p.CC) * p.chan_stride * sizeof(float);
  PatternConvKernel<FT, PX><<<static_cast<unsigned>(p.blocks), kBlockThreads, smem_bytes, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t Dispatch(const PatternConvParams& p, cudaStream_t stream) {
  switch (p.ft * 10 + p.px) {
    case 11: return Launch<1, 1>(p, stream);
    case 12: return Launch<1, 2>(p, stream);
    case 14: return Launch<1, 4>(p, stream);
    case 21: return Launch<2, 1>(p, stream);
    case 22: return Launch<2, 2>(p, stream);
    case 24: return Launch<2, 4>(p, stream);
    case 41: return Launch<4, 1>(p, stream);
    case 42: return Launch<4, 2>(p, stream);
    case 44: return Launch<4, 4>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

int SmCount(int device) {
  static int cached[64] = {0};  // benign race: every writer stores the same value
  if (device < 0 || device >= 64) return 132;
  if (cached[device] == 0) {
    int count = 0;
    if (cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || count <= 0) count = 132;
    cached[device] = count;
  }
  return cached[device];
}

}  // namespace
}  // namespace cuda
}  // namespace ctprune

// Partial sums and tickets of channel-split launches, one set per stream (launches on one stream never overlap).
struct SplitScratch {
  cudaStream_t stream = nullptr;
  float* partial = nullptr;
  size_t partial_floats = 0;
  int* tickets = nullptr;
  size_t ticket_count = 0;
};

struct CtprunePatternConvGpu {
  ctprune::cuda::PackedPatternConv packed;  // host copy: plans read the taps and shapes
  int device = -1;
  int* buffer = nullptr;  // device: entries | filter_begin | slot_filter
  const int* entries = nullptr;
  const int* filter_begin = nullptr;
  const int* slot_filter = nullptr;
  mutable std::mutex scratch_mutex;
  mutable std::vector<SplitScratch> scratch;
};

namespace {

// Grows the stream's scratch to hold `partial_floats` and `tickets` (new tickets zeroed on that stream).
cudaError_t ScratchFor(const CtprunePatternConvGpu* gpu, cudaStream_t stream, size_t partial_floats, size_t tickets,
                       SplitScratch* out) {
  std::lock_guard<std::mutex> lock(gpu->scratch_mutex);
  SplitScratch* s = nullptr;
  for (auto& candidate : gpu->scratch)
    if (candidate.stream == stream) s = &candidate;
  if (!s) {
    gpu->scratch.push_back(SplitScratch{});
    s = &gpu->scratch.back();
    s->stream = stream;
  }
  cudaError_t status = cudaSuccess;
  if (s->partial_floats < partial_floats) {
    if (s->partial) cudaFree(s->partial);  // cudaFree waits for kernels still using it
    s->partial = nullptr;
    s->partial_floats = 0;
    status = cudaMalloc(&s->partial, partial_floats * sizeof(float));
    if (status != cudaSuccess) return status;
    s->partial_floats = partial_floats;
  }
  if (s->ticket_count < tickets) {
    if (s->tickets) cudaFree(s->tickets);
    s->tickets = nullptr;
    s->ticket_count = 0;
    status = cudaMalloc(&s->tickets, tickets * sizeof(int));
    if (status == cudaSuccess) status = cudaMemsetAsync(s->tickets, 0, tickets * sizeof(int), stream);
    if (status != cudaSuccess) return status;
    s->ticket_count = tickets;
  }
  *out = *s;
  return cudaSuccess;
}

}  // namespace

extern "C" int ctprune_pattern_conv_cuda_prepare(const CtprunePatternConvDesc* desc, CtprunePatternConvGpu** out,
                                                 char* err, int err_len) {
  using namespace ctprune::cuda;
  if (out) *out = nullptr;
  auto fail = [&](const std::string& message) {
    if (err && err_len > 0) std::snprintf(err, static_cast<size_t>(err_len), "%s", message.c_str());
    return CTPRUNE_CUDA_INVALID_ATTRIBUTES;
  };
  if (!desc || !out) return fail("desc and out must not be null");
  CtprunePatternConvGpu* gpu = new (std::nothrow) CtprunePatternConvGpu();
  if (!gpu) return static_cast<int>(cudaErrorMemoryAllocation);
  const std::string problem = PackPatternConv(*desc, gpu->packed);
  if (!problem.empty()) {
    delete gpu;
    return fail(problem);
  }
  const PackedPatternConv& pk = gpu->packed;
  const size_t n_entries = pk.entries.size(), n_begin = pk.filter_begin.size(), n_slots = pk.slot_filter.size();
  cudaError_t status = cudaGetDevice(&gpu->device);
  if (status == cudaSuccess) status = cudaMalloc(&gpu->buffer, (n_entries + n_begin + n_slots + 1) * sizeof(int));
  if (status == cudaSuccess && n_entries)
    status = cudaMemcpy(gpu->buffer, pk.entries.data(), n_entries * sizeof(int), cudaMemcpyHostToDevice);
  if (status == cudaSuccess)
    status = cudaMemcpy(gpu->buffer + n_entries, pk.filter_begin.data(), n_begin * sizeof(int), cudaMemcpyHostToDevice);
  if (status == cudaSuccess)
    status = cudaMemcpy(gpu->buffer + n_entries + n_begin, pk.slot_filter.data(), n_slots * sizeof(int),
                        cudaMemcpyHostToDevice);
  if (status != cudaSuccess) {
    if (gpu->buffer) cudaFree(gpu->buffer);
    delete gpu;
    return static_cast<int>(status);
  }
  gpu->entries = gpu->buffer;
  gpu->filter_begin = gpu->buffer + n_entries;
  gpu->slot_filter = gpu->buffer + n_entries + n_begin;
  *out = gpu;
  return 0;
}

extern "C" int ctprune_pattern_conv_cuda_output_size(const CtprunePatternConvGpu* gpu, int64_t h, int64_t width,
                                                     int64_t* oh, int64_t* ow) {
  ctprune::cuda::PatternConvParams p{};
  if (!gpu || !ctprune::cuda::PlanShape(p, gpu->packed, 1, h, width)) return CTPRUNE_CUDA_INVALID_SHAPE;
  if (oh) *oh = p.OH;
  if (ow) *ow = p.OW;
  return 0;
}

extern "C" int ctprune_pattern_conv_cuda(const CtprunePatternConvGpu* gpu, const float* x, const float* w,
                                         const float* b, const float* z, int64_t z_elements, float* y, int64_t n,
                                         int64_t h, int64_t width, void* stream, int force_config) {
  using namespace ctprune::cuda;
  if (!gpu || !x || !y || (!w && gpu->packed.num_kernels > 0)) return static_cast<int>(cudaErrorInvalidValue);
  if (reinterpret_cast<uintptr_t>(w) % 16 != 0) return static_cast<int>(cudaErrorMisalignedAddress);
  int device = -1;
  if (cudaGetDevice(&device) != cudaSuccess || device != gpu->device) return static_cast<int>(cudaErrorInvalidDevice);
  PatternConvParams p{};
  if (!PlanShape(p, gpu->packed, n, h, width)) return CTPRUNE_CUDA_INVALID_SHAPE;
  const long long y_size = static_cast<long long>(p.N) * p.O * p.OH * p.OW;
  if (z && z_elements != 1 && z_elements != y_size) return CTPRUNE_CUDA_INVALID_SHAPE;
  p.x = x;
  p.w = w;
  p.b = b;
  p.z = z;
  p.z_full = z && z_elements != 1 ? 1 : 0;  // one element: the same value everywhere (also when Y has one element)
  p.y = y;
  p.entries = gpu->entries;
  p.filter_begin = gpu->filter_begin;
  p.slot_filter = gpu->slot_filter;
  if (!PlanLaunch(p, gpu->packed, SmCount(gpu->device), force_config)) return static_cast<int>(cudaErrorInvalidValue);
  if (p.blocks < 1 || p.blocks > 0x7fffffffLL) return CTPRUNE_CUDA_INVALID_SHAPE;
  if (p.splits > 1) {
    SplitScratch scratch;
    const cudaError_t status = ScratchFor(gpu, static_cast<cudaStream_t>(stream),
                                          static_cast<size_t>(p.splits) * p.y_size,
                                          static_cast<size_t>(p.blocks / p.splits), &scratch);
    if (status != cudaSuccess) return static_cast<int>(status);
    p.partial = scratch.partial;
    p.tickets = scratch.tickets;
  }
  return static_cast<int>(Dispatch(p, static_cast<cudaStream_t>(stream)));
}

extern "C" void ctprune_pattern_conv_cuda_release(CtprunePatternConvGpu* gpu) {
  if (!gpu) return;
  int current = -1;
  const bool switched = cudaGetDevice(&current) == cudaSuccess && current != gpu->device &&
                        cudaSetDevice(gpu->device) == cudaSuccess;
  // Errors here (driver shutting down) leave nothing to do.
  if (gpu->buffer) cudaFree(gpu->buffer);
  for (auto& s : gpu->scratch) {
    if (s.partial) cudaFree(s.partial);
    if (s.tickets) cudaFree(s.tickets);
  }
  if (switched) cudaSetDevice(current);
  delete gpu;
}

extern "C" const char* ctprune_pattern_conv_cuda_status_string(int status) {
  if (status == CTPRUNE_CUDA_INVALID_ATTRIBUTES) return "invalid PatternConv attributes";
  if (status == CTPRUNE_CUDA_INVALID_SHAPE)
    return "input shape gives an empty or too large output, or Z is neither one element nor the output's size";
  return cudaGetErrorString(static_cast<cudaError_t>(status));
}
