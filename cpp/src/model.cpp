// Model (manifest + ONNX Runtime session), KV state, and the one call of the graph contract
// (docs/ops.md §4): run(state, rows, input_ids, start_pos), bound as mtx/runtime/ort_backend.py binds.
#include "model_impl.hpp"

#include "graph.hpp"

#include <sys/stat.h>
#if defined(__GLIBC__)
#include <malloc.h>
#endif

#include <algorithm>
#include <cctype>
#include <cstring>
#include <fstream>
#include <limits>
#include <mutex>
#include <sstream>

namespace mtx {
namespace detail {

const OrtApi* init_ort_api() {
  static const OrtApi* api = [] {
    const OrtApiBase* base = OrtGetApiBase();
    const OrtApi* a = base->GetApi(ORT_API_VERSION);
    if (!a)
      throw Error(ErrorCode::Runtime, std::string("ONNX Runtime ") + base->GetVersionString() +
                                          " does not provide C API version " + std::to_string(ORT_API_VERSION) +
                                          " (the headers mtx was built with); install onnxruntime >= 1." +
                                          std::to_string(ORT_API_VERSION));
    Ort::InitApi(a);
    return a;
  }();
  return api;
}

Ort::Env& ort_env() {
  init_ort_api();
  static Ort::Env env(ORT_LOGGING_LEVEL_FATAL, "mtx");
  return env;
}

namespace {
std::string join(const std::string& a, const std::string& b) { return a.empty() || a.back() == '/' ? a + b : a + "/" + b; }

ONNXTensorElementDataType element_type(const std::string& dtype) {
  if (dtype == "float32") return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  if (dtype == "float16") return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
  if (dtype == "bfloat16") return ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16;
  if (dtype == "int64") return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64;
  if (dtype == "int32") return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32;
  return ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
}

std::string dims_str(const std::vector<int64_t>& d, const std::vector<const char*>& sym) {
  std::string s = "[";
  for (size_t i = 0; i < d.size(); ++i) {
    if (i) s += ", ";
    s += d[i] >= 0 ? std::to_string(d[i]) : std::string("'") + (i < sym.size() ? sym[i] : "?") + "'";
  }
  return s + "]";
}

// The manifest agrees with the graph ONNX Runtime loaded: names, dtypes, shapes, capacity, layers,
// vocabulary (mtx/integrity.py check_graph; the rest of it, from model.onnx itself, is graph.cpp's
// check_graph_file).
void check_graph(const Manifest& m, Ort::Session& session, const std::string& origin) {
  Ort::AllocatorWithDefaultOptions alloc;
  for (int kind = 0; kind < 2; ++kind) {
    const auto& specs = kind == 0 ? m.inputs : m.outputs;
    const size_t n = kind == 0 ? session.GetInputCount() : session.GetOutputCount();
    const char* what = kind == 0 ? "input" : "output";
    if (n != specs.size())
      throw Error(ErrorCode::InvalidExport, origin + ": " + std::to_string(specs.size()) + " " + what +
                                                "s listed, the graph has " + std::to_string(n));
    for (size_t i = 0; i < n; ++i) {
      auto name = kind == 0 ? session.GetInputNameAllocated(i, alloc) : session.GetOutputNameAllocated(i, alloc);
      Ort::TypeInfo ti = kind == 0 ? session.GetInputTypeInfo(i) : session.GetOutputTypeInfo(i);
      auto tt = ti.GetTensorTypeAndShapeInfo();
      const auto& spec = specs[i];
      if (spec.name != name.get())
        throw Error(ErrorCode::InvalidExport, origin + ": " + what + " " + std::to_string(i) + " is '" + spec.name +
                                                  "' in mtx.json, '" + name.get() + "' in the graph");
      std::vector<int64_t> dims = tt.GetShape();
      std::vector<const char*> sym(dims.size());
      tt.GetSymbolicDimensions(sym.data(), sym.size());
      bool ok = element_type(spec.dtype) == tt.GetElementType() && dims.size() == spec.shape.size();
      for (size_t k = 0; ok && k < dims.size(); ++k) {
        const auto& s = spec.shape[k];
        ok = s.is_number_integer() ? dims[k] == s.get<int64_t>() : (dims[k] < 0 && s.is_string() && s.get<std::string>() == sym[k]);
      }
      if (!ok)
        throw Error(ErrorCode::InvalidExport, origin + ": " + what + " '" + spec.name + "' is " + spec.dtype + " " +
                                                  nlohmann::json(spec.shape).dump() + " in mtx.json, the graph has element type " +
                                                  std::to_string(int(tt.GetElementType())) + " " + dims_str(dims, sym));
    }
  }
  const ModelInfo& info = m.info;
  int64_t past = 0;
  for (const auto& s : m.inputs) past += s.name.rfind("past_key.", 0) == 0;
  if (past != info.num_layers)
    throw Error(ErrorCode::InvalidExport, origin + ": num_layers " + std::to_string(info.num_layers) +
                                              " but the graph has " + std::to_string(past) + " past_key inputs");
  for (const auto* specs : {&m.inputs, &m.outputs})
    for (const auto& s : *specs)
      if (s.name.rfind("past_", 0) == 0 || s.name.rfind("present_", 0) == 0) {
        const std::string layer = s.name.substr(s.name.rfind('.') + 1);
        const bool digits = !layer.empty() && layer.size() < 10 &&
                            std::all_of(layer.begin(), layer.end(), [](char c) { return c >= '0' && c <= '9'; });
        if (!digits || std::stoll(layer) >= info.num_layers)
          throw Error(ErrorCode::InvalidExport, origin + ": " + s.name + " names no layer of " +
                                                    std::to_string(info.num_layers));
        const int64_t capacity = info.layer_capacities[size_t(std::stoll(layer))];
        std::vector<nlohmann::json> want = {info.num_kv_heads, capacity, info.head_dim};
        if (std::vector<nlohmann::json>(s.shape.begin() + 1, s.shape.end()) != want)
          throw Error(ErrorCode::InvalidExport, origin + ": " + s.name + " does not have the manifest's layers[" +
                                                    layer + "].capacity " + std::to_string(capacity) +
                                                    " and config's [Hkv, C, D]");
      }
  bool vocab_ok = false;
  for (const auto& s : m.outputs)
    if (s.name == "logits") vocab_ok = s.shape.back() == nlohmann::json(info.vocab_size);
  if (!vocab_ok)
    throw Error(ErrorCode::InvalidExport, origin + ": vocab_size " + std::to_string(info.vocab_size) +
                                              " does not match the graph's logits");
}

// Whether an ONNX Runtime message says memory ran out (the machine's fault: ErrorCode::Runtime).
bool out_of_memory(const std::string& what) {
  std::string low = what;
  for (auto& c : low) c = char(std::tolower(static_cast<unsigned char>(c)));
  for (const char* k : {"bad_alloc", "failed to allocate", "out of memory", "cannot allocate memory"})
    if (low.find(k) != std::string::npos) return true;
  return false;
}

std::vector<int32_t> generation_eos(const std::string& folder, const std::vector<int32_t>& fallback) {
  const std::string path = join(folder, "generation_config.json");
  std::ifstream in(path);
  if (!in) return fallback;
  std::stringstream ss;
  ss << in.rdbuf();
  nlohmann::json d = parse_json(ss.str(), path);
  if (!d.is_object() || !d.contains("eos_token_id") || d["eos_token_id"].is_null()) return fallback;
  const auto& e = d["eos_token_id"];
  std::vector<int32_t> ids;
  auto add = [&](const nlohmann::json& t) {
    if (!t.is_number_integer() || t.get<int64_t>() < 0)
      throw Error(ErrorCode::InvalidExport, path + ": eos_token_id must be token ids >= 0, got " + e.dump());
    ids.push_back(t.get<int32_t>());
  };
  if (e.is_array())
    for (const auto& t : e) add(t);
  else
    add(e);
  return ids.empty() ? fallback : ids;
}
}  // namespace

Error ort_error(const std::string& path, const Ort::Exception& e, const char* doing) {
  const std::string what = std::string(e.what()).substr(0, 300);
  if (out_of_memory(what))
    return Error(ErrorCode::Runtime, path + ": ONNX Runtime " + doing + " it: out of memory (" + what + ")");
  return Error(ErrorCode::InvalidExport, path + ": ONNX Runtime " + doing + " it (" + what + ")");
}

void keep_freed_buffers_unmapped() {
  // As mtx.runtime.memory.keep_freed_buffers_unmapped: glibc raises its mmap threshold as large blocks are
  // freed, so the initializers ONNX Runtime replaces while loading (constant-folded, prepacked) would stay
  // resident as heap holes. A fixed 1 MiB threshold returns them (process-wide; glibc only).
#if defined(__GLIBC__)
  mallopt(M_MMAP_THRESHOLD, 1 << 20);
#endif
}

void* aligned_bytes(size_t n) {
  void* p = nullptr;
  if (posix_memalign(&p, 64, std::max<size_t>(n, 64)) != 0) throw std::bad_alloc();
  std::memset(p, 0, n);
  return p;
}

}  // namespace detail



Model::Model(const std::string& folder, const ModelOptions& options) : impl_(std::make_unique<Impl>()) {
  Impl& m = *impl_;
  m.folder = folder;
  m.options = options;
  if (options.prefill_chunk <= 0)
    throw Error(ErrorCode::InvalidArgument, "prefill_chunk must be positive, got " + std::to_string(options.prefill_chunk));
  m.manifest = detail::read_manifest(folder, options.verify_hashes);
  ModelInfo& info = m.manifest.info;
  if (info.dtype != "float32" && info.dtype != "float16")
    throw Error(ErrorCode::InvalidExport, folder + ": the mtx C++ runtime runs float32 and float16 exports in ONNX "
                                                   "Runtime, this one is " + info.dtype);
  if (options.max_batch > 0) info.max_batch = options.max_batch;
  if (!info.per_layer) {
    m.layout = kv::parse_layout(info.kv_layout);
    m.window = info.window > 0 ? info.window : info.capacity;
  }
  info.eos_token_ids = detail::generation_eos(folder, info.eos_token_ids);
  m.elem = info.dtype == "float32" ? ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
  m.elem_bytes = info.dtype == "float32" ? 4 : 2;
  for (int64_t c : info.layer_capacities)
    for (int kind = 0; kind < 2; ++kind) {
      m.capacities.push_back(c);
      m.row_bytes.push_back(size_t(info.num_kv_heads * c * info.head_dim) * m.elem_bytes);
    }
  const std::string model_path = Impl::join_model_path(folder, m.manifest.model);
  const detail::GraphSource source = detail::check_graph_file(m.manifest, folder);
  Ort::Env& env = detail::ort_env();
  detail::keep_freed_buffers_unmapped();
  try {
    Ort::SessionOptions so;
    so.SetGraphOptimizationLevel(GraphOptimizationLevel::ORT_ENABLE_ALL);
    so.SetExecutionMode(ExecutionMode::ORT_SEQUENTIAL);
    so.SetInterOpNumThreads(1);
    if (options.intra_op_threads > 0) so.SetIntraOpNumThreads(options.intra_op_threads);
    so.AddConfigEntry("session.intra_op.allow_spinning", options.spin ? "1" : "0");
    so.SetLogSeverityLevel(4);
    if (options.device == "cuda" || options.device.rfind("cuda:", 0) == 0) {
      auto providers = Ort::GetAvailableProviders();
      if (std::find(providers.begin(), providers.end(), "CUDAExecutionProvider") == providers.end())
        throw Error(ErrorCode::InvalidArgument, "device cuda needs an ONNX Runtime library with the CUDA provider "
                                                "(this one has no CUDAExecutionProvider)");
      OrtCUDAProviderOptions cuda{};
      cuda.device_id = options.device.size() > 5 ? std::stoi(options.device.substr(5)) : 0;
      so.AppendExecutionProvider_CUDA(cuda);
    } else if (options.device != "cpu") {
      throw Error(ErrorCode::InvalidArgument, "device: expected cpu, cuda or cuda:N, got '" + options.device + "'");
    }
    if (source.from_memory) {
      so.AddConfigEntry("session.model_external_initializers_file_folder_path", source.external_folder.c_str());
      m.session = std::make_unique<Ort::Session>(env, source.bytes.data(), source.bytes.size(), so);
    } else {
      m.session = std::make_unique<Ort::Session>(env, model_path.c_str(), so);
    }
  } catch (const Ort::Exception& e) {
    throw detail::ort_error(model_path, e, "cannot load");
  }
  detail::check_graph(m.manifest, *m.session, folder + "/mtx.json");
  for (int64_t l = 0; l < info.num_layers; ++l) {
    for (const char* kind : {"key", "value"}) {
      m.past_names.push_back(std::string("past_") + kind + "." + std::to_string(l));
      m.present_names.push_back(std::string("present_") + kind + "." + std::to_string(l));
    }
  }
  m.cpu = std::make_unique<Ort::MemoryInfo>(Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault));
  // Warm-up: one token at position 0 on one row, so a graph that loads but cannot run is refused here.
  auto state = m.new_state(1);
  m.run(*state, 0, 1, {0}, 1, {0}, true);
}

