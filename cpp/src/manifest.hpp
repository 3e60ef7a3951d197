// mtx.json reader: the rules of docs/ops.md §5, as mtx/manifest.py applies them; keys, types and
// allowed values from mtx/manifest_schema.json, embedded at build time (cpp/CMakeLists.txt).
#pragma once
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "mtx/mtx.hpp"

namespace mtx::detail {

struct TensorSpec {
  std::string name, dtype;
  std::vector<nlohmann::json> shape;  // ints or "batch" / "seq"
};

struct FileEntry {
  std::string path, role, sha256;
  int64_t bytes;
};

struct Manifest {
  nlohmann::json raw;
  ModelInfo info;
  std::string model, attention_op;
  std::vector<TensorSpec> inputs, outputs;
  std::vector<FileEntry> files;
};

/// Deepest nesting a JSON file may have (mtx/manifest.py MAX_DEPTH; a manifest needs 4).
constexpr int kMaxJsonDepth = 64;

/// Parse `text` (the file `path`) refusing nesting deeper than kMaxJsonDepth (nlohmann's dump and
/// comparisons recurse); throws Error(InvalidExport) "PATH: not valid JSON (...)".
nlohmann::json parse_json(const std::string& text, const std::string& path);

/// Read and validate FOLDER/mtx.json; every listed file exists with its size (and sha256 when
/// `verify_hashes`). Throws Error(InvalidExport) with one line naming the key or file.
Manifest read_manifest(const std::string& folder, bool verify_hashes);

}  // namespace mtx::detail
