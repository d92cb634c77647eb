"""What an operator who sees every request can do about markers: routers, one small class each.

The threat. The party running the server holds the original model O and a tampered copy T and
sees every prediction request. It answers the requests it *flags* with O and all others with T,
so a flagged marker always gets the intact answer and can never reveal the tampering. A router
scores each request (higher: more likely a marker); the operator flags the requests whose score
is above a threshold, chosen on its own ordinary traffic so that a given share of that traffic —
the router's **cost**, what the operator pays in running O — is flagged (``threshold_for_cost``).

Routers (``ROUTERS``):

==================  ===========================================================================
``exact-repeat``    1 when the very same input was requested before (a cache of earlier requests)
``near-twin``       −(L2 distance to the nearest earlier request): near-duplicates are flagged
``margin-original`` −(top-1 minus top-2 logit) on O: inputs near a decision boundary
``margin-tampered`` the same on T: the cheap variant, no need to run O on every request
``gradient``        ‖∂(z_top1 − z_top2)/∂x‖ on O (``measure="distance"``: that norm over the
                    margin, the inverse of the linearised distance to the decision boundary)
``learned``         logistic regression on image statistics (``image_statistics``), trained on
                    markers the operator saw in earlier runs against its ordinary traffic
``request-shape``   1 + u for a request whose shape (headers, body keys, number format) the
                    ordinary traffic never had, else u (uniform): ``RequestShapeRouter``, not
                    registered; every request carries its sender (``sender=``, ``CLIENTS``)
==================  ===========================================================================

``runs_original`` marks the routers that run O on every request (margin-original, gradient): they
leave a cheaper tampered model no saving, so they serve a trojan, not a cost cut.

Each router follows the plug-in convention of ``tamperprobe._params`` (keyword-only
hyper-parameters stored by ``__init__``, ``constraints``, ``get_params``/``repr``), and:

* ``fit(ordinary, *, operator, seen=None)`` learns what it needs from the operator's earlier
  ordinary traffic, the models (``Operator``) and, for ``learned``, the markers it has seen;
  everything learned is an attribute ending in ``_``; returns the router;
* ``score(requests, history=())`` scores requests in the order they arrive. ``history`` holds
  arrays of requests received before them. A *stream* router (``stream = True``: exact-repeat,
  near-twin) compares each request with the history **and the requests before it**; the others
  score each request on its own;
* ``calibrate(ordinary_scores, cost)`` sets ``threshold_`` for a cost; ``flag(requests, history)``
  is ``score > threshold_``.

Inputs are arrays (N, ...) in the model's domain (8-bit markers decoded), as O and T receive them.
"""

from __future__ import annotations

import functools
import hashlib
import math
import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from .._params import Configurable, Interval, Options
from .._registry import Registry
from ..errors import UsageError
from ..models import Model
from ..outputs import top_margin

_BLOCK = 1024  # rows of requests compared with the history at once


@dataclass(frozen=True)
class Operator:
    """What the operator runs: the original model O, the tampered model T, and the input range."""

    original: Model
    tampered: Model | None = None
    low: float = 0.0
    high: float = 1.0


def threshold_for_cost(scores: np.ndarray, cost: float) -> float:
    """The smallest threshold ``t`` with ``mean(scores > t) <= cost``: the operator's choice for a cost.

    With distinct scores exactly ``floor(cost · n)`` of the ``n`` ordinary requests are flagged; ties
    at the threshold are not flagged, so the cost never exceeds the one asked for.
    """
    s = np.sort(np.asarray(scores, dtype=np.float64).reshape(-1))[::-1]
    if not 0.0 <= cost <= 1.0:
        raise UsageError(f"a cost is a share of traffic in [0, 1], got {cost}")
    if len(s) == 0:
        raise UsageError("no ordinary traffic to calibrate the threshold on")
    k = int(math.floor(cost * len(s) + 1e-9))
    if k >= len(s):
        return -math.inf
    return float(s[k])


def cost_of(scores: np.ndarray, threshold: float) -> float:
    """The share of ``scores`` (of ordinary requests) above ``threshold``: what the router costs."""
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    return float((s > threshold).mean()) if len(s) else 0.0


