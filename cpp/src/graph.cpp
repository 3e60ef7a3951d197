#include "graph.hpp"

#include <sys/stat.h>

#include <algorithm>
#include <charconv>
#include <climits>
#include <cstdlib>
#include <fstream>
#include <limits>
#include <map>
#include <optional>
#include <set>
#include <sstream>
#include <string_view>

namespace mtx::detail {
namespace {
[[noreturn]] void fail(const std::string& msg) { throw Error(ErrorCode::InvalidExport, msg.substr(0, 400)); }

std::string join(const std::string& a, const std::string& b) { return a.empty() || a.back() == '/' ? a + b : a + "/" + b; }

std::string real(const std::string& p) {
  char* r = realpath(p.c_str(), nullptr);
  std::string out = r ? r : p;
  std::free(r);
  return out;
}

std::string parent(const std::string& p) {
  const size_t slash = p.rfind('/');
  return slash == 0 || slash == std::string::npos ? "/" : p.substr(0, slash);
}

bool inside(const std::string& path, const std::string& dir) { return dir == "/" || path.rfind(dir + "/", 0) == 0; }

// --- Protobuf wire format, just enough of onnx.proto (field numbers from ONNX's onnx.proto) -----------
// Why not libprotobuf with Debian's libonnx-dev classes: Debian's libsentencepiece exports the
// protobuf-lite it bundles, and loading libprotobuf beside it crashes in the static initialisers.
struct ParseError {};

struct Field {
  uint32_t number = 0;
  int wire = 0;
  uint64_t value = 0;     // varint / fixed
  std::string_view bytes;  // length-delimited
  std::string_view raw;    // the whole field, tag included
};

uint64_t varint(std::string_view s, size_t& i) {
  uint64_t v = 0;
  for (int shift = 0; shift < 64; shift += 7) {
    if (i >= s.size()) throw ParseError{};
    const auto b = uint8_t(s[i++]);
    v |= uint64_t(b & 0x7f) << shift;
    if (!(b & 0x80)) return v;
  }
  throw ParseError{};
}

// Every field of one message, in order.
std::vector<Field> fields(std::string_view s) {
  std::vector<Field> out;
  size_t i = 0;
  while (i < s.size()) {
    const size_t begin = i;
    const uint64_t tag = varint(s, i);
    Field f;
    f.number = uint32_t(tag >> 3);
    f.wire = int(tag & 7);
    if (f.wire == 0) {
      f.value = varint(s, i);
    } else if (f.wire == 1 || f.wire == 5) {
      const size_t n = f.wire == 1 ? 8 : 4;
      if (s.size() - i < n) throw ParseError{};
      i += n;
    } else if (f.wire == 2) {
      const uint64_t n = varint(s, i);
      if (n > s.size() - i) throw ParseError{};
      f.bytes = s.substr(i, n);
      i += n;
    } else {
      throw ParseError{};  // groups (3, 4) are not used by onnx.proto
    }
    f.raw = s.substr(begin, i - begin);
    out.push_back(f);
  }
  return out;
}

void put_varint(std::string& out, uint64_t v) {
  while (v >= 0x80) {
    out += char(uint8_t(v) | 0x80);
    v >>= 7;
  }
  out += char(v);
}

void put_bytes(std::string& out, uint32_t number, std::string_view bytes) {
  put_varint(out, (uint64_t(number) << 3) | 2);
  put_varint(out, bytes.size());
  out.append(bytes.data(), bytes.size());
}

// A message with field `number`'s submessages replaced by `edit(sub)`, every other field as it was.
template <class Edit>
std::string rewrite(std::string_view msg, uint32_t number, Edit edit) {
  std::string out;
  for (const auto& f : fields(msg)) {
    if (f.number == number && f.wire == 2)
      put_bytes(out, number, edit(f.bytes));
    else
      out.append(f.raw.data(), f.raw.size());
  }
  return out;
}

std::string str(const Field& f) { return std::string(f.bytes); }

struct Node {
  std::string name, op_type, domain;
  std::vector<std::string> outputs;
  std::map<std::string, int64_t> ints;  // integer attributes
};

struct Tensor {
  std::string name, location;
  std::vector<int64_t> dims;
  int32_t data_type = 0;
  bool external = false;
  int64_t offset = 0, length = -1;
};

struct Graph {
  std::vector<Node> nodes;
  std::vector<Tensor> initializers;
  std::set<std::pair<std::string, std::string>> functions;  // (domain, name)
  std::string nested_external;  // where a tensor other than a main-graph initializer stores external data
};

Node read_node(std::string_view s) {
  Node n;
  for (const auto& f : fields(s)) {
    if (f.number == 2 && f.wire == 2) n.outputs.push_back(str(f));
    if (f.number == 3 && f.wire == 2) n.name = str(f);
    if (f.number == 4 && f.wire == 2) n.op_type = str(f);
    if (f.number == 7 && f.wire == 2) n.domain = str(f);
    if (f.number == 5 && f.wire == 2) {  // AttributeProto: name 1, i 3
      std::string name;
      std::optional<int64_t> i;
      for (const auto& a : fields(f.bytes)) {
        if (a.number == 1 && a.wire == 2) name = str(a);
        if (a.number == 3 && a.wire == 0) i = int64_t(a.value);
      }
      if (i) n.ints[name] = *i;
    }
  }
  return n;
}

Tensor read_tensor(std::string_view s) {
  Tensor t;
  for (const auto& f : fields(s)) {
    if (f.number == 1 && f.wire == 0) t.dims.push_back(int64_t(f.value));
    if (f.number == 1 && f.wire == 2) {  // packed dims
      size_t i = 0;
      while (i < f.bytes.size()) t.dims.push_back(int64_t(varint(f.bytes, i)));
    }
    if (f.number == 2 && f.wire == 0) t.data_type = int32_t(f.value);
    if (f.number == 8 && f.wire == 2) t.name = str(f);
    if (f.number == 14 && f.wire == 0) t.external = f.value == 1;  // DataLocation EXTERNAL
    if (f.number == 13 && f.wire == 2) {                           // StringStringEntryProto: key 1, value 2
      std::string key, value;
      for (const auto& e : fields(f.bytes)) {
        if (e.number == 1 && e.wire == 2) key = str(e);
        if (e.number == 2 && e.wire == 2) value = str(e);
      }
      if (key == "location") t.location = value;
      if (key == "offset" || key == "length") {  // a whole non-negative decimal integer, else -1 (refused)
        int64_t v = -1;
        const auto [p, ec] = std::from_chars(value.data(), value.data() + value.size(), v);
        if (ec != std::errc() || p != value.data() + value.size() || value.empty() || value[0] == '-') v = -1;
        if (key == "offset") t.offset = v;
        if (key == "length") t.length = v < 0 ? -2 : v;  // -2: given but unusable (-1: not given)
      }
    }
  }
  return t;
}

// TensorProto data_location 14 == EXTERNAL.
bool is_external(std::string_view tensor) {
  for (const auto& f : fields(tensor))
    if (f.number == 14 && f.wire == 0 && f.value == 1) return true;
  return false;
}

std::string nested_in_graph(std::string_view graph, const std::string& where, int depth);

// The first tensor of `nodes` (NodeProto messages) that stores external data: attribute (NodeProto 5)
// tensors t 5 / tensors 10, sparse tensors 22 / 23 (SparseTensorProto values 1), subgraphs g 6 / graphs 11.
std::string nested_in_node(std::string_view node, const std::string& where, int depth) {
  std::string name, op;
  for (const auto& f : fields(node)) {
    if (f.number == 3 && f.wire == 2) name = str(f);
    if (f.number == 4 && f.wire == 2) op = str(f);
  }
  for (const auto& f : fields(node)) {
    if (f.number != 5 || f.wire != 2) continue;
    std::string attr;
    for (const auto& a : fields(f.bytes))
      if (a.number == 1 && a.wire == 2) attr = str(a);
    const std::string label = where + "node '" + (name.empty() ? op : name) + "' attribute '" + attr + "'";
    for (const auto& a : fields(f.bytes)) {
      if (a.wire != 2) continue;
      if ((a.number == 5 || a.number == 10) && is_external(a.bytes)) return label;
      if (a.number == 22 || a.number == 23)
        for (const auto& v : fields(a.bytes))
          if (v.number == 1 && v.wire == 2 && is_external(v.bytes)) return label;
      if (a.number == 6 || a.number == 11) {
        std::string in = nested_in_graph(a.bytes, label + ": subgraph ", depth + 1);
        if (!in.empty()) return in;
      }
    }
  }
  return "";
}

// GraphProto: node 1, initializer 5 (nested graphs only), sparse_initializer 15 (values 1).
std::string nested_in_graph(std::string_view graph, const std::string& where, int depth) {
  if (depth > 64) return where + "(nested more than 64 graphs deep)";
  for (const auto& f : fields(graph)) {
    if (f.wire != 2) continue;
    if (f.number == 5 && !where.empty() && is_external(f.bytes)) {
      std::string name;
      for (const auto& t : fields(f.bytes))
        if (t.number == 8 && t.wire == 2) name = str(t);
      return where + "initializer '" + name + "'";
    }
    if (f.number == 15)
      for (const auto& v : fields(f.bytes))
        if (v.number == 1 && v.wire == 2 && is_external(v.bytes)) return where + "sparse initializer";
    if (f.number == 1) {
      std::string in = nested_in_node(f.bytes, where, depth);
      if (!in.empty()) return in;
    }
  }
  return "";
}

// ModelProto: graph 7 (GraphProto: node 1, initializer 5), functions 25 (FunctionProto: name 1, node 7,
// domain 10).
Graph read_graph(std::string_view model) {
  Graph g;
  for (const auto& f : fields(model)) {
    if (f.number == 7 && f.wire == 2) {
      for (const auto& gf : fields(f.bytes)) {
        if (gf.number == 1 && gf.wire == 2) g.nodes.push_back(read_node(gf.bytes));
        if (gf.number == 5 && gf.wire == 2) g.initializers.push_back(read_tensor(gf.bytes));
      }
      if (g.nested_external.empty()) g.nested_external = nested_in_graph(f.bytes, "", 0);
    }
    if (f.number == 25 && f.wire == 2) {
      std::string name, domain;
      for (const auto& ff : fields(f.bytes)) {
        if (ff.number == 1 && ff.wire == 2) name = str(ff);
        if (ff.number == 10 && ff.wire == 2) domain = str(ff);
      }
      g.functions.insert({domain, name});
      for (const auto& ff : fields(f.bytes))
        if (ff.number == 7 && ff.wire == 2 && g.nested_external.empty())
          g.nested_external = nested_in_node(ff.bytes, "function '" + name + "': ", 0);
    }
  }
  return g;
}

// The model with each external-data location replaced through `moved` (graph 7 > initializer 5 >
// external_data 13 > value 2 where key 1 is "location").
std::string with_locations(std::string_view model, const std::map<std::string, std::string>& moved) {
  return rewrite(model, 7, [&](std::string_view graph) {
    return rewrite(graph, 5, [&](std::string_view tensor) {
      return rewrite(tensor, 13, [&](std::string_view entry) {
        std::string key, value;
        for (const auto& e : fields(entry)) {
          if (e.number == 1 && e.wire == 2) key = str(e);
          if (e.number == 2 && e.wire == 2) value = str(e);
        }
        if (key != "location" || !moved.count(value)) return std::string(entry);
        std::string out;
        put_bytes(out, 1, key);
        put_bytes(out, 2, moved.at(value));
        return out;
      });
    });
  });
}

// Bytes of a tensor from its dims and element type (TensorProto.DataType); -1 for packed or unknown types.
int64_t tensor_bytes(const Tensor& t) {
  int64_t item;
  switch (t.data_type) {
    case 1: case 6: case 12: item = 4; break;           // FLOAT, INT32, UINT32
    case 4: case 5: case 10: case 16: item = 2; break;  // UINT16, INT16, FLOAT16, BFLOAT16
    case 2: case 3: case 9: item = 1; break;            // UINT8, INT8, BOOL
    case 7: case 11: case 13: item = 8; break;          // INT64, DOUBLE, UINT64
    default: return -1;
  }
  int64_t n = item;  // a negative dimension or an overflow: larger than any file, so refused
  for (int64_t d : t.dims)
    if (d < 0 || __builtin_mul_overflow(n, d, &n)) return std::numeric_limits<int64_t>::max();
  return n;
}
}  // namespace

GraphSource check_graph_file(const Manifest& m, const std::string& folder) {
  const std::string path = join(folder, m.model);
  const std::string origin = join(folder, "mtx.json");
  const nlohmann::json& d = m.raw;
  std::string model;
  {
    std::ifstream in(path, std::ios::binary);
    std::stringstream ss;
    ss << in.rdbuf();
    if (!in) fail(path + ": cannot be read");
    model = ss.str();
  }
  Graph graph;
  try {
    graph = read_graph(model);
  } catch (const ParseError&) {
    fail(path + ": not a readable ONNX model (malformed protobuf)");
  }
  // dtype: the KV buffers are in the export dtype (check_graph compares the specs with the session)
  for (const auto* specs : {&m.inputs, &m.outputs})
    for (const auto& s : *specs)
      if ((s.name.rfind("past_", 0) == 0 || s.name.rfind("present_", 0) == 0) && s.dtype != m.info.dtype)
        fail(origin + ": dtype " + m.info.dtype + " but the graph's " + s.name + " is " + s.dtype);
  // ops: node counts of the main graph by "domain::op_type"; domains ONNX Runtime or the graph defines
  std::map<std::string, int64_t> counts, listed;
  for (const auto& n : graph.nodes) counts[(n.domain.empty() ? "ai.onnx" : n.domain) + "::" + n.op_type]++;
  for (auto it = d["ops"].begin(); it != d["ops"].end(); ++it) listed[it.key()] = it.value().get<int64_t>();
  if (counts != listed) {
    std::set<std::string> keys;
    for (const auto& [k, n] : counts) keys.insert(k);
    for (const auto& [k, n] : listed) keys.insert(k);
    for (const auto& k : keys) {  // sorted: the first that differs, as mtx/integrity.py names it
      const int64_t a = listed.count(k) ? listed[k] : 0, b = counts.count(k) ? counts[k] : 0;
      if (a != b)
        fail(origin + ": ops do not match the graph's node counts (" + k + ": " + std::to_string(a) +
             " in mtx.json, " + std::to_string(b) + " in the graph)");
    }
  }
  for (const auto& n : graph.nodes)
    if (n.domain != "" && n.domain != "ai.onnx" && n.domain != "ai.onnx.ml" && n.domain != "com.microsoft" &&
        !graph.functions.count({n.domain, n.op_type}))
      fail(path + ": node '" + n.name + "' is " + n.domain + "::" + n.op_type +
           ", an op neither ONNX Runtime nor the graph's own functions define");
  // rotary tables: max_position rows
  std::set<int64_t> rows;
  if (!graph.nested_external.empty())
    fail(path + ": " + graph.nested_external +
         " stores its data externally; only initializers of the main graph may (the export never writes another)");
  std::set<std::string> initializers;
  for (const auto& t : graph.initializers) {
    if (!initializers.insert(t.name).second)
      fail(path + ": initializer '" + t.name + "' is defined twice (ONNX Runtime would use one silently)");
    if ((t.name == "rope_cos_cache" || t.name == "rope_sin_cache") && !t.dims.empty()) rows.insert(t.dims[0]);
  }
  if (!rows.empty() && !(m.info.max_position && rows.count(*m.info.max_position))) {
    std::string got;
    for (int64_t r : rows) got += (got.empty() ? "" : ", ") + std::to_string(r);
    fail(origin + ": max_position " + (m.info.max_position ? std::to_string(*m.info.max_position) : "None") +
         " but the graph's rotary tables have [" + got + "] rows");
  }
  // One GroupQueryAttention per layer, in graph (= layer) order: each with its layer's local_window_size.
  std::vector<const decltype(graph.nodes)::value_type*> gqa;
  for (const auto& n : graph.nodes)
    if (n.op_type == "GroupQueryAttention" && n.domain == "com.microsoft") gqa.push_back(&n);
  const int64_t layers = d["config"]["num_layers"];
  if (!gqa.empty() && int64_t(gqa.size()) != layers)
    fail(origin + ": " + std::to_string(layers) + " layers but the graph has " + std::to_string(gqa.size()) +
         " GroupQueryAttention nodes");
  for (size_t l = 0; l < gqa.size(); ++l) {
    const auto& want = d["layers"][l]["local_window_size"];
    const int64_t lws_want = want.is_null() ? -1 : want.get<int64_t>();
    const auto& n = *gqa[l];
    const int64_t lws = n.ints.count("local_window_size") ? n.ints.at("local_window_size") : -1;
    if (lws != lws_want)
      fail(origin + ": layers[" + std::to_string(l) + "].local_window_size " +
           (lws_want < 0 ? "None" : std::to_string(lws_want)) + " but the graph's node '" + n.name + "' has " +
           std::to_string(lws));
  }
  std::set<std::string> produced;
  for (const auto& n : graph.nodes) produced.insert(n.outputs.begin(), n.outputs.end());
  for (const auto& lo : d["layer_outputs"])
    for (const char* key : {"after_attention", "after_block"})
      if (!produced.count(lo[key].get<std::string>()))
        fail(origin + ": layer_outputs names '" + lo[key].get<std::string>() + "', which the graph does not compute");
  if (!d["quantization"].is_null())
    for (const auto& q : d["quantization"]["tensors"])
      for (const char* key : {"codes", "scales", "zero_points"})
        if (!q[key].is_null() && !initializers.count(q[key].get<std::string>()))
          fail(origin + ": quantization tensor '" + q["weight"].get<std::string>() + "' names initializer '" +
               q[key].get<std::string>() + "', which the graph does not hold");
  // external data: relative, inside the folder, listed under files (its sha256 pins the bytes, also
  // through a symlink), long enough for each tensor stored in it
  std::map<std::string, std::vector<const Tensor*>> external;
  for (const auto& t : graph.initializers)
    if (t.external) external[t.location].push_back(&t);
  std::set<std::string> files;
  for (const auto& f : m.files) files.insert(f.path);
  std::map<std::string, std::string> resolved;
  for (const auto& [location, tensors] : external) {
    const std::string& name = tensors[0]->name;
    if (location.empty() || location[0] == '/' || ("/" + location + "/").find("/../") != std::string::npos)
      fail(path + ": initializer '" + name + "' has its data at '" + location +
           "', outside the export folder (external data must be a relative path inside it)");
    if (!files.count(location))
      fail(path + ": initializer '" + name + "' has its data in '" + location + "', which " + origin +
           " does not list under files");
    const std::string file = join(folder, location);
    struct stat st{};
    if (stat(file.c_str(), &st) != 0) fail(file + ": external data of '" + name + "' cannot be read");
    for (const Tensor* t : tensors) {
      if (t->offset < 0 || t->length == -2)
        fail(path + ": initializer '" + t->name +
             "' has an external-data offset or length that is not a non-negative integer");
      const int64_t need = t->length >= 0 ? t->length : tensor_bytes(*t);
      const int64_t size = int64_t(st.st_size);
      if (need >= 0 && (need > size || t->offset > size - need))  // no overflow: both sides within the file
        fail(file + ": " + std::to_string(size) + " bytes, but initializer '" + t->name + "' is stored at bytes " +
             std::to_string(t->offset) + ".." +
             (need > size || t->offset > std::numeric_limits<int64_t>::max() - need ? std::string("beyond")
                                                                                     : std::to_string(t->offset + need)) +
             " (the file is truncated or not this graph's)");
    }
    resolved[location] = real(file);
  }
  GraphSource src;
  const std::string root = real(folder);
  bool escapes = false;
  for (const auto& [loc, r] : resolved) escapes |= !inside(r, root);
  if (!escapes) return src;
  // Symlinks out of the folder (a deduplicated store): ONNX Runtime refuses them; open the graph from
  // memory with each location relative to the folder holding every resolved file.
  std::string base;
  for (const auto& [loc, r] : resolved) {
    const std::string p = parent(r);
    if (base.empty()) base = p;
    while (base != "/" && p != base && !inside(p, base)) base = parent(base);
  }
  std::map<std::string, std::string> moved;
  for (const auto& [loc, r] : resolved) moved[loc] = base == "/" ? r.substr(1) : r.substr(base.size() + 1);
  src.from_memory = true;
  src.external_folder = base;
  try {
    src.bytes = with_locations(model, moved);
  } catch (const ParseError&) {
    fail(path + ": not a readable ONNX model (malformed protobuf)");
  }
  return src;
}

}  // namespace mtx::detail
