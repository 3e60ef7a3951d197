// The rolling KV buffer's arithmetic (docs/ops.md §1 rules 7, 10, 12): canonical chunks, live
// positions and where each layout holds them, what a speculative verification must save and restore,
// and the prompt-lookup draft. Pure functions; mtx.hpp documents each.
#include <algorithm>

#include "mtx/mtx.hpp"

namespace mtx::kv {

namespace {
[[noreturn]] void bad(const std::string& msg) { throw Error(ErrorCode::InvalidArgument, msg); }
}  // namespace

Layout parse_layout(const std::string& name) {
  if (name == "ring") return Layout::Ring;
  if (name == "ort_window") return Layout::OrtWindow;
  throw Error(ErrorCode::InvalidExport, "kv.layout: expected ring or ort_window, got '" + name + "'");
}

std::vector<int64_t> canonical_chunks(int64_t start, int64_t n, int64_t P) {
  if (P < 1 || start < 0 || n < 0) bad("canonical_chunks: needs P >= 1, start >= 0, n >= 0");
  std::vector<int64_t> out;
  for (int64_t s = start, left = n; left > 0;) {
    const int64_t m = std::min(left, P - s % P);
    out.push_back(m);
    s += m;
    left -= m;
  }
  return out;
}

Span live(int64_t p, int64_t W) { return {std::max<int64_t>(0, p - W), p}; }

int64_t ort_window_base(int64_t p, int64_t C, int64_t W) {
  if (p <= C) return 0;
  return p - W - (p - C - 1) % (C - W + 1);
}

Span held(Layout layout, int64_t p, int64_t C, int64_t W) {
  if (layout == Layout::Ring) return {std::max<int64_t>(0, p - C), p};
  return {ort_window_base(p, C, W), p};
}

int64_t slot_at(Layout layout, int64_t q, int64_t p, int64_t C, int64_t W) {
  const Span h = held(layout, p, C, W);
  if (q < h.begin || q >= h.end)
    bad("slot_at: position " + std::to_string(q) + " is not held at " + std::to_string(p) + " (capacity " +
        std::to_string(C) + ", window " + std::to_string(W) + ")");
  if (layout == Layout::Ring) return q % C;
  return q - h.begin;
}

Span verify_saved(Layout layout, int64_t p, int64_t k, int64_t C, int64_t W) {
  if (k < 1 || k > W - 1 || C < W) bad("verify_saved: needs 1 <= k <= W - 1 and C >= W");
  const int64_t begin = std::max<int64_t>(0, p + 1 - W);
  if (layout == Layout::Ring) return {begin, std::max(begin, p + k + 1 - C)};
  return {begin, std::max(begin, ort_window_base(p + k + 1, C, W))};  // ONNX Runtime's shift drops them
}

std::vector<Move> verify_restore(Layout layout, int64_t p, int64_t k, int64_t a, int64_t C, int64_t W) {
  if (a < 0 || a > k) bad("verify_restore: needs 0 <= a <= k");
  const Span saved = verify_saved(layout, p, k, C, W);
  const int64_t next = p + a + 1, post = p + k + 1;
  std::vector<Move> moves;
  const Span need = live(next, W);
  for (int64_t q = need.begin; q < need.end; ++q) {
    const int64_t dest = slot_at(layout, q, next, C, W);
    // Ring: the call overwrote the slots of positions p-C .. p+k-C, of which the saved ones are live.
    // OrtWindow: the call left the layout of p + k + 1, which no longer holds the saved positions.
    if (q >= saved.begin && q < saved.end) {
      moves.push_back({q, dest, true, q - saved.begin});
    } else if (layout == Layout::OrtWindow) {
      // Every unsaved position of live(p') is still held at p + k + 1 (from its base on).
      const int64_t source = slot_at(layout, q, post, C, W);
      if (source != dest) moves.push_back({q, dest, false, source});
    }
  }
  return moves;
}

std::vector<int32_t> ngram_draft(const std::vector<int32_t>& context, int64_t max_tokens, int max_n, int min_n) {
  if (max_tokens < 1) return {};
  const int64_t len = int64_t(context.size());
  for (int64_t n = max_n; n >= std::max(1, min_n); --n) {
    if (len <= n) continue;
    const int32_t* suffix = context.data() + len - n;
    for (int64_t i = len - n - 1; i >= 0; --i) {
      if (std::equal(suffix, suffix + n, context.data() + i)) {
        const int64_t end = std::min(len, i + n + max_tokens);
        return std::vector<int32_t>(context.begin() + i + n, context.begin() + end);
      }
    }
  }
  return {};
}

}  // namespace mtx::kv
