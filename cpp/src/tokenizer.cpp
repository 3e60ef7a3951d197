// Tokenizer: a byte-level BPE tokenizer.json (what the built-in models and HF Mistral/Mixtral use:
// ByteLevel pre-tokenizer with the GPT-2 regex, BPE with merges, ByteLevel decoder, added tokens) and
// SentencePiece tokenizer.model (libsentencepiece). Anything else in tokenizer.json is refused with
// one line naming the field, and Mistral's own files (tekken.json, tokenizer.model.v<N>) with one line
// saying so: an export carrying one loads and runs on token ids.
#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>
#include <sentencepiece_processor.h>
#include <dirent.h>
#include <sys/stat.h>

#include <algorithm>
#include <cctype>
#include <climits>
#include <fstream>
#include <map>
#include <mutex>
#include <nlohmann/json.hpp>
#include <unordered_map>

#include "mtx/mtx.hpp"

namespace mtx {
namespace {
using json = nlohmann::json;

[[noreturn]] void tok_fail(const std::string& msg) { throw Error(ErrorCode::Tokenizer, msg.substr(0, 400)); }

// GPT-2's reversible map of the 256 bytes to printable code points, as UTF-8 strings.
struct ByteMap {
  std::string to_char[256];
  std::unordered_map<std::string, uint8_t> to_byte;
  ByteMap() {
    std::vector<int> bs;
    for (int b = '!'; b <= '~'; ++b) bs.push_back(b);
    for (int b = 0xA1; b <= 0xAC; ++b) bs.push_back(b);
    for (int b = 0xAE; b <= 0xFF; ++b) bs.push_back(b);
    std::vector<int> cs(bs);
    int n = 0;
    for (int b = 0; b < 256; ++b)
      if (std::find(bs.begin(), bs.end(), b) == bs.end()) {
        bs.push_back(b);
        cs.push_back(256 + n++);
      }
    for (size_t i = 0; i < bs.size(); ++i) {
      std::string u;
      int c = cs[i];
      if (c < 0x80) {
        u += char(c);
      } else {
        u += char(0xC0 | (c >> 6));
        u += char(0x80 | (c & 0x3F));
      }
      to_char[bs[i]] = u;
      to_byte[u] = uint8_t(bs[i]);
    }
  }
};
const ByteMap& byte_map() {
  static const ByteMap m;
  return m;
}

size_t utf8_len(unsigned char c) { return c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : 4; }

// `bytes` as valid UTF-8: each maximal ill-formed subpart becomes one U+FFFD (Unicode's recommended
// practice, as Rust's String::from_utf8_lossy in HF tokenizers and Python's errors="replace").
std::string utf8_lossy(const std::string& bytes) {
  static const char kReplacement[] = "\xEF\xBF\xBD";
  std::string out;
  out.reserve(bytes.size());
  const size_t n = bytes.size();
  for (size_t i = 0; i < n;) {
    const unsigned char c = static_cast<unsigned char>(bytes[i]);
    size_t need = 0;
    unsigned char lo = 0x80, hi = 0xBF;  // the range of the first continuation byte
    if (c < 0x80) {
      out += char(c);
      ++i;
      continue;
    } else if (c >= 0xC2 && c <= 0xDF) {
      need = 1;
    } else if (c >= 0xE0 && c <= 0xEF) {
      need = 2;
      if (c == 0xE0) lo = 0xA0;
      if (c == 0xED) hi = 0x9F;
    } else if (c >= 0xF0 && c <= 0xF4) {
      need = 3;
      if (c == 0xF0) lo = 0x90;
      if (c == 0xF4) hi = 0x8F;
    } else {  // 0x80-0xC1, 0xF5-0xFF never start a character
      out += kReplacement;
      ++i;
      continue;
    }
    size_t k = 1;  // bytes of this character that are well-formed so far
    for (; k <= need && i + k < n; ++k) {
      const unsigned char d = static_cast<unsigned char>(bytes[i + k]);
      if (d < (k == 1 ? lo : 0x80) || d > (k == 1 ? hi : 0xBF)) break;
    }
    if (k == need + 1) {
      out.append(bytes, i, k);
    } else {
      out += kReplacement;  // the maximal subpart [i, i + k); resume at the byte that broke it
    }
    i += k;
  }
  return out;
}

// The GPT-2 split pattern of tokenizers' ByteLevel pre-tokenizer.
const char* kByteLevelPattern = R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";
}  // namespace

struct Tokenizer::Impl {
  virtual ~Impl() = default;
  virtual std::vector<int32_t> encode(const std::string& text) const = 0;
  virtual std::string decode(const std::vector<int32_t>& ids) const = 0;
};

namespace {

class SentencePieceTokenizer : public Tokenizer::Impl {
 public:
  explicit SentencePieceTokenizer(const std::string& path) {
    auto st = sp_.Load(path);
    if (!st.ok()) tok_fail(path + ": not a SentencePiece model (" + st.ToString() + ")");
  }
  std::vector<int32_t> encode(const std::string& text) const override {
    std::vector<int> ids;
    auto st = sp_.Encode(text, &ids);
    if (!st.ok()) throw Error(ErrorCode::InvalidArgument, "SentencePiece failed on this text (" + st.ToString() + ")");
    return std::vector<int32_t>(ids.begin(), ids.end());
  }
  std::string decode(const std::vector<int32_t>& ids) const override {
    std::string out;
    std::vector<int> v(ids.begin(), ids.end());
    for (int id : v)
      if (id < 0 || id >= sp_.GetPieceSize())
        throw Error(ErrorCode::InvalidArgument, "token id " + std::to_string(id) + " is out of range for a vocabulary of " +
                                                    std::to_string(sp_.GetPieceSize()));
    auto st = sp_.Decode(v, &out);
    if (!st.ok()) throw Error(ErrorCode::InvalidArgument, "SentencePiece cannot decode these ids (" + st.ToString() + ")");
    return out;
  }

