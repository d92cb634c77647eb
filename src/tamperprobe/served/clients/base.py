"""Shared HTTP machinery of the endpoint clients, and the rules that turn a response into an ``Answer``.

Every client is an ``HTTPTarget``: it implements the ``Target`` protocol, so ``verify`` treats a
served model like a local one. What it does on each ``query``:

* one marker per request by default (``batch_size``), in a shuffled order (``shuffle``, ``seed``;
  seed ``None`` draws a fresh order each run), with an optional random pause of up to ``delay``
  seconds between requests, so verification traffic looks like ordinary traffic;
* headers: ``headers`` as given, plus ``Authorization: Bearer <value of $token_env>``;
* TLS certificates are verified unless ``verify_tls=False``; redirects are not followed (a
  redirect would carry the token elsewhere): a 3xx is a failure;
* ``timeout`` seconds to connect and to receive the whole answer;
* up to ``retries`` retries with exponential backoff (``backoff * 2**attempt`` seconds) on
  connection errors, timeouts, 5xx and 429; a 429/503 ``Retry-After`` is honoured up to
  ``max_retry_after`` seconds. Once an endpoint stayed unreachable through all retries, later
  requests of the same query are tried once (no retries) until one gets through, so a dead
  endpoint costs ``timeout * (retries + 1)`` once, not for every marker;
* the response body is streamed and abandoned beyond ``max_response_bytes``.

Nothing raises out of ``query``: each marker gets an ``Answer`` or a ``QueryFailure`` whose reason
starts with one of:

=====================================  =========================================================
``connection refused``                 nothing listens at the endpoint
``cannot connect: ...``                DNS, TLS or another connection error
``timed out after T s``                no (complete) answer within the timeout
``connection closed by the server``    the server hung up without an answer
``HTTP 500: <error>``                  any non-2xx status (after retries for 5xx/429)
``response larger than 1 MiB``         the body exceeded ``max_response_bytes``
``malformed response: ...``            not JSON, a missing output, a wrong shape, an unknown label
``NaN in response``                    a NaN score (``infinite value in response`` likewise)
``wrong number of classes: ...``       a score vector whose length is not the model's class count
``the endpoint reveals ...``           the API's answers cannot answer the requested output spec
=====================================  =========================================================

with `` (after N attempts)`` appended when retries were spent. ``verify`` turns any of them into
INCONCLUSIVE: a bad answer is never silently accepted.

Turning outputs into an answer (``to_answer``): a response may carry labels, a top-1
probability, a full probability vector, full logits, or ranked ``(index, score)`` pairs (the
classification extension, TorchServe's ``{label: prob}``). The form the spec asks for is used as
it is; a richer form is reduced the way ``OutputSpec.reveal`` would (logits answer every spec,
probabilities every spec but ``logits``, ranked pairs the label specs); a poorer form is a
failure. Probabilities are used as returned, not re-rounded (an unrounded or more finely rounded
answer still matches); an API that rounds more coarsely than the spec says will mismatch.
"""

from __future__ import annotations

import email.utils
import json
import math
import os
import re
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import numpy as np

from ...errors import UsageError
from ...outputs import Answer, OutputSpec
from ..targets import QueryFailure

DEFAULT_MAX_RESPONSE = 1 << 20


class Failure(Exception):
    """Raised inside a client; becomes ``QueryFailure(reason)`` for the markers concerned."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def human_size(n: int) -> str:
    if n >= 1 << 20 and n % (1 << 20) == 0:
        return f"{n >> 20} MiB"
    if n >= 1024 and n % 1024 == 0:
        return f"{n >> 10} KiB"
    return f"{n} bytes"


def _one_line(text: str, limit: int = 200) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def redact_url(url: str) -> str:
    """The URL without user:password@ (for names, logs and history)."""
    parts = urlsplit(url)
    if parts.username or parts.password:
        host = parts.hostname or ""
        if parts.port:
            host = f"{host}:{parts.port}"
        parts = parts._replace(netloc=host)
    return urlunsplit(parts)


def check_url(url: str) -> str:
    parts = urlsplit(str(url).strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(f"bad endpoint URL {url!r}: expected http://host:port/... or https://...")
    return str(url).strip()


def retry_after_seconds(value: str | None) -> float | None:
    """A Retry-After header (seconds or an HTTP date) in seconds from now; None if absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


# --------------------------------------------------------------------------- answers


