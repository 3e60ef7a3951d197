// GoogleTest unit tests of the parts that need no export (ctest runs them; tests/test_cpp.py runs ctest).
#include <gtest/gtest.h>

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

TEST(OnnxRuntime, LibraryProvidesTheHeadersApi) {
  EXPECT_EQ(mtx::Model::ort_api_version(), 21);  // Debian trixie's libonnxruntime-dev 1.21 headers
  EXPECT_FALSE(mtx::Model::ort_version().empty());
}

}  // namespace