 private:
  sentencepiece::SentencePieceProcessor sp_;
};

class ByteLevelBPE : public Tokenizer::Impl {
 public:
  explicit ByteLevelBPE(const std::string& path) : path_(path) {
    std::ifstream in(path);
    json d;
    try {
      d = json::parse(in);
    } catch (const std::exception& e) {
      tok_fail(path + ": not valid JSON (" + std::string(e.what()).substr(0, 200) + ")");
    }
    if (!d.is_object()) tok_fail(path + ": expected a JSON object");
    auto unsupported = [&](const std::string& key, const json& v) {
      tok_fail(path + ": " + key + " " + v.dump().substr(0, 120) +
               " is not supported by the mtx C++ tokenizer (byte-level BPE: ByteLevel pre-tokenizer and "
               "decoder, no normalizer; or use a SentencePiece tokenizer.model)");
    };
    if (d.contains("normalizer") && !d["normalizer"].is_null()) unsupported("normalizer", d["normalizer"]);
    const json pre = d.value("pre_tokenizer", json());
    if (!pre.is_object() || pre.value("type", "") != "ByteLevel") unsupported("pre_tokenizer", pre);
    add_prefix_space_ = pre.value("add_prefix_space", false);
    use_regex_ = pre.value("use_regex", true);
    const json dec = d.value("decoder", json());
    if (!dec.is_null() && (!dec.is_object() || dec.value("type", "") != "ByteLevel")) unsupported("decoder", dec);
    const json post = d.value("post_processor", json());
    if (!post.is_null() && (!post.is_object() || post.value("type", "") != "ByteLevel")) unsupported("post_processor", post);
    const json model = d.value("model", json());
    if (!model.is_object() || model.value("type", "") != "BPE") unsupported("model", model.is_object() ? model.value("type", json()) : model);
    for (const char* key : {"dropout", "continuing_subword_prefix", "end_of_word_suffix"})
      if (model.contains(key) && !model[key].is_null()) unsupported(std::string("model.") + key, model[key]);
    if (model.value("byte_fallback", false)) unsupported("model.byte_fallback", true);
    ignore_merges_ = model.value("ignore_merges", false);
    if (!model.contains("vocab") || !model["vocab"].is_object()) tok_fail(path + ": model.vocab must be an object");
    for (auto it = model["vocab"].begin(); it != model["vocab"].end(); ++it) {
      vocab_[it.key()] = it.value().get<int32_t>();
      max_id_ = std::max(max_id_, it.value().get<int32_t>());
    }
    int rank = 0;
    for (const auto& m : model.value("merges", json::array())) {
      std::string a, b;
      if (m.is_string()) {
        const std::string s = m;
        const size_t sp = s.find(' ');
        if (sp == std::string::npos) tok_fail(path + ": merge '" + s + "' is not 'left right'");
        a = s.substr(0, sp);
        b = s.substr(sp + 1);
      } else if (m.is_array() && m.size() == 2) {
        a = m[0];
        b = m[1];
      } else {
        tok_fail(path + ": model.merges entries must be 'a b' strings or [a, b] pairs");
      }
      ranks_.emplace(a + '\x01' + b, rank++);
    }
    if (model.contains("unk_token") && model["unk_token"].is_string()) {
      auto it = vocab_.find(model["unk_token"].get<std::string>());
      if (it != vocab_.end()) unk_ = it->second;
    }
    for (const auto& t : d.value("added_tokens", json::array())) {
      if (t.value("lstrip", false) || t.value("rstrip", false) || t.value("single_word", false))
        unsupported("added_tokens[" + t.value("content", std::string()) + "] options", t);
      const std::string content = t.at("content");
      const int32_t id = t.at("id");
      added_.emplace_back(content, id);
      added_ids_[id] = {content, t.value("special", false)};
      max_id_ = std::max(max_id_, id);
    }
    std::sort(added_.begin(), added_.end(), [](const auto& x, const auto& y) { return x.first.size() > y.first.size(); });
    for (const auto& kv : vocab_) id_to_token_[kv.second] = kv.first;
    int err;
    PCRE2_SIZE off;
    re_ = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(kByteLevelPattern), PCRE2_ZERO_TERMINATED,
                        PCRE2_UTF | PCRE2_UCP, &err, &off, nullptr);
    if (!re_) tok_fail("internal: the ByteLevel pattern does not compile");
    pcre2_jit_compile(re_, PCRE2_JIT_COMPLETE);
  }
  ~ByteLevelBPE() override { pcre2_code_free(re_); }

