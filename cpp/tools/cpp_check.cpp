// Test driver of tests/test_cpp.py: mtx_cpp_check REQUEST.json prints one JSON result.
// Ops: generate (session or batch; "speculative" options for sessions), prefix (a session seeded from a
// prefix state file, fed more tokens, optionally saved, generating), score (float32 logits to a file),
// threads, kv, tokenize, detok, load, manifest (the manifest reader alone on each of "exports": {"results": [{"ok"} or {"error"}]}).
// An mtx::Error prints {"error": {"code", "message"}} and exits 2.
#include <chrono>
#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>
#include <thread>

#include "manifest.hpp"  // cpp/src: detail::read_manifest
#include "mtx/mtx.hpp"

using json = nlohmann::json;

static mtx::SamplingOptions sampling(const json& r) {
  mtx::SamplingOptions o;
  const json s = r.value("sampling", json::object());
  o.temperature = s.value("temperature", 0.0);
  o.top_k = s.value("top_k", 0);
  o.top_p = s.value("top_p", 1.0);
  o.repetition_penalty = s.value("repetition_penalty", 1.0);
  if (s.contains("seed") && !s["seed"].is_null()) o.seed = s["seed"].get<uint64_t>();
  return o;
}

static std::optional<std::vector<int32_t>> stops(const json& r) {
  if (!r.contains("stop") || r["stop"].is_null()) return std::nullopt;
  return r["stop"].get<std::vector<int32_t>>();
}

static mtx::SpeculativeOptions speculative(const json& r) {
  mtx::SpeculativeOptions o;
  const json s = r.value("speculative", json::object());
  o.num_tokens = s.value("num_tokens", 0);
  o.prompt_lookup_max = s.value("prompt_lookup_max", 3);
  o.prompt_lookup_min = s.value("prompt_lookup_min", 1);
  return o;
}

static json stats_json(const mtx::Session& s) {
  const auto& st = s.speculative_stats();
  return {{"verifications", st.verifications}, {"drafted", st.drafted}, {"accepted", st.accepted}};
}

static mtx::ModelOptions model_options(const json& r) {
  mtx::ModelOptions o;
  o.prefill_chunk = r.value("prefill_chunk", 256);
  o.intra_op_threads = r.value("intra_op_threads", 0);
  o.spin = r.value("spin", false);
  o.verify_hashes = r.value("verify", true);
  o.max_batch = r.value("max_batch", 0);
  return o;
}

