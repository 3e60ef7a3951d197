"""Artifact backend against artifact backend (e.g. onnxruntime vs TensorRT) with Polygraphy's comparator.

Each engine call is one Polygraphy iteration: the logits [1, S, V] of every backend go into a
``RunResults`` (one ``IterationResult`` per backend) and ``Comparator.compare_accuracy`` checks
each pair with ``SimpleCompareFunc`` (element-wise ``|a - b| <= atol``, ``rtol`` 0). Each backend
is held to the reference at ``limit = atol + rtol·max|r|`` per position, so two correct ones can
differ by up to twice that: the pair check of a call uses ``2·limit`` (its largest over the call's
positions). Polygraphy's log goes to stdout, so it is silenced while comparing (the results are
reported by ``mtx parity``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import combinations

import numpy as np


@dataclass
class PairResult:
    """One backend pair over the run: per compared call, Polygraphy's verdict and max |a - b|."""

    first: str
    second: str
    passed_calls: list[bool] = field(default_factory=list)
    atol: list[float] = field(default_factory=list)
    max_absdiff: list[float] = field(default_factory=list)
    mean_absdiff: list[float] = field(default_factory=list)
    call_starts: list[int] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(self.passed_calls)

    def to_json(self) -> dict:
        failed = [s for s, ok in zip(self.call_starts, self.passed_calls) if not ok]
        return {
            "backends": [self.first, self.second], "tool": "polygraphy",
            "compare_func": "SimpleCompareFunc(check_error_stat='elemwise')", "output": "logits",
            "atol": max(self.atol, default=0.0), "rtol": 0.0, "passed": self.passed,
            "calls_compared": len(self.passed_calls), "calls_failed": len(failed),
            "first_failed_call_start": failed[0] if failed else None,
            "max_absdiff": max(self.max_absdiff, default=0.0),
            "mean_absdiff": float(np.mean(self.mean_absdiff)) if self.mean_absdiff else 0.0,
        }


class BackendComparison:
    """Compares every pair of ``names`` call by call (Polygraphy ``Comparator.compare_accuracy``)."""

    def __init__(self, names: list[str]) -> None:
        self.names = names
        self.pairs = list(combinations(range(len(names)), 2))
        self.results = [PairResult(names[i], names[j]) for i, j in self.pairs]

    def add_call(self, start: int, logits: dict[str, np.ndarray], limit: float) -> None:
        """Compare one call's logits ``{backend: [S, V] float32}`` between every pair.

        ``limit``: the largest per-position tolerance against the reference over the call's positions.
        """
        from polygraphy.comparator import Comparator, IterationResult, RunResults, SimpleCompareFunc
        from polygraphy.logger import G_LOGGER

        run_results = RunResults()
        for name in self.names:
            run_results.append((name, [IterationResult({"logits": logits[name][None]}, runner_name=name)]))
        func = SimpleCompareFunc(atol=2 * limit, rtol=0.0, check_error_stat="elemwise")
        with G_LOGGER.verbosity(G_LOGGER.CRITICAL):
            (accuracy,) = Comparator.compare_accuracy(run_results, comparisons=self.pairs, compare_func=func)
        for (i, j), result in zip(self.pairs, self.results):
            (iteration,) = accuracy[(self.names[i], self.names[j])]
            outcome = iteration["logits"]
            result.passed_calls.append(bool(outcome))
            result.atol.append(2 * limit)
            result.max_absdiff.append(float(outcome.max_absdiff))
            result.mean_absdiff.append(float(outcome.mean_absdiff))
            result.call_starts.append(start)
