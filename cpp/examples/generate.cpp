// mtx-generate-cpp OUT --prompt TEXT [options]: generate text from an mtx export folder, streaming.
// Bad input: one line "mtx-generate-cpp: error: ..." on stderr, exit status 2 (1 for the machine's
// failures: ONNX Runtime's ErrorCode::Runtime, out of memory).
#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <limits>
#include <new>
#include <sstream>
#include <string>
#include <system_error>

#include "mtx/mtx.hpp"

static const char* kUsage =
    "usage: mtx-generate-cpp OUT (--prompt TEXT | --ids \"1 2 3\") [--max-new-tokens N] [--temperature T]\n"
    "       [--top-k K] [--top-p P] [--repetition-penalty R] [--seed S] [--stop TEXT]... [--threads N]\n"
    "       [--spin | --no-spin] [--no-verify] [--ids-out] [--prefix-state FILE] [--save-prefix-state FILE]\n"
    "       [--speculative-ngram K] [--stats]\n"
    "Generate from the mtx export folder OUT (mtx.json, model.onnx, tokenizer.json, tokenizer.model, tekken.json\n"
    "or tokenizer.model.v<N>) with the mtx C++ runtime. The text streams to stdout as it is generated; --ids-out\n"
    "prints the token ids instead.\n"
    "--stop TEXT (repeatable): the text ends before the first stop string, and generation stops at the token\n"
    "completing it. --spin lets ONNX Runtime's intra-op threads spin-wait for work (default --no-spin: they\n"
    "sleep, which keeps a shared machine's cores for others).\n"
    "--prefix-state FILE: start from a prefix state file (docs/ops.md section 6) written for this export; the\n"
    "prompt must start with its tokens and add at least one, and only the tokens after them are fed.\n"
    "--save-prefix-state FILE: write the state after the prompt (before generating) to FILE.\n"
    "--speculative-ngram K: prompt-lookup speculative decoding, up to K draft tokens a call (same tokens).\n"
    "--stats: one line on stderr with the speculative verifications, drafted and accepted tokens.\n";

[[noreturn]] static void usage_error(const std::string& msg) {
  std::cerr << "mtx-generate-cpp: error: " << msg << "\n";
  std::exit(2);
}

// A whole decimal integer in [lo, hi], or a usage error naming `option` (no sign tricks, no trailing
// characters, no wrap-around).
static long long parse_int(const std::string& option, const std::string& v, long long lo, long long hi,
                           const std::string& expected) {
  const bool digits = !v.empty() && std::all_of(v.begin() + (v[0] == '-' ? 1 : 0), v.end(), [](char c) {
    return c >= '0' && c <= '9';
  }) && v != "-";
  errno = 0;
  char* end = nullptr;
  const long long x = digits ? std::strtoll(v.c_str(), &end, 10) : 0;
  if (!digits || errno == ERANGE || *end || x < lo || x > hi)
    usage_error(option + ": expected " + expected + ", got '" + v + "'");
  return x;
}

// The longest suffix of `text` that is a proper prefix of some stop string (text that may begin one).
static size_t held_suffix(const std::string& text, const std::vector<std::string>& stops) {
  size_t held = 0;
  for (const auto& s : stops)
    for (size_t n = std::min(s.size() - 1, text.size()); n > held; --n)
      if (text.compare(text.size() - n, n, s, 0, n) == 0) {
        held = n;
        break;
      }
  return held;
}

