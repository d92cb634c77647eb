"""Owner side: generate a fingerprint from the real weights.

``choose`` settles which marker method a fingerprint uses, with which parameters and why, before any
model is loaded (so bad parameters are refused at once); ``generate_fingerprint`` makes the markers,
records the intact answers and measures the tolerance, and returns a ``Generated``: the fingerprint
and everything worth telling about how it was made (the method and why, the selection actually used,
a raised margin, warnings) as typed fields, which a CLI only prints. ``create_fingerprint`` is the
same with the notes issued as Python warnings and the ``Fingerprint`` returned, for library users.

The seed of the generation is drawn from the operating system's CSPRNG when not given (and recorded
in the fingerprint's generator, so a given seed reproduces it): two fingerprints generated with the
defaults never share markers, and nobody who knows the model and the method can regenerate them.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any

import numpy as np

from .._util import Progress, one_line
from ..data import Dataset, InputSpec
from ..errors import DataError, UsageError
from ..fingerprint import Fingerprint, make_fingerprint
from ..models import Model
from ..outputs import DEFAULT_TOLERANCE, OutputSpec
from .advice import choose_method, pairing_warning
from .calibrate import DEFAULT_SAFETY, TOLERANCE_SAFETY, NoiseReport, fingerprint_tolerance, margin_from_noise, noise_settings
from .markers import encode_uint8
from .methods import Method, get_method
from .methods.base import Bag
from .selection import SELECTIONS
from .selection import select as select_markers

DEFAULT_BAG = 100  # candidates generated before selection, unless --size is larger
SEED_BITS = 63  # a drawn seed: far too many to try, and within what numpy and torch take


class WeakPairingWarning(UserWarning):
    """The benchmark shows the chosen marker method weak under the fingerprint's output spec (``owner.advice``)."""


class MarginWarning(UserWarning):
    """The markers' margin ``delta`` does not exceed the comparison tolerance: a label change of one reads as a near-tie."""


@dataclass(frozen=True)
class MethodChoice:
    """The marker method of a fingerprint (a registered name or a ``Method``), its parameters, and why.

    ``reason`` says why it was chosen for the output spec (None: the caller named it); ``weak`` is the
    benchmark's warning when the caller's own method is weak under the spec. ``tolerance`` and
    ``min_tolerance`` are what ``noise`` (a ``calibrate`` report) made of the caller's.
    """

    method: str | Method
    params: dict[str, Any]
    reason: str | None = None
    weak: str | None = None
    tolerance: float | None = None
    min_tolerance: float = DEFAULT_TOLERANCE

    @property
    def name(self) -> str:
        return self.method if isinstance(self.method, str) else self.method.name


def choose(
    output_spec: str | OutputSpec,
    method: str | Method | None = None,
    params: dict[str, Any] | None = None,
    *,
    noise: NoiseReport | None = None,
    tolerance: float | None = None,
    min_tolerance: float = DEFAULT_TOLERANCE,
) -> MethodChoice:
    """The method for ``output_spec`` (``advice.choose_method`` when ``method`` is None), checked with its parameters.

    With ``noise`` the margin and tolerance follow the measured floor (``calibrate.noise_settings``).
    Bad parameters are a ``UsageError``, before any model is needed.
    """
    spec = OutputSpec.parse(output_spec)
    reason = None
    if method is None:
        chosen = choose_method(spec)
        method, reason = chosen.method, chosen.reason
    name = method if isinstance(method, str) else method.name
    weak = pairing_warning(name, spec) if reason is None else None
    given = dict(params or {})
    if noise is not None:
        given, min_tolerance = noise_settings(noise, name, given, min_tolerance if tolerance is None else tolerance)
        tolerance = None if tolerance is None else min_tolerance
    if isinstance(method, str):
        get_method(method, **given)  # bad parameters are refused here
    return MethodChoice(method, given, reason, weak, tolerance, min_tolerance)


