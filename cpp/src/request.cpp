// A generation request checked once (make_request) and decoded row by row (RowDecoder): the one
// setup and the one per-step rule behind Session::generate and Batch::generate.
#include <algorithm>

#include "model_impl.hpp"

namespace mtx {

const char* to_string(FinishReason reason) {
  switch (reason) {
    case FinishReason::Stop: return "stop";
    case FinishReason::Length: return "length";
    case FinishReason::Cancelled: return "cancelled";
    case FinishReason::None: break;
  }
  return "none";
}

GenerationRequest make_request(const Model& model, std::vector<std::vector<int32_t>> prompts, int max_new_tokens,
                               const SamplingOptions& opts, const std::optional<std::vector<int32_t>>& stop_ids,
                               const std::string& what) {
  const auto& impl = model.impl();
  if (prompts.empty()) throw Error(ErrorCode::InvalidArgument, "no prompts given");
  if (max_new_tokens < 0)
    throw Error(ErrorCode::InvalidArgument, "max_new_tokens must be an integer >= 0, got " + std::to_string(max_new_tokens));
  opts.validate();
  size_t longest = 0;
  for (size_t r = 0; r < prompts.size(); ++r) {
    impl.check_tokens(prompts[r], (what + " " + std::to_string(r)).c_str());
    longest = std::max(longest, prompts[r].size());
  }
  impl.check_positions(int64_t(longest) + max_new_tokens);  // every row starts at position 0
  GenerationRequest req;
  req.prompts = std::move(prompts);
  req.max_new_tokens = max_new_tokens;
  req.sampling = opts;
  req.stop_ids = stop_ids ? *stop_ids : model.info().eos_token_ids;
  return req;
}

RowDecoder::RowDecoder(const GenerationRequest& request, int row)
    : sampling_(request.sampling),
      stop_ids_(request.stop_ids),
      max_new_tokens_(size_t(request.max_new_tokens)),
      rng_(request.sampling.seed, uint64_t(row)),
      sequence_(request.prompts.at(size_t(row))) {
  if (max_new_tokens_ == 0) reason_ = FinishReason::Length;
}

int32_t RowDecoder::step(const float* logits, int64_t vocab) {
  if (done()) throw Error(ErrorCode::InvalidArgument, "this row has finished (" + std::string(to_string(reason_)) + ")");
  const int32_t tok = select_token(logits, vocab, sampling_, &rng_,
                                   sampling_.repetition_penalty != 1.0 ? &sequence_ : nullptr);
  sequence_.push_back(tok);
  generated_.push_back(tok);
  if (std::find(stop_ids_.begin(), stop_ids_.end(), tok) != stop_ids_.end())
    reason_ = FinishReason::Stop;  // a stop id ends the row even on its last allowed step
  else if (generated_.size() >= max_new_tokens_)
    reason_ = FinishReason::Length;
  return tok;
}

void RowDecoder::cancel() {
  if (!done()) reason_ = FinishReason::Cancelled;
}

}  // namespace mtx
