#include "ops/pattern_conv_spec.h"

#include <string>

namespace ctprune {
namespace ops {
namespace {

void Require(bool ok, const std::string& message) {
  if (!ok) throw InvalidNode(message);
}

std::string Str(int64_t v) { return std::to_string(v); }

void CheckPatterns(const std::vector<int64_t>& patterns) {
  Require(patterns.size() % 4 == 0, "attribute 'patterns' must hold 4 taps per pattern, got " +
                                        Str(static_cast<int64_t>(patterns.size())) + " values");
  const int64_t P = static_cast<int64_t>(patterns.size() / 4);
  Require(P <= kMaxPatterns, "attribute 'patterns' holds " + Str(P) + " patterns, more than the kernels' " +
                                 Str(kMaxPatterns));
  for (int64_t q = 0; q < P; ++q) {
    const std::vector<int64_t> taps(patterns.begin() + 4 * q, patterns.begin() + 4 * q + 4);
    for (int j = 0; j < 4; ++j) {
      Require(taps[j] >= 0 && taps[j] <= 8, "pattern " + Str(q) + " has tap " + Str(taps[j]) + " outside 0..8");
      Require(j == 0 || taps[j] > taps[j - 1],
              "pattern " + Str(q) + " must list 4 distinct taps in ascending order, got " + ListStr(taps));
    }
  }
}

// The storage order of ops/PatternConv.md, kernel by kernel.
void CheckKernels(const PatternConvSpec& s) {
  const size_t K = s.kernel_filters.size();
  Require(s.kernel_channels.size() == K && s.kernel_patterns.size() == K,
          "kernel_filters, kernel_channels and kernel_patterns must have the same length, got " + Str(K) + ", " +
              Str(s.kernel_channels.size()) + ", " + Str(s.kernel_patterns.size()));
  Require(static_cast<double>(K) <= static_cast<double>(s.out_channels) * static_cast<double>(s.in_channels),
          "more kept kernels (" + Str(K) + ") than O*C");
  const int64_t O = s.out_channels, C = s.in_channels, P = s.num_patterns();
  Require(P > 0 || K == 0, "attribute 'patterns' holds no pattern (an empty list, or a list of another kind such as "
                           "STRINGS) but " + Str(K) + " kept kernels need one");
  std::vector<char> filter_seen(static_cast<size_t>(O), 0), channel_used(static_cast<size_t>(C), 0);
  size_t run_start = 0;
  int64_t previous_count = -1;
  for (size_t k = 0; k <= K; ++k) {
    const bool run_ends = k == K || (k > run_start && s.kernel_filters[k] != s.kernel_filters[run_start]);
    if (run_ends && k > run_start) {
      const int64_t f = s.kernel_filters[run_start], count = static_cast<int64_t>(k - run_start);
      Require(previous_count < 0 || count <= previous_count,
              "filter " + Str(f) + " keeps " + Str(count) + " kernels, more than the filter before it (filters must "
              "be ordered by decreasing kernel count)");
      previous_count = count;
      for (size_t i = run_start; i < k; ++i) channel_used[static_cast<size_t>(s.kernel_channels[i])] = 0;
      run_start = k;
    }
    if (k == K) break;
    const int64_t f = s.kernel_filters[k], c = s.kernel_channels[k], q = s.kernel_patterns[k];
    const std::string where = "kernel " + Str(static_cast<int64_t>(k)) + " (filter " + Str(f) + ", input channel " +
                              Str(c) + ", pattern id " + Str(q) + "): ";
    Require(f >= 0 && f < O, where + "filter out of range 0.." + Str(O - 1));
    Require(c >= 0 && c < C, where + "input channel out of range 0.." + Str(C - 1));
    Require(q >= 0 && q < P, where + "pattern id out of range 0.." + Str(P - 1));
    if (k == run_start) {
      Require(!filter_seen[static_cast<size_t>(f)],
              where + "the kernels of filter " + Str(f) + " are not contiguous (kernels are stored filter by filter)");
      filter_seen[static_cast<size_t>(f)] = 1;
    } else {
      const int64_t pq = s.kernel_patterns[k - 1], pc = s.kernel_channels[k - 1];
      Require(q > pq || (q == pq && c > pc),
              where + "the kernels of a filter must be ordered by pattern id, then input channel");
    }
    Require(!channel_used[static_cast<size_t>(c)], where + "filter " + Str(f) + " keeps input channel " + Str(c) +
                                                       " twice");
    channel_used[static_cast<size_t>(c)] = 1;
  }
}

bool Has(const NodeAttributes& a, const char* name) { return a.TypeOf(name) != AttributeType::kMissing; }

// The kept kernels' lists from the compact index attributes (filter_runs, kernel_codes) or, in models written before
// them, the three per-kernel lists. The expansion checks only what it needs to stay bounded (sizes, counts, P);
// CheckKernels then checks the lists as for the older form.
void ReadKernelLists(const NodeAttributes& a, PatternConvSpec* s) {
  const bool compact = Has(a, "filter_runs") || Has(a, "kernel_codes");
  const bool lists = Has(a, "kernel_filters") || Has(a, "kernel_channels") || Has(a, "kernel_patterns");
  Require(!(compact && lists), "a node carries either 'filter_runs' and 'kernel_codes' or the older "
                               "'kernel_filters', 'kernel_channels' and 'kernel_patterns', not both");
  if (!compact && lists) {
    s->kernel_filters = a.Ints("kernel_filters", IntsRule{});
    s->kernel_channels = a.Ints("kernel_channels", IntsRule{});
    s->kernel_patterns = a.Ints("kernel_patterns", IntsRule{});
    return;
  }
  const std::vector<int64_t> runs = a.Ints("filter_runs", IntsRule{});
  const std::vector<int64_t> codes = a.Ints("kernel_codes", IntsRule{-1, 0, INT64_MAX});
  Require(runs.size() % 2 == 0, "attribute 'filter_runs' must hold (filter, kernel count) pairs, got " +
                                    Str(static_cast<int64_t>(runs.size())) + " values");
  const size_t K = codes.size();
  s->kernel_filters.reserve(K);
  for (size_t r = 0; r < runs.size(); r += 2) {
    const int64_t count = runs[r + 1];
    Require(count >= 1 && static_cast<uint64_t>(count) <= K - s->kernel_filters.size(),
            "attribute 'filter_runs': filter " + Str(runs[r]) + " keeps " + Str(count) + " kernels; counts must be "
            "at least 1 and add up to the " + Str(static_cast<int64_t>(K)) + " entries of 'kernel_codes'");
    s->kernel_filters.insert(s->kernel_filters.end(), static_cast<size_t>(count), runs[r]);
  }
  Require(s->kernel_filters.size() == K, "attribute 'filter_runs' counts " +
                                              Str(static_cast<int64_t>(s->kernel_filters.size())) +
                                              " kernels, 'kernel_codes' holds " + Str(static_cast<int64_t>(K)));
  CheckPatterns(s->patterns);  // the codes are decoded with P
  const int64_t P = s->num_patterns();
  Require(P > 0 || K == 0, "attribute 'patterns' holds no pattern (an empty list, or a list of another kind such as "
                           "STRINGS) but " + Str(static_cast<int64_t>(K)) + " kept kernels need one");
  s->kernel_channels.resize(K);
  s->kernel_patterns.resize(K);
  for (size_t k = 0; k < K; ++k) {
    s->kernel_channels[k] = codes[k] / P;
    s->kernel_patterns[k] = codes[k] % P;
  }
}

}  // namespace

const std::vector<const char*>& PatternConvAttributeNames() {
  static const std::vector<const char*> names = {
      "weight_shape", "patterns",  "filter_runs", "kernel_codes",   "kernel_filters", "kernel_channels",
      "kernel_patterns", "strides", "pads",       "dilations",      "group",          "activation_min",
      "activation_max"};
  return names;
}

PatternConvSpec ParsePatternConv(const NodeAttributes& a) {
  PatternConvSpec s;
  const std::vector<int64_t> weight_shape = a.Ints("weight_shape", IntsRule{4});
  s.out_channels = weight_shape[0];
  s.in_channels = weight_shape[1];
  Require(weight_shape[2] == 3 && weight_shape[3] == 3,
          "attribute 'weight_shape' must describe 3x3 kernels [O, C, 3, 3], got " + ListStr(weight_shape));
  s.patterns = a.Ints("patterns", IntsRule{});
  ReadKernelLists(a, &s);
  const std::vector<int64_t> strides = a.Ints("strides", IntsRule{2}, {1, 1});
  s.stride_h = strides[0];
  s.stride_w = strides[1];
  const std::vector<int64_t> pads = a.Ints("pads", IntsRule{4}, {0, 0, 0, 0});
  s.pad_top = pads[0];
  s.pad_left = pads[1];
  s.pad_bottom = pads[2];
  s.pad_right = pads[3];
  const std::vector<int64_t> dilations = a.Ints("dilations", IntsRule{2}, {1, 1});
  Require(dilations[0] == 1 && dilations[1] == 1,
          "attribute 'dilations' must be [1, 1] (undilated 3x3 kernels), got " + ListStr(dilations));
  a.Int("group", 1, 1, 1);
  s.activation_min = a.Float("activation_min", -INFINITY);
  s.activation_max = a.Float("activation_max", INFINITY);
  CheckPatternConv(s);
  return s;
}

void CheckPatternConv(const PatternConvSpec& s) {
  Require(s.out_channels >= 1 && s.out_channels <= kMaxConvChannels && s.in_channels >= 1 &&
              s.in_channels <= kMaxConvChannels,
          "attribute 'weight_shape' must have O and C in 1.." + Str(kMaxConvChannels) + ", got [" +
              Str(s.out_channels) + ", " + Str(s.in_channels) + ", 3, 3]");
  Require(s.stride_h >= 1 && s.stride_h <= kMaxStride && s.stride_w >= 1 && s.stride_w <= kMaxStride,
          "attribute 'strides' must hold values in 1.." + Str(kMaxStride) + ", got " +
              ListStr({s.stride_h, s.stride_w}));
  const std::vector<int64_t> pads = {s.pad_top, s.pad_left, s.pad_bottom, s.pad_right};
  for (int64_t p : pads)
    Require(p >= 0 && p <= kMaxPad, "attribute 'pads' [top, left, bottom, right] must hold values in 0.." +
                                        Str(kMaxPad) + ", got " + ListStr(pads));
  Require(!std::isnan(s.activation_min) && !std::isnan(s.activation_max) && s.activation_min <= s.activation_max,
          "activation_min must not exceed activation_max, got " + std::to_string(s.activation_min) + " and " +
              std::to_string(s.activation_max));
  CheckPatterns(s.patterns);
  CheckKernels(s);
}

}  // namespace ops
}  // namespace ctprune