static json run(const json& r) {
  const std::string op = r.at("op");
  if (op == "tokenize") {
    mtx::Tokenizer tok(r.at("tokenizer").get<std::string>());
    std::ifstream in(r.at("lines").get<std::string>());
    json lines = json::parse(in);
    json ids = json::array(), texts = json::array(), seconds = json::array();  // seconds: each line's encode
    for (const auto& line : lines) {
      const std::string text = line.get<std::string>();
      const auto t0 = std::chrono::steady_clock::now();
      auto v = tok.encode(text);
      seconds.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
      ids.push_back(v);
      texts.push_back(tok.decode(v));
    }
    return {{"ids", ids}, {"decoded", texts}, {"seconds", seconds}};
  }
  if (op == "manifest") {  // tests/test_manifest.py: one tamper table against both readers
    json results = json::array();
    for (const auto& folder : r.at("exports")) {
      try {
        mtx::detail::read_manifest(folder.get<std::string>(), r.value("verify", true));
        results.push_back({{"ok", true}});
      } catch (const mtx::Error& e) {
        results.push_back({{"error", {{"code", int(e.code())}, {"message", e.what()}}}});
      }
    }
    return {{"results", results}};
  }
  if (op == "detok") {  // each sequence pushed id by id: the text of every push, then the flush's
    mtx::Tokenizer tok(r.at("tokenizer").get<std::string>());
    json deltas = json::array(), decoded = json::array();
    for (const auto& seq : r.at("sequences")) {
      mtx::Detokenizer d(tok);
      json pieces = json::array();
      for (const auto& id : seq) pieces.push_back(d.push(id.get<int32_t>()));
      pieces.push_back(d.flush());
      deltas.push_back(pieces);
      decoded.push_back(tok.decode(d.ids()));
    }
    return {{"deltas", deltas}, {"decoded", decoded}};
  }
  mtx::Model model(r.at("export").get<std::string>(), model_options(r));
  if (op == "load") return {{"vocab_size", model.info().vocab_size}, {"ort_version", mtx::Model::ort_version()}};
  if (op == "generate") {
    auto prompts = r.at("prompts").get<std::vector<std::vector<int32_t>>>();
    const int n = r.at("max_new_tokens");
    json out = json::array();
    if (r.value("mode", "session") == "batch") {
      mtx::Batch b = model.batch(int(prompts.size()));
      return {{"tokens", b.generate(prompts, n, sampling(r), stops(r))}};
    }
    json stats = json::array();
    for (const auto& p : prompts) {
      mtx::Session s = model.session();
      s.append(p);
      out.push_back(s.generate(n, sampling(r), stops(r), nullptr, speculative(r)));
      stats.push_back(stats_json(s));
    }
    return {{"tokens", out}, {"stats", stats}};
  }
  // A session seeded from "state" (or fresh), fed each of "append" in turn, then generating (or scoring "score").
  if (op == "prefix") {
    mtx::Session s = r.contains("state") ? model.session_from_prefix(r.at("state").get<std::string>()) : model.session();
    json result = {{"seeded_position", s.position()}, {"seeded_tokens", s.tokens()}};
    for (const auto& more : r.value("append", json::array())) s.append(more.get<std::vector<int32_t>>());
    if (r.contains("save")) s.save_prefix_state(r.at("save").get<std::string>());
    if (r.contains("score")) {  // teacher-forced logits of "score" (float32) to the file "out"
      auto logits = s.score(r.at("score").get<std::vector<int32_t>>());
      std::ofstream f(r.at("out").get<std::string>(), std::ios::binary);
      f.write(reinterpret_cast<const char*>(logits.data()), std::streamsize(logits.size() * sizeof(float)));
      result["values"] = logits.size();
      return result;
    }
    result["tokens"] = s.generate(r.value("max_new_tokens", 0), sampling(r), stops(r), nullptr, speculative(r));
    result["stats"] = stats_json(s);
    return result;
  }
  if (op == "turns") {  // one session, several turns: append, generate, append, generate ...
    mtx::Session s = model.session();
    json out = json::array();
    for (const auto& turn : r.at("turns")) {
      s.append(turn.get<std::vector<int32_t>>());
      out.push_back(s.generate(r.at("max_new_tokens"), sampling(r), stops(r)));
    }
    return {{"tokens", out}};
  }
  if (op == "score") {
    auto logits = model.score(r.at("tokens").get<std::vector<int32_t>>());
    std::ofstream f(r.at("out").get<std::string>(), std::ios::binary);
    f.write(reinterpret_cast<const char*>(logits.data()), std::streamsize(logits.size() * sizeof(float)));
    return {{"values", logits.size()}};
  }
  if (op == "threads") {  // each of `threads` threads runs its share of `sessions` sessions over one Model
    auto prompts = r.at("prompts").get<std::vector<std::vector<int32_t>>>();
    const int n = r.at("max_new_tokens"), threads = r.at("threads");
    std::vector<std::vector<int32_t>> got(prompts.size());
    std::vector<std::string> errors(threads);
    std::vector<std::thread> pool;
    for (int t = 0; t < threads; ++t)
      pool.emplace_back([&, t] {
        try {
          for (size_t i = t; i < prompts.size(); i += threads) {
            mtx::Session s = model.session();
            s.append(prompts[i]);
            got[i] = s.generate(n, sampling(r), stops(r));
          }
        } catch (const std::exception& e) {
          errors[t] = e.what();
        }
      });
    for (auto& th : pool) th.join();
    for (const auto& e : errors)
      if (!e.empty()) throw std::runtime_error(e);
    return {{"tokens", got}};
  }
  if (op == "kv") {  // kv_bytes after every window of decoding
    mtx::Session s = model.session();
    s.append(r.at("prompt").get<std::vector<int32_t>>());
    // a window: the model's, or its smallest layer window where the layers differ
    int window = int(model.info().window);
    for (size_t l = 0; window < 0 && l < model.info().layer_windows.size(); ++l)
      if (model.info().layer_windows[l] > 0) window = int(model.info().layer_windows[l]);
    const int windows = r.at("windows");
    json bytes = json::array({s.kv_bytes()});
    for (int w = 0; w < windows; ++w) {
      s.generate(window, mtx::SamplingOptions{}, std::vector<int32_t>{});
      bytes.push_back(s.kv_bytes());
    }
    return {{"kv_bytes", bytes}, {"position", s.position()}, {"tokens", s.tokens()}};
  }
  if (op == "bench") {  // scripts/bench_cpp.py: a warm-up run, then one timed greedy run (as bench_peers.py)
    auto prompt = r.at("prompt").get<std::vector<int32_t>>();
    const int n = r.at("new_tokens");
    json result;
    for (int round = 0; round < 2; ++round) {
      using clock = std::chrono::steady_clock;
      std::vector<double> steps;
      std::vector<int32_t> tokens;
      const auto t0 = clock::now();
      auto last = t0;
      double ttft = 0;
      mtx::Session s = model.session();
      s.append(prompt);
      s.generate(n, mtx::SamplingOptions{}, std::vector<int32_t>{}, [&](int32_t t) {
        const auto now = clock::now();
        if (tokens.empty())
          ttft = std::chrono::duration<double>(now - t0).count();
        else
          steps.push_back(std::chrono::duration<double>(now - last).count());
        last = now;
        tokens.push_back(t);
        return true;
      });
      result = {{"ttft", ttft}, {"steps", steps}, {"tokens", tokens}};
    }
    return result;
  }
  throw std::runtime_error("unknown op " + op);
}

int main(int argc, char** argv) {
  if (argc != 2) {
    std::cerr << "usage: mtx_cpp_check REQUEST.json\n";
    return 2;
  }
  std::ifstream in(argv[1]);
  json req = json::parse(in);
  try {
    std::cout << run(req).dump() << "\n";
    return 0;
  } catch (const mtx::Error& e) {
    std::cout << json{{"error", {{"code", int(e.code())}, {"message", e.what()}}}}.dump() << "\n";
    return 2;
  }
}
