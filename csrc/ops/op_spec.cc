#include "ops/op_spec.h"

#include <cmath>

namespace ctprune {
namespace ops {
namespace {

std::string Quoted(const std::string& name) { return "attribute '" + name + "'"; }

// "an INT", "FLOATS": the article reads well for the scalar kinds only.
std::string Described(AttributeType type) {
  switch (type) {
    case AttributeType::kInt: return "an INT";
    case AttributeType::kFloat: return "a FLOAT";
    case AttributeType::kString: return "a STRING";
    case AttributeType::kTensor: return "a TENSOR";
    case AttributeType::kList: return "a list of another kind (STRINGS, GRAPHS, ...)";
    default: return AttributeTypeName(type);
  }
}

std::string RangeStr(const IntsRule& rule) {
  if (rule.min == INT64_MIN && rule.max == INT64_MAX) return "";
  if (rule.max == INT64_MAX) return " >= " + std::to_string(rule.min);
  if (rule.min == INT64_MIN) return " <= " + std::to_string(rule.max);
  return " in " + std::to_string(rule.min) + ".." + std::to_string(rule.max);
}

std::vector<int64_t> Checked(const std::string& name, const IntsRule& rule, std::vector<int64_t> values) {
  if (rule.length >= 0 && static_cast<int64_t>(values.size()) != rule.length)
    throw InvalidNode(Quoted(name) + " must hold " + std::to_string(rule.length) + " values, got " +
                      std::to_string(values.size()) + ": " + ListStr(values));
  for (int64_t v : values) {
    if (v < rule.min || v > rule.max)
      throw InvalidNode(Quoted(name) + " must hold values" + RangeStr(rule) + ", got " + ListStr(values));
  }
  return values;
}

}  // namespace

const char* AttributeTypeName(AttributeType type) {
  switch (type) {
    case AttributeType::kMissing: return "missing";
    case AttributeType::kFloat: return "FLOAT";
    case AttributeType::kInt: return "INT";
    case AttributeType::kString: return "STRING";
    case AttributeType::kTensor: return "TENSOR";
    case AttributeType::kFloats: return "FLOATS";
    case AttributeType::kInts: return "INTS";
    case AttributeType::kList: return "an unreadable list";
  }
  return "unknown";
}

const Attribute* NodeAttributes::Find(const std::string& name) const {
  const auto it = values_.find(name);
  return it == values_.end() || it->second.type == AttributeType::kMissing ? nullptr : &it->second;
}

AttributeType NodeAttributes::TypeOf(const std::string& name) const {
  const Attribute* a = Find(name);
  return a ? a->type : AttributeType::kMissing;
}

std::vector<int64_t> NodeAttributes::Ints(const std::string& name, const IntsRule& rule) const {
  if (!Find(name)) throw InvalidNode("required " + Quoted(name) + " (INTS) is missing");
  return Ints(name, rule, {});
}

std::vector<int64_t> NodeAttributes::Ints(const std::string& name, const IntsRule& rule,
                                          const std::vector<int64_t>& fallback) const {
  const Attribute* a = Find(name);
  if (!a) return fallback;
  // kList: an empty list (of INTS, as far as onnxruntime lets us see); the length rule catches the rest.
  if (a->type == AttributeType::kList) return Checked(name, rule, {});
  if (a->type != AttributeType::kInts)
    throw InvalidNode(Quoted(name) + " must be INTS, got " + Described(a->type));
  return Checked(name, rule, a->ints);
}

int64_t NodeAttributes::Int(const std::string& name, int64_t fallback, int64_t min, int64_t max) const {
  const Attribute* a = Find(name);
  if (!a) return fallback;
  if (a->type != AttributeType::kInt) throw InvalidNode(Quoted(name) + " must be an INT, got " + Described(a->type));
  if (a->i < min || a->i > max) {
    const std::string range = min == max ? std::to_string(min) : std::to_string(min) + ".." + std::to_string(max);
    throw InvalidNode(Quoted(name) + " must be " + range + ", got " + std::to_string(a->i));
  }
  return a->i;
}

float NodeAttributes::Float(const std::string& name, float fallback) const {
  const Attribute* a = Find(name);
  if (!a) return fallback;
  if (a->type != AttributeType::kFloat)
    throw InvalidNode(Quoted(name) + " must be a FLOAT, got " + Described(a->type));
  if (std::isnan(a->f)) throw InvalidNode(Quoted(name) + " must not be NaN");
  return a->f;
}

std::string ListStr(const std::vector<int64_t>& values) {
  std::string s = "[";
  const size_t shown = values.size() > 16 ? 16 : values.size();  // a message, not a dump of a 100k-entry list
  for (size_t i = 0; i < shown; ++i) s += (i ? ", " : "") + std::to_string(values[i]);
  if (shown < values.size()) s += ", ... (" + std::to_string(values.size()) + " values)";
  return s + "]";
}

std::string ShapeStr(const std::vector<int64_t>& shape) {
  std::string s = "(";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + (shape.size() == 1 ? ",)" : ")");
}

int64_t ResidualElements(const std::vector<int64_t>& z_shape, const std::vector<int64_t>& y_shape) {
  int64_t elements = 1;
  for (int64_t d : z_shape) elements *= d;
  if (elements != 1 && z_shape != y_shape)
    throw InvalidNode("Z (the residual) must have one element or Y's shape " + ShapeStr(y_shape) + ", got " +
                      ShapeStr(z_shape));
  return elements;
}

}  // namespace ops
}  // namespace ctprune
