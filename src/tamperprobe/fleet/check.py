"""One pass over every endpoint of a fleet (``tamperprobe fleet check``), concurrently.

Each endpoint is one ``served.session.Session``: the same flow as ``verify`` (check, draw from the
pool recorded before sending, query, compare, alarm, record), so the fleet adds no verification
logic of its own. What the fleet adds:

* **each fingerprint file is read, decrypted and its signature checked once per pass** (per file and
  trust settings), not once per endpoint; an endpoint whose fingerprint does not carry what its
  ``expect`` names is refused (NOT AUTHENTIC, exit 3 for that entry) while the others are verified;
* **concurrency**: at most ``concurrency`` endpoints are queried at once, each on its own HTTP client
  and bounded by its own ``deadline``, so a slow or dead endpoint never delays the others beyond the
  slot it holds;
* **a connection limit per server** (``per_endpoint_connections``, ``Slots``): at most that many
  entries served from one address (scheme, host and port) run at once. An entry waits for a slot
  before it draws anything, so waiting never spends markers nor any of its deadline; a running
  entry's client sends one request at a time and so holds at most one connection, so the server
  never sees more than that many connections from the fleet;
* **kept-alive connections by default**: in a pass, an entry without ``client_profile`` sends its
  requests as ``requests.Session()`` does (``python-requests-session``: the same bytes as
  ``requests.post``, on one kept-alive connection, closed at the end of the entry's run), an
  ordinary client's way of sending several requests in a row;
* **endpoints that share a fingerprint share its pool**: their draws go through the one ledger, so
  no marker is sent to two endpoints (the operator may see all of them);
* the outcome per endpoint and the exit code of the worst: 1 if any is TAMPERED, else 3 if any
  fingerprint was not authentic or not the one expected, else 2 if any is INCONCLUSIVE or could not
  be checked, else 0.

Each run is recorded in the history after its alarm, as ``verify`` does, but in batches written by
one thread (``records.Recorder``); its draw was committed to the ledger before anything was sent,
in one transaction with the draws of the entries that asked at the same time (``records.Claims``).

The queries run on a thread pool: each endpoint's client is the synchronous ``HTTPTarget`` whose
deadline, retry and bounded-transport rules verify already relies on; a thread per concurrent
endpoint is what those rules need, and the work per request is parsing and comparing, not waiting.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .._util import one_line
from ..errors import EXIT_ERROR, EXIT_INTACT, EXIT_TAMPERED, EXIT_UNTRUSTED, TamperprobeError
from ..fingerprint import Fingerprint
from ..served.credentials import redact_url
from ..served.session import Run, Session, Settings
from ..served.verify import INCONCLUSIVE, INTACT, TAMPERED
from .config import Endpoint, Fleet
from .records import Claims, Recorder

FLEET_PROFILE = "python-requests-session"  # an entry without client_profile: requests.Session(), kept alive
NOT_AUTHENTIC = "NOT AUTHENTIC"
ERROR = "ERROR"
EXIT_OF = {INTACT: EXIT_INTACT, TAMPERED: EXIT_TAMPERED, INCONCLUSIVE: EXIT_ERROR, ERROR: EXIT_ERROR, NOT_AUTHENTIC: EXIT_UNTRUSTED}
_RANK = {EXIT_TAMPERED: 3, EXIT_UNTRUSTED: 2, EXIT_ERROR: 1, EXIT_INTACT: 0}


@dataclass(frozen=True)
class Outcome:
    """What one endpoint's run came to: a verdict, or why it could not be verified (``problem``)."""

    endpoint: str
    url: str  # shown without credentials or query values
    verdict: str  # INTACT, TAMPERED, INCONCLUSIVE, NOT AUTHENTIC or ERROR
    fingerprint: str | None = None  # id, when the file could be read
    run: Run | None = None
    problem: str = ""
    seconds: float = 0.0

    @property
    def exit_code(self) -> int:
        return EXIT_OF[self.verdict]

    def summary(self) -> str:
        return self.run.report.summary() if self.run is not None else self.problem

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"endpoint": self.endpoint, "url": self.url, "verdict": self.verdict, "exit_code": self.exit_code}
        out["fingerprint"] = self.fingerprint
        out["seconds"] = round(self.seconds, 3)
        if self.run is not None:
            out["report"] = self.run.report.to_json()
        else:
            out["problem"] = self.problem
        return out


