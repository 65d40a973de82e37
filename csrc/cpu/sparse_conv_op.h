// ai.ctprune.SparseConv (version 1) on the CPU execution provider; the operator is specified in ops/SparseConv.md.
// It computes Y = gate(clip(Conv(X, W_dense, B, strides, pads, dilations, group) + Z)) (or X @ W_dense^T for an FC),
// the same as the model-local function in ops/sparse_reference.py, from the compact blocks W (K, block), I (K) and
// P (NB + 1). I and P must be constant initializers: they are checked and turned into a plan once, here.
#pragma once

#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "cpu/dispatch.h"
#include "ops/ort_api.h"
#include "ops/sparse_conv_spec.h"

namespace ctprune {
namespace cpu {

// What the kernels walk, built once from the spec and the index inputs.
struct SparsePlan {
  ops::SparseConvSpec spec;
  int K = 0;                          // rows of W and I
  std::vector<int32_t> row_begin;     // (NB + 1): P
  std::vector<int32_t> first;         // (NB): first output channel of the block at each position
  std::vector<int32_t> channels;      // (NB): its channels
  std::vector<uint16_t> columns16;    // FC: I as stored (uint16), or empty
  std::vector<int32_t> columns32;     // FC: I as stored (int32), or empty
  std::vector<int32_t> row_channel;   // Conv: (K) absolute input channel of each row
  std::vector<int32_t> row_tap;       // Conv: (K) tap ky * kw + kx of each row
  std::vector<int32_t> columns;       // (K) I, for the non-finite input fix-up (PoisonPruned)
  std::vector<int32_t> group_of;      // (NB) group of the block at each position
};

// Per-call layout of a Conv's input (see cpu/sparse_conv.h).
struct SparseGeometry {
  int64_t N = 0, C = 0, H = 0, W = 0, OH = 0, OW = 0;
  bool in_place = false;   // the kernels read X itself (1x1, stride 1, no pads; 8 lanes, or aligned planes of whole vectors)
  bool subsample = false;  // 1x1 without pads, stride > 1: the plane is X[::sh, ::sw]
  int flat_row = 0;        // output row length of the flat index
  int phase_rows = 0;      // rows of each phase plane (general layout)
  size_t phase = 0;        // floats per phase plane
  size_t plane = 0;        // floats per packed channel
  int vectors = 0;         // flat vectors holding OH * flat_row
  std::vector<int32_t> tap_offset;  // (kh * kw)
};

class SparseConvKernel {
 public:
  // Reads and checks the attributes and the index inputs; throws ops::InvalidNode on a malformed node.
  SparseConvKernel(const OrtApi& api, const OrtKernelInfo* info, std::string node);
  OrtStatusPtr ComputeV2(OrtKernelContext* context);

 private:
  void Compute(OrtKernelContext* context);
  void ComputeFc(Ort::KernelContext& ctx, const float* x, int64_t N, const float* w, const float* bias,
                 Ort::ConstValue& z);
  // onnxruntime's dense op multiplies every input by the dense weight, pruned zeros included, so a NaN or inf input
  // makes NaN wherever it meets a pruned weight; the kernels skip those products, so this sets them after the fact
  // (only when X holds a non-finite value).
  void PoisonPruned(const float* x, const std::vector<int64_t>& xs, int64_t OH, int64_t OW, float* out) const;
  bool Kept(int position, int64_t column) const;
  // A depthwise Conv (see depthwise_): Y from the dense per-channel weights, the input padded per row strip.
  void ComputeDepthwise(Ort::KernelContext& ctx, const SparseGeometry& g, const float* x, const float* w,
                        const SparseEpilogue& epilogue, const float* residual, float* out);
  // The dense (C, kh * kw) weights of a depthwise node from its compact W (taps the node does not keep are 0).
  void DenseDepthwiseWeights(const float* w, float* dense) const;
  // The rows' read offsets for an input size, made on first use and kept (a model sees few input sizes).
  std::shared_ptr<const std::vector<int32_t>> Offsets(const SparseGeometry& g);

  const OrtApi& api_;
  std::string node_;  // "SparseConv node 'name'" for error messages
  SparsePlan plan_;
  KernelTable kernels_;
  KernelTable narrow_kernels_;  // the depthwise kernel's for output rows of at most kNarrowRowFloats (dispatch.h)
  std::mutex offsets_mutex_;
  struct OffsetsFor {
    int64_t H, W;
    bool in_place;
    std::shared_ptr<const std::vector<int32_t>> offsets;
  };
  std::vector<OffsetsFor> offsets_;  // a few recent input sizes
  size_t stream_bytes_;       // Y bytes from which the 1x1 path streams its stores (CTPRUNE_SPARSE_STREAM_BYTES)
  size_t fused_check_bytes_;  // X bytes from which the non-finite check runs inside the tile loop
  long pass_bytes_;           // input bytes (all channels) of one pass of tiles on the 8-lane tier (CTPRUNE_SPARSE_PASS_BYTES)
  bool poison_output_;
  // A depthwise Conv (one input channel per group, group == O == C, dilation 1, equal strides 1 or 2, kernel up to
  // 7 x 7) runs its own kernel on the dense per-channel weights, unless CTPRUNE_SPARSE_DEPTHWISE=0. Those weights
  // multiply every input in each window, pruned taps as zeros, as onnxruntime's Conv on the rebuilt dense weight does,
  // so NaN and inf propagate as there without PoisonPruned.
  bool depthwise_ = false;
  std::vector<float> depthwise_weights_;  // built once when W is a constant initializer; empty otherwise  // CTPRUNE_POISON_OUTPUT=1: fill Y with NaN first, so unwritten elements show in tests
};

struct SparseConvOp : Ort::CustomOpBase<SparseConvOp, SparseConvKernel, /*WithStatus=*/true> {
  OrtStatusPtr CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** kernel) const;
  const char* GetName() const { return ops::kSparseConvName; }
  const char* GetExecutionProviderType() const { return "CPUExecutionProvider"; }
  size_t GetInputTypeCount() const { return 6; }  // X, W, I, P, B (optional), Z (optional)
  ONNXTensorElementDataType GetInputType(size_t index) const {
    // I is uint16 or int32: undefined lets onnxruntime accept either (the kernel checks which).
    return index == 2 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED
                      : index == 3 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32 : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t index) const {
    return index >= 4 ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
};

}  // namespace cpu
}  // namespace ctprune