Model::~Model() = default;
const ModelInfo& Model::info() const { return impl_->manifest.info; }
const std::string& Model::folder() const { return impl_->folder; }
std::string Model::ort_version() {
  detail::init_ort_api();
  return OrtGetApiBase()->GetVersionString();
}
int Model::ort_api_version() { return ORT_API_VERSION; }

std::string Model::Impl::join_model_path(const std::string& folder, const std::string& model) {
  return folder.empty() || folder.back() == '/' ? folder + model : folder + "/" + model;
}

std::unique_ptr<KVState> Model::Impl::new_state(int batch) const {
  const ModelInfo& info = manifest.info;
  if (batch < 1 || batch > info.max_batch)
    throw Error(ErrorCode::InvalidArgument, "batch " + std::to_string(batch) + " is outside 1.." +
                                                std::to_string(info.max_batch) + " (max_batch of the export)");
  auto st = std::make_unique<KVState>();
  st->batch = batch;
  st->row_bytes = row_bytes;
  const int sets = info.shared_kv ? 1 : 2;
  st->sets.resize(sets);
  for (auto& s : st->sets)
    for (int64_t k = 0; k < 2 * info.num_layers; ++k)
      s.emplace_back(static_cast<char*>(detail::aligned_bytes(batch * row_bytes[size_t(k)])));
  st->current.assign(batch, 0);
  return st;
}