@dataclass(frozen=True)
class MarginRaise:
    """The margin ``delta`` widened after the first markers' benign floor asked for more (``_margin_needed``)."""

    before: float
    to: float
    floor: float
    safety: float


@dataclass(frozen=True)
class Generated:
    """A generated fingerprint and how it was made, for a caller to show (nothing here is parsed back from text).

    ``selection`` is the selection actually used (``manc`` or ``random``) and ``selection_fallback``
    why the one asked for could not be; ``margin_raised`` / ``margin_raise_failed`` say whether the
    margin was widened; ``margin_warnings`` are ``MarginWarning`` texts; ``seed`` is the seed used
    (drawn when none was given) and ``bag`` the candidates generated.
    """

    fingerprint: Fingerprint
    choice: MethodChoice
    selection: str
    selection_fallback: str | None
    bag: int
    seed: int
    margin_raised: MarginRaise | None = None
    margin_raise_failed: str | None = None
    margin_warnings: tuple[str, ...] = ()

    @property
    def method(self) -> str:
        return str(self.fingerprint.generator["method"])


def create_fingerprint(model: Model, data: Dataset, **options: Any) -> Fingerprint:
    """``generate_fingerprint(model, data, **options).fingerprint``, with its notes issued as warnings.

    A method the benchmark shows weak gives a ``WeakPairingWarning``, a narrow margin a
    ``MarginWarning`` (see ``generate_fingerprint`` for the options).
    """
    import warnings

    made = generate_fingerprint(model, data, **options)
    if made.choice.weak is not None:
        warnings.warn(made.choice.weak, WeakPairingWarning, stacklevel=2)
    for text in made.margin_warnings:
        warnings.warn(text, MarginWarning, stacklevel=2)
    return made.fingerprint


def generate_fingerprint(
    model: Model,
    data: Dataset,
    *,
    method: str | Method | MethodChoice | None = None,
    select: str = "manc",
    size: int = 10,
    bag: int | None = None,
    seed: int | None = None,
    output_spec: str = "logits",
    tolerance: float | None = None,
    layer: str | None = None,
    params: dict[str, Any] | None = None,
    progress: Progress | None = None,
    decoys: int | None = None,
    per_run: int | None = None,
    min_tolerance: float = DEFAULT_TOLERANCE,
) -> Generated:
    """Generate a bag of ``bag`` candidates (default ``DEFAULT_BAG``, or ``size`` if larger) with ``method``,
    keep ``size`` by ``select``, record the intact outputs.

    The fingerprint is a pool: an endpoint is checked with ``per_run`` fresh markers a run
    (recorded in the file as the served side's default; ``None`` leaves the default to it), so
    ``size`` markers last ``size / per_run`` runs. ``decoys`` natural inputs of ``data`` are stored
    with the intact logits, to be mixed among the markers (``served.pool``; ``None``: as many as
    markers, at most the data that did not feed a marker; 0: none). ``seed`` None draws one from the
    CSPRNG (recorded).

    ``method`` is a registered name (built with ``params``), a ``Method`` instance, or a
    ``MethodChoice`` made by ``choose`` (``params`` and the tolerances then come from it); the
    fingerprint records its name and every validated hyper-parameter. ``None`` chooses the method
    that suits ``output_spec`` (``owner.advice.choose_method``).

    ``tolerance`` (logit units) is recorded as given; ``None`` measures it under every benign runtime
    of ``owner.calibrate`` (``calibrate.fingerprint_tolerance``: at least ``min_tolerance``), recorded
    in ``extra["benign_noise"]``. A default margin below what that floor asks for is widened
    (``_raise_margin``, ``Generated.margin_raised``).
    """
    model.require_torch("fingerprint generation")
    choice = method if isinstance(method, MethodChoice) else choose(output_spec, method, params, tolerance=tolerance, min_tolerance=min_tolerance)
    bag = max(DEFAULT_BAG, size) if bag is None else bag
    seed = secrets.randbits(SEED_BITS) if seed is None else int(seed)
    _check_sizes(size, bag, per_run, decoys, select, choice.tolerance)
    gen = get_method(choice.method, **choice.params)
    _check_fit(model, data)

    def make(g: Method) -> _Made:
        return _make(g, model, data, bag, size, select, seed, layer, decoys, choice.tolerance, choice.min_tolerance, progress)

    made = make(gen)
    gen, made, raised, failed = _raise_margin(gen, made, choice, make)
    generator = {
        "method": gen.name,
        "params": gen.validated(),
        "seed": seed,
        "selection": made.selection,
        "bag": int(bag),
        "layer": layer,
        "data": data.name,
    }
    fp = make_fingerprint(
        made.kept.inputs,
        made.logits,
        made.input_spec,
        generator,
        model.digest(),
        output_spec=str(OutputSpec.parse(output_spec)),
        tolerance=made.tolerance,
        seeds=np.asarray(made.kept.seeds, dtype=np.float32),
        groups=made.kept.groups,
        extra=made.extra,
        decoy_inputs=made.decoy_inputs,
        decoy_logits=made.decoy_logits,
        per_run=per_run,
    )
    used = made.selection.partition(" (")[0]  # "random (manc unavailable: ...)" after a fallback, as the file records it
    fallback = made.selection if used != select else None
    warnings = tuple(_margin_warnings(gen.validated(), made.tolerance, made.noise))
    return Generated(fp, choice, used, fallback, int(bag), seed, raised, failed, warnings)


