// Tokenizer: a byte-level BPE tokenizer.json (what the built-in models and HF Mistral/Mixtral use:
// ByteLevel pre-tokenizer with the GPT-2 regex, BPE with merges, ByteLevel decoder, added tokens),
// SentencePiece tokenizer.model (libsentencepiece), and Mistral's own files: tekken.json (Tekken, a
// tiktoken-style byte-level BPE with ranks, read here) and tokenizer.model.v<N>[m<M>] (SentencePiece
// models, read by libsentencepiece). Anything else in tokenizer.json is refused with one line naming
// the field.
#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>
#include <sentencepiece_processor.h>
#include <dirent.h>
#include <sys/stat.h>

#include <algorithm>
#include <cctype>
#include <climits>
#include <fstream>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <nlohmann/json.hpp>
#include <string_view>
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
  ByteLevelBPE(const std::string& path, const json& d) : path_(path) {
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

// Base64 (RFC 4648, with padding) of tekken.json's token_bytes; false on anything else.
bool base64_decode(const std::string& in, std::string& out) {
  auto value = [](char c) -> int {
    if (c >= 'A' && c <= 'Z') return c - 'A';
    if (c >= 'a' && c <= 'z') return c - 'a' + 26;
    if (c >= '0' && c <= '9') return c - '0' + 52;
    return c == '+' ? 62 : c == '/' ? 63 : -1;
  };
  out.clear();
  if (in.size() % 4 != 0) return false;
  for (size_t i = 0; i < in.size(); i += 4) {
    const size_t pad = i + 4 == in.size() ? (in[i + 3] == '=') + (in[i + 2] == '=' && in[i + 3] == '=') : 0;
    uint32_t v = 0;
    for (size_t k = 0; k < 4; ++k) {
      const int x = k >= 4 - pad ? 0 : value(in[i + k]);
      if (x < 0) return false;
      v = (v << 6) | uint32_t(x);
    }
    out += char(v >> 16);
    if (pad < 2) out += char((v >> 8) & 0xFF);
    if (pad < 1) out += char(v & 0xFF);
  }
  return true;
}

// Mistral's Tekken (tekken.json, mistral_common's Tekkenizer): a tiktoken-style byte-level BPE.
// The file: "config" {pattern, default_vocab_size, default_num_special_tokens, version "v<N>"};
// "vocab" [{rank, token_bytes (base64), token_str}], rank = index, ranks 0-255 the single bytes;
// "special_tokens" [{rank, token_str, is_control}] (required after v7; before, mistral_common's 20
// defaults). Ids: 0 .. S-1 the special tokens (S = default_num_special_tokens; those listed, then
// fillers), S + rank for the first default_vocab_size - S vocabulary entries (the rest unused).
// Encode (tiktoken's, special tokens never parsed from text): each match of the pattern is one token
// if its bytes are in the vocabulary, else its bytes merged pairwise, at each step the adjacent pair
// whose concatenation has the lowest rank (leftmost on ties); text between matches (never, with
// Mistral's patterns) is skipped as tiktoken skips it. Decode (mistral_common's
// SpecialTokenPolicy.IGNORE): special ids read as nothing, each run of other ids is its bytes as
// lossy UTF-8 (a character split by a special id reads as U+FFFD on both sides).
class Tekken : public Tokenizer::Impl {
 public:
  Tekken(const std::string& path, const json& d) : path_(path) {
    auto bad = [&](const std::string& what) { tok_fail(path + ": " + what + " (Mistral's tekken.json)"); };
    try {
      if (!d.is_object() || !d.contains("config") || !d["config"].is_object()) bad("no \"config\" object");
      const json& cfg = d["config"];
      auto count = [&](const char* key) -> int64_t {
        if (!cfg.contains(key) || !cfg[key].is_number_integer() || cfg[key].get<int64_t>() < 0 ||
            cfg[key].get<int64_t>() > INT32_MAX)
          bad(std::string("config.") + key + " must be a non-negative integer");
        return cfg[key].get<int64_t>();
      };
      const int64_t vocab_size = count("default_vocab_size"), nspecial = count("default_num_special_tokens");
      const std::string version = cfg.value("version", json()).is_string() ? cfg["version"].get<std::string>() : "";
      if (version.size() < 2 || version[0] != 'v' ||
          !std::all_of(version.begin() + 1, version.end(), [](char c) { return std::isdigit(static_cast<unsigned char>(c)); }))
        bad("config.version " + cfg.value("version", json()).dump() + " is not v<N>");
      const json specials = d.value("special_tokens", json());
      size_t listed = 20;  // mistral_common's defaults (<unk>, <s>, </s>, [INST], ...) before v8
      if (specials.is_null()) {
        if (std::stoi(version.substr(1)) > 7) bad("special_tokens is required for version " + version);
      } else if (!specials.is_array()) {
        bad("special_tokens must be a list");
      } else {
        listed = specials.size();
      }
      if (int64_t(listed) > nspecial)
        bad(std::to_string(listed) + " special tokens but config.default_num_special_tokens is " + std::to_string(nspecial));
      if (!d.contains("vocab") || !d["vocab"].is_array()) bad("no \"vocab\" list");
      const json& vocab = d["vocab"];
      const int64_t inner = vocab_size - nspecial;
      if (inner < 256 || inner > int64_t(vocab.size()))
        bad("config.default_vocab_size " + std::to_string(vocab_size) + " minus " + std::to_string(nspecial) +
            " special tokens must be between 256 and the vocab's " + std::to_string(vocab.size()) + " entries");
      vocab_size_ = int32_t(vocab_size);
      nspecial_ = int32_t(nspecial);
      tokens_.resize(size_t(inner));
      for (int64_t i = 0; i < inner; ++i) {
        const json& t = vocab[size_t(i)];
        if (!t.is_object() || t.value("rank", json()) != json(i) || !t.value("token_bytes", json()).is_string())
          bad("vocab[" + std::to_string(i) + "] is not {\"rank\": " + std::to_string(i) + ", \"token_bytes\": base64, ...}");
        if (!base64_decode(t["token_bytes"].get<std::string>(), tokens_[size_t(i)]) || tokens_[size_t(i)].empty())
          bad("vocab[" + std::to_string(i) + "].token_bytes is not base64 of at least one byte");
        if (i < 256 && tokens_[size_t(i)] != std::string(1, char(i)))
          bad("vocab[" + std::to_string(i) + "] must be the single byte " + std::to_string(i));
      }
      rank_.reserve(tokens_.size());
      for (size_t i = 0; i < tokens_.size(); ++i)
        if (!rank_.emplace(std::string_view(tokens_[i]), int32_t(i)).second)
          bad("vocab[" + std::to_string(i) + "] repeats the bytes of an earlier entry");
      if (!cfg.contains("pattern") || !cfg["pattern"].is_string()) bad("config.pattern must be a string");
      const std::string pattern = cfg["pattern"];
      int err;
      PCRE2_SIZE off;
      re_ = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(), PCRE2_UTF | PCRE2_UCP, &err,
                          &off, nullptr);
      if (!re_) {
        PCRE2_UCHAR msg[256];
        pcre2_get_error_message(err, msg, sizeof msg);
        bad("config.pattern does not compile at offset " + std::to_string(off) + " (" +
            reinterpret_cast<const char*>(msg) + ")");
      }
      pcre2_jit_compile(re_, PCRE2_JIT_COMPLETE);
    } catch (const json::exception& e) {
      bad(std::string("unexpected layout (") + e.what() + ")");
    }
  }
  ~Tekken() override { pcre2_code_free(re_); }

  std::vector<int32_t> encode(const std::string& text) const override {
    std::vector<int32_t> out;
    std::unique_ptr<pcre2_match_data, void (*)(pcre2_match_data*)> md(
        pcre2_match_data_create_from_pattern(re_, nullptr), pcre2_match_data_free);
    const auto* subject = reinterpret_cast<PCRE2_SPTR>(text.data());
    uint32_t options = 0;  // the first match checks that all the text is UTF-8; later ones need not
    for (size_t start = 0; start < text.size();) {
      const int rc = pcre2_match(re_, subject, text.size(), start, options, md.get(), nullptr);
      if (rc == PCRE2_ERROR_NOMATCH) break;
      if (rc < 0) {
        if (rc <= PCRE2_ERROR_UTF8_ERR1 && rc >= PCRE2_ERROR_UTF8_ERR21)
          throw Error(ErrorCode::InvalidArgument,
                      "text is not valid UTF-8 (byte " + std::to_string(pcre2_get_startchar(md.get())) + ")");
        PCRE2_UCHAR msg[256];
        pcre2_get_error_message(rc, msg, sizeof msg);
        throw Error(ErrorCode::InvalidArgument, path_ + ": the pattern failed on this text (" +
                                                    reinterpret_cast<const char*>(msg) + ")");
      }
      options = PCRE2_NO_UTF_CHECK;
      const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(md.get());
      if (ov[1] == ov[0]) {  // an empty match is no token; step over one character
        start = ov[0] + utf8_len(static_cast<unsigned char>(text[ov[0]]));
        continue;
      }
      encode_piece(std::string_view(text).substr(ov[0], ov[1] - ov[0]), out);
      start = ov[1];
    }
    return out;
  }

  std::string decode(const std::vector<int32_t>& ids) const override {
    std::string out, run;
    for (int32_t id : ids) {
      if (id < 0 || id >= vocab_size_)
        throw Error(ErrorCode::InvalidArgument, "token id " + std::to_string(id) +
                                                    " is out of range for a vocabulary of " + std::to_string(vocab_size_));
      if (id < nspecial_) {
        out += utf8_lossy(run);
        run.clear();
      } else {
        run += tokens_[size_t(id - nspecial_)];
      }
    }
    return out + utf8_lossy(run);
  }

 private:
  int32_t rank_of(std::string_view bytes) const {
    auto it = rank_.find(bytes);
    return it == rank_.end() ? INT32_MAX : it->second;
  }

  // One pre-token: its own token if it is one, else byte-pair merging by rank. Symbols are spans
  // [s, next[s]) of `piece` in a linked list; candidate merges wait in a min-heap on (rank of the
  // merged bytes, start), so each step takes tiktoken's choice (lowest rank, then leftmost) in
  // O(log n): a candidate is stale once its left symbol has gone or its right neighbour changed.
  void encode_piece(std::string_view piece, std::vector<int32_t>& out) const {
    if (int32_t r = rank_of(piece); r != INT32_MAX) {
      out.push_back(r + nspecial_);
      return;
    }
    const uint32_t n = uint32_t(piece.size());
    std::vector<uint32_t> next(n), prev(n);
    std::vector<char> alive(n, 1);
    struct Cand {
      int32_t rank;
      uint32_t start, end;
      bool operator>(const Cand& o) const { return rank != o.rank ? rank > o.rank : start > o.start; }
    };
    std::vector<Cand> heap;
    heap.reserve(n);
    auto consider = [&](uint32_t s, uint32_t e) {
      const int32_t r = rank_of(piece.substr(s, e - s));
      if (r != INT32_MAX) {
        heap.push_back({r, s, e});
        std::push_heap(heap.begin(), heap.end(), std::greater<Cand>());
      }
    };
    for (uint32_t i = 0; i < n; ++i) {
      next[i] = i + 1;
      prev[i] = i == 0 ? 0 : i - 1;
    }
    for (uint32_t i = 0; i + 1 < n; ++i) consider(i, i + 2);
    while (!heap.empty()) {
      std::pop_heap(heap.begin(), heap.end(), std::greater<Cand>());
      const Cand c = heap.back();
      heap.pop_back();
      if (!alive[c.start] || next[c.start] >= n || next[next[c.start]] != c.end) continue;  // stale
      const uint32_t right = next[c.start];
      alive[right] = 0;
      next[c.start] = c.end;
      if (c.end < n) prev[c.end] = c.start;
      if (c.start > 0) consider(prev[c.start], c.end);
      if (c.end < n) consider(c.start, next[c.end]);
    }
    for (uint32_t s = 0; s < n; s = next[s]) out.push_back(rank_of(piece.substr(s, next[s] - s)) + nspecial_);
  }

  std::string path_;
  int32_t vocab_size_ = 0, nspecial_ = 0;
  std::vector<std::string> tokens_;                      // rank -> bytes (never resized after loading)
  std::unordered_map<std::string_view, int32_t> rank_;  // bytes (views into tokens_) -> rank
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
// The version (N, "m<M>" or "") of a SentencePiece file name ending in .model.v<N>[m<M>] (mistral_common's
// is_sentencepiece; e.g. tokenizer.model.v3, mistral_instruct_tokenizer_241114.model.v7m1), or false.
bool spm_version(const std::string& name, std::pair<long, std::string>* version = nullptr) {
  const std::string mark = ".model.v";
  const size_t at = name.rfind(mark);
  if (at == std::string::npos) return false;
  const size_t i = at + mark.size();
  size_t j = i;
  while (j < name.size() && std::isdigit(static_cast<unsigned char>(name[j]))) ++j;
  if (j == i || j - i > 9) return false;
  const std::string minor = name.substr(j);
  if (!minor.empty() && (minor.size() < 2 || minor.size() > 10 || minor[0] != 'm' ||
                         !std::all_of(minor.begin() + 1, minor.end(), [](char c) { return std::isdigit(static_cast<unsigned char>(c)); })))
    return false;
  if (version) *version = {std::stol(name.substr(i, j - i)), minor};
  return true;
}
bool ends_with(const std::string& s, const std::string& tail) {
  return s.size() >= tail.size() && s.compare(s.size() - tail.size(), tail.size(), tail) == 0;
}
std::string base_name(const std::string& path) {
  const size_t slash = path.find_last_of('/');
  return slash == std::string::npos ? path : path.substr(slash + 1);
}
// The tokenizer of an export folder: tokenizer.json, else tokenizer.model, else Mistral's tekken.json,
// else the tokenizer.model.v<N>[m<M>] of the highest version (as mtx/tokenizer.py picks it).
std::string folder_tokenizer(const std::string& path) {
  const std::string base = path.back() == '/' ? path : path + "/";
  for (const char* name : {"tokenizer.json", "tokenizer.model", "tekken.json"})
    if (is_file(base + name)) return base + name;
  std::pair<std::pair<long, std::string>, std::string> best{{-1, ""}, ""};
  if (DIR* d = opendir(path.c_str())) {
    while (dirent* e = readdir(d)) {
      std::pair<long, std::string> v;
      if (std::string(e->d_name).rfind("tokenizer.model.v", 0) == 0 && spm_version(e->d_name, &v) && is_file(base + e->d_name) && std::make_pair(v, std::string(e->d_name)) > best)
        best = {v, e->d_name};
    }
    closedir(d);
  }
  if (best.second.empty())
    tok_fail(path + ": no tokenizer file (tokenizer.json, tokenizer.model, tekken.json or tokenizer.model.v<N>)");
  return base + best.second;
}
}  // namespace

