// Token selection: the exact mirror of mtx/runtime/sampling.py (select_token, TokenRng).
#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <random>
#include <set>

#include "mtx/mtx.hpp"

namespace mtx {

namespace {
constexpr uint64_t kGolden = 0x9E3779B97F4A7C15ULL;

[[noreturn]] void bad(const std::string& msg) { throw Error(ErrorCode::InvalidArgument, msg); }

// numpy's float64 sum (pairwise, 8-way unrolled blocks of 128), so `probs /= probs.sum()` rounds alike.
double pairwise_sum(const double* a, int64_t n) {
  if (n < 8) {
    double res = 0.;
    for (int64_t i = 0; i < n; ++i) res += a[i];
    return res;
  }
  if (n <= 128) {
    double r[8];
    for (int j = 0; j < 8; ++j) r[j] = a[j];
    int64_t i = 8;
    for (; i < n - (n % 8); i += 8)
      for (int j = 0; j < 8; ++j) r[j] += a[i + j];
    double res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
    for (; i < n; ++i) res += a[i];
    return res;
  }
  int64_t n2 = n / 2;
  n2 -= n2 % 8;
  return pairwise_sum(a, n2) + pairwise_sum(a + n2, n - n2);
}
}  // namespace

void SamplingOptions::validate() const {
  if (!std::isfinite(temperature)) bad("temperature must be a finite number");
  if (!std::isfinite(top_p)) bad("top_p must be a finite number");
  if (!std::isfinite(repetition_penalty)) bad("repetition_penalty must be a finite number");
  if (temperature < 0) bad("temperature must be >= 0, got " + std::to_string(temperature));
  if (top_k < 0) bad("top_k must be >= 0, got " + std::to_string(top_k));
  if (!(top_p > 0 && top_p <= 1)) bad("top_p must be in (0, 1], got " + std::to_string(top_p));
  if (!(repetition_penalty > 0)) bad("repetition_penalty must be > 0, got " + std::to_string(repetition_penalty));
  if (seed && *seed >= (uint64_t(1) << 63)) bad("seed must be an integer in [0, 2**63)");
}

uint64_t TokenRng::mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

TokenRng::TokenRng(std::optional<uint64_t> seed, uint64_t stream) {
  uint64_t s;
  if (seed) {
    s = *seed;
  } else {
    std::random_device rd;
    s = ((uint64_t(rd()) << 32) ^ rd()) & ((uint64_t(1) << 63) - 1);
  }
  state = mix64(s) ^ stream;
}

uint64_t TokenRng::next_u64() {
  state += kGolden;
  return mix64(state);
}

double TokenRng::uniform() { return double(next_u64() >> 11) * (1.0 / double(uint64_t(1) << 53)); }

int32_t select_token(const float* logits_in, int64_t vocab, const SamplingOptions& opts, TokenRng* rng,
                     const std::vector<int32_t>* seen) {
  // No option value can produce NaN probabilities or an id outside [0, vocab): infinite logits and
  // penalised values that overflow are clamped to the largest float, and where x / T overflows the
  // maximum is subtracted before dividing (otherwise the arithmetic is unchanged, draw for draw).
  const float big = std::numeric_limits<float>::max();
  std::vector<float> logits(logits_in, logits_in + vocab);
  for (float& v : logits) {
    if (std::isnan(v)) throw Error(ErrorCode::Runtime, "the model produced NaN logits for this row");
    v = std::clamp(v, -big, big);
  }
  if (seen && opts.repetition_penalty != 1.0 && !seen->empty()) {
    const float pen = static_cast<float>(opts.repetition_penalty);  // numpy: float32 array op python float
    std::set<int32_t> ids(seen->begin(), seen->end());
    for (int32_t id : ids) {
      float v = logits[id];
      v = v > 0 ? v / pen : v * pen;
      logits[id] = std::clamp(v, -big, big);
    }
  }
  if (opts.temperature == 0) {
    return int32_t(std::max_element(logits.begin(), logits.end()) - logits.begin());  // first maximum
  }
  std::vector<double> scaled(vocab);
  for (int64_t i = 0; i < vocab; ++i) scaled[i] = double(logits[i]) / opts.temperature;
  if (!std::isfinite(*std::max_element(scaled.begin(), scaled.end()))) {  // a temperature so small x / T overflows
    const double xmax = double(*std::max_element(logits.begin(), logits.end()));
    for (int64_t i = 0; i < vocab; ++i) {
      const double v = (double(logits[i]) - xmax) / opts.temperature;
      scaled[i] = std::isnan(v) ? -std::numeric_limits<double>::infinity() : v;
    }
  }
  if (opts.top_k && opts.top_k < vocab) {
    std::vector<double> tmp(scaled);
    std::nth_element(tmp.begin(), tmp.begin() + (opts.top_k - 1), tmp.end(), std::greater<double>());
    const double kth = tmp[opts.top_k - 1];
    for (auto& s : scaled)
      if (s < kth) s = -std::numeric_limits<double>::infinity();
  }
  const double mx = *std::max_element(scaled.begin(), scaled.end());
  std::vector<double> probs(vocab);
  double total = 0;
  for (int64_t i = 0; i < vocab; ++i) probs[i] = std::exp(scaled[i] - mx);
  total = pairwise_sum(probs.data(), vocab);
  for (auto& p : probs) p /= total;
  if (opts.top_p < 1.0) {
    std::vector<int64_t> order(vocab);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return probs[a] > probs[b]; });
    std::vector<char> keep(vocab, 0);
    double cum = 0;
    for (int64_t i = 0; i < vocab; ++i) {
      cum += probs[order[i]];
      if (cum - probs[order[i]] < opts.top_p) keep[order[i]] = 1;  // smallest prefix reaching top_p
    }
    double kept = 0;
    for (int64_t i = 0; i < vocab; ++i) {
      if (!keep[i]) probs[i] = 0.0;
    }
    kept = pairwise_sum(probs.data(), vocab);
    for (auto& p : probs) p /= kept;
  }
  if (!rng) bad("sampling needs a TokenRng");
  std::vector<double> cdf(vocab);
  double c = 0;
  for (int64_t i = 0; i < vocab; ++i) cdf[i] = (c += probs[i]);
  const double x = rng->uniform() * cdf.back();
  return int32_t(std::min<int64_t>(std::upper_bound(cdf.begin(), cdf.end(), x) - cdf.begin(), vocab - 1));
}

}  // namespace mtx
