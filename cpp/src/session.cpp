// Session and Batch: mtx/runtime/generator.py Session.stream and Generator.stream_batch, in C++.
#include <algorithm>
#include <cstring>

#include "model_impl.hpp"

namespace mtx {

Session Model::session() const { return Session(this); }
Batch Model::batch(int rows) const { return Batch(this, rows); }

void SpeculativeOptions::validate() const {
  auto bad = [](const std::string& m) { throw Error(ErrorCode::InvalidArgument, m); };
  if (num_tokens < 0) bad("speculative num_tokens must be an integer >= 0, got " + std::to_string(num_tokens));
  if (prompt_lookup_min < 1)
    bad("speculative prompt_lookup_min must be an integer >= 1, got " + std::to_string(prompt_lookup_min));
  if (prompt_lookup_max < prompt_lookup_min)
    bad("speculative prompt_lookup_max must be >= prompt_lookup_min (" + std::to_string(prompt_lookup_min) +
        "), got " + std::to_string(prompt_lookup_max));
}

namespace {
// The live positions `span` of a row at position `p`, read where the layout puts them (docs/ops.md §1
// rule 10), packed per KV tensor and head: [2L][Hkv][span][D].
std::vector<char> read_positions(const Model::Impl& m, KVState& st, kv::Span span, int64_t p) {
  const ModelInfo& info = m.manifest.info;
  const size_t vec = size_t(info.head_dim) * m.elem_bytes, n = size_t(span.size());
  std::vector<char> out(size_t(2 * info.num_layers * info.num_kv_heads) * n * vec);
  char* dst = out.data();
  for (size_t t = 0; t < size_t(2 * info.num_layers); ++t)
    for (int64_t h = 0; h < info.num_kv_heads; ++h)
      for (int64_t q = span.begin; q < span.end; ++q, dst += vec)
        std::memcpy(dst, m.slot_ptr(st, 0, t, h, kv::slot_at(m.layout, q, p, info.capacity, m.window)), vec);
  return out;
}
}  // namespace

Session Model::session_from_prefix(const std::string& path) const {
  const Impl& m = *impl_;
  const ModelInfo& info = m.manifest.info;
  m.require_uniform(path);
  detail::PrefixData d = detail::read_prefix_state(path, m);
  Session s(this);
  const int64_t p = int64_t(d.tokens.size()), n = p - d.first;
  const size_t vec = size_t(info.head_dim) * m.elem_bytes;
  for (size_t t = 0; t < d.tensors.size(); ++t)
    for (int64_t h = 0; h < info.num_kv_heads; ++h)
      for (int64_t q = d.first; q < p; ++q)
        std::memcpy(m.slot_ptr(*s.state_, 0, t, h, kv::slot_at(m.layout, q, p, info.capacity, m.window)),
                    d.tensors[t].data() + size_t(h * n + q - d.first) * vec, vec);
  s.tokens_ = std::move(d.tokens);
  s.fed_ = p;
  return s;
}

void Session::save_prefix_state(const std::string& path) const {
  const auto& m = model_->impl();
  const ModelInfo& info = m.manifest.info;
  m.require_uniform(path);
  if (fed_ < 1) throw Error(ErrorCode::InvalidArgument, path + ": the session is empty: nothing to save");
  detail::PrefixData d;
  d.tokens.assign(tokens_.begin(), tokens_.begin() + fed_);
  const kv::Span live = kv::live(fed_, m.window);
  d.first = live.begin;
  const std::vector<char> all = read_positions(m, *state_, live, fed_);
  const size_t per = all.size() / size_t(2 * info.num_layers);
  for (size_t t = 0; t < size_t(2 * info.num_layers); ++t)
    d.tensors.emplace_back(all.begin() + t * per, all.begin() + (t + 1) * per);
  detail::write_prefix_state(path, d, m);
}

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
                                       const std::function<bool(int32_t)>& on_token,
                                       const SpeculativeOptions& speculative) {
  if (tokens_.empty()) throw Error(ErrorCode::InvalidArgument, "session is empty: append a prompt before generating");
  speculative.validate();
  if (speculative.num_tokens > 0) model_->impl().require_uniform();
  // The session's row: its whole sequence is the prompt (positions and the repetition penalty see it all).
  const GenerationRequest req = make_request(*model_, {tokens_}, max_new_tokens, opts, stop_ids, "session");
  RowDecoder row(req, 0);
  if (row.done()) return row.generated();
  if (fed_ < int64_t(tokens_.size()))
    feed_pending(false);
  else if (last_logits_.empty())
    throw Error(ErrorCode::InvalidArgument, "session seeded from a prefix state has no logits of its last token: "
                                            "append at least one token before generating");
  const int64_t V = model_->info().vocab_size;
  // One sampling step (the row's own sampler and random stream); the token becomes the pending one.
  auto take = [&](const float* logits) {
    const int32_t tok = row.step(logits, V);
    tokens_.push_back(tok);
    if (on_token && !on_token(tok)) row.cancel();
    return tok;
  };
  take(last_logits_.data());
  int fails = 0, cooldown = 0;  // backoff after verifications that accepted nothing
  while (!row.done()) {  // the last token stays pending until the next append / generate
    std::vector<int32_t> draft;
    if (speculative.num_tokens > 0) {
      if (cooldown > 0)
        --cooldown;
      else
        draft = kv::ngram_draft(tokens_, draft_limit(speculative.num_tokens, max_new_tokens, row),
                                speculative.prompt_lookup_max, speculative.prompt_lookup_min);
    }
    if (draft.empty()) {
      feed_pending(false);
      take(last_logits_.data());
      continue;
    }
    if (verify(draft, row, take) == 0) {
      ++fails;
      cooldown = fails >= 5 ? 32 : std::min(1 << fails, 32);
    } else {
      fails = 0;
    }
  }
  return row.generated();
}

