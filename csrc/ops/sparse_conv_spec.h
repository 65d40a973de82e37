// ai.ctprune.SparseConv's attributes and index inputs (ops/SparseConv.md), read and checked once: the attributes from
// the node (NodeAttributes, op_spec.h), the block pointer P and the columns I from their constant initializers. A
// backend builds its plan from a spec that already holds every invariant of the operator. Free of onnxruntime.
#pragma once

#include <cmath>
#include <cstdint>
#include <vector>

#include "ops/op_spec.h"

namespace ctprune {
namespace ops {

constexpr const char* kSparseConvName = "SparseConv";
constexpr int64_t kMaxSparseChannels = (int64_t{1} << 24);  // O and C; columns and offsets stay 32-bit
constexpr int64_t kMaxSparseKernel = 1024, kMaxSparseStride = 1024, kMaxSparsePad = 1024, kMaxSparseDilation = 1024;

struct SparseConvSpec {
  bool fc = false;                // weight_shape [O, I]: X (N, I) -> Y (N, O)
  int64_t out_channels = 0;       // O
  int64_t group_channels = 0;     // Cg (Conv) or I (FC): input channels per group
  int64_t kernel_h = 1, kernel_w = 1;
  int64_t block = 1;
  std::vector<int64_t> block_order;  // [NB]: block id at each stored position
  int64_t group = 1;
  int64_t stride_h = 1, stride_w = 1;
  int64_t pad_top = 0, pad_left = 0, pad_bottom = 0, pad_right = 0;
  int64_t dilation_h = 1, dilation_w = 1;
  float activation_min = -INFINITY, activation_max = INFINITY;
  int64_t activation = 0;  // 0 none, 1 c * HardSigmoid(c), 2 c * Sigmoid(c)
  float activation_alpha = 1.0f / 6.0f, activation_beta = 0.5f;

  int64_t per_group() const { return out_channels / group; }                     // Og
  int64_t blocks_per_group() const { return (per_group() + block - 1) / block; }
  int64_t num_blocks() const { return group * blocks_per_group(); }              // NB
  int64_t columns() const { return group_channels * kernel_h * kernel_w; }       // a group's column space
  bool has_clamp() const {
    return !(std::isinf(activation_min) && activation_min < 0 && std::isinf(activation_max) && activation_max > 0);
  }
};

// The attribute names SparseConv reads (for ReadAttributes).
const std::vector<const char*>& SparseConvAttributeNames();

// Reads every attribute with the function's types (ops/sparse_reference.py) and checks them; throws InvalidNode.
SparseConvSpec ParseSparseConv(const NodeAttributes& attributes);

// The index inputs: P (NB + 1) and I (K), widened to int64 by the caller. Checks P[0] = 0, P non-decreasing,
// P[NB] = K, every column in 0..columns-1 and strictly increasing inside a block. Throws InvalidNode.
void CheckSparseIndices(const SparseConvSpec& spec, const std::vector<int64_t>& pointer,
                        const std::vector<int64_t>& columns);

}  // namespace ops
}  // namespace ctprune
