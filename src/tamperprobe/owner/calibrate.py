"""How much do the logits of the *same* weights move between runtimes? The noise floor, and δ from it.

A boundary marker is only sound if its margin ``δ`` exceeds every difference a benign serving
stack can introduce: another batch size (different kernels, another position in the batch),
another thread count, TorchScript, ONNX Runtime. ``measure_noise`` runs the model on natural
inputs under each runtime and records ``max |Δlogit|`` against the reference, torch eager at
batch size 64 in the given order (``REFERENCE``).

Runtime names:

==================  ====================================================================
``batchN``          batch size N, inputs in a rotated order (so position and batch
                    composition differ from the reference even when N = 64)
``threadsN``        batch size 64 with N torch threads
``torchscript``     the module traced and saved as TorchScript (``models.save_model``), reloaded
``export``          the module saved as a ``torch.export`` program (.pt2), reloaded
``onnx``            the module exported to ONNX and run by onnxruntime
==================  ====================================================================

A runtime that cannot be measured (e.g. ONNX for a model without a torch module) is listed in
``skipped`` with the reason. The report is stored as JSON (``save_noise``/``load_noise``) with
the model digest. The noise floor is the largest difference, but at least one float32 rounding
step of the largest logit seen (``float32 eps · max|z|``), so that a floor of exactly 0 measured
on one machine never yields δ = 0. ``delta_from_noise(noise, safety)`` is ``safety`` times the floor;
``check_delta`` refuses a δ at or below it, and ``noise_settings`` turns a report into the boundary
margin and the comparison tolerance of a fingerprint.

The comparison tolerance rule (``tolerance_from_noise``): τ = max(3e-5, ``TOLERANCE_SAFETY`` × floor),
``TOLERANCE_SAFETY`` = 2. ``fingerprint_tolerance`` applies it to a floor measured on the
fingerprint's own markers and decoys against the logits recorded for them: what ``fingerprint``
does by default. The benign deviation does not follow the size of the logits (the CIFAR-10
ResNet-56 has smaller logits than the digits CNN, and its markers move two to seven times more:
``bench/results/benign-floor.md``), so it is measured, not derived from a scale.

``runtime_logits`` is the one place that runs a model "under another runtime"; the evaluation's
benign false-alarm measurement uses it too.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from .._extras import missing_extra, require
from .._util import Progress, atomic_write_text, one_line
from ..errors import TamperprobeError, UsageError
from ..fingerprint import MAX_TOLERANCE
from ..models import Model, load_model, save_model
from ..outputs import DEFAULT_TOLERANCE
from .markers import sample_indices

FORMAT = "tamperprobe.noise/v1"
REFERENCE = "eager batch64"
DEFAULT_RUNTIMES = ("batch1", "batch64", "threads1", "threads2", "torchscript", "onnx")
DEFAULT_SAFETY = 10.0
TOLERANCE_SAFETY = 2.0  # the comparison tolerance is at least this many noise floors
_ROTATE = 17
_FILE_SUFFIX = {"torchscript": ".pt", "export": ".pt2", "onnx": ".onnx"}


@dataclass
class RuntimeNoise:
    max_abs: float  # max |Δlogit| against the reference
    mean_abs: float
    label_changes: int  # inputs whose top-1 label differs from the reference


@dataclass
class NoiseReport:
    model_digest: str
    source: str
    samples: int
    logit_scale: float  # max |logit| of the reference
    runtimes: dict[str, RuntimeNoise] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    reference: str = REFERENCE
    created: str = ""
    versions: dict[str, str] = field(default_factory=dict)

    @property
    def measured(self) -> float:
        """The largest max |Δlogit| over the measured runtimes (0.0 when none)."""
        return max((r.max_abs for r in self.runtimes.values()), default=0.0)

    @property
    def floor(self) -> float:
        """The noise floor: the measured maximum, but at least float32 eps times the largest logit (``noise_floor``)."""
        return noise_floor(self.measured, self.logit_scale)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["format"] = FORMAT
        d["floor"] = self.floor
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> NoiseReport:
        if d.get("format") != FORMAT:
            raise UsageError(f"not a tamperprobe noise report (format {d.get('format')!r}, expected {FORMAT})")
        runtimes = {str(k): RuntimeNoise(float(v["max_abs"]), float(v["mean_abs"]), int(v["label_changes"])) for k, v in d["runtimes"].items()}
        return cls(
            model_digest=str(d["model_digest"]),
            source=str(d["source"]),
            samples=int(d["samples"]),
            logit_scale=float(d["logit_scale"]),
            runtimes=runtimes,
            skipped={str(k): str(v) for k, v in (d.get("skipped") or {}).items()},
            reference=str(d.get("reference", REFERENCE)),
            created=str(d.get("created", "")),
            versions={str(k): str(v) for k, v in (d.get("versions") or {}).items()},
        )


def noise_floor(measured: float, logit_scale: float) -> float:
    """The largest measured max |Δlogit|, but at least one float32 rounding step of the largest logit ``logit_scale``."""
    return max(float(measured), float(np.finfo(np.float32).eps) * float(logit_scale))


def parse_runtimes(items: Iterable[str] | str | None) -> tuple[str, ...]:
    """Runtime names from a list and/or comma-separated strings; validated, duplicates removed."""
    if items is None:
        return DEFAULT_RUNTIMES
    if isinstance(items, str):
        items = [items]
    out: list[str] = []
    for item in items:
        for name in str(item).split(","):
            name = name.strip().lower()
            if not name:
                continue
            m = re.fullmatch(r"(batch|threads)(\d+)", name)
            if not (name in _FILE_SUFFIX or (m and int(m.group(2)) >= 1)):
                raise UsageError(f"unknown runtime {name!r}: use batchN, threadsN, torchscript, export or onnx")
            if name not in out:
                out.append(name)
    if not out:
        raise UsageError("no runtime given")
    return tuple(out)


def _versions() -> dict[str, str]:
    out = {}
    for mod in ("torch", "onnxruntime", "numpy"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # pragma: no cover - optional
            pass
    return out


def runtime_logits(model: Model, runtime: str, x: np.ndarray, workdir: Path) -> np.ndarray:
    """float32 logits of ``model`` on ``x`` under one benign runtime (see the module doc for the names).

    ``batchN`` runs the inputs in a rotated order (and rotates the logits back); ``threadsN`` runs at
    batch size 64 with N torch threads; ``torchscript``, ``export`` and ``onnx`` write the model in that
    form into ``workdir``, reload it and run it at batch size 64. Raises UsageError for an unknown name
    or a model that cannot be written in the form (no torch module).
    """
    name = parse_runtimes([runtime])[0]
    m = re.fullmatch(r"(batch|threads)(\d+)", name)
    if m and m.group(1) == "batch":
        s = _ROTATE % max(1, len(x))
        z = model.logits(np.roll(x, s, axis=0), batch_size=int(m.group(2)))
        return np.roll(z, -s, axis=0)
    if m:
        return model.logits(x, batch_size=64, threads=int(m.group(2)))
    from .._torch import quiet_all

    module = model.require_torch(f"the {name} runtime")
    if name == "onnx":  # torch's exporter needs onnx, and the runtime onnxruntime: name the extra when missing
        require("onnx", "the onnx runtime")
        require("onnxruntime", "the onnx runtime")
    with quiet_all():  # tracing/exporting chatter (e.g. "input to trace is already a ScriptModule")
        path = save_model(module, Path(workdir) / f"model{_FILE_SUFFIX[name]}", x)
        return load_model(path).logits(x, batch_size=64)


def measure_noise(
    model: Model,
    x: np.ndarray,
    runtimes: Iterable[str] | str | None = DEFAULT_RUNTIMES,
    *,
    samples: int | None = None,
    seed: int = 0,
    progress: Progress | None = None,
    reference: np.ndarray | None = None,
) -> NoiseReport:
    """Max |Δlogit| of each runtime against torch eager at batch size 64, on the inputs ``x``.

    ``samples`` runs only that many of the inputs, drawn with ``seed`` (all when there are fewer);
    ``progress(done, total, runtime)`` hears about each runtime as it starts and when all are done.
    ``reference`` (the logits recorded for ``x``, one row per input) replaces the eager batch-64 run
    as what each runtime is measured against: a fingerprint's floor is the distance to its own logits.
    """
    names = parse_runtimes(runtimes)
    if reference is not None:
        reference = np.asarray(reference, dtype=np.float32)
        if reference.ndim != 2 or len(reference) != len(x):
            raise UsageError(f"reference logits of shape {reference.shape} do not fit {len(x)} inputs")
    if samples is not None:
        if samples < 1:
            raise UsageError("--samples must be at least 1")
        if len(x):
            idx = sample_indices(len(x), min(samples, len(x)), np.random.default_rng(seed))
            x = x[idx]
            reference = None if reference is None else reference[idx]
    x = np.ascontiguousarray(x, dtype=np.float32)
    if len(x) < 1:
        raise UsageError("calibration needs at least one input")
    ref = model.logits(x, batch_size=64) if reference is None else reference
    if not np.isfinite(ref).all():
        raise UsageError("the model returns NaN or infinite logits on the calibration inputs")
    report = NoiseReport(
        model_digest=model.digest(),
        source=str(model.source),
        samples=int(len(x)),
        logit_scale=float(np.abs(ref).max()),
        reference=REFERENCE if reference is None else "recorded logits",
        created=datetime.now(UTC).replace(microsecond=0).isoformat(),
        versions=_versions(),
    )
    ref_labels = ref.argmax(axis=1)
    with tempfile.TemporaryDirectory(prefix="tamperprobe-calibrate-") as tmp:
        for i, name in enumerate(names):
            if progress is not None:
                progress(i, len(names), name)
            try:
                z = runtime_logits(model, name, x, Path(tmp))
            except (TamperprobeError, RuntimeError, ValueError, TypeError, OSError) as exc:
                report.skipped[name] = one_line(exc, 200)
                continue
            except ModuleNotFoundError as exc:  # an optional runtime that is not installed
                known = missing_extra(exc)
                if known is None:
                    raise
                report.skipped[name] = str(known)
                continue
            if z.shape != ref.shape:
                report.skipped[name] = f"output shape {z.shape} differs from the reference {ref.shape}"
                continue
            d = np.abs(z.astype(np.float64) - ref.astype(np.float64))
            if not np.isfinite(d).all():
                report.skipped[name] = "NaN or infinite logits"
                continue
            report.runtimes[name] = RuntimeNoise(float(d.max()), float(d.mean()), int((z.argmax(axis=1) != ref_labels).sum()))
    if progress is not None:
        progress(len(names), len(names), "")
    return report


def default_noise_path(model: str) -> Path:
    """``MODEL.noise.json`` next to a model file; for ``package.module:attr`` a file in the working folder."""
    p = Path(model)
    if p.exists() and p.is_file():
        return p.with_name(p.name + ".noise.json")
    return Path(re.sub(r"[^A-Za-z0-9_.-]+", "_", model) + ".noise.json")


def save_noise(report: NoiseReport, path: str | os.PathLike) -> Path:
    return atomic_write_text(path, json.dumps(report.to_json(), indent=2, sort_keys=True) + "\n")


def load_noise(path: str | os.PathLike) -> NoiseReport:
    p = Path(path)
    try:
        d = json.loads(p.read_text())
    except FileNotFoundError:
        raise UsageError(f"noise report not found: {p}") from None
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read noise report {p}: {one_line(exc)}") from None
    if not isinstance(d, dict):
        raise UsageError(f"{p} is not a tamperprobe noise report")
    try:
        return NoiseReport.from_json(d)
    except UsageError as exc:
        raise UsageError(f"{p}: {exc}") from None
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise UsageError(f"{p}: noise report is incomplete or invalid ({one_line(exc)})") from None


def _floor(noise: NoiseReport | float) -> float:
    if isinstance(noise, NoiseReport):
        return noise.floor
    value = float(noise)
    if not (value >= 0 and math.isfinite(value)):
        raise UsageError(f"noise level must be a finite number >= 0, got {noise}")
    return value


def delta_from_noise(noise: NoiseReport | float, safety: float = DEFAULT_SAFETY) -> float:
    """δ = ``safety`` × the noise floor (a report or a number in logit units)."""
    safety = float(safety)
    if not (safety > 0 and math.isfinite(safety)):
        raise UsageError(f"safety factor must be a positive number, got {safety}")
    return safety * _floor(noise)


def margin_from_noise(noise: NoiseReport | float, tolerance: float) -> float:
    """The margin δ of label-only markers under this noise: ``DEFAULT_SAFETY`` floors, and at least twice ``tolerance``."""
    return max(delta_from_noise(noise, DEFAULT_SAFETY), 2.0 * float(tolerance))


def check_delta(delta: float, noise: NoiseReport | float) -> None:
    """Raise UsageError when ``delta`` is not above the measured noise floor."""
    floor = _floor(noise)
    try:
        d = float(delta)
    except (TypeError, ValueError):
        raise UsageError(f"delta must be a number, got {delta!r}") from None
    if not (d > 0 and math.isfinite(d)):
        raise UsageError(f"delta must be a positive number, got {delta}")
    if d <= floor:
        raise UsageError(
            f"delta={d:.3g} is not above the measured noise floor {floor:.3g} (max |Δlogit| between runtimes); "
            f"use at least {delta_from_noise(floor, DEFAULT_SAFETY):.3g}"
        )


def tolerance_from_noise(noise: NoiseReport | float, at_least: float = DEFAULT_TOLERANCE) -> float:
    """The comparison tolerance for a noise floor: ``max(at_least, TOLERANCE_SAFETY × floor)`` (logit units).

    A floor so high that the tolerance would pass ``fingerprint.MAX_TOLERANCE`` is a UsageError: the
    model's answers move too much between runtimes for a comparison to mean anything.
    """
    floor = _floor(noise)
    tolerance = max(float(at_least), TOLERANCE_SAFETY * floor)
    if tolerance > MAX_TOLERANCE:
        raise UsageError(
            f"the benign noise floor {floor:.3g} (max |Δlogit| between runtimes) asks for a tolerance of {tolerance:.3g}, "
            f"above the largest accepted {MAX_TOLERANCE:g}: is the model nondeterministic (dropout left on, a GPU's TF32)?"
        )
    return tolerance


def fingerprint_tolerance(
    model: Model, x: np.ndarray, logits: np.ndarray, runtimes: Iterable[str] | str | None = DEFAULT_RUNTIMES, at_least: float = DEFAULT_TOLERANCE
) -> tuple[float, NoiseReport]:
    """The tolerance a fingerprint carries by default, and the measurement it comes from.

    ``x`` are its queries in the model's domain (markers and decoys) and ``logits`` the intact
    logits recorded for them: each runtime's deviation from those logits is measured
    (``measure_noise``), and the tolerance is ``tolerance_from_noise(floor, at_least)``. A runtime
    that cannot run here (no onnxruntime, no torch module to trace) is skipped, as ``calibrate`` does.
    """
    report = measure_noise(model, x, runtimes, reference=logits)
    return tolerance_from_noise(report, at_least), report


def noise_settings(report: NoiseReport, method: str, params: dict[str, Any], tolerance: float) -> tuple[dict[str, Any], float]:
    """The generator parameters and comparison tolerance a fingerprint needs under this measured noise.

    The tolerance becomes at least ``TOLERANCE_SAFETY`` noise floors. For markers with a margin (boundary, crossed) the margin
    ``delta`` defaults to ``DEFAULT_SAFETY`` floors (and at least twice the tolerance); a ``delta``
    given in ``params`` (a number or its text) must lie above the floor and above the tolerance, else
    UsageError. Returns new ``(params, tolerance)``; ``params`` is not modified.
    """
    from .methods import method_class

    tolerance = tolerance_from_noise(report, tolerance)
    params = dict(params)
    if "delta" in method_class(method).constraints:  # boundary, crossed: markers with a margin
        if "delta" in params:
            check_delta(params["delta"], report)
        else:
            params["delta"] = margin_from_noise(report, tolerance)
        if float(params["delta"]) <= tolerance:
            raise UsageError(f"{method} margin delta={params['delta']} must exceed the comparison tolerance {tolerance:.3g}")
    return params, tolerance