void Model::Impl::check_positions(int64_t end_pos) const {
  const ModelInfo& info = manifest.info;
  for (size_t l = 0; l < info.layer_windows.size(); ++l)  // every full-attention layer (rule 8)
    if (info.layer_windows[l] == 0 && end_pos > info.layer_capacities[l])
      throw Error(ErrorCode::InvalidArgument, "context of " + std::to_string(end_pos) +
                                                  " tokens exceeds the KV capacity " +
                                                  std::to_string(info.layer_capacities[l]) +
                                                  " of this full-attention model; export it with a larger cache_capacity");
  if (info.max_position && end_pos > *info.max_position)
    throw Error(ErrorCode::InvalidArgument, "position " + std::to_string(end_pos) + " exceeds max_position " +
                                                std::to_string(*info.max_position) +
                                                " of this export (its RoPE tables); export it again with a larger max_position");
}

int64_t Model::Impl::position_limit() const {
  const ModelInfo& info = manifest.info;
  int64_t limit = std::numeric_limits<int64_t>::max();
  for (size_t l = 0; l < info.layer_windows.size(); ++l)
    if (info.layer_windows[l] == 0) limit = std::min(limit, info.layer_capacities[l]);
  if (info.max_position) limit = std::min(limit, *info.max_position);
  return limit;
}