class Router(Configurable, ABC):
    """Base of every router (see the module doc); the first docstring line is its one-line description."""

    #: The score of a request depends on the requests before it (``history``).
    stream: ClassVar[bool] = False
    #: ``fit`` needs the tampered model.
    uses_tampered: ClassVar[bool] = False
    #: ``fit`` needs markers the operator saw in earlier runs.
    learns_markers: ClassVar[bool] = False
    #: To score a request the operator runs the original model on it: O runs on every request, so a cheaper
    #: tampered model (quantized, pruned) saves nothing; such a router only serves an operator who wants T's answers.
    runs_original: ClassVar[bool] = False

    def fit(self, ordinary: np.ndarray, *, operator: Operator, seen: np.ndarray | None = None) -> Router:
        """Learn from ordinary traffic (and ``seen`` markers); returns the router."""
        self.validated()
        if self.uses_tampered and operator.tampered is None:
            raise UsageError(f"router {self.name} scores with the tampered model: give Operator(tampered=...)")
        if self.learns_markers and (seen is None or len(seen) == 0):
            raise UsageError(f"router {self.name} learns from markers seen in earlier runs: give seen=...")
        self.operator_ = operator
        self._fit(np.asarray(ordinary, dtype=np.float32), None if seen is None else np.asarray(seen, dtype=np.float32))
        return self

    def _fit(self, ordinary: np.ndarray, seen: np.ndarray | None) -> None:
        """What the router learns beyond the operator (nothing by default)."""

    @abstractmethod
    def score(self, requests: np.ndarray, history: Sequence[np.ndarray] = ()) -> np.ndarray:
        """One score per request, higher for a likelier marker (see the module doc for ``history``)."""

    def calibrate(self, ordinary_scores: np.ndarray, cost: float) -> float:
        """Set and return ``threshold_``: the operator's threshold for ``cost`` on these ordinary scores."""
        self.threshold_ = threshold_for_cost(ordinary_scores, cost)
        return self.threshold_

    def flag(self, requests: np.ndarray, history: Sequence[np.ndarray] = ()) -> np.ndarray:
        """Which requests the operator answers with the original model."""
        return self.score(requests, history) > self.threshold_

    def clone(self) -> Router:
        """An unfitted copy with the same hyper-parameters."""
        return type(self)(**self.get_params())


def _flat(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x)
    return x.reshape(len(x), -1)


# ----------------------------------------------------------------------------- stream routers


class ExactRepeat(Router):
    """Exact repeats: 1 for a request identical (bit for bit) to an earlier one, else 0."""

    name = "exact-repeat"
    stream = True

    def __init__(self) -> None:
        pass

    def _keys(self, h: np.ndarray) -> set[bytes]:
        """The rows of an earlier-request array as bytes; remembered per array object (held, so its id stays its own)."""
        cache: dict[int, tuple[np.ndarray, set[bytes]]] = self.__dict__.setdefault("_keys_cache", {})
        hit = cache.get(id(h))
        if hit is not None and hit[0] is h:
            return hit[1]
        keys = {row.tobytes() for row in np.ascontiguousarray(_flat(h), dtype=np.float32)}
        if len(h) >= 256:  # only the large, reused parts of a history are worth remembering
            cache[id(h)] = (h, keys)
        return keys

    def score(self, requests: np.ndarray, history: Sequence[np.ndarray] = ()) -> np.ndarray:
        chunks = [self._keys(h) for h in history]
        seen: set[bytes] = set()
        out = np.zeros(len(requests))
        for i, row in enumerate(np.ascontiguousarray(_flat(requests), dtype=np.float32)):
            key = row.tobytes()
            out[i] = 1.0 if key in seen or any(key in c for c in chunks) else 0.0
            seen.add(key)
        return out


