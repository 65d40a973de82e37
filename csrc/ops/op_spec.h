// Reading a node's attributes the way an operator's spec declares them: each attribute once, with its type, length
// and range checked, and a message that names the attribute when one is wrong (the op's status adds the node, see
// op_status.h). Shared by every op on every backend. Free of onnxruntime: the ops fill a NodeAttributes from their
// KernelInfo (kernel_info.h), while the CUDA harness and emulator, which never see a KernelInfo, check the same specs.
//
// The rule is the model-local function's: an attribute the function would reject because of its type (an INT where
// the schema says FLOAT, FLOATS where it says INT) is an error, never read as something else or replaced by the default.
#pragma once

#include <cstdint>
#include <map>
#include <stdexcept>
#include <string>
#include <vector>

namespace ctprune {
namespace ops {

// A malformed node or input: the message says which attribute or input and why. Becomes ORT_INVALID_ARGUMENT.
struct InvalidNode : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};

// What onnxruntime's C API can tell about an attribute. Its list getters do not check the element type, so a list
// with no elements cannot be told apart from an empty list of another type, nor from a kind the API cannot read
// (strings, graphs): all of those read as kList with no values.
enum class AttributeType { kMissing, kFloat, kInt, kString, kTensor, kFloats, kInts, kList };

const char* AttributeTypeName(AttributeType type);  // "FLOAT", "INTS", ... as ONNX spells them

struct Attribute {
  AttributeType type = AttributeType::kMissing;
  int64_t i = 0;
  float f = 0.0f;
  std::vector<int64_t> ints;  // kInts
  std::vector<float> floats;  // kFloats
};

// Limits of one INTS attribute. `length` < 0: any length; every value must lie in [min, max].
struct IntsRule {
  int64_t length = -1;
  int64_t min = INT64_MIN;
  int64_t max = INT64_MAX;
};

class NodeAttributes {
 public:
  void Set(const std::string& name, Attribute value) { values_[name] = std::move(value); }
  AttributeType TypeOf(const std::string& name) const;

  // A required INTS attribute.
  std::vector<int64_t> Ints(const std::string& name, const IntsRule& rule) const;
  // An optional INTS attribute: `fallback` (the spec's default) when the node does not carry it.
  std::vector<int64_t> Ints(const std::string& name, const IntsRule& rule, const std::vector<int64_t>& fallback) const;
  // An optional INT in [min, max].
  int64_t Int(const std::string& name, int64_t fallback, int64_t min, int64_t max) const;
  // An optional FLOAT, never NaN (+-inf allowed).
  float Float(const std::string& name, float fallback) const;

 private:
  const Attribute* Find(const std::string& name) const;
  std::map<std::string, Attribute> values_;
};

// "[1, 2, 3]": an attribute's values in messages.
std::string ListStr(const std::vector<int64_t>& values);
// "(1, 3, 224, 224)": Python's tuple spelling, so messages read like the shapes users see in numpy.
std::string ShapeStr(const std::vector<int64_t>& shape);

// Z, the residual of a fused Add, has one element (added to every output) or exactly Y's shape: its element count,
// or InvalidNode with the message every op gives.
int64_t ResidualElements(const std::vector<int64_t>& z_shape, const std::vector<int64_t>& y_shape);

}  // namespace ops
}  // namespace ctprune