char* Model::Impl::slot_ptr(KVState& st, int row, size_t tensor, int64_t head, int64_t slot) const {
  const ModelInfo& info = manifest.info;
  return st.sets[st.current[row]][tensor].get() + size_t(row) * st.row_bytes[tensor] +
         size_t((head * capacities[tensor] + slot) * info.head_dim) * elem_bytes;
}

void Model::Impl::require_uniform(const std::string& origin) const {
  const ModelInfo& info = manifest.info;
  if (!info.per_layer) return;
  std::string windows;
  for (int64_t w : info.layer_windows) windows += (windows.empty() ? "" : ", ") + std::to_string(w);
  throw Error(ErrorCode::InvalidArgument,
              (origin.empty() ? "" : origin + ": ") + "this model's layers differ in KV window or capacity (windows [" + windows +
                  "]); prefix caching, prefix state files and speculative decoding need one window for every layer");
}

void Model::Impl::check_tokens(const std::vector<int32_t>& ids, const char* what) const {
  if (ids.empty()) throw Error(ErrorCode::InvalidArgument, std::string(what) + " is empty: give at least one token");
  for (int32_t t : ids)
    if (t < 0 || t >= manifest.info.vocab_size)
      throw Error(ErrorCode::InvalidArgument, std::string(what) + ": token id " + std::to_string(t) +
                                                  " is out of range for a vocabulary of " +
                                                  std::to_string(manifest.info.vocab_size));
}

