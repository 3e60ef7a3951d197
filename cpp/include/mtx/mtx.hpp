// mtx C++ runtime: run an `mtx export` folder (mtx.json + model.onnx) in ONNX Runtime.
//
//   mtx::Model model("OUT");                       // checks mtx.json (docs/ops.md §5) and the files
//   mtx::Session s = model.session();              // KV buffers allocated once at capacity C
//   s.append({1, 5, 7});
//   auto tokens = s.generate(32, mtx::SamplingOptions{}, {}, [](int32_t t) { return true; });
//
// Thread-safety as the Python runtime (mtx/runtime): one Model is shared by any number of threads;
// each Session (and Batch) is used by one thread at a time.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

namespace mtx {

/// Why a call failed. Status codes of the C ABI (mtx_c.h) are these values.
enum class ErrorCode : int {
  InvalidArgument = 1,  ///< bad input from the caller: token id out of range, empty prompt, bad option
  InvalidExport = 2,    ///< the export folder: missing, malformed or tampered mtx.json / files
  Runtime = 3,          ///< ONNX Runtime failed, or its library is incompatible
  Tokenizer = 4,        ///< unreadable or unsupported tokenizer file
};

/// Every failure of the library: one line naming the file / tensor / option and what was expected.
class Error : public std::runtime_error {
 public:
  Error(ErrorCode code, const std::string& message) : std::runtime_error(message), code_(code) {}
  ErrorCode code() const noexcept { return code_; }

 private:
  ErrorCode code_;
};

/// Token selection (HF semantics). temperature == 0 is greedy; top_k == 0 and top_p == 1 disable
/// those filters. seed: the sampling seed in [0, 2^63); none = a random one.
struct SamplingOptions {
  double temperature = 0.0;
  int top_k = 0;
  double top_p = 1.0;
  double repetition_penalty = 1.0;
  std::optional<uint64_t> seed;
  void validate() const;  ///< throws Error(InvalidArgument) naming the option
};

/// SplitMix64 uniform draws, exactly mtx/runtime/sampling.py TokenRng: state = mix64(seed) ^ stream.
class TokenRng {
 public:
  explicit TokenRng(std::optional<uint64_t> seed, uint64_t stream = 0);
  uint64_t next_u64();
  double uniform();  ///< (next_u64() >> 11) * 2^-53
  static uint64_t mix64(uint64_t z);
  uint64_t state;
};

/// One token id from float32 logits [V], exactly mtx.runtime.sampling.select_token. `seen` are the
/// ids of the sequence so far (used only when repetition_penalty != 1). Greedy takes no draw.
int32_t select_token(const float* logits, int64_t vocab, const SamplingOptions& opts, TokenRng* rng,
                     const std::vector<int32_t>* seen = nullptr);

/// Model settings of an open export (from mtx.json).
struct ModelInfo {
  std::string target, dtype, model_type;
  int64_t vocab_size = 0, num_layers = 0, num_kv_heads = 0, head_dim = 0;
  int64_t window = 0;    ///< sliding window W, 0 = full attention
  int64_t capacity = 0;  ///< C, KV slots per layer and row
  int64_t max_batch = 0;
  std::optional<int64_t> max_position;
  std::string kv_layout, past_present, multi_token_batch;
  bool shared_kv = false;  ///< past_* and present_* bound to one buffer (else two buffer sets in turn)
  std::vector<int32_t> eos_token_ids;
};

struct ModelOptions {
  int intra_op_threads = 0;   ///< 0 = ONNX Runtime's default
  bool spin = false;          ///< intra-op threads spin-wait for work (session.intra_op.allow_spinning); off:
                              ///< they sleep and give a shared core back (the Python default, README "Spinning")
  bool verify_hashes = true;  ///< recompute each listed file's sha256 (docs/ops.md §5 rule 5)
  std::string device = "cpu"; ///< "cpu" or "cuda" (CUDA execution provider, where the library has it)
  int prefill_chunk = 256;    ///< prompt tokens per call
  int max_batch = 0;          ///< 0 = the manifest's max_batch
};

class Session;
class Batch;
class Model;
struct KVState;

/// Why a row stopped: a stop id (included in its tokens), max_new_tokens reached, or the caller's
/// callback returned false. None while the row still decodes.
enum class FinishReason { None, Stop, Length, Cancelled };
const char* to_string(FinishReason reason);  ///< "none", "stop", "length", "cancelled"

/// One generation request, checked once by make_request (Session::generate and Batch::generate both
/// go through it). Invariants after make_request: every prompt is non-empty with ids in
/// [0, vocab_size); max_new_tokens >= 0 and prompt + max_new_tokens fits the model's positions;
/// sampling passed SamplingOptions::validate (seed included); stop_ids resolved (the model's eos ids
/// unless given).
struct GenerationRequest {
  std::vector<std::vector<int32_t>> prompts;  ///< one per row (a Session: its whole sequence so far)
  int max_new_tokens = 0;
  SamplingOptions sampling;
  std::vector<int32_t> stop_ids;
};

/// The one validation of a request; throws Error(InvalidArgument) naming the field (a row as
/// "<what> <r>": "prompt 1: token id 99999 is out of range ..."). Checks, in order: rows given,
/// max_new_tokens, sampling options, each prompt's ids, positions.
GenerationRequest make_request(const Model& model, std::vector<std::vector<int32_t>> prompts, int max_new_tokens,
                               const SamplingOptions& opts = {},
                               const std::optional<std::vector<int32_t>>& stop_ids = std::nullopt,
                               const std::string& what = "prompt");

/// One row of a request, one step at a time: sample (row r draws from stream r of the seed), record
/// the token, decide whether the row ends (stop id, then length). Holds the row's sequence (prompt +
/// generated), which the repetition penalty reads.
class RowDecoder {
 public:
  RowDecoder(const GenerationRequest& request, int row);  ///< copies what it needs from the request
  /// The next token from this row's logits [vocab]; the row must not be done.
  int32_t step(const float* logits, int64_t vocab);
  void cancel();  ///< the caller stops this row (finish reason Cancelled unless already done)
  bool done() const { return reason_ != FinishReason::None; }
  FinishReason finish_reason() const { return reason_; }
  const std::vector<int32_t>& generated() const { return generated_; }
  const std::vector<int32_t>& sequence() const { return sequence_; }

