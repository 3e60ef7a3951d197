// GoogleTest unit tests of the parts that need no export (ctest runs them; tests/test_cpp.py runs ctest).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <unistd.h>

#include "mtx/mtx.hpp"
#include "mtx/mtx_c.h"

namespace {

std::string temp_dir() {
  char tmpl[] = "/tmp/mtx_unit_XXXXXX";
  return mkdtemp(tmpl);
}

TEST(TokenRng, SplitMix64ReferenceSequence) {
  // The published SplitMix64 outputs for state 1234567 (Vigna's splitmix64.c; Rosetta Code).
  mtx::TokenRng rng(0);
  rng.state = 1234567;
  const uint64_t want[] = {6457827717110365317ULL, 3203168211198807973ULL, 9817491932198370423ULL,
                           4593380528125082431ULL, 16408922859458223821ULL};
  for (uint64_t w : want) EXPECT_EQ(rng.next_u64(), w);
}

TEST(TokenRng, SeedAndStreams) {
  mtx::TokenRng a(42), b(42, 1);
  EXPECT_EQ(a.state, mtx::TokenRng::mix64(42));
  EXPECT_EQ(b.state, mtx::TokenRng::mix64(42) ^ 1);
  mtx::TokenRng c(42);
  const uint64_t first = c.next_u64();
  mtx::TokenRng d(42);
  EXPECT_EQ(double(first >> 11) / 9007199254740992.0, d.uniform());
}

TEST(SelectToken, GreedyTakesTheFirstMaximum) {
  const float logits[] = {0.5f, 3.0f, 3.0f, -1.0f};
  EXPECT_EQ(mtx::select_token(logits, 4, {}, nullptr), 1);
}

TEST(SelectToken, RepetitionPenaltyDividesPositiveMultipliesNegative) {
  const float logits[] = {2.0f, 1.9f, -1.0f, -1.5f};
  mtx::SamplingOptions o;
  o.repetition_penalty = 2.0;
  std::vector<int32_t> seen = {0, 0};
  EXPECT_EQ(mtx::select_token(logits, 4, o, nullptr, &seen), 1);  // 2.0 / 2 = 1.0 < 1.9
  const float neg[] = {-1.0f, -1.5f};
  std::vector<int32_t> seen0 = {0};
  EXPECT_EQ(mtx::select_token(neg, 2, o, nullptr, &seen0), 1);  // -1 * 2 = -2 < -1.5
}

TEST(SelectToken, InverseCdfInIdOrder) {
  const float logits[] = {1.0f, 1.0f, 1.0f, 1.0f};  // probabilities 1/4 each
  mtx::SamplingOptions o;
  o.temperature = 1.0;
  for (uint64_t seed = 0; seed < 50; ++seed) {
    mtx::TokenRng rng(seed), copy(seed);
    const double u = copy.uniform();
    EXPECT_EQ(mtx::select_token(logits, 4, o, &rng), int(std::floor(u * 4)));
  }
}

TEST(SelectToken, TopKAndTopPKeepOnlyTheBest) {
  const float logits[] = {0.1f, 2.0f, 0.3f, 0.2f, 1.9f};
  mtx::SamplingOptions k1;
  k1.temperature = 5.0;
  k1.top_k = 1;
  mtx::SamplingOptions p;
  p.temperature = 1.0;
  p.top_p = 1e-6;
  for (uint64_t seed = 0; seed < 20; ++seed) {
    mtx::TokenRng r1(seed), r2(seed);
    EXPECT_EQ(mtx::select_token(logits, 5, k1, &r1), 1);
    EXPECT_EQ(mtx::select_token(logits, 5, p, &r2), 1);
  }
  mtx::SamplingOptions k2;
  k2.temperature = 100.0;
  k2.top_k = 2;
  for (uint64_t seed = 0; seed < 50; ++seed) {
    mtx::TokenRng r(seed);
    const int t = mtx::select_token(logits, 5, k2, &r);
    EXPECT_TRUE(t == 1 || t == 4) << t;
  }
}

TEST(SamplingOptions, ValidateNamesTheOption) {
  mtx::SamplingOptions o;
  o.top_p = 0;
  try {
    o.validate();
    FAIL();
  } catch (const mtx::Error& e) {
    EXPECT_EQ(e.code(), mtx::ErrorCode::InvalidArgument);
    EXPECT_NE(std::string(e.what()).find("top_p"), std::string::npos);
  }
  o = {};
  o.seed = uint64_t(1) << 63;
  EXPECT_THROW(o.validate(), mtx::Error);
}

mtx::GenerationRequest request(int max_new, std::vector<int32_t> stops, mtx::SamplingOptions o = {}) {
  mtx::GenerationRequest r;  // made by hand: make_request needs a Model
  r.prompts = {{0}, {3, 3}};
  r.max_new_tokens = max_new;
  r.sampling = o;
  r.stop_ids = std::move(stops);
  return r;
}

TEST(RowDecoder, StopIdThenLengthThenCancel) {
  const float logits[] = {0.0f, 5.0f, 1.0f, 2.0f};
  auto stop = request(3, {1});
  mtx::RowDecoder a(stop, 0);
  EXPECT_EQ(a.step(logits, 4), 1);
  EXPECT_EQ(a.finish_reason(), mtx::FinishReason::Stop);  // the stop id is included
  EXPECT_EQ(a.generated(), std::vector<int32_t>{1});
  EXPECT_THROW(a.step(logits, 4), mtx::Error);
  auto len = request(2, {});
  mtx::RowDecoder b(len, 1);
  b.step(logits, 4);
  EXPECT_FALSE(b.done());
  b.step(logits, 4);
  EXPECT_EQ(b.finish_reason(), mtx::FinishReason::Length);
  EXPECT_EQ(b.sequence(), (std::vector<int32_t>{3, 3, 1, 1}));
  b.cancel();  // a finished row keeps its reason
  EXPECT_EQ(b.finish_reason(), mtx::FinishReason::Length);
  mtx::RowDecoder c(len, 0);
  c.cancel();
  EXPECT_STREQ(mtx::to_string(c.finish_reason()), "cancelled");
  mtx::RowDecoder none(request(0, {}), 0);
  EXPECT_EQ(none.finish_reason(), mtx::FinishReason::Length);
}

TEST(RowDecoder, RowRSamplesStreamRWithItsSequence) {
  const float logits[] = {1.0f, 1.2f, 0.9f, 1.1f, 0.3f};
  mtx::SamplingOptions o;
  o.temperature = 1.0;
  o.repetition_penalty = 1.3;
  o.seed = 77;
  auto req = request(20, {}, o);
  mtx::RowDecoder row(req, 1);
  mtx::TokenRng rng(77, 1);
  std::vector<int32_t> seq = {3, 3};
  while (!row.done()) {
    const int32_t want = mtx::select_token(logits, 5, o, &rng, &seq);
    seq.push_back(want);
    EXPECT_EQ(row.step(logits, 5), want);
  }
  EXPECT_EQ(row.sequence(), seq);
}

// A byte-level BPE tokenizer.json whose vocabulary is the 256 byte symbols (id = byte) and </s> (256).
std::string byte_tokenizer() {
  std::vector<int> bs, cs;
  for (int b = 0; b < 256; ++b)
    if ((b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || b >= 0xAE) bs.push_back(b);
  cs = bs;
  for (int b = 0, n = 0; b < 256; ++b)
    if (std::find(bs.begin(), bs.end(), b) == bs.end()) {
      bs.push_back(b);
      cs.push_back(256 + n++);
    }
  nlohmann::json vocab = nlohmann::json::object();
  for (size_t i = 0; i < bs.size(); ++i) {
    const int c = cs[i];
    std::string u = c < 0x80 ? std::string(1, char(c)) : std::string{char(0xC0 | (c >> 6)), char(0x80 | (c & 0x3F))};
    vocab[u] = bs[i];
  }
  vocab["</s>"] = 256;
  nlohmann::json tj = {{"pre_tokenizer", {{"type", "ByteLevel"}, {"add_prefix_space", false}}},
                       {"decoder", {{"type", "ByteLevel"}}},
                       {"model", {{"type", "BPE"}, {"vocab", vocab}, {"merges", nlohmann::json::array()}}},
                       {"added_tokens", {{{"id", 256}, {"content", "</s>"}, {"special", true}}}}};
  const std::string path = temp_dir() + "/tokenizer.json";
  std::ofstream(path) << tj.dump();
  return path;
}

TEST(Tokenizer, ByteLevelDecodeIsLossyUtf8) {
  mtx::Tokenizer tok(byte_tokenizer());
  const std::string r = "\xEF\xBF\xBD";
  EXPECT_EQ(tok.decode({0xE6, 'a'}), r + "a");
  EXPECT_EQ(tok.decode({0xF0, 0x9F}), r);                  // one maximal ill-formed subpart
  EXPECT_EQ(tok.decode({0xED, 0xA0, 0x80}), r + r + r);   // a surrogate: three
  EXPECT_EQ(tok.decode({0xE6, 256, 0x97, 0xA5}), "\xE6\x97\xA5");  // special tokens are skipped
}

TEST(Detokenizer, HoldsIncompleteCharactersAndFlushes) {
  mtx::Tokenizer tok(byte_tokenizer());
  mtx::Detokenizer d(tok);
  std::vector<std::string> got;
  for (int32_t id : std::vector<int32_t>{'a', 0xE6, 256, 0x97, 0xA5, 'b', 0xF0, 0x9F}) got.push_back(d.push(id));
  EXPECT_EQ(got, (std::vector<std::string>{"a", "", "", "", "\xE6\x97\xA5", "b", "", ""}));
  EXPECT_EQ(d.flush(), "\xEF\xBF\xBD");  // an unfinished character: U+FFFD, as decode gives
  EXPECT_EQ(d.flush(), "");
  EXPECT_EQ(d.push('c'), "c");
  EXPECT_THROW(d.push(9999), mtx::Error);
  EXPECT_EQ(d.ids().size(), 9u);  // a refused id is not kept
}

TEST(Sha256, KnownDigest) {
  const std::string dir = temp_dir(), path = dir + "/abc";
  std::ofstream(path) << "abc";
  EXPECT_EQ(mtx::sha256_file(path), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
}

TEST(CApi, StatusAndMessageNoCrash) {
  mtx_model* model = reinterpret_cast<mtx_model*>(1);
  EXPECT_EQ(mtx_model_open("/nonexistent/mtx-export", 0, 1, &model), MTX_INVALID_EXPORT);
  EXPECT_EQ(model, nullptr);
  EXPECT_NE(std::string(mtx_last_error()).find("/nonexistent/mtx-export"), std::string::npos);
  EXPECT_EQ(mtx_session_append(nullptr, nullptr, 0), MTX_INVALID_ARGUMENT);
  EXPECT_NE(std::string(mtx_last_error()).find("session is NULL"), std::string::npos);
  mtx_tokenizer* tok = nullptr;
  EXPECT_EQ(mtx_tokenizer_open("/nonexistent/tokenizer.json", &tok), MTX_TOKENIZER_ERROR);
}

TEST(Tokenizer, UnsupportedFeatureIsNamed) {
  const std::string dir = temp_dir();
  std::ofstream(dir + "/tokenizer.json") << R"({"normalizer": {"type": "NFC"}, "pre_tokenizer": null, "model": {}})";
  try {
    mtx::Tokenizer t(dir);
    FAIL();
  } catch (const mtx::Error& e) {
    EXPECT_EQ(e.code(), mtx::ErrorCode::Tokenizer);
    EXPECT_NE(std::string(e.what()).find("normalizer"), std::string::npos) << e.what();
  }
}

// A Tekken file: the 256 bytes, then "aa", "bc", "ab" (ranks 256-258); 3 special ids (2 listed, 1 filler).
nlohmann::json tiny_tekken() {
  auto b64 = [](const std::string& s) {
    static const char* abc = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    std::string out;
    for (size_t i = 0; i < s.size(); i += 3) {
      uint32_t v = uint32_t(uint8_t(s[i])) << 16;
      if (i + 1 < s.size()) v |= uint32_t(uint8_t(s[i + 1])) << 8;
      if (i + 2 < s.size()) v |= uint8_t(s[i + 2]);
      for (size_t k = 0; k < 4; ++k) out += i + k <= s.size() ? abc[(v >> (18 - 6 * k)) & 63] : '=';
    }
    return out;
  };
  nlohmann::json vocab = nlohmann::json::array();
  for (int i = 0; i < 256; ++i) vocab.push_back({{"rank", i}, {"token_bytes", b64(std::string(1, char(i)))}, {"token_str", nullptr}});
  for (const char* t : {"aa", "bc", "ab"})
    vocab.push_back({{"rank", vocab.size()}, {"token_bytes", b64(t)}, {"token_str", t}});
  return {{"config", {{"pattern", R"(\S+|\s+)"}, {"default_vocab_size", 262}, {"default_num_special_tokens", 3},
                      {"version", "v13"}, {"num_vocab_tokens", 259}}},
          {"vocab", vocab},
          {"special_tokens", {{{"rank", 0}, {"token_str", "<unk>"}, {"is_control", true}},
                              {{"rank", 1}, {"token_str", "<s>"}, {"is_control", true}}}}};
}
std::string write_tekken(const nlohmann::json& d) {
  const std::string dir = temp_dir();
  std::ofstream(dir + "/tekken.json") << d.dump();
  return dir;
}

TEST(Tokenizer, TekkenMergesByRankLeftmostFirst) {
  mtx::Tokenizer tok(write_tekken(tiny_tekken()));  // the folder: tekken.json
  const int32_t s = 3, aa = s + 256, bc = s + 257, ab = s + 258;
  EXPECT_EQ(tok.encode("aaa abc bca ab"),
            (std::vector<int32_t>{aa, s + 'a', s + ' ', s + 'a', bc, s + ' ', bc, s + 'a', s + ' ', ab}));
  EXPECT_EQ(tok.encode("<s>"), (std::vector<int32_t>{s + '<', s + 's', s + '>'}));  // never a control id
  const std::string r = "\xEF\xBF\xBD";
  EXPECT_EQ(tok.decode({s + 0xE6, s + 0x97, s + 0xA5, 0, 1, 2}), "\xE6\x97\xA5");
  EXPECT_EQ(tok.decode({s + 0xE6, 1, s + 0x97, s + 0xA5, aa}), r + r + r + "aa");  // each run decoded alone
  EXPECT_THROW(tok.decode({262}), mtx::Error);
  EXPECT_THROW(tok.decode({-1}), mtx::Error);
  try {
    tok.encode("ok \xFF");
    FAIL();
  } catch (const mtx::Error& e) {
    EXPECT_EQ(e.code(), mtx::ErrorCode::InvalidArgument);
    EXPECT_NE(std::string(e.what()).find("UTF-8 (byte 3)"), std::string::npos) << e.what();
  }
}

TEST(Tokenizer, BadTekkenIsNamed) {
  auto refused = [](const nlohmann::json& d, const std::string& words) {
    const std::string dir = write_tekken(d);
    try {
      mtx::Tokenizer t(dir + "/tekken.json");
      ADD_FAILURE() << words;
    } catch (const mtx::Error& e) {
      EXPECT_EQ(e.code(), mtx::ErrorCode::Tokenizer);
      EXPECT_NE(std::string(e.what()).find(words), std::string::npos) << e.what();
      EXPECT_NE(std::string(e.what()).find(dir + "/tekken.json"), std::string::npos) << e.what();
    }
  };
  auto d = tiny_tekken();
  d.erase("special_tokens");
  refused(d, "special_tokens is required for version v13");
  d = tiny_tekken();
  d["config"]["version"] = 3;
  refused(d, "config.version 3 is not v<N>");
  d = tiny_tekken();
  d["vocab"][257]["rank"] = 7;
  refused(d, "vocab[257] is not");
  d = tiny_tekken();
  d["vocab"][258]["token_bytes"] = "YW=";
  refused(d, "vocab[258].token_bytes");
  d = tiny_tekken();
  d["vocab"][257]["token_bytes"] = d["vocab"][256]["token_bytes"];
  refused(d, "vocab[257] repeats");
  d = tiny_tekken();
  d["config"]["default_vocab_size"] = 300;
  refused(d, "config.default_vocab_size 300");
  d = tiny_tekken();
  d["config"]["pattern"] = "(";
  refused(d, "config.pattern does not compile");
  refused(nlohmann::json::object(), "no \"config\" object");
}

TEST(Tokenizer, FolderPicksMistralsSentencePieceFile) {
  const std::string dir = temp_dir();
  std::ofstream(dir + "/tokenizer.model.v3") << "not a model";
  std::ofstream(dir + "/tokenizer.model.v7m1") << "not a model";
  std::ofstream(dir + "/tokenizer.model.v10x") << "not a model";  // not a version: ignored
  try {
    mtx::Tokenizer t(dir);
    FAIL();
  } catch (const mtx::Error& e) {
    EXPECT_NE(std::string(e.what()).find(dir + "/tokenizer.model.v7m1: not a SentencePiece model"), std::string::npos)
        << e.what();
  }
  try {
    mtx::Tokenizer t(temp_dir());
    FAIL();
  } catch (const mtx::Error& e) {
    EXPECT_NE(std::string(e.what()).find("no tokenizer file"), std::string::npos) << e.what();
  }
}

TEST(OnnxRuntime, LibraryProvidesTheHeadersApi) {
  EXPECT_EQ(mtx::Model::ort_api_version(), 21);  // Debian trixie's libonnxruntime-dev 1.21 headers
  EXPECT_FALSE(mtx::Model::ort_version().empty());
}

// ---- KV layout arithmetic (docs/ops.md §1 rules 7, 10, 12) ---------------------------------------
using mtx::kv::Layout;

TEST(KvLayout, CanonicalChunksEndAtMultiplesOfTheBlock) {
  using V = std::vector<int64_t>;
  EXPECT_EQ(mtx::kv::canonical_chunks(0, 12, 5), (V{5, 5, 2}));
  EXPECT_EQ(mtx::kv::canonical_chunks(7, 10, 5), (V{3, 5, 2}));  // 7..9, 10..14, 15..16
  EXPECT_EQ(mtx::kv::canonical_chunks(5, 5, 5), (V{5}));
  EXPECT_EQ(mtx::kv::canonical_chunks(3, 1, 5), (V{1}));
  EXPECT_EQ(mtx::kv::canonical_chunks(9, 0, 5), (V{}));
  EXPECT_EQ(mtx::kv::canonical_chunks(255, 300, 256), (V{1, 256, 43}));
}

TEST(KvLayout, SlotAtByHand) {
  EXPECT_EQ(mtx::kv::slot_at(Layout::Ring, 9, 12, 8, 8), 1);
  EXPECT_EQ(mtx::kv::slot_at(Layout::Ring, 4, 12, 12, 8), 4);
  EXPECT_EQ(mtx::kv::slot_at(Layout::OrtWindow, 5, 10, 12, 8), 5);  // p <= C: row q
  EXPECT_EQ(mtx::kv::slot_at(Layout::OrtWindow, 4, 12, 12, 8), 4);
  // C = W: the last W positions in rows 0..W-1.
  EXPECT_EQ(mtx::kv::slot_at(Layout::OrtWindow, 6, 14, 8, 8), 0);
  EXPECT_EQ(mtx::kv::slot_at(Layout::OrtWindow, 13, 14, 8, 8), 7);
  // C = 12, W = 8 (measured with ONNX Runtime 1.32): at 13..17 row 0 holds 5, at 18..22 it holds 10.
  EXPECT_EQ(mtx::kv::slot_at(Layout::OrtWindow, 5, 13, 12, 8), 0);
  EXPECT_EQ(mtx::kv::slot_at(Layout::OrtWindow, 6, 14, 12, 8), 1);
  EXPECT_EQ(mtx::kv::slot_at(Layout::OrtWindow, 16, 17, 12, 8), 11);
  EXPECT_EQ(mtx::kv::slot_at(Layout::OrtWindow, 17, 18, 12, 8), 7);
  EXPECT_EQ(mtx::kv::slot_at(Layout::OrtWindow, 23, 24, 12, 8), 8);
  EXPECT_THROW(mtx::kv::slot_at(Layout::OrtWindow, 4, 14, 12, 8), mtx::Error);  // not held at 14
  EXPECT_THROW(mtx::kv::slot_at(Layout::OrtWindow, 5, 14, 8, 8), mtx::Error);
  EXPECT_THROW(mtx::kv::slot_at(Layout::Ring, 14, 14, 12, 8), mtx::Error);
}

TEST(KvLayout, VerifySavedByHand) {
  auto span = [](mtx::kv::Span s) { return std::make_pair(s.begin, s.empty() ? s.begin : s.end); };
  using P = std::pair<int64_t, int64_t>;
  EXPECT_EQ(span(mtx::kv::verify_saved(Layout::Ring, 20, 3, 8, 8)), (P{13, 16}));
  EXPECT_TRUE(mtx::kv::verify_saved(Layout::Ring, 20, 3, 12, 8).empty());  // C >= W + k
  EXPECT_TRUE(mtx::kv::verify_saved(Layout::Ring, 20, 4, 12, 8).empty());
  EXPECT_EQ(span(mtx::kv::verify_saved(Layout::Ring, 20, 5, 12, 8)), (P{13, 14}));
  EXPECT_EQ(span(mtx::kv::verify_saved(Layout::Ring, 20, 3, 10, 8)), (P{13, 14}));
  EXPECT_TRUE(mtx::kv::verify_saved(Layout::Ring, 2, 3, 8, 8).empty());  // nothing overwritten yet
  EXPECT_TRUE(mtx::kv::verify_saved(Layout::OrtWindow, 10, 1, 12, 8).empty());  // ends at C: no shift
  EXPECT_EQ(span(mtx::kv::verify_saved(Layout::OrtWindow, 10, 3, 12, 8)), (P{3, 5}));  // row 0 holds 5 at 14
  EXPECT_TRUE(mtx::kv::verify_saved(Layout::OrtWindow, 13, 3, 12, 8).empty());  // 13..17 share row 0 = 5
  EXPECT_EQ(span(mtx::kv::verify_saved(Layout::OrtWindow, 14, 3, 12, 8)), (P{7, 10}));  // 18: row 0 = 10
  EXPECT_EQ(span(mtx::kv::verify_saved(Layout::OrtWindow, 15, 3, 12, 8)), (P{8, 10}));  // 19: row 0 = 10
  EXPECT_EQ(span(mtx::kv::verify_saved(Layout::OrtWindow, 20, 3, 8, 8)), (P{13, 16}));
  EXPECT_EQ(span(mtx::kv::verify_saved(Layout::OrtWindow, 20, 7, 8, 8)), (P{13, 20}));
  EXPECT_THROW(mtx::kv::verify_saved(Layout::Ring, 20, 8, 8, 8), mtx::Error);  // k > W - 1
}

// An independent model of a row's buffer: each slot holds the label (position) written there, -1 if
// none. A call feeding positions p..e-1 writes them as the layout does, written here from the spec
// and the measurement, not from kv::slot_at: `Ring` slot q mod C (rule 6); `OrtWindow` as ONNX
// Runtime 1.32 was measured to (tests/test_cpp.py checks it on real buffers): positions go to
// consecutive rows, and a position that would go to row C first moves the last W - 1 positions to
// rows 0..W-2 (the new one goes to row W - 1). The result depends on e only, not on how the
// positions were split into calls.
struct SimBuffer {
  Layout layout;
  int64_t C, W, next_row = 0;
  std::vector<int64_t> slot;
  SimBuffer(Layout l, int64_t c, int64_t w) : layout(l), C(c), W(w), slot(size_t(c), -1) {}
  void call(int64_t p, int64_t e) {  // positions p..e-1 (their labels)
    for (int64_t q = p; q < e; ++q) {
      if (layout == Layout::Ring) {
        slot[size_t(q % C)] = q;
        continue;
      }
      if (next_row == C) {
        std::vector<int64_t> last(slot.end() - (W - 1), slot.end());
        std::copy(last.begin(), last.end(), slot.begin());
        next_row = W - 1;
      }
      slot[size_t(next_row++)] = q;
    }
  }
};

// Where a row at position e holds each position, fed one token at a time from 0 (the plain decoding
// layout every other state must match on live positions).
std::vector<int64_t> plain_layout(Layout l, int64_t C, int64_t W, int64_t e) {
  SimBuffer b(l, C, W);
  for (int64_t q = 0; q < e; ++q) b.call(q, q + 1);
  return b.slot;
}

TEST(KvLayout, VerifyRollbackRestoresThePlainState) {
  int checked = 0, with_moves = 0;
  for (Layout layout : {Layout::Ring, Layout::OrtWindow})
    for (int64_t W : {4, 8})
      for (int64_t C : {W, W + 1, W + 3, W + 4, W + 9})
        for (int64_t p = 0; p < 3 * C + 4; ++p)
          for (int64_t k = 1; k <= W - 1; ++k)
            for (int64_t a = 0; a <= k; ++a) {
              SimBuffer b(layout, C, W);
              b.call(0, p);
              const auto saved = mtx::kv::verify_saved(layout, p, k, C, W);
              std::vector<int64_t> kept;
              for (int64_t q = saved.begin; q < saved.end; ++q)
                kept.push_back(b.slot[size_t(mtx::kv::slot_at(layout, q, p, C, W))]);
              b.call(p, p + k + 1);
              const auto moves = mtx::kv::verify_restore(layout, p, k, a, C, W);
              for (const auto& m : moves) ASSERT_TRUE(m.from_saved || b.slot[size_t(m.source)] == m.position);
              std::vector<int64_t> after = b.slot;
              for (const auto& m : moves) after[size_t(m.dest)] = m.from_saved ? kept[size_t(m.source)] : b.slot[size_t(m.source)];
              const int64_t next = p + a + 1;
              const auto want = plain_layout(layout, C, W, next);
              for (int64_t q = std::max<int64_t>(0, next - W); q < next; ++q) {
                const auto at = std::find(want.begin(), want.end(), q) - want.begin();
                ASSERT_LT(at, C);
                ASSERT_EQ(after[size_t(at)], q) << "layout " << int(layout) << " C " << C << " W " << W << " p " << p
                                                << " k " << k << " a " << a;
              }
              if (layout == Layout::Ring && C >= W + k) EXPECT_TRUE(moves.empty() && saved.empty());
              if (a == k) EXPECT_TRUE(moves.empty());
              ++checked;
              with_moves += !moves.empty();
            }
  EXPECT_GT(checked, 1000);
  EXPECT_GT(with_moves, 100);  // rollbacks that copy do occur
}

TEST(KvLayout, SlotAtMatchesThePlainLayout) {
  for (Layout layout : {Layout::Ring, Layout::OrtWindow})
    for (int64_t C : {8, 10, 12, 16})
      for (int64_t p = 1; p < 60; ++p) {
        const auto want = plain_layout(layout, C, 8, p);
        for (int64_t q = std::max<int64_t>(0, p - 8); q < p; ++q)
          EXPECT_EQ(want[size_t(mtx::kv::slot_at(layout, q, p, C, 8))], q) << p << " " << q;
      }
}

TEST(NgramDraft, LatestMatchOfTheLongestSuffix) {
  using V = std::vector<int32_t>;
  EXPECT_EQ(mtx::kv::ngram_draft({1, 2, 3, 9, 1, 2, 3}, 3, 3, 1), (V{9, 1, 2}));
  EXPECT_EQ(mtx::kv::ngram_draft({1, 2, 3, 9, 1, 2, 3}, 8, 3, 1), (V{9, 1, 2, 3}));  // shorter: the context ends
  EXPECT_EQ(mtx::kv::ngram_draft({5, 6, 5, 7, 5}, 3, 3, 1), (V{7, 5}));  // n = 1, the latest earlier 5
  EXPECT_EQ(mtx::kv::ngram_draft({5, 6, 5, 7, 5}, 3, 3, 2), (V{}));      // no 2-gram [7, 5] before
  EXPECT_EQ(mtx::kv::ngram_draft({4, 1, 2, 8, 1, 2, 9, 2}, 2, 2, 1), (V{9, 2}));  // [2] latest at 5
  EXPECT_EQ(mtx::kv::ngram_draft({4, 1, 2, 8, 3, 1, 2}, 2, 2, 1), (V{8, 3}));  // the 2-gram [1, 2] first
  EXPECT_EQ(mtx::kv::ngram_draft({7, 7, 7}, 4, 3, 1), (V{7}));  // n = 2: [7, 7] at 0, draft context[2:]
  EXPECT_EQ(mtx::kv::ngram_draft({1, 2, 1}, 0, 3, 1), (V{}));   // k' < 1
  EXPECT_EQ(mtx::kv::ngram_draft({3}, 4, 3, 1), (V{}));
}

TEST(Speculative, OptionsAreChecked) {
  mtx::SpeculativeOptions o;
  EXPECT_NO_THROW(o.validate());
  o.num_tokens = -1;
  EXPECT_THROW(o.validate(), mtx::Error);
  o = {};
  o.prompt_lookup_min = 0;
  EXPECT_THROW(o.validate(), mtx::Error);
  o = {};
  o.prompt_lookup_max = 0;
  EXPECT_THROW(o.validate(), mtx::Error);
}

}  // namespace
