// Internals shared by model.cpp and session.cpp (not installed).
#pragma once
#include <onnxruntime_cxx_api.h>

#include <cstdlib>
#include <map>
#include <memory>
#include <tuple>

#include "manifest.hpp"
#include "mtx/mtx.hpp"

namespace mtx {
namespace detail {
const OrtApi* init_ort_api();  ///< GetApi(ORT_API_VERSION) of the loaded library, or Error(Runtime)
Ort::Env& ort_env();
void* aligned_bytes(size_t n);  ///< zeroed, 64-byte aligned
struct FreeDeleter {
  void operator()(char* p) const { std::free(p); }
};
}  // namespace detail

/// KV buffers of `batch` rows: sets[s][2*l] keys, sets[s][2*l+1] values of layer l, each
/// [batch, Hkv, C, D] allocated once. One set when past/present are shared, else two used in turn
/// (current[r] = the set holding row r's state).
struct KVState {
  struct Binding {
    explicit Binding(Ort::Session& s) : io(s) {}
    Ort::IoBinding io;
    std::vector<Ort::Value> values;  // the KV views bound, kept alive with the binding
    size_t logits_index = 0;
  };
  int batch = 0;
  size_t row_bytes = 0;
  std::vector<std::vector<std::unique_ptr<char, detail::FreeDeleter>>> sets;
  std::vector<int> current;
  std::map<std::tuple<int, int, int>, std::unique_ptr<Binding>> bindings;  // (row0, row1, src set)
  int64_t nbytes() const { return int64_t(sets.size() * (sets.empty() ? 0 : sets[0].size()) * batch * row_bytes); }
};

struct Model::Impl {
  std::string folder;
  ModelOptions options;
  detail::Manifest manifest;
  std::unique_ptr<Ort::Session> session;
  std::unique_ptr<Ort::MemoryInfo> cpu;
  std::vector<std::string> past_names, present_names;  // 2*l key, 2*l+1 value
  ONNXTensorElementDataType elem;
  size_t elem_bytes = 4, row_bytes = 0;

  static std::string join_model_path(const std::string& folder, const std::string& model);
  std::unique_ptr<KVState> new_state(int batch) const;
  void check_positions(int64_t end_pos) const;
  void check_tokens(const std::vector<int32_t>& ids, const char* what) const;
  int align_rows(KVState& st, int r0, int r1) const;
  KVState::Binding& binding(KVState& st, int r0, int r1, int src) const;
  /// Feed input_ids [b, seq] at start_pos [b] for rows [r0, r1); float32 logits [b, seq or 1, V].
  std::vector<float> run(KVState& st, int r0, int r1, const std::vector<int64_t>& ids, int64_t seq,
                         const std::vector<int64_t>& start_pos, bool last_only) const;
  std::vector<float> prefill(KVState& st, int row, const std::vector<int32_t>& ids, int64_t start,
                             bool want_all) const;
};

}  // namespace mtx
