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
  if (tokens_.empty()) throw Error(ErrorCode::InvalidArgument, "session is empty: append a prompt before generating");
  // The session's row: its whole sequence is the prompt (positions and the repetition penalty see it all).
  const GenerationRequest req = make_request(*model_, {tokens_}, max_new_tokens, opts, stop_ids, "session");
  if (fed_ < int64_t(tokens_.size())) feed_pending(false);
  RowDecoder row(req, 0);
  const int64_t V = model_->info().vocab_size;
  while (!row.done()) {
    const int32_t tok = row.step(last_logits_.data(), V);
    tokens_.push_back(tok);
    if (on_token && !on_token(tok)) row.cancel();
    if (row.done()) break;  // the last token stays pending until the next append / generate
    feed_pending(false);
  }
  return row.generated();
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
  if (int(prompts.size()) > rows_)
    throw Error(ErrorCode::InvalidArgument, "batch of " + std::to_string(prompts.size()) + " prompts exceeds the " +
                                                std::to_string(rows_) + " rows of this Batch");
  const GenerationRequest req = make_request(*model_, prompts, max_new_tokens, opts, stop_ids);
  const int b = int(req.prompts.size());
  const int64_t V = model_->info().vocab_size;
  std::vector<RowDecoder> rows;
  for (int r = 0; r < b; ++r) rows.emplace_back(req, r);
  auto results = [&] {
    std::vector<std::vector<int32_t>> out;
    for (const auto& row : rows) out.push_back(row.generated());
    return out;
  };
  // Rows may be reused: start every row at position 0 (its buffers need no clearing, docs/ops.md §1.3).
  std::fill(state_->current.begin(), state_->current.end(), 0);
  std::vector<float> logits(size_t(b) * V);
  for (int r = 0; r < b; ++r) {
    auto l = impl.prefill(*state_, r, req.prompts[r], 0, false);
    std::copy(l.begin(), l.end(), logits.begin() + r * V);
  }
  std::vector<int64_t> pos(b), last(b);
  for (int r = 0; r < b; ++r) pos[r] = int64_t(req.prompts[r].size());
  // Every row ends by length at the same step; a row done earlier feeds its last token again.
  while (!std::all_of(rows.begin(), rows.end(), [](const RowDecoder& d) { return d.done(); })) {
    for (int r = 0; r < b; ++r) {
      if (rows[r].done()) {
        last[r] = rows[r].generated().back();
        continue;
      }
      last[r] = rows[r].step(logits.data() + r * V, V);
      if (on_token && !on_token(r, int32_t(last[r]))) {
        for (auto& row : rows) row.cancel();
        return results();
      }
    }
    if (std::all_of(rows.begin(), rows.end(), [](const RowDecoder& d) { return d.done(); })) break;
    logits = impl.run(*state_, 0, b, last, 1, pos, true);
    for (auto& p : pos) ++p;
  }
  return results();
}

}  // namespace mtx
