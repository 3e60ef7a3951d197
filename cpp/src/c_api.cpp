// The C ABI (mtx_c.h) over mtx.hpp: exceptions become status codes and a thread-local message.
#include "mtx/mtx_c.h"

#include <cstring>
#include <new>
#include <string>

#include "mtx/mtx.hpp"

struct mtx_model {
  mtx::Model model;
  mtx_model(const char* folder, const mtx::ModelOptions& o) : model(folder, o) {}
};
struct mtx_session {
  mtx::Session session;
  mtx::SpeculativeOptions speculative{};
};
struct mtx_tokenizer {
  mtx::Tokenizer tokenizer;
};

namespace {
thread_local std::string last_error;

template <class F>
mtx_status guard(F&& f) {
  try {
    last_error.clear();
    f();
    return MTX_OK;
  } catch (const mtx::Error& e) {
    last_error = e.what();
    return static_cast<mtx_status>(static_cast<int>(e.code()));
  } catch (const std::bad_alloc&) {
    last_error = "out of memory";
  } catch (const std::exception& e) {
    last_error = e.what();
  } catch (...) {
    last_error = "unknown error";
  }
  return MTX_INTERNAL_ERROR;
}

void need(const void* p, const char* what) {
  if (!p) throw mtx::Error(mtx::ErrorCode::InvalidArgument, std::string(what) + " is NULL");
}

mtx::SamplingOptions options(const mtx_sampling* s) {
  mtx::SamplingOptions o;
  if (!s) return o;
  o.temperature = s->temperature;
  o.top_k = s->top_k;
  o.top_p = s->top_p;
  o.repetition_penalty = s->repetition_penalty;
  if (s->has_seed) o.seed = s->seed;
  return o;
}
}  // namespace

extern "C" {

const char* mtx_last_error(void) { return last_error.c_str(); }

void mtx_sampling_default(mtx_sampling* out) {
  if (out) *out = mtx_sampling{0.0, 0, 1.0, 1.0, 0, 0};
}

mtx_status mtx_model_open(const char* folder, int32_t threads, int32_t verify, mtx_model** out) {
  return guard([&] {
    need(folder, "folder");
    need(out, "out");
    *out = nullptr;
    mtx::ModelOptions o;
    o.intra_op_threads = threads;
    o.verify_hashes = verify != 0;
    *out = new mtx_model(folder, o);
  });
}
void mtx_model_free(mtx_model* model) { delete model; }
int64_t mtx_model_vocab_size(const mtx_model* model) { return model ? model->model.info().vocab_size : -1; }

mtx_status mtx_session_new(const mtx_model* model, mtx_session** out) {
  return guard([&] {
    need(model, "model");
    need(out, "out");
    *out = new mtx_session{model->model.session(), {}};
  });
}
void mtx_session_free(mtx_session* session) { delete session; }

mtx_status mtx_session_append(mtx_session* session, const int32_t* tokens, size_t n) {
  return guard([&] {
    need(session, "session");
    if (n) need(tokens, "tokens");
    session->session.append(std::vector<int32_t>(tokens, tokens + n));
  });
}

mtx_status mtx_session_generate(mtx_session* session, int32_t max_new_tokens, const mtx_sampling* sampling,
                                const int32_t* stop_ids, size_t n_stop, mtx_token_callback callback, void* user,
                                int32_t* out_tokens, size_t* n_out) {
  return guard([&] {
    need(session, "session");
    need(n_out, "n_out");
    *n_out = 0;
    if (max_new_tokens > 0) need(out_tokens, "out_tokens");
    std::optional<std::vector<int32_t>> stops;
    if (stop_ids) stops = std::vector<int32_t>(stop_ids, stop_ids + n_stop);
    std::function<bool(int32_t)> cb;
    if (callback) cb = [&](int32_t t) { return callback(user, t) != 0; };
    auto toks = session->session.generate(max_new_tokens, options(sampling), stops, cb, session->speculative);
    std::copy(toks.begin(), toks.end(), out_tokens);
    *n_out = toks.size();
  });
}

mtx_status mtx_session_score(mtx_session* session, const int32_t* tokens, size_t n, float* out_logits) {
  return guard([&] {
    need(session, "session");
    need(out_logits, "out_logits");
    if (n) need(tokens, "tokens");
    auto logits = session->session.score(std::vector<int32_t>(tokens, tokens + n));
    std::copy(logits.begin(), logits.end(), out_logits);
  });
}
int64_t mtx_session_kv_bytes(const mtx_session* session) { return session ? session->session.kv_bytes() : -1; }

mtx_status mtx_session_from_prefix(const mtx_model* model, const char* path, mtx_session** out) {
  return guard([&] {
    need(model, "model");
    need(path, "path");
    need(out, "out");
    *out = nullptr;
    *out = new mtx_session{model->model.session_from_prefix(path), {}};
  });
}

mtx_status mtx_session_save_prefix(const mtx_session* session, const char* path) {
  return guard([&] {
    need(session, "session");
    need(path, "path");
    session->session.save_prefix_state(path);
  });
}

mtx_status mtx_session_set_speculative(mtx_session* session, int32_t num_tokens, int32_t lookup_max,
                                       int32_t lookup_min) {
  return guard([&] {
    need(session, "session");
    mtx::SpeculativeOptions o;
    o.num_tokens = num_tokens;
    o.prompt_lookup_max = lookup_max;
    o.prompt_lookup_min = lookup_min;
    o.validate();
    session->speculative = o;
  });
}

mtx_status mtx_session_speculative_stats(const mtx_session* session, int64_t* verifications, int64_t* drafted,
                                         int64_t* accepted) {
  return guard([&] {
    need(session, "session");
    const auto& st = session->session.speculative_stats();
    if (verifications) *verifications = st.verifications;
    if (drafted) *drafted = st.drafted;
    if (accepted) *accepted = st.accepted;
  });
}

mtx_status mtx_tokenizer_open(const char* path, mtx_tokenizer** out) {
  return guard([&] {
    need(path, "path");
    need(out, "out");
    *out = new mtx_tokenizer{mtx::Tokenizer(path)};
  });
}
void mtx_tokenizer_free(mtx_tokenizer* tokenizer) { delete tokenizer; }

mtx_status mtx_tokenizer_encode(const mtx_tokenizer* tokenizer, const char* text, int32_t* out_ids, size_t capacity,
                                size_t* n_out) {
  return guard([&] {
    need(tokenizer, "tokenizer");
    need(text, "text");
    need(n_out, "n_out");
    auto ids = tokenizer->tokenizer.encode(text);
    *n_out = ids.size();
    if (capacity) need(out_ids, "out_ids");
    std::copy(ids.begin(), ids.begin() + std::min(capacity, ids.size()), out_ids);
  });
}

mtx_status mtx_tokenizer_decode(const mtx_tokenizer* tokenizer, const int32_t* ids, size_t n, char* out_text,
                                size_t capacity, size_t* n_out) {
  return guard([&] {
    need(tokenizer, "tokenizer");
    need(n_out, "n_out");
    if (n) need(ids, "ids");
    auto text = tokenizer->tokenizer.decode(std::vector<int32_t>(ids, ids + n));
    *n_out = text.size();
    if (capacity) {
      need(out_text, "out_text");
      const size_t k = std::min(capacity - 1, text.size());
      std::memcpy(out_text, text.data(), k);
      out_text[k] = '\0';
    }
  });
}

}  // extern "C"
