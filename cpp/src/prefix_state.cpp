// Prefix state files (docs/ops.md §6 "Prefix state files"; mtx/runtime/prefix_state.py writes and
// reads the same): a safetensors file, `key.{l}` / `value.{l}` [Hkv, n, D] in the export dtype, and
// string metadata pinning the export. Read strictly: header length, JSON header, every tensor's
// dtype, shape and offsets, the data's size; one line naming the file and the field otherwise.
#include <openssl/evp.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <algorithm>
#include <map>
#include <memory>
#include <set>

#include "model_impl.hpp"

namespace mtx::detail {

namespace {
using json = nlohmann::json;

constexpr const char* kFormat = "mtx-prefix-state";
constexpr const char* kVersion = "1";
constexpr uint64_t kMaxHeader = 100000000;  // safetensors' own limit on the JSON header
const char* const kMetadataKeys[] = {"format", "version", "export_sha256", "dtype", "capacity",
                                     "window", "position", "first", "tokens"};

struct FileCloser {
  void operator()(std::FILE* f) const { std::fclose(f); }
};
using File = std::unique_ptr<std::FILE, FileCloser>;

std::string st_dtype(const std::string& dtype) {
  if (dtype == "float32") return "F32";
  if (dtype == "float16") return "F16";
  return "BF16";
}

// A whole non-negative decimal integer of at most 18 digits, or -1.
int64_t parse_count(const std::string& v) {
  if (v.empty() || v.size() > 18) return -1;
  for (char c : v)
    if (c < '0' || c > '9') return -1;
  return std::stoll(v);
}

std::string tensor_name(size_t k) { return std::string(k % 2 ? "value." : "key.") + std::to_string(k / 2); }
}  // namespace

std::string export_digest(const Manifest& m) {
  std::string text;
  for (const auto& f : m.files)
    if (f.role == "model" || f.role == "weights" || f.role == "checkpoint-weights")
      text += f.role + " " + f.path + " " + f.sha256 + "\n";
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  EVP_Digest(text.data(), text.size(), md, &len, EVP_sha256(), nullptr);
  static const char* hex = "0123456789abcdef";
  std::string out;
  for (unsigned int i = 0; i < len; ++i) {
    out += hex[md[i] >> 4];
    out += hex[md[i] & 15];
  }
  return out;
}

PrefixData read_prefix_state(const std::string& path, const Model::Impl& m) {
  auto fail = [&](const std::string& field, const std::string& what) -> void {
    throw Error(ErrorCode::InvalidArgument, (path + ": " + field + ": " + what).substr(0, 600));
  };
  const ModelInfo& info = m.manifest.info;
  struct stat st{};
  if (stat(path.c_str(), &st) != 0) fail("file", std::string("cannot read it (") + std::strerror(errno) + ")");
  if (!S_ISREG(st.st_mode)) fail("file", "not a regular file");
  File f(std::fopen(path.c_str(), "rb"));
  if (!f) fail("file", std::string("cannot read it (") + std::strerror(errno) + ")");
  const uint64_t size = uint64_t(st.st_size);
  unsigned char len8[8];
  if (size < 8 || std::fread(len8, 1, 8, f.get()) != 8) fail("header", "not a safetensors file (shorter than 8 bytes)");
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | len8[i];  // little-endian
  if (n > kMaxHeader || n > size - 8)
    fail("header", "not a safetensors file (header length " + std::to_string(n) + " exceeds the file of " +
                       std::to_string(size) + " bytes)");
  std::string text(n, '\0');
  if (std::fread(text.data(), 1, n, f.get()) != n) fail("header", "truncated");
  json h;
  try {
    h = parse_json(text, path);
  } catch (const Error&) {
    fail("header", "not valid JSON");
  }
  if (!h.is_object()) fail("header", "not a JSON object");
  const uint64_t data_size = size - 8 - n;

  // The tensor table: names, dtypes, shapes, offsets covering the data exactly (safetensors' rules).
  struct Entry {
    std::string dtype;
    std::vector<int64_t> shape;
    uint64_t begin, end;
  };
  std::map<std::string, Entry> entries;
  for (const auto& [name, v] : h.items()) {
    if (name == "__metadata__") continue;
    if (!v.is_object() || !v.contains("dtype") || !v["dtype"].is_string() || !v.contains("shape") ||
        !v["shape"].is_array() || !v.contains("data_offsets") || !v["data_offsets"].is_array() ||
        v["data_offsets"].size() != 2 || v.size() != 3)
      fail("header", "tensor '" + name + "' is not {dtype, shape, data_offsets}");
    Entry e;
    e.dtype = v["dtype"];
    static const std::map<std::string, uint64_t> kSizes = {
        {"BOOL", 1}, {"U8", 1}, {"I8", 1}, {"F8_E5M2", 1}, {"F8_E4M3", 1}, {"I16", 2}, {"U16", 2}, {"F16", 2},
        {"BF16", 2}, {"I32", 4}, {"U32", 4}, {"F32", 4}, {"I64", 8}, {"U64", 8}, {"F64", 8}};
    auto size_of = kSizes.find(e.dtype);
    if (size_of == kSizes.end()) fail("header", "tensor '" + name + "' has an unknown dtype " + json(e.dtype).dump());
    for (const auto& d : v["shape"]) {
      if (!d.is_number_unsigned() || d.get<uint64_t>() > (uint64_t(1) << 40))
        fail("header", "tensor '" + name + "' has a bad shape " + v["shape"].dump());
      e.shape.push_back(d.get<int64_t>());
    }
    for (const auto& o : v["data_offsets"])
      if (!o.is_number_unsigned()) fail("header", "tensor '" + name + "' has bad data_offsets");
    e.begin = v["data_offsets"][0];
    e.end = v["data_offsets"][1];
    if (e.end < e.begin || e.end > data_size)
      fail("header", "tensor '" + name + "' has data_offsets outside the file's " + std::to_string(data_size) +
                         " data bytes (truncated?)");
    uint64_t elems = 1;
    for (int64_t x : e.shape) elems = x == 0 || elems <= (uint64_t(1) << 60) / uint64_t(x) ? elems * uint64_t(x) : ~0ULL;
    if (elems == ~0ULL || e.end - e.begin != elems * size_of->second)
      fail("header", "tensor '" + name + "' data_offsets do not match its dtype and shape");
    entries.emplace(name, std::move(e));
  }
  {
    std::vector<std::pair<uint64_t, uint64_t>> spans;
    for (const auto& [name, e] : entries) spans.emplace_back(e.begin, e.end);
    std::sort(spans.begin(), spans.end());
    uint64_t at = 0;
    for (const auto& [b, e] : spans) {
      if (b != at) fail("header", "tensor data overlaps or leaves a gap at byte " + std::to_string(at));
      at = e;
    }
    if (at != data_size)
      fail("header", "the tensors cover " + std::to_string(at) + " of the file's " + std::to_string(data_size) +
                         " data bytes");
  }

  // Metadata: every field, strings only, nothing else.
  if (!h.contains("__metadata__")) fail("format", "missing (no __metadata__)");
  const json& md = h["__metadata__"];
  if (!md.is_object()) fail("header", "__metadata__ is not an object of strings");
  for (const auto& [k, v] : md.items())
    if (!v.is_string()) fail("header", "__metadata__ value of '" + k + "' is not a string");
  auto field = [&](const char* key) -> std::string {
    if (!md.contains(key)) fail(key, "missing");
    return md[key].get<std::string>();
  };
  auto expect = [&](const char* key, const std::string& want, const std::string& why) {
    const std::string got = field(key);
    if (got != want) fail(key, "expected " + json(want).dump() + ", got " + json(got).dump().substr(0, 80) + why);
  };
  expect("format", kFormat, "");
  expect("version", kVersion, " (written by another mtx version)");
  expect("export_sha256", export_digest(m.manifest), " (written for another export)");
  expect("dtype", info.dtype, " (another export's dtype)");
  expect("capacity", std::to_string(info.capacity), " (another export's capacity)");
  expect("window", std::to_string(info.window), " (another export's window)");
  const int64_t position = parse_count(field("position"));
  if (position < 1) fail("position", "expected an integer >= 1, got " + json(field("position")).dump().substr(0, 80));
  if (position > m.position_limit())
    fail("position", std::to_string(position) + " exceeds the " + std::to_string(m.position_limit()) +
                         " positions this export can hold");
  const int64_t first = parse_count(field("first"));
  const int64_t want_first = std::max<int64_t>(0, position - m.window);
  if (first != want_first)
    fail("first", "expected max(0, position - W) = " + std::to_string(want_first) + " (W = " +
                      std::to_string(m.window) + "), got " + json(field("first")).dump().substr(0, 80));
  PrefixData d;
  d.first = first;
  {
    const std::string t = field("tokens");
    json ids;
    try {
      ids = parse_json(t, path);
    } catch (const Error&) {
      fail("tokens", "not a JSON list of token ids");
    }
    if (!ids.is_array()) fail("tokens", "not a JSON list of token ids");
    if (int64_t(ids.size()) != position)
      fail("tokens", std::to_string(ids.size()) + " ids for position " + std::to_string(position));
    for (const auto& id : ids) {
      if (!id.is_number_integer() || (!id.is_number_unsigned() && id.get<int64_t>() < 0) ||
          (id.is_number_unsigned() && id.get<uint64_t>() >= uint64_t(info.vocab_size)))
        fail("tokens", "id " + id.dump().substr(0, 40) + " is not in the vocabulary of " +
                           std::to_string(info.vocab_size));
      d.tokens.push_back(id.get<int32_t>());
    }
  }
  for (const auto& [k, v] : md.items())
    if (std::find(std::begin(kMetadataKeys), std::end(kMetadataKeys), k) == std::end(kMetadataKeys))
      fail("header", "metadata key '" + k + "' is not part of " + kFormat + " version " + kVersion);

  // Tensors: exactly key.l and value.l of every layer, [Hkv, n, D] in the export dtype.
  const int64_t count = position - first;
  const std::vector<int64_t> shape = {info.num_kv_heads, count, info.head_dim};
  const size_t tensors = size_t(2 * info.num_layers);
  for (const auto& [name, e] : entries) {
    bool known = false;
    for (size_t k = 0; k < tensors && !known; ++k) known = tensor_name(k) == name;
    if (!known) fail(name, "not a tensor of a prefix state of this " + std::to_string(info.num_layers) + "-layer export");
  }
  const uint64_t bytes = uint64_t(info.num_kv_heads * count * info.head_dim) * m.elem_bytes;
  for (size_t k = 0; k < tensors; ++k) {
    const std::string name = tensor_name(k);
    auto it = entries.find(name);
    if (it == entries.end()) fail(name, "missing");
    const Entry& e = it->second;
    if (e.dtype != st_dtype(info.dtype))
      fail(name, "dtype " + e.dtype + ", the export's is " + st_dtype(info.dtype) + " (" + info.dtype + ")");
    if (e.shape != shape)
      fail(name, "shape " + json(e.shape).dump() + ", expected [Hkv, position - first, D] = " + json(shape).dump());
    std::vector<char> buf(bytes);
    if (std::fseek(f.get(), long(8 + n + e.begin), SEEK_SET) != 0 || std::fread(buf.data(), 1, bytes, f.get()) != bytes)
      fail(name, "truncated");
    d.tensors.push_back(std::move(buf));
  }
  return d;
}

void write_prefix_state(const std::string& path, const PrefixData& d, const Model::Impl& m) {
  const ModelInfo& info = m.manifest.info;
  const int64_t position = int64_t(d.tokens.size());
  const int64_t count = position - d.first;
  json h = json::object();
  h["__metadata__"] = {{"format", kFormat},
                       {"version", kVersion},
                       {"export_sha256", export_digest(m.manifest)},
                       {"dtype", info.dtype},
                       {"capacity", std::to_string(info.capacity)},
                       {"window", std::to_string(info.window)},
                       {"position", std::to_string(position)},
                       {"first", std::to_string(d.first)},
                       {"tokens", json(d.tokens).dump()}};
  uint64_t at = 0;
  for (size_t k = 0; k < d.tensors.size(); ++k) {
    h[tensor_name(k)] = {{"dtype", st_dtype(info.dtype)},
                         {"shape", {info.num_kv_heads, count, info.head_dim}},
                         {"data_offsets", {at, at + d.tensors[k].size()}}};
    at += d.tensors[k].size();
  }
  std::string text = h.dump();
  text.append((8 - text.size() % 8) % 8, ' ');  // data 8-byte aligned, as safetensors writes it
  const auto slash = path.find_last_of('/');
  const std::string dir = slash == std::string::npos ? "." : path.substr(0, slash == 0 ? 1 : slash);
  std::string tmp = dir + "/." + path.substr(slash == std::string::npos ? 0 : slash + 1) + ".XXXXXX";
  const int fd = mkstemp(tmp.data());
  if (fd < 0)
    throw Error(ErrorCode::InvalidArgument, path + ": cannot write it (" + std::strerror(errno) + ")");
  File f(fdopen(fd, "wb"));
  bool ok = bool(f);
  unsigned char len8[8];
  for (int i = 0; i < 8; ++i) len8[i] = (uint64_t(text.size()) >> (8 * i)) & 0xFF;
  ok = ok && std::fwrite(len8, 1, 8, f.get()) == 8 && std::fwrite(text.data(), 1, text.size(), f.get()) == text.size();
  for (const auto& t : d.tensors) ok = ok && std::fwrite(t.data(), 1, t.size(), f.get()) == t.size();
  ok = ok && std::fflush(f.get()) == 0 && fsync(fileno(f.get())) == 0;
  const int err = errno;
  if (!f) close(fd);
  f.reset();
  if (!ok || std::rename(tmp.c_str(), path.c_str()) != 0) {
    const int e = ok ? errno : err;
    std::remove(tmp.c_str());
    throw Error(ErrorCode::InvalidArgument, path + ": cannot write it (" + std::strerror(e) + ")");
  }
}

}  // namespace mtx::detail
