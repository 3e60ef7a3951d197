#include "manifest.hpp"

#include <openssl/evp.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdlib>

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <future>
#include <map>
#include <set>
#include <sstream>

namespace mtx {

std::string sha256_file(const std::string& path) {
  std::FILE* f = std::fopen(path.c_str(), "rb");
  if (!f) throw Error(ErrorCode::InvalidExport, path + ": cannot be read");
  EVP_MD_CTX* ctx = EVP_MD_CTX_new();
  EVP_DigestInit_ex(ctx, EVP_sha256(), nullptr);
  std::vector<unsigned char> buf(16 << 20);
  size_t n;
  while ((n = std::fread(buf.data(), 1, buf.size(), f)) > 0) EVP_DigestUpdate(ctx, buf.data(), n);
  std::fclose(f);
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  EVP_DigestFinal_ex(ctx, md, &len);
  EVP_MD_CTX_free(ctx);
  static const char* hex = "0123456789abcdef";
  std::string out;
  for (unsigned i = 0; i < len; ++i) {
    out += hex[md[i] >> 4];
    out += hex[md[i] & 15];
  }
  return out;
}

namespace detail {
namespace {
using json = nlohmann::json;
enum class T { Str, Int, Num, Obj, Arr, Bool };
struct Key {
  const char* name;
  T type;
  bool nullable;
};

[[noreturn]] void fail(const std::string& msg) { throw Error(ErrorCode::InvalidExport, msg.substr(0, 400)); }

const char* type_name(T t) {
  switch (t) {
    case T::Str: return "a string";
    case T::Int: return "an integer";
    case T::Num: return "a number";
    case T::Obj: return "an object";
    case T::Arr: return "an array";
    case T::Bool: return "true or false";
  }
  return "?";
}

bool has_type(const json& v, T t) {
  switch (t) {
    case T::Str: return v.is_string();
    case T::Int: return v.is_number_integer();  // never a boolean or a float
    case T::Num: return v.is_number();
    case T::Obj: return v.is_object();
    case T::Arr: return v.is_array();
    case T::Bool: return v.is_boolean();
  }
  return false;
}

// Exactly these keys, each of its type (docs/ops.md §5 rules 2 and 3).
void check_keys(const json& d, const std::vector<Key>& keys, const std::string& origin) {
  if (!d.is_object()) fail(origin + ": expected a JSON object");
  for (const auto& k : keys)
    if (!d.contains(k.name)) fail(origin + ": missing key '" + k.name + "'");
  std::set<std::string> names;
  for (const auto& k : keys) names.insert(k.name);
  for (auto it = d.begin(); it != d.end(); ++it)
    if (!names.count(it.key())) fail(origin + ": unknown key '" + it.key() + "'");
  for (const auto& k : keys) {
    const json& v = d.at(k.name);
    if (v.is_null() && k.nullable) continue;
    if (!has_type(v, k.type))
      fail(origin + ": key '" + k.name + "' must be " + type_name(k.type) + (k.nullable ? " or null" : "") +
           ", got " + v.dump());
  }
}

void choice(const json& d, const char* key, const std::vector<std::string>& allowed, const std::string& origin) {
  const std::string v = d.at(key).get<std::string>();
  if (std::find(allowed.begin(), allowed.end(), v) == allowed.end()) {
    std::string all;
    for (const auto& a : allowed) all += (all.empty() ? "" : ", ") + a;
    fail(origin + ": " + key + " '" + v + "' is not one of " + all);
  }
}

const std::vector<Key> kTop = {
    {"format", T::Str, false},        {"format_version", T::Int, false}, {"target", T::Str, false},
    {"model", T::Str, false},         {"dtype", T::Str, false},          {"config", T::Obj, false},
    {"window", T::Int, false},        {"capacity", T::Int, false},       {"max_batch", T::Int, false},
    {"max_position", T::Int, true},   {"kv", T::Obj, false},             {"inputs", T::Arr, false},
    {"outputs", T::Arr, false},       {"ops", T::Obj, false},            {"attention_op", T::Str, false},
    {"moe_op", T::Str, true},         {"local_window_size", T::Int, true}, {"fallbacks", T::Arr, false},
    {"layer_outputs", T::Arr, false}, {"quantization", T::Obj, true}, {"engine", T::Str, true},          {"engine_status", T::Str, false},
    {"checkpoint", T::Obj, false},    {"weights", T::Obj, false},        {"versions", T::Obj, false},
    {"files", T::Arr, false}};
const std::vector<Key> kKV = {{"layout", T::Str, false}, {"past_present", T::Str, false},
                              {"multi_token_batch", T::Str, false}};
const std::vector<Key> kSpec = {{"name", T::Str, false}, {"dtype", T::Str, false}, {"shape", T::Arr, false}};
const std::vector<Key> kFallback = {{"op", T::Str, false}, {"layers", T::Arr, false}, {"reason", T::Str, false}};
const std::vector<Key> kLayerOut = {{"layer", T::Int, false}, {"after_attention", T::Str, false},
                                    {"after_block", T::Str, false}};
// docs/ops.md §5 and §7 (mtx/manifest.py Quantization, QuantizedTensor).
const std::vector<Key> kQuant = {{"method", T::Str, false},     {"bits", T::Int, false},
                                 {"block_size", T::Int, false}, {"scheme", T::Str, false},
                                 {"accuracy_level", T::Int, true}, {"lm_head", T::Bool, false},
                                 {"tensors", T::Arr, false}};
const std::vector<Key> kQTensor = {{"weight", T::Str, false}, {"sources", T::Arr, false}, {"shape", T::Arr, false},
                                   {"bits", T::Int, false},   {"op", T::Str, false},      {"codes", T::Str, false},
                                   {"scales", T::Str, false}, {"zero_points", T::Str, true}};

void check_int_in(const json& d, const char* key, const std::vector<int64_t>& allowed, const std::string& origin) {
  const int64_t v = d.at(key).get<int64_t>();
  if (std::find(allowed.begin(), allowed.end(), v) != allowed.end()) return;
  std::string all;
  for (auto a : allowed) all += (all.empty() ? "" : ", ") + std::to_string(a);
  fail(origin + ": " + key + " " + std::to_string(v) + " is not one of " + all);
}

void check_quantization(const json& q, const std::string& origin) {
  check_keys(q, kQuant, origin);
  choice(q, "method", {"rtn"}, origin);
  choice(q, "scheme", {"asymmetric", "symmetric"}, origin);
  check_int_in(q, "bits", {4, 8}, origin);
  check_int_in(q, "block_size", {32, 64, 128}, origin);
  int i = 0;
  for (const auto& t : q["tensors"]) {
    const std::string o = origin + ".tensors[" + std::to_string(i++) + "]";
    check_keys(t, kQTensor, o);
    check_int_in(t, "bits", {4, 8}, o);
  }
}

const std::vector<Key> kFile = {{"path", T::Str, false}, {"role", T::Str, false}, {"bytes", T::Int, false},
                                {"sha256", T::Str, false}};
// ModelConfig (mtx/config.py): fields without a default must be present; all typed.
const std::vector<Key> kConfigRequired = {
    {"model_type", T::Str, false},       {"vocab_size", T::Int, false},   {"hidden_size", T::Int, false},
    {"intermediate_size", T::Int, false}, {"num_layers", T::Int, false},  {"num_heads", T::Int, false},
    {"num_kv_heads", T::Int, false},     {"head_dim", T::Int, false},     {"rms_norm_eps", T::Num, false},
    {"rope_theta", T::Num, false},       {"sliding_window", T::Int, true}, {"max_position_embeddings", T::Int, false}};

void check_config(const json& c, const std::string& origin) {
  for (const auto& k : kConfigRequired) {
    if (!c.contains(k.name)) fail(origin + ": missing key '" + k.name + "'");
    const json& v = c.at(k.name);
    if (v.is_null() && k.nullable) continue;
    if (!has_type(v, k.type)) fail(origin + ": '" + k.name + "' must be " + type_name(k.type) + ", got " + v.dump());
  }
  for (const char* name : {"vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                           "num_kv_heads", "head_dim", "max_position_embeddings"})
    if (c.at(name).get<int64_t>() <= 0) fail(origin + ": '" + name + "' must be a positive integer");
  if (c.at("num_heads").get<int64_t>() % c.at("num_kv_heads").get<int64_t>())
    fail(origin + ": num_heads must be a multiple of num_kv_heads");
  if (c.contains("eos_token_ids")) {
    const json& e = c.at("eos_token_ids");
    if (!e.is_array()) fail(origin + ": 'eos_token_ids' must be a list of token ids");
    for (const auto& t : e)
      if (!t.is_number_integer() || t.get<int64_t>() < 0) fail(origin + ": token ids must be integers >= 0");
  }
}

std::string join_path(const std::string& a, const std::string& b) { return a.empty() || a.back() == '/' ? a + b : a + "/" + b; }

// mtx/integrity.py's record of verified large files: {resolved path: {"sha256", "state": [dev, ino,
// size, mtime_ns, ctime_ns]}}. Best effort: an unreadable or unwritable record only means hashing again.
class HashRecords {
 public:
  HashRecords() {
    const char* env = std::getenv("MTX_CACHE_DIR");
    const char* home = std::getenv("HOME");
    dir_ = env && *env ? env : std::string(home ? home : "/tmp") + "/.cache/mtx";
    path_ = dir_ + "/verified.json";
    std::ifstream in(path_);
    if (in) {
      try {
        records_ = json::parse(in);
      } catch (const std::exception&) {
      }
    }
    if (!records_.is_object()) records_ = json::object();
  }
  bool verified(const std::string& file, const std::string& sha) const {
    const std::string key = resolved(file);
    if (!records_.contains(key)) return false;
    const json& r = records_[key];
    return r.is_object() && r.value("sha256", json()) == sha && r.value("state", json()) == state(file);
  }
  void remember(const std::string& file, const std::string& sha) {
    records_[resolved(file)] = {{"sha256", sha}, {"state", state(file)}};
  }
  void save() const {
    std::string cmd_dir = dir_;
    for (size_t i = 1; i <= cmd_dir.size(); ++i)  // mkdir -p
      if (i == cmd_dir.size() || cmd_dir[i] == '/') mkdir(cmd_dir.substr(0, i).c_str(), 0755);
    std::string tmpl = dir_ + "/.verified.XXXXXX";
    std::vector<char> buf(tmpl.begin(), tmpl.end());
    buf.push_back('\0');
    const int fd = mkstemp(buf.data());
    if (fd < 0) return;
    const std::string text = records_.dump();
    const bool ok = write(fd, text.data(), text.size()) == ssize_t(text.size());
    close(fd);
    if (!ok || std::rename(buf.data(), path_.c_str()) != 0) std::remove(buf.data());
  }

 private:
  static std::string resolved(const std::string& p) {
    char* r = realpath(p.c_str(), nullptr);
    std::string out = r ? r : p;
    std::free(r);
    return out;
  }
  static json state(const std::string& p) {
    struct stat st{};
    if (stat(p.c_str(), &st) != 0) return json();
    return json::array({int64_t(st.st_dev), int64_t(st.st_ino), int64_t(st.st_size),
                        int64_t(st.st_mtim.tv_sec) * 1000000000 + st.st_mtim.tv_nsec,
                        int64_t(st.st_ctim.tv_sec) * 1000000000 + st.st_ctim.tv_nsec});
  }
  std::string dir_, path_;
  json records_;
};
}  // namespace

Manifest read_manifest(const std::string& folder, bool verify_hashes) {
  const std::string path = join_path(folder, "mtx.json");
  struct stat st{};
  if (stat(folder.c_str(), &st) != 0) fail(folder + ": no such folder");
  if (stat(path.c_str(), &st) != 0 || !S_ISREG(st.st_mode)) fail(folder + ": not an mtx export (no mtx.json)");
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  json d;
  try {
    d = json::parse(ss.str());
  } catch (const std::exception& e) {
    std::string what = e.what();
    fail(path + ": not valid JSON (" + what.substr(0, 200) + ")");
  }
  const std::string origin = path;
  // The version first: a folder of another format version has other keys; it is to be exported again.
  if (d.is_object() && d.contains("format") && d.contains("format_version") &&
      (d["format"] != "mtx-export" || d["format_version"] != 3))
    fail(origin + ": not an mtx-export v3 manifest (format " + d["format"].dump() + ", version " +
         d["format_version"].dump() + "); export the checkpoint again with this mtx");
  check_keys(d, kTop, origin);
  choice(d, "target", {"onnxruntime", "onnx", "tensorrt"}, origin);
  choice(d, "dtype", {"float32", "float16", "bfloat16"}, origin);
  const json& kv = d["kv"];
  check_keys(kv, kKV, origin + ": kv");
  choice(kv, "layout", {"ring", "ort_window"}, origin + ": kv");
  choice(kv, "past_present", {"separate", "shared"}, origin + ": kv");
  choice(kv, "multi_token_batch", {"any", "first_call_only"}, origin + ": kv");
  Manifest m;
  for (const char* key : {"inputs", "outputs"}) {
    int i = 0;
    for (const auto& spec : d[key]) {
      check_keys(spec, kSpec, origin + ": " + key + "[" + std::to_string(i++) + "]");
      TensorSpec t{spec["name"], spec["dtype"], {}};
      for (const auto& s : spec["shape"]) t.shape.push_back(s);
      (std::string(key) == "inputs" ? m.inputs : m.outputs).push_back(t);
    }
  }
  int i = 0;
  for (const auto& fb : d["fallbacks"]) check_keys(fb, kFallback, origin + ": fallbacks[" + std::to_string(i++) + "]");
  i = 0;
  for (const auto& lo : d["layer_outputs"]) {
    check_keys(lo, kLayerOut, origin + ": layer_outputs[" + std::to_string(i) + "]");
    if (lo["layer"] != i)
      fail(origin + ": layer_outputs[" + std::to_string(i) + "] is for layer " + lo["layer"].dump() +
           "; expected layer " + std::to_string(i));
    ++i;
  }
  if (!d["quantization"].is_null()) check_quantization(d["quantization"], origin + ": quantization");
  i = 0;
  for (const auto& f : d["files"]) {
    const std::string o = origin + ": files[" + std::to_string(i++) + "]";
    check_keys(f, kFile, o);
    choice(f, "role", {"model", "weights", "checkpoint-weights", "tokenizer", "engine", "tooling"}, o);
    m.files.push_back({f["path"], f["role"], f["sha256"], f["bytes"].get<int64_t>()});
  }
  const json& cfg = d["config"];
  check_config(cfg, origin + ": config");
  const int64_t layers = cfg["num_layers"].get<int64_t>();
  if (int64_t(d["layer_outputs"].size()) != layers)
    fail(origin + ": layer_outputs has " + std::to_string(d["layer_outputs"].size()) + " entries for " +
         std::to_string(layers) + " layers");
  // Files: inside the folder, regular, of the recorded size (and digest).
  // Hashes as mtx/integrity.py: small files every load; weights and engines once per file state,
  // remembered in $MTX_CACHE_DIR/verified.json (default ~/.cache/mtx), the record the Python runtime keeps.
  HashRecords records;
  std::vector<std::pair<size_t, std::future<std::string>>> digests;
  bool remember = false;
  for (size_t k = 0; k < m.files.size(); ++k) {
    const auto& f = m.files[k];
    if (f.path.empty() || f.path[0] == '/' || ("/" + f.path + "/").find("/../") != std::string::npos)
      fail(origin + ": file path '" + f.path + "' must stay inside the export folder");
    const std::string fp = join_path(folder, f.path);
    struct stat fs{};
    if (stat(fp.c_str(), &fs) != 0 || !S_ISREG(fs.st_mode)) fail(fp + ": listed in mtx.json but missing");
    if (int64_t(fs.st_size) != f.bytes)
      fail(fp + ": " + std::to_string(fs.st_size) + " bytes, mtx.json records " + std::to_string(f.bytes));
    if (!verify_hashes) continue;
    const bool large = f.role == "weights" || f.role == "checkpoint-weights" || f.role == "engine";
    if (large && records.verified(fp, f.sha256)) continue;
    remember |= large;
    digests.emplace_back(k, std::async(std::launch::async, [fp] { return sha256_file(fp); }));
  }
  for (auto& [k, digest] : digests) {
    if (digest.get() != m.files[k].sha256)
      fail(join_path(folder, m.files[k].path) +
           ": sha256 differs from mtx.json (the file changed after export); export again, or load with "
           "verify_hashes = false to skip this check");
  }
  if (remember) {
    for (const auto& [k, digest] : digests) {
      const auto& f = m.files[k];
      if (f.role == "weights" || f.role == "checkpoint-weights" || f.role == "engine")
        records.remember(join_path(folder, f.path), f.sha256);
    }
    records.save();
  }
  m.model = d["model"];
  bool listed = false;
  for (const auto& f : m.files) listed |= (f.path == m.model && f.role == "model");
  if (!listed) fail(origin + ": model '" + m.model + "' is not listed under files");
  if (!d["engine"].is_null()) {
    bool eng = false;
    for (const auto& f : m.files) eng |= (f.path == d["engine"].get<std::string>() && f.role == "engine");
    if (!eng) fail(origin + ": engine " + d["engine"].dump() + " is not listed under files with role engine");
  }
  ModelInfo& info = m.info;
  info.target = d["target"];
  info.dtype = d["dtype"];
  info.model_type = cfg["model_type"];
  info.vocab_size = cfg["vocab_size"];
  info.num_layers = layers;
  info.num_kv_heads = cfg["num_kv_heads"];
  info.head_dim = cfg["head_dim"];
  info.window = d["window"];
  info.capacity = d["capacity"];
  info.max_batch = d["max_batch"];
  if (!d["max_position"].is_null()) info.max_position = d["max_position"].get<int64_t>();
  info.kv_layout = kv["layout"];
  info.past_present = kv["past_present"];
  info.multi_token_batch = kv["multi_token_batch"];
  m.attention_op = d["attention_op"];
  // As Manifest.ort_aliases_past_present: ORT running an mtx function body must not alias.
  info.shared_kv = info.past_present == "shared" && m.attention_op.rfind("mtx::", 0) != 0;
  if (cfg.contains("eos_token_ids"))
    for (const auto& t : cfg["eos_token_ids"]) info.eos_token_ids.push_back(t.get<int32_t>());
  else
    info.eos_token_ids = {2};
  m.raw = std::move(d);
  return m;
}

}  // namespace detail
}  // namespace mtx