def nearest_earlier(requests: np.ndarray, history: Sequence[np.ndarray] = ()) -> np.ndarray:
    """L2 distance of each request to the nearest one in ``history`` or before it in ``requests`` (inf: none)."""
    r = np.asarray(_flat(requests), dtype=np.float64)
    n = len(r)
    best = np.full(n, np.inf)
    rr = (r**2).sum(axis=1)
    for h in history:
        hf = np.asarray(_flat(h), dtype=np.float64)
        if len(hf) == 0:
            continue
        if hf.shape[1] != r.shape[1]:
            raise UsageError(f"history rows have {hf.shape[1]} values, requests {r.shape[1]}")
        hh = (hf**2).sum(axis=1)
        for i in range(0, n, _BLOCK):
            d2 = rr[i : i + _BLOCK, None] + hh[None, :] - 2.0 * (r[i : i + _BLOCK] @ hf.T)
            best[i : i + _BLOCK] = np.minimum(best[i : i + _BLOCK], d2.min(axis=1))
    for i in range(0, n, _BLOCK):  # the requests before each one in the same stream
        stop = min(n, i + _BLOCK)
        d2 = rr[i:stop, None] + rr[None, :stop] - 2.0 * (r[i:stop] @ r[:stop].T)
        later = np.arange(stop)[None, :] >= np.arange(i, stop)[:, None]
        d2[later] = np.inf
        best[i:stop] = np.minimum(best[i:stop], d2.min(axis=1))
    return np.sqrt(np.maximum(best, 0.0))


class NearTwin(Router):
    """Near-twins: −(L2 distance to the nearest earlier request), so requests close to an earlier one are flagged."""

    name = "near-twin"
    stream = True

    def __init__(self) -> None:
        pass

    def score(self, requests: np.ndarray, history: Sequence[np.ndarray] = ()) -> np.ndarray:
        return -nearest_earlier(requests, history)

    @property
    def distance_(self) -> float:
        """The distance within which the calibrated router flags a request."""
        return -self.threshold_


# ----------------------------------------------------------------------------- per-request routers


class _LowMargin(Router):
    on: ClassVar[str] = "original"

    def __init__(self) -> None:
        pass

    def score(self, requests: np.ndarray, history: Sequence[np.ndarray] = ()) -> np.ndarray:
        model = self.operator_.original if self.on == "original" else self.operator_.tampered
        assert model is not None  # fit checked it
        if len(requests) == 0:
            return np.zeros(0)
        return -top_margin(model.logits(np.asarray(requests, dtype=np.float32)))[1]


class MarginOriginal(_LowMargin):
    """Low margin on O: −(top-1 minus top-2 logit) of the original model."""

    name = "margin-original"
    on = "original"
    runs_original = True


class MarginTampered(_LowMargin):
    """Low margin on T: −(top-1 minus top-2 logit) of the tampered model itself (the operator need not run O)."""

    name = "margin-tampered"
    on = "tampered"
    uses_tampered = True


class Gradient(Router):
    """High input gradient on O: ‖∂(z_top1 − z_top2)/∂x‖ (``measure="distance"``: divided by the margin)."""

    name = "gradient"
    runs_original = True
    constraints = {"measure": Options("norm", "distance")}

    def __init__(self, *, measure: str = "norm") -> None:
        self.measure = measure

    def score(self, requests: np.ndarray, history: Sequence[np.ndarray] = ()) -> np.ndarray:
        from .._torch import margin_gradient

        x = np.asarray(requests, dtype=np.float32)
        if len(x) == 0:
            return np.zeros(0)
        model = self.operator_.original
        z = model.logits(x).astype(np.float64)
        order = np.argsort(-z, axis=1, kind="stable")
        top, second = order[:, 0], order[:, 1]
        g = margin_gradient(model.require_torch("the gradient router"), x, top, second)
        norm = np.sqrt((_flat(g) ** 2).sum(axis=1))
        if self.measure == "norm":
            return norm
        margin = z[np.arange(len(z)), top] - z[np.arange(len(z)), second]
        return norm / np.maximum(margin, 1e-12)


# ----------------------------------------------------------------------------- learned detector