int main(int argc, char** argv) {
  std::string out, prompt, ids_text, prefix_state, save_prefix_state;
  bool have_prompt = false, have_ids = false, ids_out = false, stats = false;
  mtx::SpeculativeOptions spec;
  int max_new = 64;
  std::vector<std::string> stops;
  mtx::SamplingOptions opts;
  mtx::ModelOptions mo;
  const long long kIntMax = std::numeric_limits<int>::max();
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
      max_new = int(parse_int(a, value(), 0, kIntMax, "an integer >= 0"));
    } else if (a == "--temperature") {
      opts.temperature = number(value());
    } else if (a == "--top-k") {
      opts.top_k = int(parse_int(a, value(), 0, kIntMax, "an integer >= 0"));
    } else if (a == "--top-p") {
      opts.top_p = number(value());
    } else if (a == "--repetition-penalty") {
      opts.repetition_penalty = number(value());
    } else if (a == "--seed") {
      opts.seed = uint64_t(parse_int(a, value(), 0, std::numeric_limits<long long>::max(), "an integer in [0, 2**63)"));
    } else if (a == "--stop") {
      stops.push_back(value());
      if (stops.back().empty()) usage_error("--stop: expected a non-empty text");
    } else if (a == "--threads") {
      mo.intra_op_threads = int(parse_int(a, value(), 0, 4096, "an integer in [0, 4096]"));
    } else if (a == "--spin" || a == "--no-spin") {
      mo.spin = a == "--spin";
    } else if (a == "--no-verify") {
      mo.verify_hashes = false;
    } else if (a == "--ids-out") {
      ids_out = true;
    } else if (a == "--prefix-state") {
      prefix_state = value();
      if (prefix_state.empty()) usage_error("--prefix-state: expected a file name");
    } else if (a == "--save-prefix-state") {
      save_prefix_state = value();
      if (save_prefix_state.empty()) usage_error("--save-prefix-state: expected a file name");
    } else if (a == "--speculative-ngram") {
      spec.num_tokens = int(parse_int(a, value(), 1, 1024, "an integer in [1, 1024]"));
    } else if (a == "--stats") {
      stats = true;
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
  std::vector<int32_t> ids;
  if (have_ids) {
    std::istringstream in(ids_text);
    std::string word;
    while (in >> word) ids.push_back(int32_t(parse_int("--ids", word, 0, std::numeric_limits<int32_t>::max(),
                                                       "token ids separated by spaces, each an integer in [0, 2**31)")));
  }
  try {
    mtx::Model model(out, mo);
    std::unique_ptr<mtx::Tokenizer> tok;
    if (have_prompt || !ids_out || !stops.empty()) tok = std::make_unique<mtx::Tokenizer>(out);
    if (have_prompt) ids = tok->encode(prompt);
    mtx::Session s = prefix_state.empty() ? model.session() : model.session_from_prefix(prefix_state);
    if (!prefix_state.empty()) {
      const auto& have = s.tokens();
      if (ids.size() < have.size() || !std::equal(have.begin(), have.end(), ids.begin()))
        throw mtx::Error(mtx::ErrorCode::InvalidArgument, prefix_state + ": the prompt does not start with the " +
                                                              std::to_string(have.size()) + " tokens of this prefix state");
      if (ids.size() == have.size())
        throw mtx::Error(mtx::ErrorCode::InvalidArgument, prefix_state + ": the prompt must add at least one token to the " +
                                                              std::to_string(have.size()) + " tokens of this prefix state");
      ids.erase(ids.begin(), ids.begin() + std::ptrdiff_t(have.size()));
    }
    s.append(ids);
    if (!save_prefix_state.empty()) s.save_prefix_state(save_prefix_state);
    std::unique_ptr<mtx::Detokenizer> detok;
    if (tok) detok = std::make_unique<mtx::Detokenizer>(*tok);
    size_t n_out = 0;
    // Text streamed so far: [0, shown) is printed; the rest may begin a stop string and waits.
    std::string text;
    size_t shown = 0;
    bool stopped = false;
    auto show = [&](size_t upto) {
      if (!ids_out && upto > shown) std::cout << text.substr(shown, upto - shown) << std::flush;
      shown = std::max(shown, upto);
    };
    // Adds `delta` to the text; false once a stop string occurs (the text is cut before the first one).
    auto add_text = [&](const std::string& delta) {
      text += delta;
      size_t cut = std::string::npos;
      for (const auto& st : stops) {
        cut = std::min(cut, text.find(st, shown));  // none starts before `shown` (held back)
      }
      if (cut != std::string::npos) {
        text.resize(cut);
        show(cut);
        stopped = true;
        return false;
      }
      show(text.size() - held_suffix(text, stops));
      return true;
    };
    s.generate(max_new, opts, std::nullopt, [&](int32_t t) {
      if (ids_out) std::cout << (n_out++ ? " " : "") << t << std::flush;
      return detok ? add_text(detok->push(t)) : true;
    }, spec);
    if (detok && !stopped) {
      add_text(detok->flush());
      if (!stopped) show(text.size());
    }
    std::cout << "\n" << std::flush;
    if (stats) {
      const auto& st = s.speculative_stats();
      std::cerr << "speculative: " << st.verifications << " verifications, " << st.drafted << " drafted, "
                << st.accepted << " accepted\n";
    }
  } catch (const mtx::Error& e) {
    std::cerr << "mtx-generate-cpp: error: " << e.what() << "\n";
    return e.code() == mtx::ErrorCode::Runtime ? 1 : 2;
  } catch (const std::bad_alloc&) {  // the machine's fault, not the input's: exit status 1
    std::cerr << "mtx-generate-cpp: error: " << out << ": out of memory\n";
    return 1;
  } catch (const std::system_error& e) {  // e.g. no thread could be started (EAGAIN under a memory limit)
    std::cerr << "mtx-generate-cpp: error: " << out << ": the system refused a resource (" << e.what() << ")\n";
    return 1;
  }
  return 0;
}