def _check_sizes(size: int, bag: int, per_run: int | None, decoys: int | None, select: str, tolerance: float | None) -> None:
    if size < 1:
        raise UsageError("--size must be at least 1")
    if size > bag:
        raise UsageError(f"--size {size} is larger than --bag {bag}")
    if per_run is not None and not 1 <= per_run <= size:
        raise UsageError(f"--per-run must be between 1 and --size {size}, got {per_run}")
    if decoys is not None and decoys < 0:
        raise UsageError(f"--decoys must be >= 0, got {decoys}")
    if select not in SELECTIONS:
        raise UsageError(f"unknown selection {select!r}: choose {' or '.join(SELECTIONS)}")
    if tolerance is not None and tolerance < 0:
        raise UsageError("tolerance must be >= 0")


def _raise_margin(gen: Method, made: _Made, choice: MethodChoice, make: Any) -> tuple[Method, _Made, MarginRaise | None, str | None]:
    """Make the markers again with a wider margin when the benign floor measured on them asks for one (``_margin_needed``).

    From the same seed, exactly as ``--param delta=<that>`` would. When too few markers come out
    with the wider margin, the first ones are kept and the failure is returned (and recorded).
    """
    raise_to = _margin_needed(gen, made, choice.params, choice.method, choice.tolerance)
    if raise_to is None:
        return gen, made, None, None
    assert made.noise is not None  # _margin_needed asks for a wider margin only from a measured floor
    before, floor = float(gen.validated()["delta"]), float(made.noise.floor)
    wider = get_method(choice.method, **{**choice.params, "delta": raise_to})
    try:
        remade = make(wider)
    except UsageError as exc:  # too few markers with the wider margin: keep the first ones, and the margin warning says so
        made.extra["delta_raise_failed"] = {"to": raise_to, "floor": floor, "error": one_line(exc)}
        return gen, made, None, one_line(exc)
    remade.extra["delta_raised"] = {"from": before, "to": raise_to, "floor": floor, "safety": DEFAULT_SAFETY}
    return wider, remade, MarginRaise(before, raise_to, floor, DEFAULT_SAFETY), None


MARGIN_HEADROOM = 1.5  # a raised margin is this many times what the first markers' floor asks for


@dataclass
class _Made:
    """One generation: the kept markers, their intact logits, decoys, tolerance and what was measured."""

    input_spec: InputSpec
    kept: Bag
    logits: np.ndarray
    selection: str
    extra: dict[str, Any]
    decoy_inputs: np.ndarray | None
    decoy_logits: np.ndarray | None
    tolerance: float
    noise: NoiseReport | None


