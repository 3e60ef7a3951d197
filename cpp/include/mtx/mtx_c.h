/* mtx C ABI: the C++ runtime (mtx.hpp) behind opaque handles, for bindings (Go, Rust, C#, ...).
 *
 * Every call returns an mtx_status; on failure mtx_last_error() gives one line naming the problem
 * (thread-local, valid until the thread's next mtx call). Nothing throws across this boundary.
 * Thread-safety: a model may be used from many threads; a session from one thread at a time.
 */
#ifndef MTX_C_H
#define MTX_C_H
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum mtx_status {
  MTX_OK = 0,
  MTX_INVALID_ARGUMENT = 1, /* bad input: token id out of range, empty prompt, bad option, NULL handle */
  MTX_INVALID_EXPORT = 2,   /* missing, malformed or tampered export folder */
  MTX_RUNTIME_ERROR = 3,    /* ONNX Runtime failed or is incompatible */
  MTX_TOKENIZER_ERROR = 4,  /* unreadable or unsupported tokenizer */
  MTX_INTERNAL_ERROR = 5    /* anything else (out of memory, ...) */
} mtx_status;

typedef struct mtx_model mtx_model;
typedef struct mtx_session mtx_session;
typedef struct mtx_tokenizer mtx_tokenizer;

/* temperature 0 = greedy; top_k 0 and top_p 1 = off; seed used when has_seed != 0 (in [0, 2^63)). */
typedef struct mtx_sampling {
  double temperature;
  int32_t top_k;
  double top_p;
  double repetition_penalty;
  int32_t has_seed;
  uint64_t seed;
} mtx_sampling;

/* Called with each generated token; return 0 to stop. */
typedef int (*mtx_token_callback)(void* user, int32_t token);

const char* mtx_last_error(void);
void mtx_sampling_default(mtx_sampling* out); /* greedy */

/* intra_op_threads 0 = ONNX Runtime's default; verify_hashes != 0 recomputes the files' sha256. */
mtx_status mtx_model_open(const char* folder, int32_t intra_op_threads, int32_t verify_hashes, mtx_model** out);
void mtx_model_free(mtx_model* model);
int64_t mtx_model_vocab_size(const mtx_model* model);

mtx_status mtx_session_new(const mtx_model* model, mtx_session** out);
void mtx_session_free(mtx_session* session);
mtx_status mtx_session_append(mtx_session* session, const int32_t* tokens, size_t n);
/* Up to max_new_tokens into out_tokens (capacity >= max_new_tokens); *n_out = how many.
 * stop_ids: n_stop ids that end generation (included); stop_ids NULL = the model's eos ids. */
mtx_status mtx_session_generate(mtx_session* session, int32_t max_new_tokens, const mtx_sampling* sampling,
                                const int32_t* stop_ids, size_t n_stop, mtx_token_callback callback, void* user,
                                int32_t* out_tokens, size_t* n_out);
/* Append tokens and write their logits [n, vocab] (float32) to out_logits. */
mtx_status mtx_session_score(mtx_session* session, const int32_t* tokens, size_t n, float* out_logits);
int64_t mtx_session_kv_bytes(const mtx_session* session);
/* A session seeded from a prefix state file (docs/ops.md section 6) written for this model's export: its
 * tokens and KV state are the file's; append at least one token before generating. */
mtx_status mtx_session_from_prefix(const mtx_model* model, const char* path, mtx_session** out);
/* Write the state of the session's fed positions to a prefix state file (temporary file, renamed). */
mtx_status mtx_session_save_prefix(const mtx_session* session, const char* path);
/* Prompt-lookup speculative decoding in this session's later mtx_session_generate calls (the same
 * tokens): up to num_tokens drafts a call (0 = off), n-grams of lookup_max down to lookup_min tokens. */
mtx_status mtx_session_set_speculative(mtx_session* session, int32_t num_tokens, int32_t lookup_max,
                                       int32_t lookup_min);
/* The session's speculative counters: verification calls, draft tokens fed, drafts accepted. */
mtx_status mtx_session_speculative_stats(const mtx_session* session, int64_t* verifications, int64_t* drafted,
                                         int64_t* accepted);

mtx_status mtx_tokenizer_open(const char* path, mtx_tokenizer** out);
void mtx_tokenizer_free(mtx_tokenizer* tokenizer);
/* Writes up to capacity ids; *n_out = the number of ids of the text (call again if larger). */
mtx_status mtx_tokenizer_encode(const mtx_tokenizer* tokenizer, const char* text, int32_t* out_ids, size_t capacity,
                                size_t* n_out);
/* Writes a NUL-terminated string of at most capacity bytes; *n_out = its length without the NUL. */
mtx_status mtx_tokenizer_decode(const mtx_tokenizer* tokenizer, const int32_t* ids, size_t n, char* out_text,
                                size_t capacity, size_t* n_out);

#ifdef __cplusplus
}
#endif
#endif
