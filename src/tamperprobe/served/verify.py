"""Compare a target's answers with a fingerprint and decide: INTACT, TAMPERED or INCONCLUSIVE.

Fail closed: a run is INTACT only if every marker got a well-formed answer and every answer
matched. Any failed or malformed answer makes the run INCONCLUSIVE (even if other markers
mismatched: the report still counts them), a mismatch among complete answers TAMPERED.

A target is the party under suspicion: its name is shown without URL secrets and every failure
reason it gives is made inert (``untrusted.clean``) before it enters the report, so nothing a
server says can reach a terminal, the history or a hook as control characters. ``Report.headline``
is the verdict in words chosen here alone (no remote text); ``summary`` adds the first failure.
The report also says whether the fingerprint was signed (``signer``, a key id) and carries
``notes`` such as an accepted unsigned fingerprint.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from ..errors import EXIT_ERROR, EXIT_INTACT, EXIT_TAMPERED, UsageError
from ..fingerprint import Fingerprint, check_tolerance
from ..outputs import Answer, OutputSpec
from .credentials import redact_urls_in
from .targets import LocalTarget, QueryFailure, Target
from .untrusted import clean

INTACT, TAMPERED, INCONCLUSIVE = "INTACT", "TAMPERED", "INCONCLUSIVE"
EXIT_CODES = {INTACT: EXIT_INTACT, TAMPERED: EXIT_TAMPERED, INCONCLUSIVE: EXIT_ERROR}
UNSIGNED_NOTE = "the fingerprint is not signed: anyone who could write it could have chosen its expected answers"


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
    signer: str | None = None  # key id of the fingerprint's verified signature; None: not signed (or not read from a file)

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.verdict]

    @property
    def mismatched(self) -> int:
        return sum(1 for m in self.markers if not m.ok and m.failure is None)

    @property
    def failed(self) -> int:
        return sum(1 for m in self.markers if m.failure is not None)

    def headline(self) -> str:
        """The verdict in one line made of counts and words of tamperprobe's own (no text from the target)."""
        n = len(self.markers)
        if self.verdict == INCONCLUSIVE:
            return f"INCONCLUSIVE: {self.failed} of {n} markers got no usable answer ({self.mismatched} mismatched)"
        if self.verdict == TAMPERED:
            return f"TAMPERED: {self.mismatched} of {n} markers changed under {self.output_spec}"
        return f"INTACT: all {n} markers match under {self.output_spec}"

    def first_failure(self) -> str | None:
        """``marker I: reason`` of the first marker without a usable answer (its reason made inert), or None."""
        first = next((m for m in self.markers if m.failure), None)
        return None if first is None else f"marker {first.index}: {first.failure}"

    def summary(self) -> str:
        """The headline, and for INCONCLUSIVE the first failure (``; marker I: reason``)."""
        why = self.first_failure() if self.verdict == INCONCLUSIVE else None
        return self.headline() + (f"; {why}" if why else "")

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
            "signer": self.signer,
            "notes": list(self.notes),
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


def weights_note(expected: str, actual: str) -> str:
    """What the weight digest of a local model file says, beside the verdict (the answers decide the verdict)."""
    if actual == expected:
        return f"weights digest matches the fingerprint's ({expected[:23]}…)"
    return (
        f"weights digest {actual[:23]}… differs from the fingerprint's {expected[:23]}…: these are not the fingerprinted weights "
        "(another format with renamed tensors also differs; the answers decide the verdict)"
    )


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
    tol = check_tolerance(fp.tolerance if tolerance is None else tolerance, "the tolerance" if tolerance is None else "--tolerance")
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
            results.append(MarkerResult(i, expected, None, False, failure=clean(got.reason, 400) or "no reason given", latency=latencies[i]))
            continue
        if not isinstance(got, Answer):
            results.append(
                MarkerResult(i, expected, None, False, failure=f"target returned {type(got).__name__}, not an answer", latency=latencies[i])
            )
            continue
        match = spec.compare(fp.logits[i], got, tol)
        results.append(MarkerResult(i, expected, got, match.ok, detail=match.detail, latency=latencies[i]))
    if any(r.failure for r in results):
        verdict = INCONCLUSIVE
    elif all(r.ok for r in results):
        verdict = INTACT
    else:
        verdict = TAMPERED
    notes = [] if fp.signer is not None else [UNSIGNED_NOTE]
    if isinstance(target, LocalTarget):
        notes.append(weights_note(fp.model_digest, target.model.digest()))
    name = clean(redact_urls_in(str(target.name)), 300)
    return Report(verdict, name, str(spec), fp.id, results, seconds, tol, notes=notes, signer=fp.signer)
