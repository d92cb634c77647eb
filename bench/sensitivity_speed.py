"""Cost of one Sensitive-Samples ascent step against one forward+backward pass, per model format.

For the digits CNN (trained here in a few seconds, seeded; bags of 100 and 1,000 training images)
and the pretrained CIFAR-10 ResNet-56 (``../shared/models/cifar10_resnet56``, bag of 100 test
images), and each format (``nn.Module``, TorchScript by tracing, ``torch.export`` with a dynamic
batch), it times side by side, in interleaved rounds on one torch thread:

* ``fwd+bwd <format>``: one forward pass of the bag and one backward pass to the input
  (``autograd.grad(z.sum(), x)``), the physical floor of a step that needs dS/dx;
* ``S+dS/dx module``: ``Sensitivity.value_and_grad`` alone (inside one session, as in an ascent):
  the step without Adam, projection and bookkeeping, so the table splits a step's excess over
  the floor into the sensitivity's part and the ascent's part;
* ``step <format>``: one ascent step of the ``sensitive`` method as it runs: the time between two
  consecutive progress calls of ``SensitiveSamples(patience=0).generate`` (S and dS/dx, Adam,
  projection and bookkeeping; the seeds' evaluation and the set-up are not part of a step);
* ``step bf16``: the same on the ``nn.Module`` with ``autocast=bf16``;
* ``paired: step module`` and ``paired: fwd+bwd module``: k steps of one ascent with a fwd+bwd
  timed between each two (not counted in the step), so both see the same machine state; a
  fwd+bwd in a tight loop keeps caches warm that a step's hundred small kernels evict, and on
  a shared machine the load changes between the tight loops of two contenders;
* with ``--baseline REV``: ``main@REV <format>``, one S + dS/dx evaluation by the sensitivity
  module of that revision, and ``step main@REV <format>``, one step of that revision's
  ``sensitive`` method (both modules imported from git under private names), when it has one
  with the same structure.

Every contender runs ``k`` calls (or steps) per round, so all timings are of the same kind: one
call or one step. Acceptance (issue 11): step ≤ 1.5× fwd+bwd on ``nn.Module``; TorchScript and
``.pt2`` steps ≤ 2× the ``nn.Module`` step. Ratios use the minimum over all calls (the least
disturbed on a shared machine); medians are shown too.

    python bench/sensitivity_speed.py --baseline 6de438d --out bench/results/sensitivity-speed.md
"""

from __future__ import annotations

import argparse
import importlib.util
import platform
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
RESNET = SHARED / "models" / "cifar10_resnet56"
CIFAR = SHARED / "data" / "cifar10" / "test1017_uint8.npz"


def digits_cnn(bag: int) -> tuple[torch.nn.Module, torch.Tensor, str]:
    from tamperprobe import zoo
    from tamperprobe.data import load_data
    from tamperprobe.train import accuracy, fit

    train, test = load_data("digits").split(0.3, seed=0)
    assert train.y is not None and test.y is not None
    torch.manual_seed(0)
    module = fit(zoo.build("cnn", (1, 8, 8)), train.x, train.y, epochs=8, lr=3e-3, seed=0)
    x = torch.from_numpy(np.ascontiguousarray(train.x[:bag], dtype=np.float32))
    return module, x, f"digits CNN (zoo `cnn`, trained here: test accuracy {accuracy(module, test.x, test.y):.3f}), bag {bag} of 1×8×8"


def resnet56(bag: int) -> tuple[torch.nn.Module, torch.Tensor, str]:
    sys.path.insert(0, str(RESNET))
    import model_def

    module = model_def.load()
    data = np.load(CIFAR)
    x = torch.from_numpy(data["x"][:bag].astype(np.float32) / 255.0)
    return module, x, f"CIFAR-10 ResNet-56 (pretrained, {sum(p.numel() for p in module.parameters()):,} parameters), bag {bag} of 3×32×32"


def formats(module: torch.nn.Module, x: torch.Tensor) -> dict[str, Any]:
    from tamperprobe.models import ExportedModel, ScriptedModel, TorchModel

    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    return {
        "module": TorchModel(module, "module"),
        "torchscript": ScriptedModel(torch.jit.trace(module, x[:2], check_trace=False), "torchscript"),
        ".pt2": ExportedModel(torch.export.export(module, (x[:2],), dynamic_shapes=({0: batch},)).module(), ".pt2"),
    }


