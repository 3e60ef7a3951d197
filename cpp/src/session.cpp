// Session and Batch: mtx/runtime/generator.py Session.stream and Generator.stream_batch, in C++.
#include <algorithm>

#include "model_impl.hpp"

namespace mtx {

Session Model::session() const { return Session(this); }
Batch Model::batch(int rows) const { return Batch(this, rows); }

Session::Session(const Model* model) : model_(model), state_(model->impl().new_state(1)) {}
Session::Session(Session&&) noexcept = default;
Session& Session::operator=(Session&&) noexcept = default;
Session::~Session() = default;
int64_t Session::kv_bytes() const { return state_->nbytes(); }

std::vector<float> Session::feed_pending(bool want_all) {
  std::vector<int32_t> pending(tokens_.begin() + fed_, tokens_.end());
  auto logits = model_->impl().prefill(*state_, 0, pending, fed_, want_all);
  fed_ = int64_t(tokens_.size());
  const int64_t V = model_->info().vocab_size;
  last_logits_.assign(logits.end() - V, logits.end());
  return logits;
}

std::vector<float> Session::append(const std::vector<int32_t>& ids) {
  model_->impl().check_tokens(ids, "turn");
  tokens_.insert(tokens_.end(), ids.begin(), ids.end());
  feed_pending(false);
  return last_logits_;
}

std::vector<float> Session::score(const std::vector<int32_t>& ids) {
  model_->impl().check_tokens(ids, "turn");
  const int64_t pending = int64_t(tokens_.size()) - fed_;
  tokens_.insert(tokens_.end(), ids.begin(), ids.end());
  auto all = feed_pending(true);
  const int64_t V = model_->info().vocab_size;
  return std::vector<float>(all.begin() + pending * V, all.end());
}

std::vector<int32_t> Session::generate(int max_new_tokens, const SamplingOptions& opts,
                                       const std::optional<std::vector<int32_t>>& stop_ids,
                                       const std::function<bool(int32_t)>& on_token) {
  if (max_new_tokens < 0)
    throw Error(ErrorCode::InvalidArgument, "max_new_tokens must be an integer >= 0, got " + std::to_string(max_new_tokens));
  opts.validate();
  const auto& impl = model_->impl();
  const std::vector<int32_t> stops = stop_ids ? *stop_ids : model_->info().eos_token_ids;
  TokenRng rng(opts.seed);
  if (tokens_.empty()) throw Error(ErrorCode::InvalidArgument, "session is empty: append a prompt before generating");
  impl.check_positions(int64_t(tokens_.size()) + max_new_tokens);
  if (fed_ < int64_t(tokens_.size())) feed_pending(false);
  std::vector<int32_t> out;
  const int64_t V = model_->info().vocab_size;
  for (int step = 0; step < max_new_tokens; ++step) {
    const int32_t tok = select_token(last_logits_.data(), V, opts, &rng,
                                     opts.repetition_penalty != 1.0 ? &tokens_ : nullptr);
    tokens_.push_back(tok);
    out.push_back(tok);
    const bool go_on = on_token ? on_token(tok) : true;
    if (!go_on || std::find(stops.begin(), stops.end(), tok) != stops.end() || step == max_new_tokens - 1)
      return out;  // the last token stays pending until the next append / generate
    feed_pending(false);
  }
  return out;
}

Batch::Batch(const Model* model, int rows) : model_(model), rows_(rows), state_(model->impl().new_state(rows)) {}
Batch::Batch(Batch&&) noexcept = default;
Batch::~Batch() = default;
int64_t Batch::kv_bytes() const { return state_->nbytes(); }

std::vector<std::vector<int32_t>> Batch::generate(const std::vector<std::vector<int32_t>>& prompts, int max_new_tokens,
                                                  const SamplingOptions& opts,
                                                  const std::optional<std::vector<int32_t>>& stop_ids,
                                                  const TokenCallback& on_token) {
  const auto& impl = model_->impl();
  const int b = int(prompts.size());
  if (b == 0) throw Error(ErrorCode::InvalidArgument, "no prompts given");
  if (b > rows_)
    throw Error(ErrorCode::InvalidArgument, "batch of " + std::to_string(b) + " prompts exceeds the " +
                                                std::to_string(rows_) + " rows of this Batch");
  if (max_new_tokens < 0)
    throw Error(ErrorCode::InvalidArgument, "max_new_tokens must be an integer >= 0, got " + std::to_string(max_new_tokens));
  opts.validate();
  size_t longest = 0;
  for (int r = 0; r < b; ++r) {
    impl.check_tokens(prompts[r], ("prompt " + std::to_string(r)).c_str());
    longest = std::max(longest, prompts[r].size());
  }
  impl.check_positions(int64_t(longest) + max_new_tokens);
  const std::vector<int32_t> stops = stop_ids ? *stop_ids : model_->info().eos_token_ids;
  const int64_t V = model_->info().vocab_size;
  std::vector<TokenRng> rngs;
  for (int r = 0; r < b; ++r) rngs.emplace_back(opts.seed, uint64_t(r));
  // Rows may be reused: start every row at position 0 (its buffers need no clearing, docs/ops.md §1.3).
  std::fill(state_->current.begin(), state_->current.end(), 0);
  std::vector<float> logits(size_t(b) * V);
  for (int r = 0; r < b; ++r) {
    auto l = impl.prefill(*state_, r, prompts[r], 0, false);
    std::copy(l.begin(), l.end(), logits.begin() + r * V);
  }
  std::vector<std::vector<int32_t>> seqs(prompts), out(b);
  std::vector<char> done(b, 0);
  std::vector<int64_t> pos(b);
  for (int r = 0; r < b; ++r) pos[r] = int64_t(prompts[r].size());
  for (int step = 0; step < max_new_tokens; ++step) {
    std::vector<int64_t> last(b);
    for (int r = 0; r < b; ++r) {
      if (done[r]) {
        last[r] = out[r].back();
        continue;
      }
      const int32_t tok = select_token(logits.data() + r * V, V, opts, &rngs[r],
                                       opts.repetition_penalty != 1.0 ? &seqs[r] : nullptr);
      seqs[r].push_back(tok);
      out[r].push_back(tok);
      if (std::find(stops.begin(), stops.end(), tok) != stops.end()) done[r] = 1;
      last[r] = tok;
      if (on_token && !on_token(r, tok)) return out;
    }
    if (std::all_of(done.begin(), done.end(), [](char d) { return d != 0; }) || step == max_new_tokens - 1) return out;
    logits = impl.run(*state_, 0, b, last, 1, pos, true);
    for (auto& p : pos) ++p;
  }
  return out;
}

}  // namespace mtx