 private:
  SamplingOptions sampling_;
  std::vector<int32_t> stop_ids_;
  size_t max_new_tokens_;
  TokenRng rng_;
  std::vector<int32_t> sequence_, generated_;
  FinishReason reason_ = FinishReason::None;
};

/// Per-token callback of a batch: (row, token); return false to stop the whole batch.
using TokenCallback = std::function<bool(int row, int32_t token)>;

/// An open export folder: the validated manifest and one ONNX Runtime session. Thread-safe.
class Model {
 public:
  explicit Model(const std::string& folder, const ModelOptions& options = {});
  ~Model();
  Model(const Model&) = delete;
  Model& operator=(const Model&) = delete;

  const ModelInfo& info() const;
  const std::string& folder() const;
  Session session() const;  ///< a single-sequence session with its own KV buffers
  Batch batch(int rows) const;  ///< `rows` sequences decoded together in one call per step

  /// Logits [T, V] (float32, row-major) of every token of `tokens`, from a fresh session.
  std::vector<float> score(const std::vector<int32_t>& tokens) const;

  /// ONNX Runtime's version string, and the C API version this library was built with.
  static std::string ort_version();
  static int ort_api_version();

  struct Impl;
  const Impl& impl() const { return *impl_; }

 private:
  std::unique_ptr<Impl> impl_;
};

/// One sequence and its KV buffers (allocated once at capacity C). As mtx.runtime.Session: the last
/// generated token stays pending until the next append / generate.
class Session {
 public:
  Session(Session&&) noexcept;
  Session& operator=(Session&&) noexcept;
  ~Session();

