"""Compare a target's answers with a fingerprint and decide: INTACT, TAMPERED or INCONCLUSIVE.

Fail closed: a run is INTACT only if every marker got a well-formed answer and every answer
matched. Any failed or malformed answer makes the run INCONCLUSIVE (even if other markers
mismatched: the report still counts them), a mismatch among complete answers TAMPERED.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

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
    answers = target.query(fp.inputs[:n], spec)
    latencies = list(getattr(target, "last_latencies", None) or [])
    latencies += [None] * (n - len(latencies))
    seconds = time.monotonic() - started
    if len(answers) != n:
        answers = list(answers) + [QueryFailure("no answer returned")] * (n - len(answers))
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


def changed_mask(fp: Fingerprint, logits: np.ndarray, spec: str | OutputSpec, tol: float | None = None) -> np.ndarray:
    """Which markers a model with these ``logits`` answers differently from the fingerprint (offline)."""
    spec = OutputSpec.parse(spec)
    tol = fp.tolerance if tol is None else tol
    return np.array([not spec.compare(fp.logits[i], spec.reveal(logits[i]), tol).ok for i in range(len(logits))], dtype=bool)
