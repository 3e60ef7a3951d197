// mtx-generate-cpp OUT --prompt TEXT [options]: generate text from an mtx export folder, streaming.
// Bad input: one line "mtx-generate-cpp: error: ..." on stderr, exit status 2.
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <sstream>
#include <string>

#include "mtx/mtx.hpp"

static const char* kUsage =
    "usage: mtx-generate-cpp OUT (--prompt TEXT | --ids \"1 2 3\") [--max-new-tokens N] [--temperature T]\n"
    "       [--top-k K] [--top-p P] [--repetition-penalty R] [--seed S] [--threads N] [--no-verify] [--ids-out]\n"
    "Generate from the mtx export folder OUT (mtx.json, model.onnx, tokenizer.json or tokenizer.model) with the\n"
    "mtx C++ runtime. The text streams to stdout as it is generated; --ids-out prints the token ids instead.\n";

[[noreturn]] static void usage_error(const std::string& msg) {
  std::cerr << "mtx-generate-cpp: error: " << msg << "\n";
  std::exit(2);
}

int main(int argc, char** argv) {
  std::string out, prompt, ids_text;
  bool have_prompt = false, have_ids = false, ids_out = false;
  int max_new = 64;
  mtx::SamplingOptions opts;
  mtx::ModelOptions mo;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) usage_error(a + " needs a value");
      return argv[++i];
    };
    auto number = [&](const std::string& v) {
      char* end = nullptr;
      double d = std::strtod(v.c_str(), &end);
      if (v.empty() || *end) usage_error(a + ": expected a number, got '" + v + "'");
      return d;
    };
    if (a == "-h" || a == "--help") {
      std::cout << kUsage;
      return 0;
    } else if (a == "--prompt") {
      prompt = value();
      have_prompt = true;
    } else if (a == "--ids") {
      ids_text = value();
      have_ids = true;
    } else if (a == "--max-new-tokens") {
      max_new = int(number(value()));
    } else if (a == "--temperature") {
      opts.temperature = number(value());
    } else if (a == "--top-k") {
      opts.top_k = int(number(value()));
    } else if (a == "--top-p") {
      opts.top_p = number(value());
    } else if (a == "--repetition-penalty") {
      opts.repetition_penalty = number(value());
    } else if (a == "--seed") {
      opts.seed = std::strtoull(value().c_str(), nullptr, 10);
    } else if (a == "--threads") {
      mo.intra_op_threads = int(number(value()));
    } else if (a == "--no-verify") {
      mo.verify_hashes = false;
    } else if (a == "--ids-out") {
      ids_out = true;
    } else if (!a.empty() && a[0] == '-') {
      usage_error("unknown option " + a + " (see --help)");
    } else if (out.empty()) {
      out = a;
    } else {
      usage_error("unexpected argument '" + a + "'");
    }
  }
  if (out.empty()) usage_error("missing the export folder OUT (see --help)");
  if (have_prompt == have_ids) usage_error("give exactly one of --prompt and --ids");
  try {
    mtx::Model model(out, mo);
    std::vector<int32_t> ids;
    std::unique_ptr<mtx::Tokenizer> tok;
    if (have_prompt || !ids_out) tok = std::make_unique<mtx::Tokenizer>(out);
    if (have_prompt) {
      ids = tok->encode(prompt);
    } else {
      std::istringstream in(ids_text);
      long v;
      while (in >> v) ids.push_back(int32_t(v));
      if (!in.eof()) usage_error("--ids: expected token ids separated by spaces");
    }
    mtx::Session s = model.session();
    s.append(ids);
    std::vector<int32_t> generated;
    std::string shown;
    s.generate(max_new, opts, std::nullopt, [&](int32_t t) {
      generated.push_back(t);
      if (ids_out) {
        std::cout << (generated.size() > 1 ? " " : "") << t << std::flush;
      } else {  // print what decoding the whole generation adds to the text shown so far
        std::string text = tok->decode(generated);
        if (text.size() > shown.size() && text.compare(0, shown.size(), shown) == 0) {
          std::cout << text.substr(shown.size()) << std::flush;
          shown = text;
        }
      }
      return true;
    });
    std::cout << "\n";
  } catch (const mtx::Error& e) {
    std::cerr << "mtx-generate-cpp: error: " << e.what() << "\n";
    return e.code() == mtx::ErrorCode::Runtime ? 1 : 2;
  }
  return 0;
}