  std::vector<int32_t> encode(const std::string& text) const override {
    std::vector<int32_t> out;
    // Added tokens are matched first (leftmost, then longest); the text between is pre-tokenized.
    size_t pos = 0, seg = 0;
    while (pos <= text.size()) {
      const std::pair<std::string, int32_t>* hit = nullptr;
      if (pos < text.size())
        for (const auto& a : added_)
          if (!a.first.empty() && text.compare(pos, a.first.size(), a.first) == 0) {
            hit = &a;
            break;
          }
      if (hit || pos == text.size()) {
        if (pos > seg) encode_segment(text.substr(seg, pos - seg), out);
        if (!hit) break;
        out.push_back(hit->second);
        pos += hit->first.size();
        seg = pos;
      } else {
        ++pos;
      }
    }
    return out;
  }

  std::string decode(const std::vector<int32_t>& ids) const override {
    // As HF tokenizers: special tokens are skipped, every other token (added ones too) goes to the
    // ByteLevel decoder: its characters mapped back to bytes (a token with a character outside the
    // byte map keeps its UTF-8 bytes), and all bytes decoded once as lossy UTF-8.
    std::string bytes;
    const auto& bm = byte_map();
    auto add_token = [&](const std::string& token) {
      std::string mapped;
      for (size_t i = 0; i < token.size();) {
        const size_t n = utf8_len(static_cast<unsigned char>(token[i]));
        auto it = bm.to_byte.find(token.substr(i, n));
        if (it == bm.to_byte.end()) {
          bytes += token;
          return;
        }
        mapped += char(it->second);
        i += n;
      }
      bytes += mapped;
    };
    for (int32_t id : ids) {
      auto a = added_ids_.find(id);
      if (a != added_ids_.end()) {
        if (!a->second.second) add_token(a->second.first);
        continue;
      }
      auto t = id_to_token_.find(id);
      if (t == id_to_token_.end())
        throw Error(ErrorCode::InvalidArgument, "token id " + std::to_string(id) + " is not in the vocabulary of " + path_);
      add_token(t->second);
    }
    return utf8_lossy(bytes);
  }

