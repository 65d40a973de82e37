#include "ops/sparse_conv_spec.h"

#include <string>

namespace ctprune {
namespace ops {
namespace {

void Require(bool ok, const std::string& message) {
  if (!ok) throw InvalidNode(message);
}

std::string Str(int64_t v) { return std::to_string(v); }

}  // namespace

const std::vector<const char*>& SparseConvAttributeNames() {
  static const std::vector<const char*> names = {
      "weight_shape",   "block",          "block_order", "strides",          "pads",           "dilations", "group",
      "activation_min", "activation_max", "activation",  "activation_alpha", "activation_beta"};
  return names;
}

SparseConvSpec ParseSparseConv(const NodeAttributes& a) {
  SparseConvSpec s;
  const std::vector<int64_t> shape = a.Ints("weight_shape", IntsRule{-1, 1, kMaxSparseChannels});
  Require(shape.size() == 2 || shape.size() == 4,
          "attribute 'weight_shape' must be [O, Cg, kh, kw] (Conv) or [O, I] (FC), got " + ListStr(shape));
  s.fc = shape.size() == 2;
  s.out_channels = shape[0];
  s.group_channels = shape[1];
  if (!s.fc) {
    s.kernel_h = shape[2];
    s.kernel_w = shape[3];
    Require(s.kernel_h <= kMaxSparseKernel && s.kernel_w <= kMaxSparseKernel,
            "attribute 'weight_shape' has a kernel larger than " + Str(kMaxSparseKernel) + ": " + ListStr(shape));
  }
  Require(static_cast<double>(s.group_channels) * s.kernel_h * s.kernel_w < 2147483647.0,
          "attribute 'weight_shape' " + ListStr(shape) + " has more than 2^31 columns per output channel");
  s.block = a.Int("block", 0, 1, 8);
  Require(s.block == 1 || s.block == 2 || s.block == 4 || s.block == 8,
          "attribute 'block' must be 1, 2, 4 or 8, got " + Str(s.block));
  const std::vector<int64_t> no_geometry;
  if (s.fc) {
    // An FC carries no Conv geometry; if present it must be the defaults.
    Require(a.Ints("strides", IntsRule{2, 1, 1}, {1, 1}) == std::vector<int64_t>{1, 1} &&
                a.Ints("pads", IntsRule{4, 0, 0}, {0, 0, 0, 0}).size() == 4 &&
                a.Ints("dilations", IntsRule{2, 1, 1}, {1, 1}).size() == 2,
            "an FC SparseConv (2-D weight_shape) has no strides, pads or dilations");
    a.Int("group", 1, 1, 1);
  } else {
    const std::vector<int64_t> strides = a.Ints("strides", IntsRule{2, 1, kMaxSparseStride}, {1, 1});
    s.stride_h = strides[0];
    s.stride_w = strides[1];
    const std::vector<int64_t> pads = a.Ints("pads", IntsRule{4, 0, kMaxSparsePad}, {0, 0, 0, 0});
    s.pad_top = pads[0];
    s.pad_left = pads[1];
    s.pad_bottom = pads[2];
    s.pad_right = pads[3];
    const std::vector<int64_t> dilations = a.Ints("dilations", IntsRule{2, 1, kMaxSparseDilation}, {1, 1});
    s.dilation_h = dilations[0];
    s.dilation_w = dilations[1];
    s.group = a.Int("group", 1, 1, s.out_channels);
    Require(s.out_channels % s.group == 0, "attribute 'group' (" + Str(s.group) + ") must divide O (" +
                                               Str(s.out_channels) + ")");
  }
  s.block_order = a.Ints("block_order", IntsRule{s.num_blocks(), 0, s.num_blocks() - 1});
  std::vector<char> seen(static_cast<size_t>(s.num_blocks()), 0);
  for (int64_t id : s.block_order) {
    Require(!seen[static_cast<size_t>(id)], "attribute 'block_order' must be a permutation of 0.." +
                                                Str(s.num_blocks() - 1) + " (block " + Str(id) + " appears twice)");
    seen[static_cast<size_t>(id)] = 1;
  }
  s.activation_min = a.Float("activation_min", -INFINITY);
  s.activation_max = a.Float("activation_max", INFINITY);
  Require(s.activation_min <= s.activation_max, "activation_min must not exceed activation_max, got " +
                                                    std::to_string(s.activation_min) + " and " +
                                                    std::to_string(s.activation_max));
  s.activation = a.Int("activation", 0, 0, 2);
  s.activation_alpha = a.Float("activation_alpha", 1.0f / 6.0f);
  s.activation_beta = a.Float("activation_beta", 0.5f);
  Require(std::isfinite(s.activation_alpha) && std::isfinite(s.activation_beta),
          "activation_alpha and activation_beta must be finite");
  return s;
}

void CheckSparseIndices(const SparseConvSpec& s, const std::vector<int64_t>& pointer,
                        const std::vector<int64_t>& columns) {
  const int64_t NB = s.num_blocks(), K = static_cast<int64_t>(columns.size()), width = s.columns();
  Require(static_cast<int64_t>(pointer.size()) == NB + 1,
          "P must have NB + 1 = " + Str(NB + 1) + " elements (one more than the blocks), got " +
              Str(static_cast<int64_t>(pointer.size())));
  Require(pointer[0] == 0 && pointer[static_cast<size_t>(NB)] == K,
          "P must start at 0 and end at the number of rows of I (" + Str(K) + "), got " + Str(pointer[0]) + " .. " +
              Str(pointer[static_cast<size_t>(NB)]));
  for (int64_t p = 0; p < NB; ++p) {
    const int64_t r0 = pointer[static_cast<size_t>(p)], r1 = pointer[static_cast<size_t>(p) + 1];
    Require(r0 <= r1, "P must be non-decreasing, but P[" + Str(p) + "] = " + Str(r0) + " > P[" + Str(p + 1) +
                          "] = " + Str(r1));
    // before reading I: a P that rises past the rows of I and falls back to end at K passes the checks above
    Require(r1 <= K, "P[" + Str(p + 1) + "] = " + Str(r1) + " is past the rows of I (" + Str(K) + ")");
    Require(r1 - r0 <= width, "block position " + Str(p) + " keeps " + Str(r1 - r0) + " columns, more than the " +
                                  Str(width) + " a block has");
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t c = columns[static_cast<size_t>(r)];
      Require(c >= 0 && c < width, "I[" + Str(r) + "] = " + Str(c) + " is outside the column space 0.." +
                                       Str(width - 1));
      // the message reads I[r - 1], so it is built only when there is one (Require evaluates it every time)
      if (r > r0 && c <= columns[static_cast<size_t>(r) - 1])
        throw InvalidNode("the columns of a block must be strictly increasing, but I[" + Str(r) + "] = " + Str(c) +
                          " follows " + Str(columns[static_cast<size_t>(r) - 1]));
    }
  }
}

}  // namespace ops
}  // namespace ctprune