def _make(
    gen: Method,
    model: Model,
    data: Dataset,
    bag: int,
    size: int,
    select: str,
    seed: int,
    layer: str | None,
    decoys: int | None,
    tolerance: float | None,
    min_tolerance: float,
    progress: Progress | None,
) -> _Made:
    """Generate, select, record the intact logits, pick decoys and (``tolerance`` None) measure the tolerance."""
    rng = np.random.default_rng(seed)
    candidates = gen.generate(model, data, bag, rng, progress)
    if len(candidates) < size:
        raise UsageError(f"method {gen.name} produced {len(candidates)} candidates, fewer than --size {size}")
    input_spec = data.input_spec
    if candidates.encoding is not None:  # markers in the 8-bit domain: sent as uint8, decoded by the served model's preprocessing
        input_spec = candidates.encoding.spec(input_spec.shape)
    decoded = Bag(candidates.decoded(), candidates.seeds, candidates.groups, candidates.info)
    selection = select
    try:
        chosen = select_markers(select, model, decoded, size, rng, layer=layer)
    except UsageError as exc:
        if select != "manc" or layer is not None:
            raise
        # MANC needs the penultimate activations (logits that are a linear layer's output, or a hookable
        # model): fall back, and say so in the file
        selection = f"random (manc unavailable: {exc})"
        chosen = select_markers("random", model, decoded, size, rng)
    kept = candidates.take(np.asarray(chosen, dtype=np.int64))
    logits = model.logits(input_spec.decode(kept.inputs))
    if not np.isfinite(logits).all():
        raise UsageError("the model returns NaN or infinite logits on the markers")
    extra = {k: v for k, v in kept.info.items() if not isinstance(v, np.ndarray)}
    if kept.encoding is not None:
        extra["input_encoding"] = kept.encoding.record()
    decoy_x = pick_decoys(data, kept, size if decoys is None else decoys, rng, required=decoys is not None)
    decoy_inputs = _as_sent(decoy_x, input_spec) if len(decoy_x) else None
    decoy_logits = None
    if decoy_inputs is not None:
        decoy_logits = model.logits(input_spec.decode(decoy_inputs))
        if not np.isfinite(decoy_logits).all():
            raise UsageError("the model returns NaN or infinite logits on the decoys")
    noise = None
    if tolerance is None:
        queries = kept.inputs if decoy_inputs is None else np.concatenate([kept.inputs, decoy_inputs])
        recorded = logits if decoy_logits is None else np.concatenate([logits, decoy_logits])
        tolerance, noise = fingerprint_tolerance(model, input_spec.decode(queries), recorded, at_least=min_tolerance)
        extra["benign_noise"] = noise_record(noise)
    return _Made(input_spec, kept, logits, selection, extra, decoy_inputs, decoy_logits, float(tolerance), noise)


def _margin_needed(gen: Method, made: _Made, given: dict[str, Any], method: str | Method, tolerance: float | None) -> float | None:
    """The wider margin δ that the measured benign floor asks for, or None (no margin, δ given, nothing measured, wide enough).

    A label-only marker flips when its top-1 margin falls below 0; a benign runtime moves each logit
    by up to the floor, so δ must sit well above it: ``--noise`` sets δ = ``DEFAULT_SAFETY`` floors
    (``calibrate.noise_settings``), and so does this, from the floor measured on the markers themselves,
    when the user chose no δ (no ``delta`` parameter, no ``--noise``, a method given by name).
    """
    delta = gen.validated().get("delta")
    if delta is None or "delta" in given or not isinstance(method, str) or tolerance is not None or made.noise is None:
        return None
    needed = margin_from_noise(made.noise, made.tolerance)
    # half again as much: the remade markers have a floor of their own (on the ResNet-56 one was 1.4x the first)
    return float(f"{MARGIN_HEADROOM * needed:.3g}") if float(delta) < needed else None