int64_t Session::draft_limit(int num_tokens, int max_new_tokens, const RowDecoder& row) const {
  const auto& m = model_->impl();
  const int64_t remaining = int64_t(max_new_tokens) - int64_t(row.generated().size());  // tokens still to draw
  int64_t k = std::min<int64_t>(num_tokens, remaining - 1);
  k = std::min(k, m.position_limit() - fed_ - 1);  // the call feeds positions fed_ .. fed_ + k
  return std::min(k, m.window - 1);
}

int64_t Session::verify(const std::vector<int32_t>& draft, RowDecoder& row,
                        const std::function<int32_t(const float*)>& take) {
  const auto& m = model_->impl();
  const ModelInfo& info = m.manifest.info;
  const int64_t p = fed_, k = int64_t(draft.size()), C = info.capacity, W = m.window, V = info.vocab_size;
  // Positions the call loses that a rejection may still need, read at the layout of p (rule 12).
  const kv::Span saved = kv::verify_saved(m.layout, p, k, C, W);
  const std::vector<char> kept = read_positions(m, *state_, saved, p);
  std::vector<int64_t> ids = {tokens_.back()};
  ids.insert(ids.end(), draft.begin(), draft.end());
  m.check_positions(p + k + 1);
  const std::vector<float> logits = m.run(*state_, 0, 1, ids, k + 1, {p}, false);  // [k + 1, V]
  // Draw as plain decoding would, one position at a time, while the drafts match the tokens drawn.
  int64_t a = 0;
  for (int64_t i = 0;; ++i) {
    const int32_t t = take(logits.data() + i * V);
    if (row.done() || i == k || t != draft[size_t(i)]) break;
    ++a;
  }
  const int64_t next = p + a + 1;
  const auto moves = kv::verify_restore(m.layout, p, k, a, C, W);
  if (!moves.empty()) {  // gather every source first: sources and destinations may overlap
    const size_t vec = size_t(info.head_dim) * m.elem_bytes, T = size_t(2 * info.num_layers);
    std::vector<char> tmp(T * size_t(info.num_kv_heads) * moves.size() * vec);
    char* at = tmp.data();
    for (size_t t = 0; t < T; ++t)
      for (int64_t h = 0; h < info.num_kv_heads; ++h)
        for (const auto& mv : moves) {
          const char* src = mv.from_saved ? kept.data() + ((t * info.num_kv_heads + h) * saved.size() + mv.source) * vec
                                          : m.slot_ptr(*state_, 0, t, h, mv.source);
          std::memcpy(at, src, vec);
          at += vec;
        }
    at = tmp.data();
    for (size_t t = 0; t < T; ++t)
      for (int64_t h = 0; h < info.num_kv_heads; ++h)
        for (const auto& mv : moves) {
          std::memcpy(m.slot_ptr(*state_, 0, t, h, mv.dest), at, vec);
          at += vec;
        }
  }
  fed_ = next;
  last_logits_.assign(logits.begin() + a * V, logits.begin() + (a + 1) * V);
  spec_stats_.verifications += 1;
  spec_stats_.drafted += k;
  spec_stats_.accepted += a;
  return a;
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