// Separate buffers: every row of [r0, r1) must hold its state in the same set (copy rows once if not).
int Model::Impl::align_rows(KVState& st, int r0, int r1) const {
  int n1 = 0;
  for (int r = r0; r < r1; ++r) n1 += st.current[r];
  const int target = n1 * 2 > (r1 - r0) ? 1 : 0;  // numpy bincount().argmax(): ties -> 0
  for (int r = r0; r < r1; ++r) {
    if (st.current[r] == target) continue;
    for (size_t k = 0; k < st.sets[0].size(); ++k)
      std::memcpy(st.sets[target][k].get() + r * st.row_bytes[k], st.sets[1 - target][k].get() + r * st.row_bytes[k],
                  st.row_bytes[k]);
    st.current[r] = target;
  }
  return target;
}

KVState::Binding& Model::Impl::binding(KVState& st, int r0, int r1, int src) const {
  auto key = std::make_tuple(r0, r1, src);
  auto it = st.bindings.find(key);
  if (it != st.bindings.end()) return *it->second;
  auto b = std::make_unique<KVState::Binding>(*session);
  const int dst = manifest.info.shared_kv ? src : 1 - src;
  const ModelInfo& info = manifest.info;
  b->io.BindOutput("logits", *cpu);
  for (size_t k = 0; k < past_names.size(); ++k) {
    std::vector<int64_t> shape = {r1 - r0, info.num_kv_heads, capacities[k], info.head_dim};
    const size_t bytes = size_t(r1 - r0) * st.row_bytes[k];
    b->values.push_back(Ort::Value::CreateTensor(*cpu, st.sets[src][k].get() + r0 * st.row_bytes[k], bytes,
                                                 shape.data(), shape.size(), elem));
    b->io.BindInput(past_names[k].c_str(), b->values.back());
    b->values.push_back(Ort::Value::CreateTensor(*cpu, st.sets[dst][k].get() + r0 * st.row_bytes[k], bytes,
                                                 shape.data(), shape.size(), elem));
    b->io.BindOutput(present_names[k].c_str(), b->values.back());
  }
  auto names = b->io.GetOutputNames();
  b->logits_index = size_t(std::find(names.begin(), names.end(), "logits") - names.begin());
  return *st.bindings.emplace(key, std::move(b)).first->second;
}