 private:
  void encode_segment(std::string s, std::vector<int32_t>& out) const {
    if (add_prefix_space_ && (s.empty() || s[0] != ' ')) s = " " + s;
    if (!use_regex_) return encode_word(s, out);
    pcre2_match_data* md = pcre2_match_data_create_from_pattern(re_, nullptr);
    size_t start = 0;
    while (start < s.size()) {
      int rc = pcre2_match(re_, reinterpret_cast<PCRE2_SPTR>(s.data()), s.size(), start, 0, md, nullptr);
      if (rc == PCRE2_ERROR_NOMATCH) {
        encode_word(s.substr(start), out);
        break;
      }
      if (rc < 0) {
        pcre2_match_data_free(md);
        throw Error(ErrorCode::InvalidArgument, "text is not valid UTF-8 (byte " + std::to_string(start) + ")");
      }
      PCRE2_SIZE* ov = pcre2_get_ovector_pointer(md);
      if (ov[0] > start) encode_word(s.substr(start, ov[0] - start), out);  // a gap is a piece too
      if (ov[1] == ov[0]) {  // empty match: cannot happen with this pattern; step one character
        start = ov[0] + utf8_len(static_cast<unsigned char>(s[ov[0]]));
        continue;
      }
      encode_word(s.substr(ov[0], ov[1] - ov[0]), out);
      start = ov[1];
    }
    pcre2_match_data_free(md);
  }

  // BPE of one pre-token: bytes -> byte-level symbols, then merges by rank (lowest first, leftmost).
  void encode_word(const std::string& piece, std::vector<int32_t>& out) const {
    const auto& bm = byte_map();
    std::string mapped;
    std::vector<std::string> sym;
    for (unsigned char c : piece) {
      sym.push_back(bm.to_char[c]);
      mapped += bm.to_char[c];
    }
    if (ignore_merges_) {
      auto it = vocab_.find(mapped);
      if (it != vocab_.end()) {
        out.push_back(it->second);
        return;
      }
    }
    while (sym.size() > 1) {
      int best = INT_MAX;
      for (size_t i = 0; i + 1 < sym.size(); ++i) {
        auto it = ranks_.find(sym[i] + '\x01' + sym[i + 1]);
        if (it != ranks_.end() && it->second < best) best = it->second;
      }
      if (best == INT_MAX) break;
      std::vector<std::string> next;
      for (size_t i = 0; i < sym.size();) {
        if (i + 1 < sym.size()) {
          auto it = ranks_.find(sym[i] + '\x01' + sym[i + 1]);
          if (it != ranks_.end() && it->second == best) {
            next.push_back(sym[i] + sym[i + 1]);
            i += 2;
            continue;
          }
        }
        next.push_back(sym[i++]);
      }
      sym.swap(next);
    }
    for (const auto& s : sym) {
      auto it = vocab_.find(s);
      if (it != vocab_.end())
        out.push_back(it->second);
      else if (unk_ >= 0)
        out.push_back(unk_);
      else
        throw Error(ErrorCode::InvalidArgument, path_ + ": piece '" + s + "' is not in the vocabulary and there is no unk_token");
    }
  }