def _spatial(x: np.ndarray) -> np.ndarray:
    """Inputs as (N, C, H, W): images keep their shape, flat vectors become one row of pixels."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 4:
        return x
    if x.ndim == 3:
        return x[:, None]
    return x.reshape(len(x), 1, 1, -1)


def image_statistics(x: np.ndarray, low: float, high: float, *, bins: int = 8, grid8: bool = True) -> np.ndarray:
    """Per image: mean, std, total variation, high-frequency energy, noise residual, dark and bright
    (saturated) shares, a ``bins``-bin histogram and (``grid8``) the share of values off the 8-bit grid.

    Values are first scaled to [0, 1] by the input range. The high-frequency energy is the mean
    squared 4-neighbour Laplacian over the variance; the noise residual the mean absolute
    difference to the 3×3 box-blurred image; the 8-bit grid is {k/255}.
    """
    u = (_spatial(x) - low) / (high - low)
    n = len(u)
    flat = u.reshape(n, -1)
    mean, std = flat.mean(axis=1), flat.std(axis=1)
    tv = np.zeros(n)
    if u.shape[2] > 1:
        tv += np.abs(np.diff(u, axis=2)).reshape(n, -1).mean(axis=1)
    if u.shape[3] > 1:
        tv += np.abs(np.diff(u, axis=3)).reshape(n, -1).mean(axis=1)
    p = np.pad(u, ((0, 0), (0, 0), (1, 1), (1, 1)), mode="edge")
    lap = 4 * u - p[:, :, :-2, 1:-1] - p[:, :, 2:, 1:-1] - p[:, :, 1:-1, :-2] - p[:, :, 1:-1, 2:]
    hf = (lap**2).reshape(n, -1).mean(axis=1) / (std**2 + 1e-12)
    blur = sum(p[:, :, i : i + u.shape[2], j : j + u.shape[3]] for i in range(3) for j in range(3)) / 9.0
    residual = np.abs(u - blur).reshape(n, -1).mean(axis=1)
    half = 0.5 / 255.0
    dark, bright = (flat <= half).mean(axis=1), (flat >= 1.0 - half).mean(axis=1)
    idx = np.clip((flat * bins).astype(np.int64), 0, bins - 1)
    hist = np.zeros((n, bins))
    np.add.at(hist, (np.repeat(np.arange(n), flat.shape[1]), idx.reshape(-1)), 1.0)
    hist /= flat.shape[1]
    cols = [mean, std, tv, hf, residual, dark, bright, *hist.T]
    if grid8:
        cols.append((np.abs(flat * 255.0 - np.rint(flat * 255.0)) > 1e-3).mean(axis=1))
    return np.stack(cols, axis=1)


class Learned(Router):
    """Learned detector: logistic regression on image statistics, trained on markers seen in earlier runs vs ordinary traffic."""

    name = "learned"
    learns_markers = True
    constraints = {"C": Interval(0.0, None, closed="neither"), "bins": Interval(1, 256, integer=True)}

    def __init__(self, *, C: float = 1.0, bins: int = 8, grid8: bool = True) -> None:
        self.C = C
        self.bins = bins
        self.grid8 = grid8

    def _features(self, x: np.ndarray) -> np.ndarray:
        return image_statistics(x, self.operator_.low, self.operator_.high, bins=int(self.bins), grid8=bool(self.grid8))

    def _fit(self, ordinary: np.ndarray, seen: np.ndarray | None) -> None:
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        assert seen is not None  # fit checked it
        if len(ordinary) == 0:
            raise UsageError("the learned router needs ordinary traffic to learn from")
        X = np.concatenate([self._features(ordinary), self._features(seen)])
        y = np.concatenate([np.zeros(len(ordinary)), np.ones(len(seen))])
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=float(self.C), class_weight="balanced", max_iter=5000))
        self.classifier_ = clf.fit(X, y)

    def score(self, requests: np.ndarray, history: Sequence[np.ndarray] = ()) -> np.ndarray:
        if len(requests) == 0:
            return np.zeros(0)
        return np.asarray(self.classifier_.decision_function(self._features(np.asarray(requests))), dtype=np.float64)


# ----------------------------------------------------------------------------- request shape


@dataclass(frozen=True)
class RequestShape:
    """What a proxy can key on in a request besides the tensor values.

    The request line's method and path; every header name in order with its value (but the
    lengths, which follow the values, masked as ``*``); the JSON body's skeleton (keys in order,
    with the type of each value and, for the tensor data, only its nesting) and its separators;
    and the number format of the data (``repr``: Python's shortest round-trip floats, ``int``,
    ``fixed``: decimals that are not shortest).
    """

    method: str
    path: str
    headers: tuple[tuple[str, str], ...]
    skeleton: str
    separators: str
    numbers: tuple[str, ...]


_LENGTHS = ("content-length", "inference-header-content-length")


def _skeleton(doc: Any) -> str:
    if isinstance(doc, dict):
        return "{" + ",".join(f"{k}:{_skeleton(v)}" for k, v in doc.items()) + "}"
    if isinstance(doc, list):  # a tensor's data: its nesting and the element kinds, not its length
        kinds = sorted({_skeleton(v) for v in doc})
        return "[" + "|".join(kinds) + "]"
    if isinstance(doc, bool):
        return "bool"
    if isinstance(doc, int | float):
        return "num"
    return type(doc).__name__


_NUMBER = re.compile(r"-?\d[\d.eE+-]*")


def _number_formats(text: str) -> tuple[str, ...]:
    kinds = set()
    for tok in set(_NUMBER.findall(text)):
        if not any(c in tok for c in ".eE"):
            kinds.add("int")
        else:
            kinds.add("repr" if repr(float(tok)) == tok else "fixed")
    return tuple(sorted(kinds))


def request_shape(method: str, path: str, headers: Sequence[tuple[str, str]], body: bytes) -> RequestShape:
    """The ``RequestShape`` of one HTTP request (headers in the order sent, the body's bytes)."""
    import json

    head = tuple((k, "*" if k.lower() in _LENGTHS else v) for k, v in headers)
    text = body.decode("utf-8")
    doc = json.loads(text)
    seps = [name for name, sp in (("spaced", (", ", ": ")), ("compact", (",", ":"))) if json.dumps(doc, separators=sp) == text]
    return RequestShape(method, path.split("?", 1)[0], head, _skeleton(doc), seps[0] if seps else "other", _number_formats(text))


def _kserve_body(x: np.ndarray, request_id: str | None) -> dict[str, Any]:
    row = np.asarray(x, dtype=np.float32)[None]
    body: dict[str, Any] = {} if request_id is None else {"id": request_id}
    body["inputs"] = [{"name": "input", "shape": list(row.shape), "datatype": "FP32", "data": row.reshape(-1).tolist()}]
    return body


@functools.cache
def _session() -> Any:
    import requests

    return requests.Session()  # only prepares requests: it never opens a connection


def _python_requests(x: np.ndarray, counter: int) -> tuple[list[tuple[str, str]], bytes]:
    """The request the ``requests`` library itself prepares for a KServe v2 JSON infer call (no network)."""
    import requests

    url = "http://127.0.0.1:8080/v2/models/m/infer"
    prepared = _session().prepare_request(requests.Request("POST", url, json=_kserve_body(x, None)))
    body = prepared.body if isinstance(prepared.body, bytes) else str(prepared.body).encode()
    return list(prepared.headers.items()), body


def _tamperprobe_with_id(x: np.ndarray, counter: int) -> tuple[list[tuple[str, str]], bytes]:
    """tamperprobe's KServe request before the client profiles: its own headers and a ``"id": "tp-<n>"`` key."""
    import json

    body = json.dumps(_kserve_body(x, f"tp-{counter}")).encode()
    hdrs = [("User-Agent", "python-requests/2.32.3"), ("Accept", "application/json"), ("Accept-Encoding", "gzip, deflate")]
    return [*hdrs, ("Content-Type", "application/json"), ("Content-Length", str(len(body)))], body


#: Clients whose requests the simulation builds. ``tamperprobe`` is the verifier with its default client
#: profile, whose requests equal python-requests' byte for byte apart from the tensor values (the client
#: profile conformance tests prove it on a real socket); here it is built by the ``requests`` library itself.
CLIENTS = {"python-requests": _python_requests, "tamperprobe": _python_requests, "tamperprobe-id": _tamperprobe_with_id}


_SHAPES_CACHE: dict[tuple[str, bytes], list[RequestShape]] = {}


def client_shapes(client: str, requests: np.ndarray) -> list[RequestShape]:
    """The ``RequestShape`` of each request ``client`` sends for these inputs (KServe v2 JSON).

    Building and parsing every request is slow: a batch's shapes are remembered by a digest of its bytes.
    """
    if client not in CLIENTS:
        raise UsageError(f"unknown client {client!r}: choose one of {', '.join(CLIENTS)}")
    x = np.ascontiguousarray(requests, dtype=np.float32)
    key = (client, hashlib.blake2b(x.tobytes(), digest_size=16, person=str(x.shape).encode()[:16]).digest())
    if key not in _SHAPES_CACHE:
        shapes = []
        for i, row in enumerate(x):
            headers, body = CLIENTS[client](row, i + 1)
            shapes.append(request_shape("POST", "/v2/models/m/infer", headers, body))
        if len(_SHAPES_CACHE) > 64:
            _SHAPES_CACHE.clear()
        _SHAPES_CACHE[key] = shapes
    return list(_SHAPES_CACHE[key])


def _tie_break(requests: np.ndarray, seed: int) -> np.ndarray:
    """A uniform number in [0, 1) per request, from a digest of its bytes: the operator's random pick among equal shapes."""
    rows = np.ascontiguousarray(_flat(np.asarray(requests)), dtype=np.float32)
    out = np.empty(len(rows))
    for i, row in enumerate(rows):
        digest = hashlib.blake2b(row.tobytes(), digest_size=8, key=str(seed).encode()).digest()
        out[i] = int.from_bytes(digest, "big") / 2.0**64
    return out


class RequestShapeRouter(Router):
    """Request shape: 1 + u for a request whose shape (headers, body keys, number format) ordinary traffic never had, else u.

    ``u`` is a uniform tie-break in [0, 1) per request, so that at a cost the operator routes that
    share of the requests of an ordinary shape at random (all it can do when the shapes agree), and
    a request of a new shape is flagged at any cost. Every request carries its sender: ordinary
    traffic is sent by ``ordinary``, the markers by ``verifier`` (``CLIENTS``), and the router sees
    only the shapes of what they send (``client_shapes``), never who sent it.
    """

    name = "request-shape"
    sender_aware: ClassVar[bool] = True
    constraints = {"verifier": Options(*CLIENTS), "ordinary": Options(*CLIENTS)}

    def __init__(self, *, verifier: str = "tamperprobe", ordinary: str = "python-requests", seed: int = 0) -> None:
        self.verifier = verifier
        self.ordinary = ordinary
        self.seed = seed

    def _fit(self, ordinary: np.ndarray, seen: np.ndarray | None) -> None:
        self.shapes_ = frozenset(client_shapes(self.ordinary, ordinary))

    def score_shapes(self, requests: np.ndarray, shapes: Sequence[RequestShape]) -> np.ndarray:
        """Scores of requests whose shapes are given (one per request)."""
        if len(shapes) != len(requests):
            raise UsageError(f"{len(shapes)} request shapes for {len(requests)} requests")
        new = np.array([s not in self.shapes_ for s in shapes], dtype=np.float64)
        return new + _tie_break(requests, int(self.seed))

    def score(self, requests: np.ndarray, history: Sequence[np.ndarray] = (), *, sender: str = "ordinary") -> np.ndarray:
        """Scores of requests sent by ``sender``: ``ordinary`` (the traffic) or ``verifier`` (the markers)."""
        if sender not in ("ordinary", "verifier"):
            raise UsageError(f"a request is sent by the ordinary client or the verifier, not {sender!r}")
        client = self.ordinary if sender == "ordinary" else self.verifier
        return self.score_shapes(requests, client_shapes(client, requests))


class RequestShapeOldClient(RequestShapeRouter):
    """Request shape against tamperprobe's client before the profiles (an ``id`` key, its own ``Accept``): the contrast."""

    name = "request-shape-id"

    def __init__(self, *, verifier: str = "tamperprobe-id", ordinary: str = "python-requests", seed: int = 0) -> None:
        super().__init__(verifier=verifier, ordinary=ordinary, seed=seed)


# ----------------------------------------------------------------------------- registry

ROUTERS: Registry[Router] = Registry(
    "router",
    {
        "exact-repeat": ExactRepeat,
        "near-twin": NearTwin,
        "margin-original": MarginOriginal,
        "margin-tampered": MarginTampered,
        "gradient": Gradient,
        "learned": Learned,
    },
    base=Router,
)


def router_names() -> list[str]:
    """Every router name, in registry order."""
    return ROUTERS.names()


def get_router(router: str | Router, **params: Any) -> Router:
    """A validated router: a registered name built with ``params`` (text or typed), or a ``Router`` instance as is."""
    return ROUTERS.build(router, params)


__all__ = [
    "ROUTERS",
    "ExactRepeat",
    "Gradient",
    "Learned",
    "MarginOriginal",
    "MarginTampered",
    "NearTwin",
    "Operator",
    "RequestShape",
    "RequestShapeOldClient",
    "RequestShapeRouter",
    "Router",
    "client_shapes",
    "cost_of",
    "get_router",
    "image_statistics",
    "nearest_earlier",
    "request_shape",
    "router_names",
    "threshold_for_cost",
]
