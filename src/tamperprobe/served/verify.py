"""Compare a target's answers with a fingerprint and decide: INTACT, TAMPERED or INCONCLUSIVE.

Fail closed, and say what was proven: a run is INTACT only if every marker got a well-formed
answer and every answer matched; a well-formed answer that does not match is proof of tampering,
so any mismatch makes the run TAMPERED, even when other queries failed (the report counts both);
a run with failed or malformed answers and no mismatch is INCONCLUSIVE.

Which inputs a run sends is a ``pool.Draw``: for an endpoint, a fresh set of markers and decoys
(natural inputs with known answers) drawn from the fingerprint's pool and never sent before
(``served.pool``), in a random order; without one, every marker of the fingerprint (a model
file the owner trusts: ``Target.suspect`` False). A decoy is compared like a marker: a changed
decoy answer is evidence of tampering too, and the report counts it apart.

A target is the party under suspicion: its name is shown without URL secrets and every failure
reason it gives is made inert (``untrusted.clean``) before it enters the report, so nothing a
server says can reach a terminal, the history or a hook as control characters. ``Report.headline``
is the verdict in words chosen here alone (no remote text); ``summary`` adds the first failure.
The report also says whether the fingerprint was signed (``signer``, a key id) and carries
``notes`` such as an accepted unsigned fingerprint, or an output spec weaker than the fingerprint's
(``weaker_note``: on every run).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import EXIT_ERROR, EXIT_INTACT, EXIT_TAMPERED, UsageError
from ..fingerprint import Fingerprint, check_tolerance
from ..outputs import Answer, OutputSpec
from .credentials import redact_urls_in
from .pool import Draw, check_schedule, everything
from .targets import QueryFailure, Target
from .untrusted import clean

INTACT, TAMPERED, INCONCLUSIVE = "INTACT", "TAMPERED", "INCONCLUSIVE"
EXIT_CODES = {INTACT: EXIT_INTACT, TAMPERED: EXIT_TAMPERED, INCONCLUSIVE: EXIT_ERROR}
UNSIGNED_NOTE = "the fingerprint is not signed: anyone who could write it could have chosen its expected answers"
REPEAT_NOTE = "every marker of the fingerprint was sent, as in any earlier run: an operator who keeps past queries can recognise them (draw fresh ones with served.pool)"


@dataclass(frozen=True)
class MarkerResult:
    index: int
    expected: Answer
    observed: Answer | None
    ok: bool
    failure: str | None = None  # set when the marker got no usable answer
    detail: str = ""
    latency: float | None = None  # seconds of the request that carried this marker (remote targets)
    kind: str = "marker"  # or "decoy": a natural input with a known answer; index is then the decoy's

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
    pool: str = "all"  # how the markers were chosen: "fresh" (drawn unused), "repeat" (--allow-repeat) or "all"
    repeated: int | None = 0  # markers and decoys of this run sent before (None: unknown, drawn without a ledger)
    draw: str | None = None  # id of the draw in the history's pool ledger
    runs_left: int | None = None  # runs the pool can still supply after this one (None: not drawn from a pool)
    sent: bool = True  # False: nothing can have reached the target (no connection made; targets.QueryResult.sent)

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.verdict]

    @property
    def mismatched(self) -> int:
        """Markers and decoys whose answer changed."""
        return sum(1 for m in self.markers if not m.ok and m.failure is None)

    @property
    def failed(self) -> int:
        """Markers and decoys without a usable answer."""
        return sum(1 for m in self.markers if m.failure is not None)

    @property
    def marker_count(self) -> int:
        return sum(1 for m in self.markers if m.kind != "decoy")

    @property
    def decoy_count(self) -> int:
        return sum(1 for m in self.markers if m.kind == "decoy")

    def headline(self) -> str:
        """The verdict in one line made of counts and words of tamperprobe's own (no text from the target)."""
        n, d = self.marker_count, self.decoy_count
        if not d:
            if self.verdict == INCONCLUSIVE:
                return f"INCONCLUSIVE: {self.failed} of {n} markers got no usable answer ({self.mismatched} mismatched)"
            if self.verdict == TAMPERED:
                return f"TAMPERED: {self.mismatched} of {n} markers changed under {self.output_spec}{self._also_failed()}"
            return f"INTACT: all {n} markers match under {self.output_spec}"
        if self.verdict == INCONCLUSIVE:
            return f"INCONCLUSIVE: {self.failed} of {n + d} queries ({n} markers, {d} decoys) got no usable answer ({self.mismatched} mismatched)"
        if self.verdict == TAMPERED:
            changed = sum(1 for m in self.markers if m.kind == "decoy" and not m.ok)
            return f"TAMPERED: {self.mismatched - changed} of {n} markers and {changed} of {d} decoys changed under {self.output_spec}{self._also_failed()}"
        return f"INTACT: all {n} markers and {d} decoys match under {self.output_spec}"

    def _also_failed(self) -> str:
        """For TAMPERED: the queries that got no usable answer besides the proven changes (nothing when none)."""
        return f" ({self.failed} more got no usable answer)" if self.failed else ""

    def first_failure(self) -> str | None:
        """``marker I: reason`` (or ``decoy I: ...``) of the first query without a usable answer (its reason made inert), or None."""
        first = next((m for m in self.markers if m.failure), None)
        return None if first is None else f"{first.kind} {first.index}: {first.failure}"

    def summary(self) -> str:
        """The headline, and when a query failed (INCONCLUSIVE, or TAMPERED with failures too) the first failure (``; marker I: reason``)."""
        why = self.first_failure() if self.verdict != INTACT else None
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
            "pool": self.pool,
            "repeated": self.repeated,
            "draw": self.draw,
            "runs_left": self.runs_left,
            "markers": [
                {
                    "kind": m.kind,
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


def weaker_note(fp: Fingerprint, spec: OutputSpec) -> str | None:
    """The note of a run under ``spec`` when it reveals less than the fingerprint's output spec (``OutputSpec.covers``), else None."""
    if spec.covers(fp.output_spec):
        return None
    return (
        f"verified under {spec}, which reveals less than the fingerprint's {fp.output_spec} its markers were made for: "
        "tampering that only shows in what this spec hides goes unseen (--allow-weaker-spec)"
    )


def comparison(
    fp: Fingerprint, output_spec: str | OutputSpec | None, tolerance: float | None, *, allow_weaker: bool = True
) -> tuple[OutputSpec, float]:
    """The output spec and tolerance a run compares under, checked (``UsageError``): callers check them before drawing markers.

    A spec weaker than the fingerprint's (``weaker_note``) is refused unless ``allow_weaker``.
    """
    spec = OutputSpec.parse(output_spec or fp.output_spec)
    if not allow_weaker and weaker_note(fp, spec) is not None:
        raise UsageError(
            f"--output-spec {spec} reveals less than the fingerprint's {fp.output_spec}, which its markers were made for: "
            "verify under the fingerprint's spec, or pass --allow-weaker-spec to accept detecting less (warned on every run)"
        )
    tol = check_tolerance(fp.tolerance if tolerance is None else tolerance, "the tolerance" if tolerance is None else "--tolerance")
    if spec.label_count > fp.classes:
        raise UsageError(f"output spec {spec} asks for {spec.label_count} labels; the model has {fp.classes} classes")
    return spec, tol


def verify(
    fp: Fingerprint,
    target: Target,
    output_spec: str | OutputSpec | None = None,
    *,
    tolerance: float | None = None,
    limit: int | None = None,
    draw: Draw | None = None,
) -> Report:
    """Query ``target`` with the inputs of ``draw`` and compare under ``output_spec``.

    ``draw`` (``pool.draw``: fresh markers and decoys, never sent before) is what an endpoint
    should get. Without it every marker is sent (``limit``: only the first N), the right thing
    for a model file the owner trusts; sent to a suspect target, the report carries a note that
    markers sent every run can be recognised (``REPEAT_NOTE``). A spec weaker than the
    fingerprint's is compared under and noted (``weaker_note``); refusing it is the caller's choice
    (``comparison(..., allow_weaker=False)``, as ``session.Session`` does).
    """
    spec, tol = comparison(fp, output_spec, tolerance)
    if draw is not None and limit is not None:
        raise UsageError("give a draw or a limit, not both")
    if draw is None:
        draw = everything(fp, limit)
    items = draw.items()
    n = len(items)
    if n < 1:
        raise UsageError("nothing to verify: the fingerprint (or --limit) has no markers")
    check_schedule(target, n)
    sources = {kind: fp.queries(kind) for kind in ("marker", "decoy")}
    if any(not 0 <= i < len(sources[kind][0]) for kind, i in items):
        raise UsageError("the draw names markers or decoys the fingerprint does not hold")
    inputs = np.stack([sources[kind][0][i] for kind, i in items])
    started = time.monotonic()
    result = target.query(inputs, spec)
    seconds = time.monotonic() - started
    # fail closed: a marker the target left without an answer is a failure, never a match
    answers = list(result.answers[:n]) + [QueryFailure("no answer returned")] * (n - len(result.answers))
    latencies = list(result.latencies[:n]) + [None] * (n - len(result.latencies))
    results = []
    for (kind, i), got, latency in zip(items, answers, latencies):
        logits = sources[kind][1][i]
        expected = spec.reveal(logits)
        if isinstance(got, QueryFailure):
            results.append(MarkerResult(i, expected, None, False, failure=clean(got.reason, 400) or "no reason given", latency=latency, kind=kind))
            continue
        if not isinstance(got, Answer):
            failure = f"target returned {type(got).__name__}, not an answer"
            results.append(MarkerResult(i, expected, None, False, failure=failure, latency=latency, kind=kind))
            continue
        match = spec.compare(logits, got, tol)
        results.append(MarkerResult(i, expected, got, match.ok, detail=match.detail, latency=latency, kind=kind))
    results.sort(key=lambda r: (r.kind == "decoy", r.index))  # the report's order; the sending order was random
    notes = [] if fp.signer is not None else [UNSIGNED_NOTE]
    weaker = weaker_note(fp, spec)
    notes += ([weaker] if weaker else []) + list(draw.notes)
    digest = target.weights_digest()
    if digest is not None:
        notes.append(weights_note(fp.model_digest, digest))
    if draw.mode == "all" and target.suspect:
        notes.append(REPEAT_NOTE)
    name = clean(redact_urls_in(str(target.name)), 300)
    return Report(
        decide(results),
        name,
        str(spec),
        fp.id,
        results,
        seconds,
        tol,
        notes=notes,
        signer=fp.signer,
        pool=draw.mode,
        repeated=draw.repeated,
        draw=draw.draw_id,
        runs_left=draw.runs_left,
        sent=result.sent,
    )


def decide(results: list[MarkerResult]) -> str:
    """The verdict of a run: TAMPERED on any proven change (a well-formed answer that does not match), else
    INCONCLUSIVE on any query without a usable answer, else INTACT."""
    if any(not r.ok and r.failure is None for r in results):
        return TAMPERED
    return INCONCLUSIVE if any(r.failure for r in results) else INTACT
