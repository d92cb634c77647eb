"""The evaluation harness: how well does each marker method detect each attack, under each API?

``run_evaluation`` runs a whole campaign on one white-box model and ``write_report`` writes
it out (markdown, CSV, PNG, ``results.json``). The campaign:

1. **Split** the data (seeded) into a training part (marker seeds, the attacker's data) and a
   test part (accuracy before/after each attack).
2. **Bags.** For each method, generate a bag of ``bag`` candidate markers from the training
   part and record the intact model's logits on them (default runtime: batch 256, default
   threads), exactly as a fingerprint would. The baselines natural (TamperNN's SM) and
   VerIDeep's noise / rotation / distortion are always included unless ``baselines=False``.
3. **Benign runtimes.** The same markers are run under batch size 1 and 64, 1 and 2
   threads, TorchScript (traced) and ONNX Runtime; every marker's answer is compared with
   the intact one under every output spec with the fingerprint's tolerance. A benign
   runtime must flag nothing: the report counts flagged markers over all these benign
   re-verifications (expected 0) and the largest ``|Δlogit|``.
4. **Attacks.** Each attack runs on a copy of ``model.module`` with the training part as its
   data and the test part as ``eval_data``. Random attacks get ``trials`` instances with
   different seeds; deterministic ones (quantisation, casts, flooring, magnitude pruning)
   run once. Accuracy before/after and the attack's own success flag are reported.
5. **Trigger ratio.** Per (method, attack instance, spec): the share of the bag's markers
   whose answer under the tampered model no longer matches the intact one by
   ``OutputSpec.compare`` (``compare_many``, its vectorised equivalent). Boundary pairs
   count as two markers.
6. **Detection rate vs N_S** (a fingerprint of N_S queries detects the attack when at least
   one of its markers changed), estimated over ``resamples`` (default 10 000) resampled
   selections per method; the same selections serve every attack instance and spec
   (common random numbers), so differences between attacks are not sampling noise.

   * ``random``: each resample is a uniformly random ordering of the bag; its first N_S
     markers are the selection of size N_S. A selection of size N_S is thus a uniform
     N_S-subset, and the expected rate is exactly ``1 − C(n−m, N_S)/C(n, N_S)`` for ``m``
     changed markers out of ``n``.
   * ``manc``: MANC is deterministic on a fixed bag up to tie-breaking, so resampling the
     selection alone would measure one fingerprint. Each resample instead draws a random
     sub-bag of ``manc_fraction`` (default half) of the bag and runs MANC
     (``selection.manc`` on the penultimate activations, greedy order) on it; its first N_S
     picks are the selection of size N_S (greedy coverage is a prefix-consistent order).
     This measures "an owner who generated a bag of n/2 candidates and kept N_S by MANC".
   * **Groups** (boundary pairs): a group is picked whole and counts as ``g`` markers (its
     size, 2 for pairs), so a selection of N_S queries takes ``floor(N_S / g)`` groups and
     N_S = 1 detects nothing. A group detects when any of its members changed; under MANC a
     group's activation pattern is the union of its members'.

   Because selections of size N_S are prefixes of the same ordering, the rate is monotone
   non-decreasing in N_S for every resample. Rates are averaged over attack instances.
7. **Key size** (TamperNN): with ``p`` the mean trigger ratio, the number of markers needed to
   detect with confidence ``c`` is the smallest ``s > log(1−c)/log(1−p)`` (``budget.key_size``);
   ``p = 0`` needs infinitely many (reported as empty / ``null``). The report also gives the
   empirical smallest N_S <= 10 whose measured detection rate reaches ``c``.

Everything random derives from ``seed`` by name (method, attack, trial), so a seed fixes
every table regardless of which methods or attacks are included. A failing method or attack
is recorded in ``errors`` and the campaign goes on.
"""

from __future__ import annotations

import csv
import inspect as _inspect
import json
import math
import os
import platform
import tempfile
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from ..data import Dataset
from ..describe import as_image
from ..errors import UsageError
from ..models import Model, OnnxModel, ScriptedModel, TorchModel
from ..outputs import DEFAULT_TOLERANCE, OutputSpec, changed_markers

DEFAULT_SPECS = ("top1", "topk:3", "topk:5", "top1-prob:2", "probs:1", "probs:2", "logits")
BASELINES = ("natural", "noise", "rotation", "distortion")
CONFIDENCES = (0.9, 0.99, 0.999)
MAX_NS = 10
RUNTIMES = ("batch1", "batch64", "threads1", "threads2", "torchscript", "onnxruntime")
# Attacks whose outcome does not depend on a seed: one instance is enough.
DETERMINISTIC_ATTACKS = frozenset({"int8", "int8-channel", "dynamic-int8", "fp16", "bf16", "floor", "prune"})
SELECTIONS = ("manc", "random")

Progress = Callable[..., None]  # progress(done, total) or progress(done, total, description)


# ----------------------------------------------------------------------------- vectorised compare


# ----------------------------------------------------------------------------- key size


def key_size(p: float, c: float) -> int | None:
    """TamperNN's key size: the smallest s with ``s > log(1−c)/log(1−p)``; ``None`` when p = 0.

    Delegates to ``tamperprobe.owner.budget.key_size`` when that module is present.
    """
    try:
        from ..owner.budget import key_size as _budget_key_size
    except ImportError:
        _budget_key_size = None
    if _budget_key_size is not None:
        try:
            s = _budget_key_size(float(p), float(c))
        except (ValueError, ZeroDivisionError, OverflowError):
            return None
        if s is None or (isinstance(s, float) and not math.isfinite(s)):
            return None
        return int(s)
    return _key_size_formula(p, c)


