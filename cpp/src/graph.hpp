// What model.onnx itself says, read with a minimal protobuf wire-format reader: the manifest
// fields ONNX Runtime's session does not show (op counts and domains, rotary rows, attributes, value
// and initializer names, external data), checked as mtx/integrity.py check_graph checks them.
#pragma once
#include <string>

#include "manifest.hpp"

namespace mtx::detail {

/// How to open the graph: its path, or (external data symlinked out of the folder, which ONNX Runtime
/// refuses) the serialised graph with locations relative to `external_folder`.
struct GraphSource {
  bool from_memory = false;
  std::string bytes, external_folder;
};

/// Check FOLDER/model.onnx against the manifest (everything but the inputs and outputs, which
/// check_graph compares with the session); throws Error(InvalidExport) with one line naming the file.
GraphSource check_graph_file(const Manifest& m, const std::string& folder);

}  // namespace mtx::detail