@dataclass
class Parts:
    """What one response says about one marker, before the output spec decides what to use."""

    logits: list[float] | None = None
    probs: list[float] | None = None
    labels: list[int] | None = None
    probability: float | None = None  # the top-1 probability
    ranked: list[tuple[int, float]] | None = None  # (class index, score), most likely first
    ranked_kind: str | None = None  # "probs" | "logits" | None (unknown)

    def empty(self) -> bool:
        return self.logits is None and self.probs is None and self.labels is None and self.probability is None and self.ranked is None

    def describe(self) -> str:
        if self.logits is not None:
            return "logits"
        if self.probs is not None:
            return "probabilities"
        have = []
        if self.labels is not None:
            have.append(f"{len(self.labels)} label(s)")
        if self.probability is not None:
            have.append("the top-1 probability")
        if self.ranked is not None:
            have.append(f"the top {len(self.ranked)} classes")
        return " and ".join(have) or "nothing usable"


def as_label(value: Any, what: str = "label") -> int:
    """An int class index from a JSON int or an integer string ("7"); anything else is malformed."""
    if isinstance(value, bool):
        raise Failure(f"malformed response: {what} {value!r} is not a class index")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, (str, bytes)):
        text = value.decode(errors="replace") if isinstance(value, bytes) else value
        if re.fullmatch(r"\s*-?\d+\s*", text):
            return int(text)
        raise Failure(f"malformed response: {what} {_one_line(text, 40)!r} is not a class index")
    raise Failure(f"malformed response: {what} {_one_line(repr(value), 40)} is not a class index")


def as_number(value: Any, what: str = "score") -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        if isinstance(value, str) and value.strip().lower() in ("nan", "inf", "-inf", "infinity", "-infinity"):
            value = float(value)
        else:
            raise Failure(f"malformed response: {what} {_one_line(repr(value), 40)} is not a number")
    v = float(value)
    if math.isnan(v):
        raise Failure("NaN in response")
    if math.isinf(v):
        raise Failure("infinite value in response")
    return v


def as_vector(value: Any, what: str = "scores") -> list[float]:
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], list):
        value = value[0]  # one row of a batch
    if not isinstance(value, list) or not value:
        raise Failure(f"malformed response: {what} must be a non-empty list of numbers")
    return [as_number(v, what[:-1] if what.endswith("s") else what) for v in value]


def as_labels(value: Any, what: str = "labels") -> list[int]:
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], list):
        value = value[0]
    if not isinstance(value, list):
        value = [value]
    if not value:
        raise Failure(f"malformed response: {what} is empty")
    return [as_label(v) for v in value]


def guess_kind(name: str, values: list[float] | None = None) -> str:
    """Are these scores probabilities or logits? By name first, then by value (in [0, 1] summing to 1)."""
    n = name.lower()
    if "logit" in n:
        return "logits"
    if "prob" in n or "softmax" in n:
        return "probs"
    if values is not None and values and all(0.0 <= v <= 1.0 for v in values) and abs(sum(values) - 1.0) <= 1e-3:
        return "probs"
    return "logits"


_LABEL_KEYS = ("label", "labels", "class", "classes", "class_id", "class_ids", "predicted_label", "predicted_class", "prediction")
_PROB_VECTOR_KEYS = ("probabilities", "probs", "softmax", "scores", "probability", "prob", "confidence")
_LOGIT_KEYS = ("logits", "logit")


def parts_from_named(d: dict) -> Parts:
    """Read a dict of named outputs ({"logits": [...]}, {"label": 3, "probability": 0.9}, TF's {"classes", "probabilities"})."""
    low = {str(k).lower(): v for k, v in d.items()}
    p = Parts()
    for k in _LOGIT_KEYS:
        if k in low and p.logits is None:
            p.logits = as_vector(low[k], k)
    for k in _PROB_VECTOR_KEYS:
        if k in low:
            v = low[k]
            if isinstance(v, list) and not (len(v) == 1 and not isinstance(v[0], list)):
                if p.probs is None:
                    p.probs = as_vector(v, k)
            elif p.probability is None:
                p.probability = as_number(v[0] if isinstance(v, list) else v, k)
    for k in _LABEL_KEYS:
        if k in low and p.labels is None:
            p.labels = as_labels(low[k], k)
    if p.empty():
        keys = ", ".join(sorted(map(str, d)))[:120]
        raise Failure(f"malformed response: no labels or scores found (keys: {keys or 'none'})")
    return p