def _key_size_formula(p: float, c: float) -> int | None:
    if not 0 < c < 1:
        raise UsageError(f"confidence must be in (0, 1), got {c}")
    if p <= 0:
        return None
    if p >= 1:
        return 1
    bound = math.log(1 - c) / math.log(1 - p)
    return max(1, int(math.floor(bound)) + 1)


# ----------------------------------------------------------------------------- resampling


def selection_orders(units: int, depth: int, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """``random`` protocol: (resamples, depth) unit indices, each row the start of a uniform random ordering."""
    depth = min(depth, units)
    keys = rng.random((resamples, units))
    return np.argsort(keys, axis=1)[:, :depth].astype(np.int64)


def manc_orders(unit_acts: np.ndarray, depth: int, resamples: int, rng: np.random.Generator, fraction: float = 0.5) -> np.ndarray:
    """``manc`` protocol: per resample, MANC's first ``depth`` picks on a random sub-bag of ``fraction`` of the units."""
    from ..owner.selection import manc

    units = len(unit_acts)
    depth = min(depth, units)
    sub = min(units, max(depth, int(round(fraction * units))))
    out = np.empty((resamples, depth), dtype=np.int64)
    for r in range(resamples):
        pool = np.sort(rng.choice(units, size=sub, replace=False))
        out[r] = pool[manc(unit_acts[pool], depth, rng)]
    return out


def detection_curve(unit_changed: np.ndarray, orders: np.ndarray, group_size: int = 1, max_ns: int = MAX_NS) -> np.ndarray:
    """Detection rate at N_S = 1..max_ns: share of resampled selections holding a changed unit."""
    hit = np.asarray(unit_changed, dtype=bool)[orders]
    seen = np.logical_or.accumulate(hit, axis=1).mean(axis=0) if hit.size else np.zeros(orders.shape[1])
    curve = np.zeros(max_ns)
    for ns in range(1, max_ns + 1):
        u = min(ns // group_size, orders.shape[1])
        curve[ns - 1] = seen[u - 1] if u >= 1 else 0.0
    return curve


def exact_random_detection(n: int, m: int, k: int) -> float:
    """Detection probability of a uniform k-subset of n markers, m of them changed."""
    if k > n:
        k = n
    return 1.0 - math.comb(n - m, k) / math.comb(n, k)


# ----------------------------------------------------------------------------- the campaign


@dataclass
class Evaluation:
    """Everything a campaign measured; rows are plain dicts (one CSV line each)."""

    params: dict[str, Any]
    machine: dict[str, Any]
    started: str
    seconds: float = 0.0
    model: dict[str, Any] = field(default_factory=dict)
    methods: list[dict] = field(default_factory=list)
    attacks: list[dict] = field(default_factory=list)
    trigger: list[dict] = field(default_factory=list)
    detection: list[dict] = field(default_factory=list)
    key_sizes: list[dict] = field(default_factory=list)
    false_alarms: list[dict] = field(default_factory=list)
    errors: list[dict] = field(default_factory=list)
    warnings: list[dict] = field(default_factory=list)  # measured, but worth a look (e.g. an attack that changed nothing)
    timings: dict[str, float] = field(default_factory=dict)
    samples: dict[str, dict[str, np.ndarray]] = field(default_factory=dict, repr=False)

    @property
    def measured(self) -> bool:
        """True when at least one (method, attack) pair was measured."""
        return bool(self.trigger)

    @property
    def benign_flagged(self) -> int:
        return int(sum(r["flagged"] for r in self.false_alarms if r.get("flagged") is not None))

    @property
    def benign_checks(self) -> int:
        return int(sum(r["markers"] for r in self.false_alarms if r.get("flagged") is not None))

    def detection_table(self, spec: str = "top1") -> dict[tuple[str, str], list[float]]:
        out: dict[tuple[str, str], list[float]] = {}
        for r in self.detection:
            if r["spec"] == spec:
                out.setdefault((r["method"], r["attack"]), [0.0] * MAX_NS)[r["ns"] - 1] = r["rate"]
        return out

    def to_json(self) -> dict[str, Any]:
        return _clean(
            {
                "format": "tamperprobe.evaluation/v1",
                "params": self.params,
                "machine": self.machine,
                "started": self.started,
                "seconds": round(self.seconds, 3),
                "model": self.model,
                "methods": self.methods,
                "attacks": self.attacks,
                "trigger": self.trigger,
                "detection": self.detection,
                "key_size": self.key_sizes,
                "false_alarms": self.false_alarms,
                "false_alarm_summary": {
                    "flagged": self.benign_flagged,
                    "checks": self.benign_checks,
                    "max_abs_dlogit": max((r["max_abs_dlogit"] for r in self.false_alarms if r.get("max_abs_dlogit") is not None), default=None),
                },
                "errors": self.errors,
                "warnings": self.warnings,
                "timings": {k: round(v, 3) for k, v in self.timings.items()},
            }
        )


def machine_info() -> dict[str, Any]:
    import torch

    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        usable = os.cpu_count()
    return {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "cpu": cpu,
        "nproc": usable,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }


def _derive(seed: int, *parts: object) -> int:
    """A 31-bit seed derived from ``seed`` and names (stable across runs, unlike ``hash``)."""
    return zlib.crc32("|".join([str(int(seed)), *map(str, parts)]).encode()) & 0x7FFFFFFF


def _rng(seed: int, *parts: object) -> np.random.Generator:
    return np.random.default_rng(_derive(seed, *parts))


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    msg = text[0][:300] if text else ""
    return f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__


def _progress_caller(progress: Progress | None) -> Callable[[int, int, str], None]:
    if progress is None:
        return lambda done, total, what: None
    try:
        params = _inspect.signature(progress).parameters.values()
        three = sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params) >= 3 or any(p.kind == p.VAR_POSITIONAL for p in params)
    except (TypeError, ValueError):
        three = False
    if three:
        return lambda done, total, what: progress(done, total, what)
    return lambda done, total, what: progress(done, total)


def _module_logits(module: Any, x: np.ndarray, source: str) -> np.ndarray:
    if isinstance(module, (TorchModel, OnnxModel)):
        return module.logits(x)
    return TorchModel(module, source).logits(x)


@dataclass
class _MethodState:
    name: str
    start: int
    stop: int
    groups: np.ndarray | None
    unit_of: np.ndarray  # marker -> unit index
    units: int
    group_size: int
    orders: np.ndarray | None = None
    selection: str = ""


def _units(groups: np.ndarray | None, n: int) -> tuple[np.ndarray, int, int]:
    if groups is None:
        return np.arange(n, dtype=np.int64), n, 1
    _, first, inverse = np.unique(np.asarray(groups), return_index=True, return_inverse=True)
    rank = np.empty(len(first), dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(first))
    unit_of = rank[inverse.reshape(-1)]
    sizes = np.bincount(unit_of)
    return unit_of, len(first), int(sizes.max())


def run_evaluation(
    model: Model,
    data: Dataset,
    *,
    methods: Sequence[str] | None = None,
    attacks: Sequence[str] | None = None,
    specs: Sequence[str] = DEFAULT_SPECS,
    trials: int = 3,
    bag: int = 100,
    select: str = "manc",
    resamples: int = 10_000,
    seed: int = 0,
    progress: Progress | None = None,
    test_fraction: float = 0.3,
    baselines: bool = True,
    runtimes: Sequence[str] = RUNTIMES,
    tolerance: float = DEFAULT_TOLERANCE,
    method_params: dict[str, dict] | None = None,
    attack_params: dict[str, dict] | None = None,
    manc_fraction: float = 0.5,
    layer: str | None = None,
) -> Evaluation:
    """Run the campaign described in the module docstring and return its measurements.

    ``methods``/``attacks`` default to every registered one. ``method_params`` and
    ``attack_params`` map a name to keyword hyper-parameters.
    """
    import torch

    from ..owner.methods import get_method, method_names

    t_start = time.monotonic()
    spec_objs = [OutputSpec.parse(s) for s in specs]
    spec_names = list(dict.fromkeys(str(s) for s in spec_objs))
    spec_objs = [OutputSpec.parse(s) for s in spec_names]
    if select not in SELECTIONS:
        raise UsageError(f"unknown selection {select!r}: choose manc or random")
    if trials < 1 or bag < 1 or resamples < 1:
        raise UsageError("--trials, --bag and --resamples must be at least 1")
    if not 0 < test_fraction < 1:
        raise UsageError(f"--test-fraction must be in (0, 1), got {test_fraction}")
    if not 0 < manc_fraction <= 1:
        raise UsageError(f"manc_fraction must be in (0, 1], got {manc_fraction}")
    unknown_rt = [r for r in runtimes if r not in RUNTIMES]
    if unknown_rt:
        raise UsageError(f"unknown runtime(s) {', '.join(unknown_rt)}: choose from {', '.join(RUNTIMES)}")
    method_list = list(dict.fromkeys(list(method_names() if methods is None else methods) + (list(BASELINES) if baselines else [])))
    errors: list[dict] = []
    run_attack = None
    if attacks is None:
        try:
            from ..attacks import attack_names

            attack_list = list(attack_names())
        except Exception as exc:  # the attack suite may be missing or broken
            attack_list = []
            errors.append({"stage": "attacks", "name": "*", "error": f"cannot list attacks: {_one_line(exc)}"})
    else:
        attack_list = list(dict.fromkeys(attacks))
    try:
        from ..attacks import run_attack  # noqa: F811
    except Exception as exc:
        if attack_list:
            errors.append({"stage": "attacks", "name": "*", "error": f"tamperprobe.attacks is not available: {_one_line(exc)}"})
    method_params = dict(method_params or {})
    attack_params = dict(attack_params or {})

    train, test = data.split(test_fraction, seed=seed)
    ev = Evaluation(
        params={
            "seed": int(seed),
            "methods": method_list,
            "attacks": attack_list,
            "specs": spec_names,
            "trials": int(trials),
            "bag": int(bag),
            "select": select,
            "resamples": int(resamples),
            "test_fraction": float(test_fraction),
            "tolerance": float(tolerance),
            "max_ns": MAX_NS,
            "confidences": list(CONFIDENCES),
            "runtimes": list(runtimes),
            "manc_fraction": float(manc_fraction),
            "layer": layer,
            "baselines": bool(baselines),
            "method_params": method_params,
            "attack_params": attack_params,
            "data": {
                "name": data.name,
                "size": len(data),
                "train": len(train),
                "test": len(test),
                "shape": list(data.x.shape[1:]),
                "low": float(data.low),
                "high": float(data.high),
            },
        },
        machine=machine_info(),
        started=datetime.now(UTC).isoformat(timespec="seconds"),
        errors=errors,
    )
    report = _progress_caller(progress)
    attack_runs = [(a, t) for a in attack_list for t in range(trials if _is_random(a) else 1)]
    total = 2 * len(method_list) + len(runtimes) + len(attack_runs) + 2
    done = 0

    def step(what: str) -> None:
        nonlocal done
        done += 1
        report(done, total, what)

    report(0, total, "starting")
    # -- the intact model
    module = model.module
    ev.model = {"source": model.source, "kind": model.format}
    try:
        ev.model["digest"] = model.digest()
    except Exception as exc:  # pragma: no cover - a damaged model
        ev.model["digest"] = None
        errors.append({"stage": "model", "name": model.source, "error": _one_line(exc)})
    probe = model.logits(train.x[:2])
    classes = int(probe.shape[1])
    ev.model["classes"] = classes
    for s in spec_objs:
        if s.label_count > classes:
            raise UsageError(f"output spec {s} asks for {s.label_count} labels; the model has {classes} classes")
    for name, part in (("train", train), ("test", test)):
        if part.y is not None and len(part):
            ev.model[f"acc_{name}"] = float((model.logits(part.x).argmax(1) == part.y).mean())
    step("intact model")

    # -- bags
    t0 = time.monotonic()
    bags: dict[str, Any] = {}
    for name in method_list:
        t1 = time.monotonic()
        row: dict[str, Any] = {"method": name, "params": method_params.get(name, {}), "markers": 0, "groups": None, "error": None}
        try:
            gen = get_method(name, **method_params.get(name, {}))
            row["params"] = gen.params()
            torch.manual_seed(_derive(seed, "method", name))
            b = gen.generate(model, train, bag, _rng(seed, "method", name), None)
            if len(b) == 0:
                raise UsageError("the method produced no markers")
            x = np.ascontiguousarray(b.inputs, dtype=np.float32)
            if x.shape[1:] != train.x.shape[1:]:
                raise UsageError(f"markers have shape {x.shape[1:]}, inputs {train.x.shape[1:]}")
            bags[name] = b
            row["markers"] = len(b)
            row["groups"] = None if b.groups is None else int(len(np.unique(b.groups)))
        except Exception as exc:
            row["error"] = _one_line(exc)
            errors.append({"stage": "method", "name": name, "error": row["error"]})
        ev.methods.append(row)
        ev.timings[f"method:{name}"] = time.monotonic() - t1
        step(f"markers: {name}")
    ev.timings["methods"] = time.monotonic() - t0

    names = list(bags)
    if names:
        all_x = np.concatenate([np.asarray(bags[n].inputs, dtype=np.float32) for n in names])
        ref = model.logits(all_x)
    else:
        all_x = np.zeros((0, *train.x.shape[1:]), dtype=np.float32)
        ref = np.zeros((0, classes), dtype=np.float32)
    states: dict[str, _MethodState] = {}
    pos = 0
    for n in names:
        b = bags[n]
        unit_of, units, gsize = _units(b.groups, len(b))
        states[n] = _MethodState(n, pos, pos + len(b), b.groups, unit_of, units, gsize)
        pos += len(b)
        k = min(8, len(b))
        ev.samples[n] = {
            "seeds": np.asarray(b.seeds[:k]),
            "inputs": np.asarray(b.inputs[:k]),
            "labels": ref[states[n].start : states[n].start + k].argmax(1),
        }
    if not np.isfinite(ref).all():
        errors.append({"stage": "model", "name": model.source, "error": "the intact model returns non-finite logits on some markers"})

    # -- resampled selections
    t0 = time.monotonic()
    for row in ev.methods:
        n = row["method"]
        if n not in states:
            step(f"selections: {n}")
            continue
        st = states[n]
        depth = max(1, MAX_NS // st.group_size)
        rng = _rng(seed, "select", select, n)
        st.selection = select
        try:
            if select == "manc":
                from ..owner.sensitivity import activations

                acts = activations(model, all_x[st.start : st.stop], layer)
                active = acts > 0
                if st.group_size > 1:
                    unit_acts = np.zeros((st.units, active.shape[1]), dtype=bool)
                    np.logical_or.at(unit_acts, st.unit_of, active)
                else:
                    unit_acts = active
                st.orders = manc_orders(unit_acts.astype(np.float32), depth, resamples, rng, manc_fraction)
            else:
                st.orders = selection_orders(st.units, depth, resamples, rng)
        except Exception as exc:
            errors.append({"stage": "selection", "name": n, "error": f"{select} selection failed, fell back to random: {_one_line(exc)}"})
            st.selection = "random"
            st.orders = selection_orders(st.units, depth, resamples, _rng(seed, "select", "random", n))
        row["selection"] = st.selection
        row["units"] = st.units
        row["group_size"] = st.group_size
        step(f"selections: {n}")
    ev.timings["selections"] = time.monotonic() - t0

    # -- benign runtimes
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="tamperprobe-eval-") as tmp:
        for rt in runtimes:
            t1 = time.monotonic()
            try:
                if not names:
                    raise UsageError("no markers to re-verify")
                other = _runtime_logits(model, rt, all_x, Path(tmp))
                if other.shape != ref.shape:
                    raise UsageError(f"runtime returned logits of shape {other.shape}, expected {ref.shape}")
            except Exception as exc:
                errors.append({"stage": "runtime", "name": rt, "error": _one_line(exc)})
                for n in names:
                    ev.false_alarms.append(
                        {
                            "method": n,
                            "runtime": rt,
                            "spec": None,
                            "flagged": None,
                            "markers": states[n].stop - states[n].start,
                            "max_abs_dlogit": None,
                            "error": _one_line(exc),
                        }
                    )
                step(f"benign runtime: {rt}")
                continue
            for n in names:
                st = states[n]
                e, o = ref[st.start : st.stop], other[st.start : st.stop]
                dmax = float(np.max(np.abs(o.astype(np.float64) - e))) if len(e) else 0.0
                for s in spec_objs:
                    flagged = int(changed_markers(s, e, o, tolerance).sum())
                    ev.false_alarms.append(
                        {"method": n, "runtime": rt, "spec": str(s), "flagged": flagged, "markers": len(e), "max_abs_dlogit": dmax, "error": None}
                    )
            ev.timings[f"runtime:{rt}"] = time.monotonic() - t1
            step(f"benign runtime: {rt}")
    ev.timings["runtimes"] = time.monotonic() - t0

    # -- attacks
    t0 = time.monotonic()
    curves: dict[tuple[str, str, str], list[np.ndarray]] = {}
    for kind, trial in attack_runs:
        t1 = time.monotonic()
        aseed = _derive(seed, "attack", kind, trial)
        row = {
            "attack": kind,
            "trial": trial,
            "seed": aseed,
            "params": attack_params.get(kind, {}),
            "acc_before": None,
            "acc_after": None,
            "success": None,
            "changed": None,
            "error": None,
        }
        try:
            if run_attack is None:
                raise UsageError("the attack suite tamperprobe.attacks is not available")
            if module is None:
                raise UsageError(f"attacks need the model in PyTorch form; {model.source} is {model.format}")
            if not names:
                raise UsageError("no method produced markers")
            torch.manual_seed(aseed)
            result = run_attack(kind, module, train, seed=aseed, eval_data=test, **attack_params.get(kind, {}))
            row.update(
                params=_jsonable(getattr(result, "params", {})),
                acc_before=_num(getattr(result, "acc_before", None)),
                acc_after=_num(getattr(result, "acc_after", None)),
                success=_jsonable(getattr(result, "success", None)),
                changed=_jsonable(getattr(result, "changed", None)),
            )
            tampered = _module_logits(result.model, all_x, f"attack:{kind}")
            if tampered.shape != ref.shape:
                raise UsageError(f"the attacked model returns logits of shape {tampered.shape}, expected {ref.shape}")
        except Exception as exc:
            row["error"] = _one_line(exc)
            errors.append({"stage": "attack", "name": f"{kind}#{trial}", "error": row["error"]})
            ev.attacks.append(row)
            ev.timings[f"attack:{kind}#{trial}"] = time.monotonic() - t1
            step(f"attack: {kind} #{trial}")
            continue
        row["max_abs_dlogit"] = float(np.max(np.abs(tampered.astype(np.float64) - ref))) if ref.size else 0.0
        if row["changed"] == 0 or row["max_abs_dlogit"] == 0.0:
            ev.warnings.append(
                {
                    "stage": "attack",
                    "name": f"{kind}#{trial}",
                    "warning": f"the attack changed {row['changed']} weights and moved no logit by more than "
                    f"{row['max_abs_dlogit']:.3g}: nothing to detect",
                }
            )
        ev.attacks.append(row)
        for n in names:
            st = states[n]
            e, o = ref[st.start : st.stop], tampered[st.start : st.stop]
            for s in spec_objs:
                ch = changed_markers(s, e, o, tolerance)
                ev.trigger.append(
                    {
                        "method": n,
                        "attack": kind,
                        "trial": trial,
                        "spec": str(s),
                        "changed": int(ch.sum()),
                        "markers": int(len(ch)),
                        "ratio": float(ch.mean()) if len(ch) else 0.0,
                    }
                )
                unit_changed = np.zeros(st.units, dtype=bool)
                np.logical_or.at(unit_changed, st.unit_of, ch)
                curves.setdefault((n, kind, str(s)), []).append(detection_curve(unit_changed, st.orders, st.group_size))
        ev.timings[f"attack:{kind}#{trial}"] = time.monotonic() - t1
        step(f"attack: {kind} #{trial}")
    ev.timings["attacks"] = time.monotonic() - t0
    if attack_runs and names:
        try:  # attacks must work on a copy: the intact model must still give the reference logits
            if not np.array_equal(model.logits(all_x), ref, equal_nan=True):
                errors.append(
                    {
                        "stage": "model",
                        "name": model.source,
                        "error": "the intact model's logits changed during the campaign (an attack modified it in place)",
                    }
                )
        except Exception as exc:  # pragma: no cover
            errors.append({"stage": "model", "name": model.source, "error": _one_line(exc)})

    # -- aggregation
    for (n, kind, s), cs in curves.items():
        mean = np.mean(cs, axis=0)
        lo = np.min(cs, axis=0)
        for ns in range(1, MAX_NS + 1):
            ev.detection.append(
                {
                    "method": n,
                    "attack": kind,
                    "spec": s,
                    "ns": ns,
                    "rate": float(mean[ns - 1]),
                    "min_trial": float(lo[ns - 1]),
                    "trials": len(cs),
                    "resamples": int(resamples),
                    "selection": states[n].selection,
                }
            )
        ratios = [r["ratio"] for r in ev.trigger if r["method"] == n and r["attack"] == kind and r["spec"] == s]
        p = float(np.mean(ratios))
        for c in CONFIDENCES:
            reach = [ns for ns in range(1, MAX_NS + 1) if mean[ns - 1] >= c]
            ev.key_sizes.append(
                {"method": n, "attack": kind, "spec": s, "p": p, "c": c, "s": key_size(p, c), "empirical_ns": reach[0] if reach else None}
            )
    ev.seconds = time.monotonic() - t_start
    ev.timings["total"] = ev.seconds
    step("done")
    return ev


def _is_random(kind: str) -> bool:
    """Whether an attack's outcome depends on its seed (the suite's ``random`` flag, else a fixed list)."""
    try:
        from ..attacks import REGISTRY
    except Exception:
        return kind not in DETERMINISTIC_ATTACKS
    attack = REGISTRY.get(kind)
    return bool(getattr(attack, "random", False)) if attack is not None else False  # unknown: fails once


def _runtime_logits(model: Model, runtime: str, x: np.ndarray, tmp: Path) -> np.ndarray:
    if runtime == "batch1":
        return model.logits(x, batch_size=1)
    if runtime == "batch64":
        return model.logits(x, batch_size=64)
    if runtime == "threads1":
        return model.logits(x, threads=1)
    if runtime == "threads2":
        return model.logits(x, threads=2)
    import warnings

    from ..models import load_model, save_model

    module = model.require_torch(f"the {runtime} runtime")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # exporter deprecation chatter
        return _exported_logits(model, module, runtime, x, tmp, load_model, save_model)


def _exported_logits(model: Model, module: Any, runtime: str, x: np.ndarray, tmp: Path, load_model, save_model) -> np.ndarray:
    if runtime == "torchscript":
        path = tmp / "model.pt"
        if isinstance(model, ScriptedModel):
            import torch

            torch.jit.save(module, str(path))
        else:
            save_model(module, path, x[:2])
        return load_model(path).logits(x)
    if runtime == "onnxruntime":
        path = tmp / "model.onnx"
        save_model(module, path, x[:2])
        return load_model(path).logits(x)
    raise UsageError(f"unknown runtime {runtime!r}")


def _num(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _jsonable(v: Any) -> Any:
    if v is None or isinstance(v, (bool, str)):
        return v
    if isinstance(v, (int, np.integer)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        return _num(v)
    if isinstance(v, np.ndarray):
        return _jsonable(v.tolist()) if v.size <= 64 else f"array{tuple(v.shape)}"
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    try:
        import torch

        if isinstance(v, torch.Tensor):
            return _jsonable(v.detach().cpu().numpy())
    except ImportError:  # pragma: no cover
        pass
    return str(v)


def _clean(v: Any) -> Any:
    """JSON-safe copy: NaN/inf become null, numpy scalars plain numbers."""
    if isinstance(v, dict):
        return {str(k): _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    return _jsonable(v)


# ----------------------------------------------------------------------------- report


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "" for ch in str(text).replace(":", "")) or "x"


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v).replace("|", "\\|")


def _md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def _write_csv(path: Path, rows: list[dict], columns: Sequence[str]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(columns)
        for r in rows:
            w.writerow([_csv_value(r.get(c)) for c in columns])


def _csv_value(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, (dict, list)):
        return json.dumps(_clean(v), sort_keys=True)
    return v


def _mean_trigger(ev: Evaluation) -> dict[tuple[str, str, str], tuple[float, float, float]]:
    acc: dict[tuple[str, str, str], list[float]] = {}
    for r in ev.trigger:
        acc.setdefault((r["method"], r["attack"], r["spec"]), []).append(r["ratio"])
    return {k: (float(np.mean(v)), float(np.min(v)), float(np.max(v))) for k, v in acc.items()}


def _measured(ev: Evaluation) -> tuple[list[str], list[str]]:
    methods = [m["method"] for m in ev.methods if not m.get("error")]
    attacks = list(dict.fromkeys(r["attack"] for r in ev.trigger))
    methods = [m for m in methods if any(r["method"] == m for r in ev.trigger)] or methods
    return methods, attacks


def write_report(evaluation: Evaluation, out_dir: str | os.PathLike) -> list[Path]:
    """Write ``report.md``, CSV tables, PNG plots and ``results.json`` into ``out_dir``; return the paths."""
    ev = evaluation
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    tables = {
        "methods.csv": (ev.methods, ["method", "markers", "groups", "units", "group_size", "selection", "params", "error"]),
        "attacks.csv": (
            ev.attacks,
            ["attack", "trial", "seed", "acc_before", "acc_after", "success", "max_abs_dlogit", "changed", "params", "error"],
        ),
        "trigger.csv": (ev.trigger, ["method", "attack", "trial", "spec", "changed", "markers", "ratio"]),
        "detection.csv": (ev.detection, ["method", "attack", "spec", "ns", "rate", "min_trial", "trials", "resamples", "selection"]),
        "key_size.csv": (ev.key_sizes, ["method", "attack", "spec", "p", "c", "s", "empirical_ns"]),
        "false_alarms.csv": (ev.false_alarms, ["method", "runtime", "spec", "flagged", "markers", "max_abs_dlogit", "error"]),
        "errors.csv": (ev.errors, ["stage", "name", "error"]),
    }
    for fname, (rows, cols) in tables.items():
        _write_csv(out / fname, rows, cols)
        written.append(out / fname)

    js = out / "results.json"
    js.write_text(json.dumps(ev.to_json(), separators=(",", ":"), allow_nan=False))
    written.append(js)
    plot_errors: list[str] = []
    plots = _plots(ev, out, plot_errors)
    written += plots
    md = out / "report.md"
    md.write_text(_markdown(ev, [p.name for p in plots], plot_errors))
    written.append(md)
    return written


def _markdown(ev: Evaluation, plots: list[str], plot_errors: Sequence[str] = ()) -> str:
    p = ev.params
    methods, attacks = _measured(ev)
    specs = p["specs"]
    lines = [f"# Tamper-detection evaluation: {ev.model.get('source')}", ""]
    m = ev.machine
    lines += [
        f"- started {ev.started}, took {ev.seconds:.1f} s on {m.get('hostname')} ({m.get('nproc')} usable cores, {m.get('cpu')}; "
        f"torch {m.get('torch')}, python {m.get('python')})",
        f"- model {ev.model.get('source')} ({ev.model.get('kind')}, {ev.model.get('classes')} classes), "
        f"accuracy train {_fmt(ev.model.get('acc_train'))}, test {_fmt(ev.model.get('acc_test'))}",
        f"- data {p['data']['name']}: {p['data']['train']} train / {p['data']['test']} test (test fraction {p['test_fraction']}, seed {p['seed']})",
        f"- bag {p['bag']} candidates per method; selection {p['select']} over {p['resamples']} resamples"
        + (f" (MANC on random sub-bags of {p['manc_fraction']:.0%})" if p["select"] == "manc" else " (uniform random subsets)")
        + f"; {p['trials']} trials per random attack; tolerance {p['tolerance']:g}",
        f"- output specs: {', '.join(specs)}",
        "",
        "Protocol: see the docstring of `tamperprobe.evaluation.campaign`. Detection rate at N_S = share of resampled selections of "
        "N_S queries that hold at least one marker whose answer changed (boundary pairs are picked whole: floor(N_S/2) pairs), "
        "averaged over attack instances. Trigger ratio = share of the bag's markers whose answer changed.",
        "",
    ]
    if not ev.measured:
        lines += ["**Nothing could be measured** (see errors below).", ""]

    lines += ["## Methods", ""]
    lines.append(
        _md_table(
            ["method", "markers", "groups", "selection", "parameters", "error"],
            [
                [
                    r["method"],
                    r["markers"],
                    r.get("groups"),
                    r.get("selection"),
                    json.dumps(_clean(r.get("params", {})), sort_keys=True),
                    r.get("error"),
                ]
                for r in ev.methods
            ],
        )
    )
    lines += ["", "## Attacks", ""]
    lines.append(
        _md_table(
            ["attack", "trial", "acc before", "acc after", "success", "max abs Δlogit", "error"],
            [
                [r["attack"], r["trial"], r.get("acc_before"), r.get("acc_after"), r.get("success"), r.get("max_abs_dlogit"), r.get("error")]
                for r in ev.attacks
            ],
        )
    )

    det = {}
    for r in ev.detection:
        det[(r["method"], r["attack"], r["spec"], r["ns"])] = r["rate"]
    if ev.detection:
        key_spec = "top1" if "top1" in specs else specs[0]
        lines += ["", f"## Detection rate vs N_S ({key_spec})", "", "Rows: attack / method; columns: number of queries N_S.", ""]
        rows = []
        for a in attacks:
            for mth in methods:
                if (mth, a, key_spec, 1) in det:
                    rows.append([a, mth] + [det[(mth, a, key_spec, ns)] for ns in range(1, MAX_NS + 1)])
        lines.append(_md_table(["attack", "method"] + [str(ns) for ns in range(1, MAX_NS + 1)], rows))
        for ns_show in (1, MAX_NS):
            lines += [
                "",
                f"## Detection rate at N_S = {ns_show}, every output spec",
                "",
                "Rows: attack; one table per spec, one column per method.",
                "",
            ]
            for s in specs:
                lines += [f"**{s}**", ""]
                lines.append(_md_table(["attack"] + methods, [[a] + [det.get((mth, a, s, ns_show)) for mth in methods] for a in attacks]))
                lines.append("")

    trig = _mean_trigger(ev)
    if trig:
        lines += ["## Trigger ratio (mean over trials)", ""]
        for s in specs:
            lines += [f"**{s}**", ""]
            lines.append(_md_table(["attack"] + methods, [[a] + [trig.get((mth, a, s), (None,))[0] for mth in methods] for a in attacks]))
            lines.append("")

    if ev.key_sizes:
        ks = {(r["method"], r["attack"], r["spec"], r["c"]): r for r in ev.key_sizes}
        key_spec = "top1" if "top1" in specs else specs[0]
        lines += [
            f"## Key size for confidence c ({key_spec})",
            "",
            "TamperNN: s > log(1−c)/log(1−p), p = mean trigger ratio; – means p = 0 (never). "
            "In brackets: the smallest N_S ≤ 10 whose measured detection rate reaches c.",
            "",
        ]
        rows = []
        for a in attacks:
            for mth in methods:
                cells = []
                for c in CONFIDENCES:
                    r = ks.get((mth, a, key_spec, c))
                    if r is None:
                        cells.append(None)
                    else:
                        emp = r["empirical_ns"]
                        cells.append(f"{'–' if r['s'] is None else r['s']} [{'>10' if emp is None else emp}]")
                if any(c is not None for c in cells):
                    p_ = ks.get((mth, a, key_spec, CONFIDENCES[0]), {}).get("p")
                    rows.append([a, mth, p_] + cells)
        lines.append(_md_table(["attack", "method", "p"] + [f"c={c}" for c in CONFIDENCES], rows))
        lines.append("")

    lines += ["## False alarms under benign runtime changes", ""]
    lines.append(
        f"Flagged markers over all benign re-verifications: **{ev.benign_flagged}** of {ev.benign_checks} (markers × runtimes × specs; must be 0)."
    )
    lines.append("")
    rt_rows = []
    for rt in p["runtimes"]:
        rows = [r for r in ev.false_alarms if r["runtime"] == rt]
        err = next((r["error"] for r in rows if r.get("error")), None)
        flagged = None if err else sum(r["flagged"] for r in rows)
        checks = None if err else sum(r["markers"] for r in rows)
        dmax = max((r["max_abs_dlogit"] for r in rows if r.get("max_abs_dlogit") is not None), default=None)
        rt_rows.append([rt, flagged, checks, None if dmax is None else f"{dmax:.3g}", err])
    lines.append(_md_table(["runtime", "flagged", "checks", "max abs Δlogit", "error"], rt_rows))
    lines.append("")

    if ev.errors:
        lines += ["## Errors (the campaign continued)", ""]
        lines.append(_md_table(["stage", "name", "error"], [[e["stage"], e["name"], e["error"]] for e in ev.errors]))
        lines.append("")
    if ev.warnings:
        lines += ["## Warnings", ""]
        lines.append(_md_table(["stage", "name", "warning"], [[w["stage"], w["name"], w["warning"]] for w in ev.warnings]))
        lines.append("")
    lines += ["## Timings (seconds)", ""]
    lines.append(_md_table(["phase", "seconds"], [[k, v] for k, v in ev.timings.items() if ":" not in k]))
    lines.append("")
    if plots:
        lines += ["## Plots", ""] + [f"![{name}]({name})" for name in plots] + [""]
    if plot_errors:
        lines += ["Plots that could not be drawn: " + "; ".join(plot_errors), ""]
    lines.append("Files: methods.csv, attacks.csv, trigger.csv, detection.csv, key_size.csv, false_alarms.csv, errors.csv, results.json.")
    return "\n".join(lines) + "\n"


def _plots(ev: Evaluation, out: Path, errors: list[str]) -> list[Path]:
    """Draw every plot; one that fails is noted in ``errors`` and the others still get drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written: list[Path] = []
    jobs = []
    methods, attacks = _measured(ev)
    for s in ev.params["specs"]:
        jobs.append((f"detection_{_slug(s)}.png", lambda path, s=s: _plot_detection(ev, s, methods, attacks, path, plt)))
        jobs.append((f"trigger_{_slug(s)}.png", lambda path, s=s: _plot_trigger(ev, s, methods, attacks, path, plt)))
    for m in ev.samples:
        jobs.append((f"markers_{_slug(m)}.png", lambda path, m=m: _plot_markers(ev, m, path, plt)))
    for name, draw in jobs:
        path = out / name
        try:
            if draw(path):
                written.append(path)
        except Exception as exc:
            errors.append(f"{name}: {_one_line(exc)}")
        finally:
            plt.close("all")
    return written


def _colours(methods: Sequence[str], plt) -> dict[str, Any]:
    return {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(methods)}


def _plot_detection(ev: Evaluation, s: str, methods: list[str], attacks: list[str], path: Path, plt) -> bool:
    """VerIDeep Fig. 8/10/12 style: detection rate vs N_S, one subplot per attack, one line per method."""
    table = ev.detection_table(s)
    if not (table and attacks):
        return False
    colours = _colours(methods, plt)
    ns = np.arange(1, MAX_NS + 1)
    cols = min(4, len(attacks))
    rows = int(math.ceil(len(attacks) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows + 0.6), squeeze=False, sharex=True, sharey=True)
    for i, a in enumerate(attacks):
        ax = axes[i // cols][i % cols]
        for m in methods:
            if (m, a) in table:
                ax.plot(ns, table[(m, a)], marker="o", ms=3, lw=1.2, label=m, color=colours[m])
        ax.set_title(a, fontsize=9)
        ax.set_ylim(-0.03, 1.03)
        ax.set_xticks([1, 2, 4, 6, 8, 10])
        ax.grid(alpha=0.3)
        if i % cols == 0:
            ax.set_ylabel("detection rate")
        if i // cols == rows - 1 or i + cols >= len(attacks):
            ax.set_xlabel("N_S (queries)")
    for j in range(len(attacks), rows * cols):
        axes[j // cols][j % cols].axis("off")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.suptitle(f"detection rate vs N_S · {s} · {ev.params['select']} selection", fontsize=10)
    fig.tight_layout(rect=(0, 0.45 / (2.6 * rows + 0.6), 1, 1))
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 9) or 1, fontsize=8, frameon=False)
    fig.savefig(path, dpi=72)
    return True


def _plot_trigger(ev: Evaluation, s: str, methods: list[str], attacks: list[str], path: Path, plt) -> bool:
    """TamperNN Fig. 4 style: grouped bars of the trigger ratio per attack, one bar per method."""
    trig = _mean_trigger(ev)
    if not (trig and attacks and methods):
        return False
    colours = _colours(methods, plt)
    fig, ax = plt.subplots(figsize=(min(15.0, max(6.0, 0.12 * len(attacks) * len(methods) + 2)), 4.2))
    width = 0.8 / len(methods)
    x = np.arange(len(attacks))
    for j, m in enumerate(methods):
        vals = [trig.get((m, a, s)) for a in attacks]
        mean = [v[0] if v else 0.0 for v in vals]
        err = np.clip(np.array([[v[0] - v[1], v[2] - v[0]] if v else [0.0, 0.0] for v in vals]).T, 0.0, None)
        ax.bar(x - 0.4 + width * (j + 0.5), mean, width, yerr=err, capsize=1.5, label=m, color=colours[m], error_kw={"lw": 0.6})
    ax.set_xticks(x)
    ax.set_xticklabels(attacks, rotation=35, ha="right", fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("trigger ratio")
    ax.set_title(f"trigger ratio · {s} (mean; whiskers: min–max over trials)", fontsize=9)
    ax.legend(fontsize=7, ncol=min(len(methods), 5))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=72)
    return True


def _plot_markers(ev: Evaluation, m: str, path: Path, plt) -> bool:
    """VerIDeep Fig. 7/9/11 style: seeds above the markers generated from them."""
    smp = ev.samples[m]
    seeds, inputs = np.asarray(smp["seeds"], dtype=np.float32), np.asarray(smp["inputs"], dtype=np.float32)
    k = len(inputs)
    if k == 0:
        return False
    lo, hi = ev.params.get("data", {}).get("low"), ev.params.get("data", {}).get("high")
    lo = float(min(seeds.min(), inputs.min())) if lo is None else lo
    hi = float(max(seeds.max(), inputs.max())) if hi is None else hi
    fig, axes = plt.subplots(2, k, figsize=(1.2 * k + 0.6, 2.8), squeeze=False)
    for i in range(k):
        for row, (arr, label) in enumerate(((seeds[i], "seed"), (inputs[i], "marker"))):
            ax = axes[row][i]
            ax.imshow(as_image(arr), cmap="gray", vmin=lo, vmax=hi)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_ylabel(label)
        axes[1][i].set_xlabel(str(int(smp["labels"][i])), fontsize=8)
    fig.suptitle(f"{m}: seeds (top) and markers (bottom), intact top-1 label below", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=72)
    return True
