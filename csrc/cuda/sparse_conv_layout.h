// SparseConv for the GPU: packing a checked spec (ops/sparse_conv_spec.h, shared with the CPU op) and its index
// inputs for the kernel (host code only).
//
// The kernel takes one stored block position per thread block column (sparse_conv_impl.cuh) and walks its rows; per
// row it wants where the input lives rather than the column number, so the packed layout keeps, per row r,
//     Conv: (input channel c = group * Cg + local channel, dy = ky * dilation_h, dx = kx * dilation_w)
//     FC:   (input feature, 0, 0)
// and per stored position its first output channel, channel count, group and row range (P). I itself stays for the
// non-finite pass, which asks whether a position keeps a column (binary search: a block's columns are increasing).
//
// Header-only and free of CUDA so that the launcher (nvcc), the onnxruntime op (g++) and the CPU emulator share it;
// whoever includes it links ops/sparse_conv_spec.cc and ops/op_spec.cc (the spec checks).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <new>
#include <string>
#include <vector>

#include "cuda/sparse_conv_cuda.h"
#include "ops/sparse_conv_spec.h"

namespace ctprune {
namespace cuda {

struct PackedSparseConv {
  ops::SparseConvSpec spec;
  int num_blocks = 0;               // NB
  int num_rows = 0;                 // K
  std::vector<int> rows;            // [K * 3]: (input channel or feature, dy, dx)
  std::vector<int> row_begin;       // [NB + 1]: P
  std::vector<int> first;           // [NB]: first output channel of each stored position
  std::vector<int> channels;        // [NB]: its channels (< block for a partial block)
  std::vector<int> group_of;        // [NB]: its group
  std::vector<int> columns;         // [K]: I
};

// Packs a spec ops::ParseSparseConv accepted and index arrays ops::CheckSparseIndices accepted.
inline PackedSparseConv PackSparseConv(const ops::SparseConvSpec& s, const std::vector<int64_t>& pointer,
                                       const std::vector<int64_t>& columns) {
  PackedSparseConv out;
  out.spec = s;
  out.num_blocks = static_cast<int>(s.num_blocks());
  out.num_rows = static_cast<int>(columns.size());
  out.row_begin.assign(pointer.begin(), pointer.end());
  out.columns.assign(columns.begin(), columns.end());
  out.rows.resize(columns.size() * 3);
  const int64_t bpg = s.blocks_per_group(), Og = s.per_group(), taps = s.kernel_h * s.kernel_w;
  for (int p = 0; p < out.num_blocks; ++p) {
    const int64_t id = s.block_order[static_cast<size_t>(p)], g = id / bpg, i = id % bpg;
    out.group_of.push_back(static_cast<int>(g));
    out.first.push_back(static_cast<int>(g * Og + i * s.block));
    out.channels.push_back(static_cast<int>(std::min<int64_t>(s.block, Og - i * s.block)));
    for (int64_t r = pointer[static_cast<size_t>(p)]; r < pointer[static_cast<size_t>(p) + 1]; ++r) {
      const int64_t column = columns[static_cast<size_t>(r)];
      int* row = out.rows.data() + 3 * r;
      if (s.fc) {
        row[0] = static_cast<int>(column);
        row[1] = row[2] = 0;
      } else {
        const int64_t tap = column % taps;
        row[0] = static_cast<int>(g * s.group_channels + column / taps);
        row[1] = static_cast<int>((tap / s.kernel_w) * s.dilation_h);
        row[2] = static_cast<int>((tap % s.kernel_w) * s.dilation_w);
      }
    }
  }
  return out;
}

// The C ABI's descriptor as the node attributes it stands for, read by the same parser as the ops' (ParseSparseConv).
inline ops::SparseConvSpec SpecFromDesc(const CtpruneSparseConvDesc& d) {
  auto ints = [](std::vector<int64_t> v) {
    ops::Attribute a;
    a.type = v.empty() ? ops::AttributeType::kList : ops::AttributeType::kInts;
    a.ints = std::move(v);
    return a;
  };
  auto one = [](int64_t v) {
    ops::Attribute a;
    a.type = ops::AttributeType::kInt;
    a.i = v;
    return a;
  };
  auto real = [](float v) {
    ops::Attribute a;
    a.type = ops::AttributeType::kFloat;
    a.f = v;
    return a;
  };
  if (d.num_blocks < 0 || (d.num_blocks > 0 && !d.block_order))
    throw ops::InvalidNode("the descriptor's block_order is missing or has a bad length");
  ops::NodeAttributes a;
  a.Set("weight_shape", ints(d.fc ? std::vector<int64_t>{d.out_channels, d.group_channels}
                                  : std::vector<int64_t>{d.out_channels, d.group_channels, d.kernel_h, d.kernel_w}));
  a.Set("block", one(d.block));
  a.Set("block_order", ints(std::vector<int64_t>(d.block_order, d.block_order + d.num_blocks)));
  if (!d.fc) {
    a.Set("strides", ints({d.stride_h, d.stride_w}));
    a.Set("pads", ints({d.pad_top, d.pad_left, d.pad_bottom, d.pad_right}));
    a.Set("dilations", ints({d.dilation_h, d.dilation_w}));
    a.Set("group", one(d.group));
  }
  a.Set("activation_min", real(d.activation_min));
  a.Set("activation_max", real(d.activation_max));
  a.Set("activation", one(d.activation));
  a.Set("activation_alpha", real(d.activation_alpha));
  a.Set("activation_beta", real(d.activation_beta));
  return ops::ParseSparseConv(a);
}

// The C ABI's check and pack: "" on success, else the spec's one-sentence reason (nothing may throw across the ABI).
inline std::string PackSparseConv(const CtpruneSparseConvDesc& d, PackedSparseConv& out) {
  try {
    const ops::SparseConvSpec spec = SpecFromDesc(d);
    if (d.num_rows < 0 || (d.num_rows > 0 && !d.columns) || !d.pointer || d.num_rows >= (int64_t{1} << 31))
      throw ops::InvalidNode("the descriptor's P or I is missing or has a bad length");
    const std::vector<int64_t> pointer(d.pointer, d.pointer + spec.num_blocks() + 1);
    const std::vector<int64_t> columns(d.columns, d.columns + d.num_rows);
    ops::CheckSparseIndices(spec, pointer, columns);
    out = PackSparseConv(spec, pointer, columns);
    return "";
  } catch (const ops::InvalidNode& e) {
    return e.what();
  } catch (const std::bad_alloc&) {
    return "out of memory while packing the layer";
  }
}

}  // namespace cuda
}  // namespace ctprune