Tokenizer::Tokenizer(const std::string& path) {
  const std::string file = is_dir(path) ? folder_tokenizer(path) : path;
  if (!is_file(file)) tok_fail(file + ": no such tokenizer file (tokenizer.json, tokenizer.model, tekken.json or tokenizer.model.v<N>)");
  const std::string name = base_name(file);
  if (ends_with(name, ".model") || spm_version(name)) {
    impl_ = std::make_unique<SentencePieceTokenizer>(file);
    return;
  }
  std::ifstream in(file);
  json d;
  try {
    d = json::parse(in);
  } catch (const std::exception& e) {
    tok_fail(file + ": not valid JSON (" + std::string(e.what()).substr(0, 200) + ")");
  }
  if (!d.is_object()) tok_fail(file + ": expected a JSON object");
  // tekken.json by name (mistral_common: a .json file with "tekken" in its name) or by its layout.
  const bool tekken = (name.find("tekken") != std::string::npos && ends_with(name, ".json")) ||
                      (!d.contains("model") && d.contains("config") && d["config"].is_object() && d.contains("vocab") &&
                       d["vocab"].is_array());
  if (tekken)
    impl_ = std::make_unique<Tekken>(file, d);
  else
    impl_ = std::make_unique<ByteLevelBPE>(file, d);
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
