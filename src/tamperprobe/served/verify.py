"""Compare a target's answers with a fingerprint and decide: INTACT, TAMPERED or INCONCLUSIVE.

Fail closed: a run is INTACT only if every marker got a well-formed answer and every answer
matched. Any failed or malformed answer makes the run INCONCLUSIVE (even if other markers
mismatched: the report still counts them), a mismatch among complete answers TAMPERED.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from ..errors import EXIT_ERROR, EXIT_INTACT, EXIT_TAMPERED, UsageError
from ..fingerprint import Fingerprint
from ..outputs import Answer, OutputSpec
from .targets import QueryFailure, Target

INTACT, TAMPERED, INCONCLUSIVE = "INTACT", "TAMPERED", "INCONCLUSIVE"
EXIT_CODES = {INTACT: EXIT_INTACT, TAMPERED: EXIT_TAMPERED, INCONCLUSIVE: EXIT_ERROR}


@dataclass(frozen=True)
class MarkerResult:
    index: int
    expected: Answer
    observed: Answer | None
    ok: bool
    failure: str | None = None  # set when the marker got no usable answer
    detail: str = ""
    latency: float | None = None  # seconds of the request that carried this marker (remote targets)

    @property
    def status(self) -> str:
        return "failed" if self.failure else ("match" if self.ok else "MISMATCH")


@dataclass(frozen=True)
class Report:
    verdict: str
    target: str
    output_spec: str
    fingerprint_id: str
    markers: list[MarkerResult]
    seconds: float
    tolerance: float
    notes: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.verdict]

    @property
    def mismatched(self) -> int:
        return sum(1 for m in self.markers if not m.ok and m.failure is None)

    @property
    def failed(self) -> int:
        return sum(1 for m in self.markers if m.failure is not None)

    def summary(self) -> str:
        n = len(self.markers)
        if self.verdict == INCONCLUSIVE:
            first = next((m for m in self.markers if m.failure), None)
            why = f"; marker {first.index}: {first.failure}" if first else ""
            return f"INCONCLUSIVE: {self.failed} of {n} markers got no usable answer ({self.mismatched} mismatched){why}"
        if self.verdict == TAMPERED:
            return f"TAMPERED: {self.mismatched} of {n} markers changed under {self.output_spec}"
        return f"INTACT: all {n} markers match under {self.output_spec}"

    def to_json(self) -> dict[str, Any]:
        """The report as JSON-ready data (``verify --json``)."""
        return {
            "verdict": self.verdict,
            "summary": self.summary(),
            "target": self.target,
            "output_spec": self.output_spec,
            "fingerprint": self.fingerprint_id,
            "seconds": round(self.seconds, 4),
            "tolerance": self.tolerance,
            "markers": [
                {
                    "index": m.index,
                    "status": m.status,
                    "expected": str(m.expected),
                    "observed": None if m.observed is None else str(m.observed),
                    "detail": m.failure or m.detail,
                    "latency": m.latency,
                }
                for m in self.markers
            ],
        }


def verify(
    fp: Fingerprint,
    target: Target,
    output_spec: str | OutputSpec | None = None,
    *,
    tolerance: float | None = None,
    limit: int | None = None,
) -> Report:
    """Query ``target`` with the fingerprint's markers and compare under ``output_spec``.

    ``limit`` uses only the first N markers (a smaller query budget).
    """
    spec = OutputSpec.parse(output_spec or fp.output_spec)
    tol = fp.tolerance if tolerance is None else float(tolerance)
    if tol < 0:
        raise UsageError("tolerance must be >= 0")
    if spec.label_count > fp.classes:
        raise UsageError(f"output spec {spec} asks for {spec.label_count} labels; the model has {fp.classes} classes")
    n = len(fp) if limit is None else min(int(limit), len(fp))
    if n < 1:
        raise UsageError("nothing to verify: the fingerprint (or --limit) has no markers")
    started = time.monotonic()
    result = target.query(fp.inputs[:n], spec)
    seconds = time.monotonic() - started
    # fail closed: a marker the target left without an answer is a failure, never a match
    answers = list(result.answers[:n]) + [QueryFailure("no answer returned")] * (n - len(result.answers))
    latencies = list(result.latencies[:n]) + [None] * (n - len(result.latencies))
    results = []
    for i in range(n):
        expected = spec.reveal(fp.logits[i])
        got = answers[i]
        if isinstance(got, QueryFailure):
            results.append(MarkerResult(i, expected, None, False, failure=got.reason, latency=latencies[i]))
            continue
        match = spec.compare(fp.logits[i], got, tol)
        results.append(MarkerResult(i, expected, got, match.ok, detail=match.detail, latency=latencies[i]))
    if any(r.failure for r in results):
        verdict = INCONCLUSIVE
    elif all(r.ok for r in results):
        verdict = INTACT
    else:
        verdict = TAMPERED
    return Report(verdict, target.name, str(spec), fp.id, results, seconds, tol)