def _import_from_git(rev: str, path: str, name: str, package: str, replace: tuple[str, str] | None = None) -> Any:
    """Module ``path`` of revision ``rev``, imported as ``name`` inside ``package`` (relative imports resolve there)."""
    source = subprocess.run(["git", "-C", str(REPO), "show", f"{rev}:{path}"], check=True, capture_output=True, text=True).stdout
    if replace is not None:
        source = source.replace(*replace)
    spec = importlib.util.spec_from_loader(name, loader=None)
    assert spec is not None
    mod = importlib.util.module_from_spec(spec)
    mod.__package__ = package
    sys.modules[name] = mod
    exec(compile(source, f"{rev}:{path}", "exec"), mod.__dict__)
    return mod


def load_baseline(rev: str) -> tuple[Any, Any]:
    """The sensitivity module of revision ``rev`` and its ``SensitiveSamples`` class (None if it cannot be loaded)."""
    sens = _import_from_git(rev, "src/tamperprobe/owner/sensitivity.py", "tamperprobe.owner._baseline_sensitivity", "tamperprobe.owner")
    try:
        method = _import_from_git(
            rev,
            "src/tamperprobe/owner/methods/sensitive.py",
            "tamperprobe.owner.methods._baseline_sensitive",
            "tamperprobe.owner.methods",
            ("from ..sensitivity import", "from .._baseline_sensitivity import"),
        ).SensitiveSamples
    except Exception:  # an older layout: time its sensitivity module only
        method = None
    return sens, method


def contenders(module: torch.nn.Module, x: torch.Tensor, k: int, baseline: tuple[Any, Any] | None, rev: str) -> dict[str, Callable[[], list[float]]]:
    """Name -> a callable that runs the contender ``k`` times and returns the seconds of each run."""
    from tamperprobe.data import Dataset
    from tamperprobe.owner.methods.sensitive import SensitiveSamples
    from tamperprobe.owner.sensitivity import Sensitivity, resolve_params

    models = formats(module, x)
    data = Dataset(x.numpy(), None, "bag", 0.0, 1.0)
    names = resolve_params(module, None)
    out: dict[str, Callable[[], list[float]]] = {}

    def repeat(once: Callable[[], object]) -> Callable[[], list[float]]:
        def run() -> list[float]:
            times = []
            for _ in range(k):
                t = time.perf_counter()
                once()
                times.append(time.perf_counter() - t)
            return times

        return run

    def fwd_bwd(model: Any) -> Callable[[], object]:
        def once() -> object:
            xv = x.clone().requires_grad_(True)
            z = model.forward(xv)
            return torch.autograd.grad(z.sum(), xv)

        return once

    def value_and_grad(model: Any) -> Callable[[], list[float]]:
        """k evaluations of S and dS/dx inside one session, as an ascent makes them."""
        route = Sensitivity(model, names)

        def run() -> list[float]:
            times = []
            with route.session():
                for _ in range(k):
                    t = time.perf_counter()
                    route.value_and_grad(x)
                    times.append(time.perf_counter() - t)
            return times

        return run

    def steps(model: Any, autocast: Any = None, method: Any = SensitiveSamples) -> Callable[[], list[float]]:
        """k ascent steps of the method; each step is the time between two progress calls."""
        gen = method(steps=k + 1, patience=0, autocast=autocast)

        def run() -> list[float]:
            stamps: list[float] = []
            gen.generate(model, data, len(x), np.random.default_rng(0), lambda done, total, *_: stamps.append(time.perf_counter()))
            return list(np.diff(stamps[: k + 1]))

        return run

    def paired(model: Any) -> tuple[Callable[[], list[float]], Callable[[], list[float]]]:
        """k ascent steps with one fwd+bwd timed between each two (outside the step): both under the same conditions.

        In a tight loop a fwd+bwd reuses warm caches that a step, with its hundred small kernels,
        cannot; timed between steps it starts as cold as the step's own passes do.
        """
        gen = SensitiveSamples(steps=k + 1, patience=0)
        once = fwd_bwd(model)
        between: list[float] = []

        def run_steps() -> list[float]:
            stamps: list[float] = []

            def progress(done: int, total: int, *_: object) -> None:
                stamps.append(time.perf_counter())  # a step ends
                t = time.perf_counter()
                once()
                between.append(time.perf_counter() - t)
                stamps.append(time.perf_counter())  # the next starts

            gen.generate(model, data, len(x), np.random.default_rng(0), progress)
            ends, starts = stamps[0::2], stamps[1::2]
            return [end - start for start, end in zip(starts[:k], ends[1 : k + 1], strict=True)]

        def run_between() -> list[float]:
            out = between[:k]
            between.clear()
            return out

        return run_steps, run_between

    def old(model: Any, sens: Any) -> Callable[[], object]:
        # revisions before 871811f pick their route by Model.functional, an attribute since dropped
        model.functional = not model.format == "torchscript"

        def once() -> object:
            xv = x.clone().requires_grad_(True)
            s = sens.sensitivity(model, xv, names)
            return torch.autograd.grad(s.sum(), xv)

        return once

    for fmt, model in models.items():
        out[f"fwd+bwd {fmt}"] = repeat(fwd_bwd(model))
    out["S+dS/dx module"] = value_and_grad(models["module"])
    for fmt, model in models.items():
        out[f"step {fmt}"] = steps(model)
    out["step bf16 module"] = steps(models["module"], "bf16")
    out["paired: step module"], out["paired: fwd+bwd module"] = paired(models["module"])
    if baseline is not None:
        sens, method = baseline
        for fmt, model in models.items():
            out[f"main@{rev} {fmt}"] = repeat(old(model, sens))
        if method is not None:
            for fmt, model in models.items():
                out[f"step main@{rev} {fmt}"] = steps(model, method=method)
    return out