def parts_from_label_map(d: dict) -> Parts:
    """TorchServe's {class: probability} (top-5 by default): ranked pairs, most likely first."""
    pairs = [(as_label(k), as_number(v, "probability")) for k, v in d.items()]
    if not pairs:
        raise Failure("malformed response: empty prediction")
    pairs.sort(key=lambda kv: -kv[1])  # stable: keeps the server's order for ties
    return Parts(ranked=pairs, ranked_kind="probs")


def _check_labels(labels: list[int], classes: int | None) -> None:
    if len(set(labels)) != len(labels):
        raise Failure(f"malformed response: repeated label in {labels}")
    for c in labels:
        if c < 0 or (classes is not None and c >= classes):
            raise Failure(f"malformed response: label {c} out of range" + (f" for {classes} classes" if classes else ""))


def _check_vector(v: list[float], classes: int | None, what: str) -> None:
    if classes is not None and len(v) != classes:
        raise Failure(f"wrong number of classes: got {len(v)} {what}, expected {classes}")


def to_answer(parts: Parts, spec: OutputSpec, classes: int | None = None) -> Answer:
    """The answer ``spec`` asks for, from what the response holds (rules in the module doc); raises Failure."""
    p = parts
    for v, what in ((p.logits, "logits"), (p.probs, "probabilities")):
        if v is not None:
            for x in v:
                as_number(x)
            _check_vector(v, classes, what)
    if p.probability is not None:
        as_number(p.probability)
    if p.labels is not None:
        _check_labels(p.labels, classes)
    if p.ranked is not None:
        _check_labels([c for c, _ in p.ranked], classes)
        for _, s in p.ranked:
            as_number(s)
        # every class present: the ranking is a full score vector
        full = len(p.ranked) if classes is None else classes
        if len(p.ranked) == full and sorted(c for c, _ in p.ranked) == list(range(full)) and p.logits is None and p.probs is None:
            vec = [0.0] * full
            for c, s in p.ranked:
                vec[c] = s
            kind = p.ranked_kind or guess_kind("", vec)
            if kind == "probs":
                p = Parts(probs=vec, labels=p.labels, probability=p.probability, ranked=p.ranked, ranked_kind=kind)
            else:
                p = Parts(logits=vec, labels=p.labels, probability=p.probability, ranked=p.ranked, ranked_kind=kind)

    if spec.kind == "logits":
        if p.logits is not None:
            return spec.reveal(np.asarray(p.logits, dtype=np.float64))
        raise Failure(f"the endpoint reveals {p.describe()}, not logits: verify with a weaker --output-spec")
    if spec.kind == "probs":
        if p.probs is not None:
            return Answer(scores=tuple(float(v) for v in p.probs))
        if p.logits is not None:
            return spec.reveal(np.asarray(p.logits, dtype=np.float64))
        raise Failure(f"the endpoint reveals {p.describe()}, not every class probability: verify with a weaker --output-spec")
    if spec.kind == "top1-prob":
        if p.labels is not None and p.probability is not None:
            return Answer(labels=(p.labels[0],), scores=(float(p.probability),))
        if p.probs is not None:
            top = int(np.argsort(-np.asarray(p.probs), kind="stable")[0])
            return Answer(labels=(top,), scores=(float(p.probs[top]),))
        if p.logits is not None:
            return spec.reveal(np.asarray(p.logits, dtype=np.float64))
        if p.ranked and p.ranked_kind == "probs":
            return Answer(labels=(p.ranked[0][0],), scores=(float(p.ranked[0][1]),))
        raise Failure(f"the endpoint reveals {p.describe()}, not the top-1 probability: verify with --output-spec top1")
    k = spec.label_count
    if p.labels is not None and len(p.labels) >= k:
        return Answer(labels=tuple(p.labels[:k]))
    if p.ranked is not None and len(p.ranked) >= k:
        return Answer(labels=tuple(c for c, _ in p.ranked[:k]))
    vec = p.logits if p.logits is not None else p.probs
    if vec is not None:
        if k > len(vec):
            raise Failure(f"wrong number of classes: got {len(vec)} scores, {spec} needs at least {k}")
        return Answer(labels=tuple(int(c) for c in np.argsort(-np.asarray(vec, dtype=np.float64), kind="stable")[:k]))
    raise Failure(f"the endpoint reveals only {p.describe()}; {spec} needs {k} labels")