def noise_record(noise: NoiseReport) -> dict[str, Any]:
    """What a fingerprint records of the benign floor its tolerance was set from."""
    return {
        "floor": noise.floor,
        "safety": TOLERANCE_SAFETY,
        "queries": noise.samples,
        "runtimes": {name: r.max_abs for name, r in noise.runtimes.items()},
        "skipped": dict(noise.skipped),
        "versions": dict(noise.versions),
    }


def _margin_warnings(params: dict[str, Any], tolerance: float, noise: NoiseReport | None = None) -> list[str]:
    """The ``MarginWarning`` texts for a margin ``delta`` too close to the benign floor or not above the tolerance."""
    out = []
    delta = params.get("delta")
    if delta is not None and noise is not None and tolerance < float(delta) < DEFAULT_SAFETY * noise.floor:
        out.append(
            f"the markers' margin delta={float(delta):g} is less than {DEFAULT_SAFETY:g}x the benign floor {noise.floor:.3g} measured on "
            "them: a runtime that was not measured may flip one; pass a larger --param delta"
        )
    if delta is not None and float(delta) <= tolerance:
        out.append(
            f"the markers' margin delta={float(delta):g} is not above the comparison tolerance {tolerance:.3g}: a changed label "
            "of such a marker reads as a near-tie (label specs detect little); run `tamperprobe calibrate` and pass --noise, "
            "or pass a larger --param delta"
        )
    return out


def pick_decoys(data: Dataset, kept: Bag, n: int, rng: np.random.Generator, *, required: bool = False) -> np.ndarray:
    """``n`` natural inputs of ``data`` (model domain) for decoys, none of which fed a marker.

    A decoy that is a marker's seed or blend partner would be a near-twin of that marker, which a
    near-twin router would flag (and with it the marker): so the images a method recorded as
    sources (``seed_index``, ``partner_index``) and any image equal to a marker's seed are left
    out. Fewer than ``n`` left: all of them, or a ``UsageError`` when ``n`` was asked for explicitly.
    """
    if n <= 0:
        return data.x[:0]
    used = np.zeros(len(data.x), dtype=bool)
    for key in ("seed_index", "partner_index"):
        idx = np.asarray(kept.info.get(key, []), dtype=np.int64).reshape(-1)
        idx = idx[(idx >= 0) & (idx < len(data.x))]
        used[idx] = True
    if kept.seeds is not None and len(kept.seeds):
        flat = np.ascontiguousarray(data.x.reshape(len(data.x), -1), dtype=np.float32)
        seeds = {row.tobytes() for row in np.ascontiguousarray(np.asarray(kept.seeds, dtype=np.float32).reshape(len(kept.seeds), -1))}
        used |= np.array([row.tobytes() in seeds for row in flat], dtype=bool)
    free = np.flatnonzero(~used)
    if required and n > len(free):
        raise UsageError(f"--decoys {n}: the data holds only {len(free)} natural inputs that fed no marker")
    take = rng.permutation(free)[: min(n, len(free))]
    return data.x[np.sort(take)]


def _as_sent(x: np.ndarray, spec: InputSpec) -> np.ndarray:
    """Natural inputs as the markers are sent: 8-bit when the markers are (so a decoy's encoding does not tell it apart)."""
    if spec.dtype == "uint8":
        return encode_uint8(np.asarray(x, dtype=np.float32), spec.low, spec.high)
    return np.ascontiguousarray(x, dtype=np.dtype(spec.dtype))


def _check_fit(model: Model, data: Dataset) -> None:
    try:
        out = model.logits(data.x[:2])
    except Exception as exc:
        raise DataError(f"the model does not accept the data ({data.name}, input shape {tuple(data.x.shape[1:])}): {one_line(exc)}") from None
    if out.ndim != 2 or out.shape[0] != min(2, len(data.x)):
        raise DataError(f"the model's output has shape {out.shape}; expected (batch, classes)")