def worst_exit(outcomes: list[Outcome]) -> int:
    """1 if any TAMPERED, else 3 if any not authentic, else 2 if any INCONCLUSIVE or failed, else 0 (an empty pass is 2)."""
    if not outcomes:
        return EXIT_ERROR
    return max((o.exit_code for o in outcomes), key=lambda c: _RANK[c])


@dataclass
class _Fingerprints:
    """Each fingerprint file read and authenticated once per pass, per (file, trust settings); errors kept per key."""

    cache: dict[tuple, Fingerprint | TamperprobeError] = field(default_factory=dict)

    def get(self, e: Endpoint) -> Fingerprint:
        from .. import signing
        from ..fingerprint import load

        key = (e.fingerprint, e.trust_keys, e.allow_unsigned, e.decrypt_key)
        if key not in self.cache:
            try:
                trust = signing.Trust.from_sources(list(e.trust_keys) or None, allow_unsigned=e.allow_unsigned)
                self.cache[key] = load(e.fingerprint, trust=trust, secret_key=signing.load_secret_key(e.decrypt_key))
            except TamperprobeError as exc:
                self.cache[key] = exc
        got = self.cache[key]
        if isinstance(got, TamperprobeError):
            raise got
        return got


class Slots:
    """At most ``per_server`` entries of one server address (scheme, host, port) run at once: ``with slots.held(url):``."""

    def __init__(self, per_server: int) -> None:
        self.per_server = per_server
        self._lock = threading.Lock()
        self._by_origin: dict[tuple[str, str, int | None], threading.BoundedSemaphore] = {}

    @staticmethod
    def origin(url: str) -> tuple[str, str, int | None]:
        parts = urlsplit(url)
        port = parts.port if parts.port is not None else (443 if parts.scheme == "https" else 80)
        return (parts.scheme, (parts.hostname or "").lower(), port)

    @contextmanager
    def held(self, url: str) -> Iterator[None]:
        key = self.origin(url)
        with self._lock:
            sem = self._by_origin.setdefault(key, threading.BoundedSemaphore(self.per_server))
        with sem:
            yield


def expect_problem(fp: Fingerprint, expect: str | None) -> str | None:
    """Why ``fp`` is not the fingerprint ``expect`` names (its id or the model ``NAME:VERSION`` it vouches for, the one rule of
    ``fingerprint.check_expected``); None if it is. A malformed ``expect`` is a problem too: the entry is refused, never run."""
    from ..fingerprint import check_expected

    try:
        check_expected(fp, expect)
    except TamperprobeError as exc:
        shown = f"{fp.model_name}:{fp.model_version}" if fp.model_name is not None else "no model name or version"
        return f"fingerprint {fp.id[:12]} ({shown}) is not the one expected ({expect}): {one_line(exc)}"
    return None


def make_session(
    e: Endpoint,
    fp: Fingerprint,
    settings: Settings,
    on_run: Callable[[Run], None] | None,
    on_warning: Callable[[str], None] | None,
    *,
    default_profile: str | None = None,
    claim: Callable[..., dict[str, list[int]]] | None = None,
) -> Session:
    """The session of endpoint ``e``: its client built from the entry's fields, the fleet's history and hook settings.

    ``default_profile`` is the client profile of an entry that names none (None: ``verify``'s default)."""
    from ..served.clients import make_client

    client = make_client(
        e.protocol,
        e.url,
        model_name=e.model_name,
        headers=dict(e.headers),
        token_env=e.token_env,
        token_file=e.token_file,
        timeout=e.timeout,
        deadline=e.deadline,
        retries=e.retries,
        batch_size=e.batch_size,
        delay=e.delay,
        spread=e.spread,
        verify_tls=not e.insecure,
        ca_file=None if e.ca_cert is None else str(e.ca_cert),
        template=None if e.template is None else str(e.template),
        profile=e.client_profile or default_profile,
        input_spec=fp.input_spec,
        classes=fp.classes,
    )
    return Session(fp, client, settings, endpoint=e.name, fingerprint_file=e.fingerprint, on_run=on_run, on_warning=on_warning, claim=claim)