def check_answer(answer: Answer, spec: OutputSpec, classes: int | None) -> Answer:
    """A last check of any answer a client produced: right form for the spec, finite, in range."""
    if spec.label_count:
        if answer.labels is None or len(answer.labels) != spec.label_count:
            raise Failure(f"malformed response: expected {spec.label_count} label(s)")
        _check_labels(list(answer.labels), classes)
    if spec.kind in ("top1-prob", "probs", "logits"):
        if answer.scores is None:
            raise Failure("malformed response: no scores")
        for s in answer.scores:
            as_number(s)
        if spec.kind != "top1-prob":
            _check_vector(list(answer.scores), classes, "scores")
    return answer


# --------------------------------------------------------------------------- HTTP


@dataclass
class HTTPResponse:
    status: int
    headers: Any
    body: bytes

    def json(self) -> Any:
        try:
            return json.loads(self.body)
        except RecursionError:
            raise Failure("malformed response: JSON nested too deeply") from None
        except (ValueError, UnicodeDecodeError):
            ctype = self.headers.get("content-type", "?") if self.headers is not None else "?"
            raise Failure(f"malformed response: not JSON ({ctype}): {_one_line(self.body.decode(errors='replace'), 80)!r}") from None


class HTTPTarget:
    """Base of the endpoint clients: HTTP with retries and limits, marker scheduling, failure capture.

    Subclasses set ``protocol`` and implement ``_query_batch(x, spec) -> list[Answer]`` (raising
    ``Failure`` for the whole batch, or returning ``QueryFailure`` entries per marker), and may
    override ``_prepare(spec)`` (run once per query before the markers, e.g. to read metadata).
    """

    protocol = "http"
    max_batch: int | None = None  # None: any batch size; 1: the dialect takes one input per request
    # A model URL of the dialect, as a regex with groups (base URL, model name, version or None):
    # such an endpoint sets the model name and version unless --model-name is given.
    model_url_pattern: str | None = None
    default_model_name: str | None = None

    def __init__(
        self,
        url: str,
        *,
        model_name: str | None = None,
        headers: dict[str, str] | None = None,
        token_env: str | None = None,
        timeout: float = 10.0,
        retries: int = 3,
        backoff: float = 0.2,
        batch_size: int = 1,
        delay: float = 0.0,
        shuffle: bool = True,
        seed: int | None = None,
        verify_tls: bool = True,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE,
        input_spec=None,
        classes: int | None = None,
        max_retry_after: float = 10.0,
        transport=None,
    ) -> None:
        import httpx

        self.version: str | None = None
        if self.model_url_pattern:
            m = re.match(self.model_url_pattern, url.strip())
            if m:
                url, self.version = m.group(1), m.group(3)
                model_name = model_name or m.group(2)
            url = url.rstrip("/")
        self.url = check_url(url)
        self.model_name = model_name or self.default_model_name
        if not timeout > 0:
            raise UsageError("--timeout must be > 0 seconds")
        if retries < 0:
            raise UsageError("--retries must be >= 0")
        if batch_size < 1:
            raise UsageError("--batch-size must be >= 1")
        if delay < 0 or backoff < 0:
            raise UsageError("--delay and backoff must be >= 0")
        if max_response_bytes < 1:
            raise UsageError("the response size cap must be >= 1 byte")
        self.timeout = float(timeout)
        self.retries = int(retries)
        self.backoff = float(backoff)
        self.batch_size = int(batch_size) if self.max_batch is None else min(int(batch_size), self.max_batch)
        self.delay = float(delay)
        self.shuffle = shuffle
        self.seed = seed
        self.verify_tls = verify_tls
        self.max_response_bytes = int(max_response_bytes)
        self.max_retry_after = float(max_retry_after)
        self.input_spec = input_spec
        self.classes = classes
        self.last_latencies: list[float | None] = []
        hdrs = {"User-Agent": "tamperprobe", "Accept": "application/json", "Accept-Encoding": "gzip, deflate"}
        for k, v in (headers or {}).items():
            k, v = str(k).strip(), str(v).strip()
            if not re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", k) or any(ch in v for ch in "\r\n\0"):
                raise UsageError(f"bad header {k!r}: use Name:value with a token name and a one-line value")
            hdrs[k] = v
        if token_env:
            token = os.environ.get(token_env)
            if not token:
                raise UsageError(f"environment variable {token_env} is not set or empty (--token-env)")
            hdrs["Authorization"] = f"Bearer {token.strip()}"
        # Redirects are never followed, so a plain-http endpoint never needs TLS: skip loading the CA bundle.
        tls = verify_tls if urlsplit(self.url).scheme == "https" else False
        self._client = httpx.Client(
            headers=hdrs,
            verify=tls,
            follow_redirects=False,
            transport=transport,
            timeout=httpx.Timeout(self.timeout),
            trust_env=False,
        )
        self._unreachable = False
        self.name = f"{self.protocol}:{redact_url(self.endpoint_url())}"

    def endpoint_url(self) -> str:
        """The URL that names this client in reports and history (subclasses: the model's URL)."""
        return self.url

    # ------------------------------------------------------------------ Target protocol

    def query(self, inputs: np.ndarray, spec: OutputSpec) -> list[Answer | QueryFailure]:
        try:
            spec = OutputSpec.parse(spec)
            x = np.asarray(inputs)
        except Exception as exc:  # noqa: BLE001 - query never raises
            return [QueryFailure(f"bad query: {exc}")] * len(inputs)
        n = len(x)
        results: list[Answer | QueryFailure | None] = [None] * n
        latencies: list[float | None] = [None] * n
        self._unreachable = False
        rng = np.random.default_rng(self.seed)
        try:
            self._prepare(spec, x)
        except Failure as f:
            self.last_latencies = latencies
            return [QueryFailure(f.reason)] * n
        except Exception as exc:  # noqa: BLE001
            self.last_latencies = latencies
            return [QueryFailure(f"client error: {type(exc).__name__}: {_one_line(str(exc), 120)}")] * n
        order = rng.permutation(n) if self.shuffle else np.arange(n)
        for b, start in enumerate(range(0, n, self.batch_size)):
            idx = order[start : start + self.batch_size]
            if b and self.delay > 0:
                time.sleep(float(rng.uniform(0.0, self.delay)))
            t0 = time.monotonic()
            try:
                answers = list(self._query_batch(x[idx], spec))
                if len(answers) != len(idx):
                    raise Failure(f"malformed response: {len(answers)} answers for {len(idx)} inputs")
            except Failure as f:
                answers = [QueryFailure(f.reason)] * len(idx)
            except Exception as exc:  # noqa: BLE001 - never raise out of query()
                answers = [QueryFailure(f"client error: {type(exc).__name__}: {_one_line(str(exc), 120)}")] * len(idx)
            dt = time.monotonic() - t0
            for i, a in zip(idx, answers):
                if isinstance(a, Answer):
                    try:
                        a = check_answer(a, spec, self.classes)
                    except Failure as f:
                        a = QueryFailure(f.reason)
                results[int(i)] = a
                latencies[int(i)] = dt
        self.last_latencies = latencies
        return [r if r is not None else QueryFailure("no answer returned") for r in results]

    def close(self) -> None:
        self._client.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ hooks

    def _prepare(self, spec: OutputSpec, x: np.ndarray) -> None:
        """Run once per query before any marker (metadata look-ups); raise Failure to fail all markers."""

    def _query_batch(self, x: np.ndarray, spec: OutputSpec) -> list[Answer | QueryFailure]:
        raise NotImplementedError

    # ------------------------------------------------------------------ HTTP with retries

    def request(
        self,
        method: str,
        url: str,
        *,
        json_body: Any = None,
        content: bytes | None = None,
        headers: dict | None = None,
        ok_statuses: tuple[int, ...] = (),
    ) -> HTTPResponse:
        """Send with retries; return a 2xx response (or one in ``ok_statuses``); raise Failure otherwise."""
        import httpx

        if json_body is not None:
            try:
                content = json.dumps(json_body, allow_nan=False).encode()
            except ValueError:
                raise Failure("cannot send NaN or infinite inputs as JSON") from None
            headers = {"Content-Type": "application/json", **(headers or {})}
        attempts = 1 if self._unreachable else self.retries + 1
        reason = "no attempt made"
        unreachable = False
        for attempt in range(attempts):
            wait = self.backoff * (2**attempt)
            try:
                resp = self._send_once(method, url, content, headers)
            except Failure as f:
                reason = f.reason
                if not getattr(f, "retryable", False):
                    raise
                unreachable = bool(getattr(f, "unreachable", False))
            except httpx.HTTPError as exc:  # anything _send_once did not classify
                reason = f"HTTP error: {_one_line(str(exc) or type(exc).__name__, 120)}"
                unreachable = False
            else:
                self._unreachable = unreachable = False
                if 200 <= resp.status < 300 or resp.status in ok_statuses:
                    return resp
                reason = f"HTTP {resp.status}: {self._error_text(resp)}"
                if 300 <= resp.status < 400:
                    loc = resp.headers.get("location", "")
                    raise Failure(f"HTTP {resp.status}: redirect to {_one_line(loc, 100)!r} not followed (give the final URL)")
                if not (resp.status == 429 or resp.status >= 500):
                    raise Failure(reason)
                ra = retry_after_seconds(resp.headers.get("retry-after"))
                if ra is not None:
                    wait = min(ra, self.max_retry_after)
            if attempt < attempts - 1:
                time.sleep(wait)
        if unreachable:
            self._unreachable = True  # later requests of this query: one attempt each until one gets through
        if attempts > 1:
            reason = f"{reason} (after {attempts} attempts)"
        raise Failure(reason)

    def _error_text(self, resp: HTTPResponse) -> str:
        text = resp.body.decode(errors="replace")
        try:
            doc = json.loads(text)
            if isinstance(doc, dict) and isinstance(doc.get("error"), str):
                text = doc["error"]
            elif isinstance(doc, dict) and isinstance(doc.get("message"), str):
                text = doc["message"]
        except ValueError:
            pass
        return _one_line(text, 200) or "(empty body)"

    def _send_once(self, method: str, url: str, content: bytes | None, headers: dict | None) -> HTTPResponse:
        import httpx

        start = time.monotonic()
        cap = self.max_response_bytes
        try:
            with self._client.stream(method, url, content=content, headers=headers) as resp:
                declared = resp.headers.get("content-length")
                if declared is not None and declared.isdigit() and int(declared) > cap:
                    raise Failure(f"response larger than {human_size(cap)}")
                chunks, size = [], 0
                for chunk in resp.iter_raw():
                    size += len(chunk)
                    if size > cap:
                        raise Failure(f"response larger than {human_size(cap)}")
                    if time.monotonic() - start > self.timeout:
                        raise _retryable(f"timed out after {self.timeout:.1f} s", unreachable=False)
                    chunks.append(chunk)
                body = b"".join(chunks)
                encoding = resp.headers.get("content-encoding", "").lower()
                if encoding in ("gzip", "deflate"):
                    body = _decompress(body, encoding, cap)
                elif encoding not in ("", "identity"):
                    raise Failure(f"malformed response: unsupported Content-Encoding {encoding!r}")
                return HTTPResponse(resp.status_code, resp.headers, body)
        except httpx.ConnectTimeout:
            raise _retryable(f"timed out after {self.timeout:.1f} s (connecting)", unreachable=True) from None
        except httpx.TimeoutException:
            raise _retryable(f"timed out after {self.timeout:.1f} s", unreachable=True) from None
        except httpx.ConnectError as exc:
            msg = str(exc)
            if "refused" in msg.lower():
                raise _retryable("connection refused", unreachable=True) from None
            raise _retryable(f"cannot connect: {_one_line(msg, 120)}", unreachable=True) from None
        except httpx.RemoteProtocolError as exc:
            raise _retryable(f"connection closed by the server ({_one_line(str(exc), 80)})", unreachable=False) from None
        except httpx.TransportError as exc:
            raise _retryable(f"transport error: {_one_line(str(exc) or type(exc).__name__, 120)}", unreachable=False) from None


def _retryable(reason: str, *, unreachable: bool) -> Failure:
    f = Failure(reason)
    f.retryable = True  # type: ignore[attr-defined]
    f.unreachable = unreachable  # type: ignore[attr-defined]
    return f


def _decompress(body: bytes, encoding: str, cap: int) -> bytes:
    import zlib

    d = zlib.decompressobj(16 + zlib.MAX_WBITS if encoding == "gzip" else zlib.MAX_WBITS)
    try:
        out = d.decompress(body, cap + 1)
    except zlib.error:
        raise Failure(f"malformed response: bad {encoding} body") from None
    if len(out) > cap:
        raise Failure(f"response larger than {human_size(cap)}")
    return out


def nested(x: np.ndarray, datatype_kind: str = "f") -> list:
    """An array as nested JSON lists: floats as exact float64 values of the float32 inputs."""
    if datatype_kind in "iu":
        return np.asarray(x).astype(np.int64).tolist()
    return np.asarray(x).astype(np.float64).tolist()