  /// Add tokens and run them (chunked prefill). Returns the last token's logits [V].
  std::vector<float> append(const std::vector<int32_t>& tokens);
  /// Add tokens and return the logits [T, V] of each of them (teacher-forced).
  std::vector<float> score(const std::vector<int32_t>& tokens);
  /// Continue the sequence. Stops at max_new_tokens, a stop id (included in the result; nullopt =
  /// the model's eos ids, {} = none), or when the callback returns false.
  std::vector<int32_t> generate(int max_new_tokens, const SamplingOptions& opts = {},
                                const std::optional<std::vector<int32_t>>& stop_ids = std::nullopt,
                                const std::function<bool(int32_t)>& on_token = nullptr);
  const std::vector<int32_t>& tokens() const { return tokens_; }
  int64_t position() const { return fed_; }  ///< tokens in the KV buffer
  int64_t kv_bytes() const;                  ///< bytes of the KV buffers (fixed for the session's life)

 private:
  friend class Model;
  Session(const Model* model);
  std::vector<float> feed_pending(bool want_all);
  const Model* model_;
  std::unique_ptr<KVState> state_;
  std::vector<int32_t> tokens_;
  int64_t fed_ = 0;
  std::vector<float> last_logits_;
};

/// `rows` prompts generated together, as mtx.runtime.Generator.generate: each prompt is prefilled
/// alone, then every decode step runs all rows in one call; row r samples with stream r.
class Batch {
 public:
  Batch(Batch&&) noexcept;
  ~Batch();
  std::vector<std::vector<int32_t>> generate(const std::vector<std::vector<int32_t>>& prompts, int max_new_tokens,
                                             const SamplingOptions& opts = {},
                                             const std::optional<std::vector<int32_t>>& stop_ids = std::nullopt,
                                             const TokenCallback& on_token = nullptr);
  int64_t kv_bytes() const;

 private:
  friend class Model;
  Batch(const Model* model, int rows);
  const Model* model_;
  int rows_;
  std::unique_ptr<KVState> state_;
};

/// Text <-> ids: a byte-level BPE tokenizer.json (the built-in models' kind) or a SentencePiece
/// tokenizer.model. Thread-safe (const).
class Tokenizer {
 public:
  /// `path` names tokenizer.json or tokenizer.model; a folder picks tokenizer.json, else tokenizer.model.
  explicit Tokenizer(const std::string& path);
  Tokenizer(Tokenizer&&) noexcept;
  Tokenizer& operator=(Tokenizer&&) noexcept;
  ~Tokenizer();
  std::vector<int32_t> encode(const std::string& text) const;
  std::string decode(const std::vector<int32_t>& ids) const;
  struct Impl;

 private:
  std::unique_ptr<Impl> impl_;
};

/// Streaming text of a growing id sequence. Invariants: the concatenation of everything push()
/// returned is always a prefix of tok.decode(ids()), and with flush() it equals it. Each push decodes
/// only ids[prefix:] (the window since the last text emitted; a few ids for text, growing only while
/// the decoded text keeps ending in U+FFFD) and holds text back while it ends in U+FFFD, since a later
/// byte may complete that character. Keeps a reference to `tok`.
class Detokenizer {
 public:
  explicit Detokenizer(const Tokenizer& tok) : tok_(&tok) {}
  std::string push(int32_t id);  ///< the text this id adds, possibly "" (held back)
  std::string flush();           ///< everything held back
  const std::vector<int32_t>& ids() const { return ids_; }

 private:
  const Tokenizer* tok_;
  std::vector<int32_t> ids_;
  size_t prefix_ = 0;  ///< window start: decode(ids[prefix:read]) is text already emitted
  size_t read_ = 0;    ///< ids before read have all their text emitted
};

/// Hex sha256 of a file (read in chunks).
std::string sha256_file(const std::string& path);

}  // namespace mtx
