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
  int64_t window = 0;    ///< sliding window W of every layer, 0 = full attention; -1 where layers differ
  int64_t capacity = 0;  ///< C, KV slots per layer and row; -1 where layers differ
  /// Per layer l (docs/ops.md §1 "Per-layer windows", mtx.json `layers`): its window W_l (0 = full
  /// attention), capacity C_l and KV layout ("ring" or "ort_window").
  std::vector<int64_t> layer_windows, layer_capacities;
  std::vector<std::string> layer_layouts;
  bool per_layer = false;  ///< the layers differ in window, capacity or layout (kv_layout "per_layer")
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
  /// The prefill block P: prompt tokens are fed in canonical chunks, each ending at a multiple of P
  /// or at the end of the tokens (docs/ops.md §1 rule 7), so a token's bits do not depend on where
  /// a feed started.
  int prefill_chunk = 256;
  int max_batch = 0;          ///< 0 = the manifest's max_batch
};

class Session;
class Batch;
class Model;
struct KVState;

/// The rolling KV buffer's arithmetic (docs/ops.md §1 rules 7, 10 and 12) as pure functions: no
/// model, no buffers. `C` capacity, `W` effective window (the sliding window, or C under full
/// attention; C >= W), `p` a row's position (its next token's), `k` draft tokens of a verification.
namespace kv {

enum class Layout { Ring, OrtWindow };  ///< mtx.json kv.layout: "ring", "ort_window"
Layout parse_layout(const std::string& name);  ///< throws Error(InvalidExport) for another name

/// A half-open range of positions [begin, end); empty when end <= begin.
struct Span {
  int64_t begin = 0, end = 0;
  bool empty() const { return end <= begin; }
  int64_t size() const { return empty() ? 0 : end - begin; }
};

/// Token counts of the calls feeding `n` tokens from position `start` in canonical chunks of block
/// `P` (rule 7): a call from s feeds min(left, P - s mod P). Their sum is n.
std::vector<int64_t> canonical_chunks(int64_t start, int64_t n, int64_t P);

/// live(p) = [max(0, p - W), p): the positions a row at p can still read (rule 10).
Span live(int64_t p, int64_t W);

/// `OrtWindow`: the position ONNX Runtime holds in row 0 of a row at position p (rule 10): 0 while
/// p <= C, else p - W - ((p - C - 1) mod (C - W + 1)) (measured on ORT 1.32: once full, it moves the
/// last W - 1 positions to rows 0..W-2 and goes on writing after them; p - W when C = W).
int64_t ort_window_base(int64_t p, int64_t C, int64_t W);

/// The positions a row at p holds (a superset of live(p)): `Ring` [max(0, p - C), p); `OrtWindow`
/// [ort_window_base(p), p).
Span held(Layout layout, int64_t p, int64_t C, int64_t W);

/// The buffer row (slot) holding position q for a row at position p (rule 10): `Ring` q mod C;
/// `OrtWindow` q - ort_window_base(p). Throws Error(InvalidArgument) if q is not in held(p).
int64_t slot_at(Layout layout, int64_t q, int64_t p, int64_t C, int64_t W);

/// Positions to save (read at the layout of p) before a verification call feeding positions p..p+k,
/// because the call loses them while a rejection may still need them (rule 12): `Ring` live(p+1)
/// intersected with [p+1-C, p+k+1-C) (empty iff C >= W + k); `OrtWindow` [max(0, p+1-W),
/// ort_window_base(p+k+1)) (ONNX Runtime's shift drops them). At most k. Needs 1 <= k <= W - 1.
Span verify_saved(Layout layout, int64_t p, int64_t k, int64_t C, int64_t W);

/// One copy of a rollback: position `position` goes to slot `dest` (the layout of p'), from the saved
/// copy (`from_saved`: index `source` of verify_saved's span) or from slot `source` of the buffer as
/// the verification call left it (the layout of p + k + 1).
struct Move {
  int64_t position, dest;
  bool from_saved;
  int64_t source;
};

/// The copies that make a row's buffer, as a verification at p with k drafts left it, the state at
/// p' = p + a + 1 after `a` (0 <= a <= k) accepted drafts: every position of live(p') not already
/// where the layout of p' puts it. Empty for a == k, and for `Ring` whenever C >= W + k. Sources are
/// read before any destination is written (they may overlap).
std::vector<Move> verify_restore(Layout layout, int64_t p, int64_t k, int64_t a, int64_t C, int64_t W);

/// Prompt-lookup draft: for n from max_n down to min_n (n >= 1), if context.size() > n, find the
/// latest i with i + n < context.size() and context[i, i+n) == the last n tokens; the draft is
/// context[i+n, i+n+max_tokens) (possibly shorter). Empty when nothing matches or max_tokens < 1.
std::vector<int32_t> ngram_draft(const std::vector<int32_t>& context, int64_t max_tokens, int max_n, int min_n);

}  // namespace kv