  std::string path_;
  bool add_prefix_space_ = false, use_regex_ = true, ignore_merges_ = false;
  std::unordered_map<std::string, int32_t> vocab_;
  std::unordered_map<int32_t, std::string> id_to_token_;
  std::unordered_map<std::string, int> ranks_;
  std::vector<std::pair<std::string, int32_t>> added_;
  std::unordered_map<int32_t, std::pair<std::string, bool>> added_ids_;  // id -> (content, special)
  int32_t unk_ = -1, max_id_ = -1;
  pcre2_code* re_ = nullptr;
};

bool is_file(const std::string& p) {
  struct stat st{};
  return stat(p.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}
bool is_dir(const std::string& p) {
  struct stat st{};
  return stat(p.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}
}  // namespace

namespace {
// Mistral's own tokenizer files (mtx/tokenizer.py: tekken.json, tokenizer.model.v<N>[m<M>]), which
// mtx's Python runtime reads with mistral_common and this tokenizer does not read (yet).
bool is_mistral_file(const std::string& name) {
  const std::string spm = "tokenizer.model.v";
  return name == "tekken.json" || (name.compare(0, spm.size(), spm) == 0 && name.size() > spm.size() &&
                                   std::isdigit(static_cast<unsigned char>(name[spm.size()])));
}
std::string base_name(const std::string& path) {
  const size_t slash = path.find_last_of('/');
  return slash == std::string::npos ? path : path.substr(slash + 1);
}
[[noreturn]] void mistral_fail(const std::string& file) {
  tok_fail(file + ": Mistral's own tokenizer (read by mtx's Python runtime with mistral_common) is not read by "
                  "the mtx C++ tokenizer yet; give token ids instead of text");
}
}  // namespace

Tokenizer::Tokenizer(const std::string& path) {
  std::string file = path;
  if (is_dir(path)) {
    const std::string base = path.back() == '/' ? path : path + "/";
    file = is_file(base + "tokenizer.json") ? base + "tokenizer.json" : base + "tokenizer.model";
    if (!is_file(file)) {  // an export made with Mistral's tokenizer holds tekken.json or tokenizer.model.v<N>
      std::string mistral;
      if (DIR* d = opendir(path.c_str())) {
        while (dirent* e = readdir(d))
          if (is_mistral_file(e->d_name) && is_file(base + e->d_name) && (mistral.empty() || e->d_name < mistral))
            mistral = e->d_name;
        closedir(d);
      }
      if (!mistral.empty()) mistral_fail(base + mistral);
    }
  }
  if (is_mistral_file(base_name(file)) && is_file(file)) mistral_fail(file);
  if (!is_file(file)) tok_fail(file + ": no such tokenizer file (tokenizer.json or tokenizer.model)");
  if (file.size() >= 6 && file.compare(file.size() - 6, 6, ".model") == 0)
    impl_ = std::make_unique<SentencePieceTokenizer>(file);
  else
    impl_ = std::make_unique<ByteLevelBPE>(file);
}
Tokenizer::~Tokenizer() = default;
Tokenizer::Tokenizer(Tokenizer&&) noexcept = default;
Tokenizer& Tokenizer::operator=(Tokenizer&&) noexcept = default;
std::vector<int32_t> Tokenizer::encode(const std::string& text) const { return impl_->encode(text); }
std::string Tokenizer::decode(const std::vector<int32_t>& ids) const { return impl_->decode(ids); }

namespace {
bool ends_with_replacement(const std::string& s) {
  return s.size() >= 3 && s.compare(s.size() - 3, 3, "\xEF\xBF\xBD") == 0;
}
}  // namespace

std::string Detokenizer::push(int32_t id) {
  ids_.push_back(id);
  std::string text, done;
  try {
    text = tok_->decode(std::vector<int32_t>(ids_.begin() + prefix_, ids_.end()));
    if (ends_with_replacement(text)) return "";  // a later id may complete that character
    done = tok_->decode(std::vector<int32_t>(ids_.begin() + prefix_, ids_.begin() + read_));
  } catch (...) {
    ids_.pop_back();  // a refused id leaves the stream as it was
    throw;
  }
  // Decoded from the same window start, `done` is a prefix of `text` (the start's context, e.g.
  // SentencePiece's dropped leading space, affects both alike); hold while nothing is added.
  if (text.size() <= done.size() || text.compare(0, done.size(), done) != 0) return "";
  prefix_ = read_;
  read_ = ids_.size();
  return text.substr(done.size());
}

std::string Detokenizer::flush() {
  if (read_ == ids_.size()) return "";
  const std::string text = tok_->decode(std::vector<int32_t>(ids_.begin() + prefix_, ids_.end()));
  const std::string done = tok_->decode(std::vector<int32_t>(ids_.begin() + prefix_, ids_.begin() + read_));
  prefix_ = read_;  // as an emission: the next window starts where this text's ids start
  read_ = ids_.size();
  if (text.size() <= done.size() || text.compare(0, done.size(), done) != 0) return "";
  return text.substr(done.size());
}

}  // namespace mtx