std::vector<float> Model::Impl::run(KVState& st, int r0, int r1, const std::vector<int64_t>& ids, int64_t seq,
                                    const std::vector<int64_t>& start_pos, bool last_only) const {
  const int b = r1 - r0;
  const int64_t V = manifest.info.vocab_size;
  if (seq > 1 && b > 1 && manifest.info.multi_token_batch == "first_call_only" &&
      std::any_of(start_pos.begin(), start_pos.end(), [](int64_t p) { return p != 0; })) {
    std::vector<float> out;
    for (int i = 0; i < b; ++i) {
      std::vector<int64_t> row(ids.begin() + i * seq, ids.begin() + (i + 1) * seq);
      auto part = run(st, r0 + i, r0 + i + 1, row, seq, {start_pos[i]}, last_only);
      out.insert(out.end(), part.begin(), part.end());
    }
    return out;
  }
  const int src = manifest.info.shared_kv ? 0 : align_rows(st, r0, r1);
  KVState::Binding& bd = binding(st, r0, r1, src);
  std::vector<int64_t> ids_shape = {b, seq}, pos_shape = {b};
  auto ids_v = Ort::Value::CreateTensor<int64_t>(*cpu, const_cast<int64_t*>(ids.data()), ids.size(),
                                                 ids_shape.data(), 2);
  auto pos_v = Ort::Value::CreateTensor<int64_t>(*cpu, const_cast<int64_t*>(start_pos.data()), start_pos.size(),
                                                 pos_shape.data(), 1);
  std::vector<Ort::Value> outs;
  try {
    bd.io.BindInput("input_ids", ids_v);
    bd.io.BindInput("start_pos", pos_v);
    bd.io.BindOutput("logits", *cpu);
    session->Run(Ort::RunOptions{nullptr}, bd.io);
    outs = bd.io.GetOutputValues();
  } catch (const Ort::Exception& e) {
    throw detail::ort_error(join_model_path(folder, manifest.model), e, "failed to run");
  }
  if (!manifest.info.shared_kv)
    for (int r = r0; r < r1; ++r) st.current[r] = 1 - src;
  const Ort::Value& logits = outs[bd.logits_index];
  const int64_t keep = last_only ? 1 : seq;
  std::vector<float> out(size_t(b * keep * V));
  for (int i = 0; i < b; ++i) {
    const int64_t first = i * seq + (seq - keep);
    if (elem == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) {
      const float* p = logits.GetTensorData<float>() + first * V;
      std::copy(p, p + keep * V, out.begin() + i * keep * V);
    } else {
      const Ort::Float16_t* p = logits.GetTensorData<Ort::Float16_t>() + first * V;
      for (int64_t k = 0; k < keep * V; ++k) out[i * keep * V + k] = p[k].ToFloat();
    }
  }
  return out;
}

std::vector<float> Model::Impl::prefill(KVState& st, int row, const std::vector<int32_t>& ids, int64_t start,
                                        bool want_all) const {
  check_positions(start + int64_t(ids.size()));
  std::vector<float> all, last;
  size_t off = 0;
  for (const int64_t n : kv::canonical_chunks(start, int64_t(ids.size()), options.prefill_chunk)) {
    std::vector<int64_t> c(ids.begin() + off, ids.begin() + off + size_t(n));
    auto logits = run(st, row, row + 1, c, n, {start + int64_t(off)}, !want_all);
    off += size_t(n);
    if (want_all)
      all.insert(all.end(), logits.begin(), logits.end());
    else
      last = std::move(logits);
  }
  return want_all ? all : last;
}

std::vector<float> Model::score(const std::vector<int32_t>& tokens) const {
  Session s = session();
  return s.score(tokens);
}

}  // namespace mtx