/// Prompt-lookup (n-gram) speculative decoding of Session::generate (docs/ops.md §1 rule 12). The
/// tokens are exactly plain decoding's (greedy or seeded); only the number of calls changes.
/// num_tokens = 0 disables it; else 1 <= prompt_lookup_min <= prompt_lookup_max.
struct SpeculativeOptions {
  int num_tokens = 0;         ///< k: drafts per verification (capped by the window and the tokens left)
  int prompt_lookup_max = 3;  ///< longest n-gram searched
  int prompt_lookup_min = 1;  ///< shortest n-gram searched
  void validate() const;      ///< throws Error(InvalidArgument) naming the option
};

/// Counters of a session's speculative decoding, over its whole life.
struct SpeculativeStats {
  int64_t verifications = 0;  ///< verification calls
  int64_t drafted = 0;        ///< draft tokens fed to them
  int64_t accepted = 0;       ///< drafts accepted (equal to the token drawn, followed by another)
};

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
/// On glibc, opening one fixes malloc's mmap threshold at 1 MiB for the whole process (mallopt), so the
/// buffers ONNX Runtime frees while it loads the model are returned to the system, not kept as heap holes.
class Model {
 public:
  explicit Model(const std::string& folder, const ModelOptions& options = {});
  ~Model();
  Model(const Model&) = delete;
  Model& operator=(const Model&) = delete;

  const ModelInfo& info() const;
  const std::string& folder() const;
  Session session() const;  ///< a single-sequence session with its own KV buffers
  /// A session seeded from a prefix state file (docs/ops.md §6, "Prefix state files"): its tokens
  /// are the state's, its position the state's, and the KV of its live positions is written where
  /// the export's layout puts them (§1 rule 10). A file written for another export, or inconsistent
  /// in any field, is Error(InvalidArgument), one line naming the file and the field.
  Session session_from_prefix(const std::string& path) const;
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
  /// `speculative`: prompt-lookup drafts verified in one call each (SpeculativeOptions); the tokens
  /// are those of plain decoding.
  std::vector<int32_t> generate(int max_new_tokens, const SamplingOptions& opts = {},
                                const std::optional<std::vector<int32_t>>& stop_ids = std::nullopt,
                                const std::function<bool(int32_t)>& on_token = nullptr,
                                const SpeculativeOptions& speculative = {});
  /// Write the state of the positions in the KV buffer (tokens()[0, position())) as a prefix state
  /// file (docs/ops.md §6), through a temporary file renamed into place. Needs position() >= 1.
  void save_prefix_state(const std::string& path) const;
  const std::vector<int32_t>& tokens() const { return tokens_; }
  int64_t position() const { return fed_; }  ///< tokens in the KV buffer
  int64_t kv_bytes() const;                  ///< bytes of the KV buffers (fixed for the session's life)
  const SpeculativeStats& speculative_stats() const { return spec_stats_; }

 private:
  friend class Model;
  Session(const Model* model);
  std::vector<float> feed_pending(bool want_all);
  /// k' for the next verification: num_tokens capped by the tokens left to draw minus one, the
  /// positions the export can hold and W - 1 (< 1: no draft).
  int64_t draft_limit(int num_tokens, int max_new_tokens, const RowDecoder& row) const;
  /// One verification of `draft` after the pending token (docs/ops.md §1 rule 12): draws with `take`
  /// while drafts match, rolls the buffers back to the new position; returns the drafts accepted.
  int64_t verify(const std::vector<int32_t>& draft, RowDecoder& row, const std::function<int32_t(const float*)>& take);
  const Model* model_;
  std::unique_ptr<KVState> state_;
  std::vector<int32_t> tokens_;
  int64_t fed_ = 0;
  std::vector<float> last_logits_;
  SpeculativeStats spec_stats_;
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

/// Text <-> ids: a byte-level BPE tokenizer.json (the built-in models' kind), a SentencePiece
/// tokenizer.model, or Mistral's own files (exports made with --tokenizer-mode mistral): tekken.json
/// (ids and decode of mistral_common's Tekkenizer: no BOS/EOS, control tokens never parsed from text,
/// control ids decoded as nothing) and tokenizer.model.v<N>[m<M>] (SentencePiece). Thread-safe (const).
class Tokenizer {
 public:
  /// `path` names a tokenizer file (a .json with "tekken" in its name or Tekken's layout is read as
  /// Tekken; a name ending .model or .model.v<N>[m<M>] as SentencePiece); a folder picks tokenizer.json,
  /// else tokenizer.model, else tekken.json, else the highest tokenizer.model.v<N>[m<M>].
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