def measure(cases: dict[str, Callable[[], list[float]]], rounds: int) -> dict[str, list[float]]:
    """Seconds per call or step over ``rounds`` interleaved rounds (each case runs k times a round), after a warm-up."""
    for run in cases.values():
        run()
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(rounds):
        for name, run in cases.items():
            times[name] += run()
    return times


def breakdown(module: torch.nn.Module, x: torch.Tensor, k: int, rounds: int) -> list[str]:
    """Where a step's time goes on the ``nn.Module`` route: its parts timed inside the running ascent, and kernel counts.

    The network's forward (``Sensitivity._hooked``), the float64 terms of S (``_output_layer_terms``),
    the backward pass (``torch.autograd.grad``), Adam and the projection are wrapped with timers
    for ``rounds`` ascents of ``k`` steps; the rest of a step is its bookkeeping and Python. The
    top-level aten ops per step and per fwd+bwd come from ``torch.profiler`` (counts only: its
    timings of small ops are inflated).
    """
    from torch.profiler import ProfilerActivity, profile

    from tamperprobe.data import Dataset
    from tamperprobe.models import TorchModel
    from tamperprobe.owner import sensitivity
    from tamperprobe.owner.methods import sensitive

    model = TorchModel(module, "module")
    data = Dataset(x.numpy(), None, "bag", 0.0, 1.0)
    parts = {"network forward (hooked)": [], "S terms, float64": [], "backward pass": [], "Adam": [], "projection": []}
    current: dict[str, float] = {}

    def timed(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                current[name] = current.get(name, 0.0) + time.perf_counter() - t

        return wrapper

    patches = [
        (sensitivity.Sensitivity, "_hooked", "network forward (hooked)"),
        (sensitivity, "_output_layer_terms", "S terms, float64"),
        (torch.autograd, "grad", "backward pass"),
        (sensitive.SensitiveSamples, "_adam", "Adam"),
        (sensitive, "_project", "projection"),
    ]
    saved = [(owner, attr, getattr(owner, attr)) for owner, attr, _ in patches]
    steps_total: list[float] = []
    try:
        for owner, attr, name in patches:
            setattr(owner, attr, timed(name, getattr(owner, attr)))
        stamps: list[float] = []
        per_step: list[dict[str, float]] = []

        def progress(done: int, total: int, *_: object) -> None:
            stamps.append(time.perf_counter())
            per_step.append(dict(current))
            current.clear()

        for round_ in range(rounds + 1):  # the first is a warm-up
            stamps.clear()
            per_step.clear()
            sensitive.SensitiveSamples(steps=k + 1, patience=0).generate(model, data, len(x), np.random.default_rng(0), progress)
            if round_:
                steps_total += list(np.diff(stamps[: k + 1]))
                for record in per_step[1 : k + 1]:
                    for name in parts:
                        parts[name].append(record.get(name, 0.0))
    finally:
        for owner, attr, fn in saved:
            setattr(owner, attr, fn)

    def top_level_ops(run: Callable[[], object], calls: int) -> float:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            run()
        events = [e for e in prof.events() if e.name.startswith("aten::")]
        return sum(1 for e in events if e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")) / calls

    def fwd_bwd() -> None:
        for _ in range(k):
            xv = x.clone().requires_grad_(True)
            torch.autograd.grad(model.forward(xv).sum(), xv)

    ops_fb = top_level_ops(fwd_bwd, k)
    ops_step = top_level_ops(lambda: sensitive.SensitiveSamples(steps=k, patience=0).generate(model, data, len(x), np.random.default_rng(0)), k + 1)
    step_median = float(np.median(steps_total))
    rows = [
        f"Median over {len(steps_total)} steps ({rounds} ascents of {k}); a step has {ops_step:.0f} top-level aten ops, a fwd+bwd {ops_fb:.0f}.",
        "",
        "| part of a step | median µs | share of the median step |",
        "|---|---:|---:|",
    ]
    accounted = 0.0
    for name, ts in parts.items():
        med = float(np.median(ts))
        accounted += med
        rows.append(f"| {name} | {med * 1e6:.0f} | {med / step_median:.0%} |")
    rows.append(f"| bookkeeping, progress, Python (the rest) | {(step_median - accounted) * 1e6:.0f} | {1 - accounted / step_median:.0%} |")
    rows.append(f"| **step** | {step_median * 1e6:.0f} | 100% |")
    return rows


def table(times: dict[str, list[float]]) -> list[str]:
    floor = min(times["fwd+bwd module"])
    step = min(times["step module"])
    rows = ["| contender | min ms | median ms | ÷ fwd+bwd module | ÷ step module |", "|---|---:|---:|---:|---:|"]
    for name, ts in times.items():
        best = min(ts)
        rows.append(f"| {name} | {best * 1e3:.2f} | {float(np.median(ts)) * 1e3:.2f} | {best / floor:.2f} | {best / step:.2f} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--steps",
        default="digits=20,digits:1000=5,resnet56=3",
        help="k per model or model:bag: calls or ascent steps per contender and round (fewer for slow ones: more, shorter windows)",
    )
    parser.add_argument("--baseline", default="", help="a git revision whose sensitivity module and sensitive method to time as well (e.g. main)")
    parser.add_argument("--models", default="digits:100,digits:1000,resnet56:100", help="model:bag, ...")
    parser.add_argument("--breakdown", default="digits:100", help="model:bag whose step to split into parts (empty: none)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    rev = ""
    baseline = None
    if args.baseline:
        rev = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", args.baseline], check=True, capture_output=True, text=True
        ).stdout.strip()
        baseline = load_baseline(rev)
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()
    lines = [
        f"# Sensitive-Samples: ascent step vs forward+backward ({datetime.now(UTC).date()})",
        "",
        f"`python bench/sensitivity_speed.py {' '.join(sys.argv[1:])}` at {head}: {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} torch thread, torch {torch.__version__}, {args.rounds} interleaved rounds after a warm-up, "
        f"k calls or steps per contender and round ({args.steps}). A step is the time between two progress calls of "
        f"`SensitiveSamples(patience=0).generate`. Machine shared with other jobs: compare ratios, not seconds.",
    ]
    builders = {"digits": digits_cnn, "resnet56": resnet56}
    steps = {k: int(v) for k, _, v in (item.partition("=") for item in args.steps.split(","))}
    for item in args.models.split(","):
        name, _, bag = item.partition(":")
        module, x, what = builders[name](int(bag or 100))
        cases = contenders(module, x, steps.get(item, steps[name]), baseline, rev)
        t0 = time.monotonic()
        times = measure(cases, args.rounds)
        lines += ["", f"## {what}", "", *table(times), "", f"({sum(len(v) for v in times.values())} timings in {time.monotonic() - t0:.0f} s)"]
        print("\n".join(lines[-len(cases) - 5 :]), flush=True)
        if item == args.breakdown:
            lines += [
                "",
                "Where a step's time goes (`nn.Module`, parts timed inside the running ascent):",
                "",
                *breakdown(module, x, 20, args.rounds),
            ]
            print("\n".join(lines[-12:]), flush=True)
    text = "\n".join(lines) + "\n"
    if args.out:
        args.out.write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