def session_settings(e: Endpoint, *, record: bool, history_path: str | Path | None) -> Settings:
    return Settings(
        output_spec=e.output_spec,
        tolerance=e.tolerance,
        per_run=e.per_run,
        decoys=e.decoys,
        allow_repeat=e.allow_repeat,
        record=record,
        history_path=history_path,
        protocol=e.protocol,
        hook=e.hook,
    )


def check(
    fleet: Fleet,
    *,
    concurrency: int | None = None,
    record: bool = True,
    history_path: str | Path | None = None,
    on_outcome: Callable[[Outcome], None] | None = None,
    on_run: Callable[[Endpoint, Run], None] | None = None,
    on_warning: Callable[[str, str], None] | None = None,
) -> list[Outcome]:
    """Verify every endpoint of ``fleet`` once; the outcomes in file order (``on_outcome`` hears each as it ends).

    ``on_run(endpoint, run)`` is each session's alarm callback (before its hook and its record);
    ``on_warning(endpoint name, text)`` hears the sessions' warnings. Nothing raises for one
    endpoint's problem: it becomes that endpoint's outcome.
    """
    history_path = history_path if history_path is not None else fleet.settings.history
    fingerprints = _Fingerprints()
    slots = Slots(fleet.settings.per_endpoint_connections)
    lock = threading.Lock()  # callbacks are called one at a time

    def locked(fn: Callable[..., None] | None, *head: Any) -> Callable[..., None] | None:
        if fn is None:
            return None

        def call(*args: Any) -> None:
            with lock:
                fn(*head, *args)

        return call

    def one(e: Endpoint) -> Outcome:
        start = time.monotonic()
        url = redact_url(e.url)
        fp_id = None
        try:
            fp = fingerprints.get(e)
            fp_id = fp.id
            problem = expect_problem(fp, e.expect)
            if problem:
                return Outcome(e.name, url, NOT_AUTHENTIC, fp_id, problem=problem, seconds=time.monotonic() - start)
            settings = session_settings(e, record=record, history_path=history_path)
            session = make_session(e, fp, settings, locked(on_run, e), locked(on_warning, e.name), default_profile=FLEET_PROFILE, claim=claims)
            with slots.held(e.url):  # before the draw: waiting for a slot spends no marker and none of the deadline
                try:
                    run = session.next_run()  # drawn (committed to the ledger before sending), queried, compared
                    session.alarm(run)
                    recorder.add(session, run)  # then recorded, in a batch (records.py)
                finally:  # inside the slot: its connection is closed before another entry may open one
                    session.target.close() if hasattr(session.target, "close") else None
            return Outcome(e.name, url, run.report.verdict, fp_id, run=run, seconds=time.monotonic() - start)
        except TamperprobeError as exc:
            verdict = NOT_AUTHENTIC if exc.exit_code == EXIT_UNTRUSTED else ERROR
            return Outcome(e.name, url, verdict, fp_id, problem=one_line(exc, 300), seconds=time.monotonic() - start)
        except Exception as exc:  # noqa: BLE001 - one endpoint's bug must not cost the others their verdicts
            return Outcome(
                e.name, url, ERROR, fp_id, problem=f"internal error: {one_line(exc, 300, with_type=True)}", seconds=time.monotonic() - start
            )

    for e in fleet.endpoints:  # every file read and checked once, before any endpoint is queried
        try:
            fingerprints.get(e)
        except TamperprobeError:
            pass  # kept in the cache: that endpoint's outcome says why
    workers = max(1, min(concurrency or fleet.settings.concurrency, len(fleet.endpoints)))
    outcomes: dict[str, Outcome] = {}
    warn = locked(on_warning) or (lambda _name, _text: None)
    recorder, claims = Recorder(history_path, warn), Claims(history_path)
    try:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fleet") as pool:
            for future in as_completed([pool.submit(one, e) for e in fleet.endpoints]):
                outcome = future.result()
                outcomes[outcome.endpoint] = outcome
                if on_outcome is not None:
                    with lock:
                        on_outcome(outcome)
    finally:
        claims.close()
        recorder.close()  # every run of the pass is in the history (or warned about) before check returns
    return [outcomes[e.name] for e in fleet.endpoints]
