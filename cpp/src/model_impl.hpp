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
void keep_freed_buffers_unmapped();  ///< fixes glibc's mmap threshold before a session loads (no-op elsewhere)
struct FreeDeleter {
  void operator()(char* p) const { std::free(p); }
};
}  // namespace detail

/// KV buffers of `batch` rows: sets[s][2*l] keys, sets[s][2*l+1] values of layer l, each
/// [batch, Hkv, C_l, D] allocated once. One set when past/present are shared, else two used in turn
/// (current[r] = the set holding row r's state).
struct KVState {
  struct Binding {
    explicit Binding(Ort::Session& s) : io(s) {}
    Ort::IoBinding io;
    std::vector<Ort::Value> values;  // the KV views bound, kept alive with the binding
    size_t logits_index = 0;
  };
  int batch = 0;
  std::vector<size_t> row_bytes;  // per KV tensor (2*l key, 2*l+1 value): one row, Hkv * C_l * D elements
  std::vector<std::vector<std::unique_ptr<char, detail::FreeDeleter>>> sets;
  std::vector<int> current;
  std::map<std::tuple<int, int, int>, std::unique_ptr<Binding>> bindings;  // (row0, row1, src set)
  int64_t nbytes() const {
    size_t row = 0;
    for (size_t b : row_bytes) row += b;
    return int64_t(sets.size() * batch * row);
  }
};

struct Model::Impl {
  std::string folder;
  ModelOptions options;
  detail::Manifest manifest;
  kv::Layout layout = kv::Layout::Ring;  // manifest kv.layout (every layer's; per_layer: see require_uniform)
  int64_t window = 0;                    // W: the sliding window, or C under full attention (uniform layers)
  std::vector<int64_t> capacities;       // per KV tensor (2*l, 2*l+1): C_l
  std::unique_ptr<Ort::Session> session;
  std::unique_ptr<Ort::MemoryInfo> cpu;
  std::vector<std::string> past_names, present_names;  // 2*l key, 2*l+1 value
  ONNXTensorElementDataType elem;
  size_t elem_bytes = 4;
  std::vector<size_t> row_bytes;  // per KV tensor (2*l, 2*l+1)

  static std::string join_model_path(const std::string& folder, const std::string& model);
  std::unique_ptr<KVState> new_state(int batch) const;
  void check_positions(int64_t end_pos) const;
  /// Error(InvalidArgument), prefixed by `origin` (a file, or empty), where the layers differ in KV
  /// window, capacity or layout (docs/ops.md §1: rules 10-12 and prefix state files need one window).
  void require_uniform(const std::string& origin = "") const;
  /// Positions a row may reach: C under full attention (rule 8), max_position; else INT64_MAX.
  int64_t position_limit() const;
  /// Slot `slot` of head `head` of KV tensor `tensor` (2*l key, 2*l+1 value of layer l) of `row`,
  /// in the set holding the row's state: head_dim elements in the export dtype.
  char* slot_ptr(KVState& st, int row, size_t tensor, int64_t head, int64_t slot) const;
  void check_tokens(const std::vector<int32_t>& ids, const char* what) const;
  int align_rows(KVState& st, int r0, int r1) const;
  KVState::Binding& binding(KVState& st, int r0, int r1, int src) const;
  /// Feed input_ids [b, seq] at start_pos [b] for rows [r0, r1); float32 logits [b, seq or 1, V].
  std::vector<float> run(KVState& st, int r0, int r1, const std::vector<int64_t>& ids, int64_t seq,
                         const std::vector<int64_t>& start_pos, bool last_only) const;
  /// Feed `ids` for one row from `start` in canonical chunks (kv::canonical_chunks, block
  /// options.prefill_chunk); logits of the last token [V], or of all [T, V] with want_all.
  std::vector<float> prefill(KVState& st, int row, const std::vector<int32_t>& ids, int64_t start,
                             bool want_all) const;
};

namespace detail {
/// A prefix state in memory (docs/ops.md §6 "Prefix state files"): the ids of positions
/// 0..position-1 and, per KV tensor (2*l key, 2*l+1 value), the live positions first..position-1
/// as [Hkv, n, D] in the export dtype, n = position - first, first = max(0, position - W).
struct PrefixData {
  std::vector<int32_t> tokens;
  int64_t first = 0;
  std::vector<std::vector<char>> tensors;
};
/// Hex sha256 pinning an export's computation: of the lines "ROLE PATH SHA256\n" of its files of
/// roles model, weights and checkpoint-weights, in manifest order.
std::string export_digest(const Manifest& m);
/// Read and check a prefix state file against the open export; Error(InvalidArgument), one line
/// naming the file and the field, for anything inconsistent.
PrefixData read_prefix_state(const std::string& path, const Model::Impl& m);
/// Write `d` to `path` through a temporary file in its folder, renamed into place.
void write_prefix_state(const std::string& path, const PrefixData& d, const Model::Impl& m);
}  // namespace detail

}  // namespace mtx
