"""Throughput and memory of one loaded model: prefill and decode tokens/s, time to first token,
peak RSS, memory by the rule of mtx.runtime.memory, KV bytes, and decode latency by position (to show memory and latency stay flat)."""

from __future__ import annotations

import resource
import time
from typing import Any

import numpy as np
import psutil

from mtx.errors import UsageError
from mtx.runtime.generator import Generator
from mtx.runtime.memory import MemorySampler, export_weight_roots


def _rss_mb() -> float:
    return psutil.Process().memory_info().rss / 2**20


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def run_bench(gen: Generator, batch: int = 1, prompt_len: int = 128, new_tokens: int = 256, seed: int = 0,
              warmup: int = 1) -> dict[str, Any]:
    """Greedy decode of random prompts through the generation core (:class:`~mtx.runtime.core.BatchCore`);
    all timings wall-clock on this process. Time to first token: until every row has its first token.

    Decode latency is reported as the median per-step time in windows of positions, so a user can
    compare the step at position W with the step at 20W.
    """
    be = gen.backend
    if batch < 1:
        raise UsageError(f"batch must be >= 1, got {batch}", params=("batch",))
    if batch > be.max_batch:
        raise UsageError(f"batch {batch} exceeds the maximum batch {be.max_batch} of this model", params=("batch",))
    if prompt_len <= 0 or new_tokens <= 0:
        raise UsageError("prompt_len and new_tokens must be positive", params=("prompt_len", "new_tokens"))
    be.check_positions(prompt_len + new_tokens)
    rng = np.random.default_rng(seed)
    prompts = rng.integers(3, gen.config.vocab_size, size=(batch, prompt_len)).tolist()
    for _ in range(warmup):  # the same shapes once: first calls plan kernels and grow memory arenas; other
        # ids, so the prefix cache holds nothing of the measured prompts (their prefill is measured whole)
        others = rng.integers(3, gen.config.vocab_size, size=(batch, prompt_len)).tolist()
        gen.generate(others, max_new_tokens=4, stop_token_ids=[])

    rss_before = _rss_mb()
    root = getattr(be, "root", None)  # the torch backend holds its weights in anonymous memory
    with MemorySampler(export_weight_roots(root) if root is not None else []) as sampler:  # stopped on errors too
        core = gen.core(batch)  # the generation core every front end runs on; its KV state allocated once
        kv_bytes = core.kv_bytes
        for p in prompts:
            core.add(gen.request(p, new_tokens, stop_token_ids=[]))  # greedy, no stop: exactly new_tokens each
        def step() -> list[Any]:
            outs = core.step()
            for o in outs:
                if o.error is not None:
                    raise o.error  # a failed request fails the benchmark, as a failed call did before
            return outs

        t0 = time.perf_counter()
        firsts = 0
        while firsts < batch:  # prefill steps, until every row has its first token
            firsts += sum(o.token is not None for o in step())
        t_first = time.perf_counter()
        rss_after_prefill = _rss_mb()
        steps = []
        while core.has_unfinished():
            s0 = time.perf_counter()
            step()
            steps.append(time.perf_counter() - s0)
        t_end = time.perf_counter()
        rss_end = _rss_mb()
        sampler.take()
    memory = sampler.result.report()
    decode_s = t_end - t_first
    plan = be.kv_plan
    window = min(plan.effective(l) for l in range(len(plan.windows)))  # the smallest window
    by_pos = {}
    for start in sorted({window, 2 * window, 5 * window, 10 * window, 20 * window, prompt_len + new_tokens - window}):
        lo = start - prompt_len - 1
        sel = steps[max(0, lo): max(0, lo) + min(window, 64)]
        if lo >= 0 and len(sel) >= 4:
            by_pos[str(start)] = round(1000 * float(np.median(sel)), 3)
    return {
        "backend": be.name,
        "batch": batch,
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "window": gen.config.sliding_window,
        "kv_capacity": plan.capacities[0] if plan.uniform else list(plan.capacities),
        "time_to_first_token_s": round(t_first - t0, 4),
        "prefill_tokens_per_s": round(batch * prompt_len / (t_first - t0), 1),
        "decode_tokens_per_s": round(batch * (new_tokens - 1) / decode_s, 1) if new_tokens > 1 else None,
        "decode_step_ms_median": round(1000 * float(np.median(steps)), 3) if steps else None,
        "decode_step_ms_by_position": by_pos,
        "kv_bytes": kv_bytes,
        "rss_mb": {"before": round(rss_before, 1), "after_prefill": round(rss_after_prefill, 1),
                   "end": round(rss_end, 1), "growth_during_decode": round(rss_end - rss_after_prefill, 1)},
        "peak_rss_mb": round(_peak_rss_mb(), 1),
        # the rule every benchmark uses (mtx.runtime.memory): anonymous resident bytes + mapped weight files
        "memory_mb": memory["memory_mb"], "memory": memory,
    }
