"""Lab commands: ``train``, ``attack``, ``evaluate`` and ``demo``."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import List, Optional

import typer

from ._common import console, err_console, fail, handled


def _parse_params(items: list[str] | None) -> dict[str, str]:
    from ..errors import UsageError

    out: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"bad --param {item!r}: expected key=value")
        out[key.strip()] = value.strip()
    return out


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def _example_input(module, data) -> object | None:
    """An example batch: from the data, else from a torch.export module's input placeholder."""
    import numpy as np

    if data is not None and len(data.x):
        return data.x[:2]
    graph = getattr(module, "graph", None)
    for node in getattr(graph, "nodes", []):
        if node.op != "placeholder":
            continue
        val = node.meta.get("val")
        if val is None or not hasattr(val, "shape"):
            continue
        shape = [d if isinstance(d, int) else 2 for d in val.shape]
        return np.zeros(shape, dtype=np.float32)
    return None


def check_output(kind: str, source_kind: str, out: Path) -> None:
    """Refuse, before any work, an output format the attacked model cannot be written in."""
    from ..errors import UsageError
    from ..models import TORCHSCRIPT_SUFFIXES

    suffix = out.suffix.lower()
    if source_kind == "torchscript" and suffix not in TORCHSCRIPT_SUFFIXES:
        raise UsageError(f"a TorchScript model is written back as TorchScript: give --out a .pt file, not {suffix or 'no suffix'}")
    if source_kind == "export" and suffix != ".pt2":
        raise UsageError(f"a torch.export model is written back as torch.export: give --out a .pt2 file, not {suffix or 'no suffix'}")
    if suffix not in (*TORCHSCRIPT_SUFFIXES, ".pt2", ".onnx", ".safetensors"):
        raise UsageError(f"cannot write a model as {suffix or '(no suffix)'}: use .pt, .pt2, .onnx or .safetensors")
    if kind == "dynamic-int8" and suffix not in TORCHSCRIPT_SUFFIXES:
        raise UsageError("a dynamic-int8 model holds packed int8 layers and can only be written as TorchScript: give --out a .pt file")


def write_attacked(module, kind: str, source_kind: str, out: Path, data) -> None:
    """Write ``module`` (the attacked copy) to ``out`` in a format compatible with ``source_kind``."""
    import torch

    from ..attacks.base import quiet
    from ..errors import UsageError
    from ..models import save_model

    check_output(kind, source_kind, out)
    suffix = out.suffix.lower()
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        with quiet():
            if isinstance(module, torch.jit.ScriptModule):
                torch.jit.save(module, str(out))
                return
            if suffix == ".safetensors":
                from safetensors.torch import save_file

                save_file({k: v.detach().contiguous() for k, v in module.state_dict().items()}, str(out))
                return
            example = _example_input(module, data)
            if example is None:
                raise UsageError(f"writing {suffix} needs an example input: pass --data")
            save_model(module, out, example)
    except UsageError:
        raise
    except Exception as exc:
        text = str(exc).strip().splitlines()
        raise UsageError(f"cannot write the attacked model as {suffix}: {text[0][:200] if text else type(exc).__name__}") from None


def train_cmd(
    arch: str = typer.Argument(..., help="Architecture from the zoo: mlp, cnn, irnn or perceptron."),
    data: str = typer.Option(..., "--data", help="Labelled data: .npz with x and y, an IDX folder, or digits / mnist5k."),
    out: Path = typer.Option(..., "--out", help="Model file to write: .pt (TorchScript), .pt2 (torch.export), .onnx or .safetensors."),
    epochs: int = typer.Option(20, "--epochs", help="Training epochs."),
    lr: float = typer.Option(1e-3, "--lr", help="Adam learning rate."),
    seed: int = typer.Option(0, "--seed", help="Seed of the split, the initialisation and the batch order."),
    test_fraction: float = typer.Option(0.25, "--test-fraction", help="Share of the data held out for the test accuracy."),
) -> None:
    """Train a zoo model on labelled data and write it in the format of --out's suffix."""
    with handled():
        import numpy as np
        import torch

        from .. import zoo
        from ..data import load_data
        from ..errors import DataError, UsageError
        from ..models import save_model
        from ..train import accuracy, fit

        if arch not in zoo.ARCHITECTURES:
            raise UsageError(f"unknown architecture {arch!r}: choose one of {', '.join(zoo.ARCHITECTURES)}")
        if not 0.0 < test_fraction < 1.0:
            raise UsageError(f"--test-fraction must lie in (0, 1), got {test_fraction}")
        if epochs < 1 or lr <= 0:
            raise UsageError("--epochs must be >= 1 and --lr > 0")
        ds = load_data(data)
        if ds.y is None:
            raise DataError(f"{data} has no labels: training needs y")
        tr, te = ds.split(test_fraction, seed=seed)
        if len(tr) == 0 or len(te) == 0:
            raise DataError(f"{data}: too few samples ({len(ds)}) to split off a test set")
        classes = int(np.max(ds.y)) + 1
        torch.manual_seed(seed)
        module = zoo.build(arch, tuple(ds.x.shape[1:]), classes)
        fit(module, tr.x, tr.y, epochs=epochs, lr=lr, seed=seed)
        console.print(
            f"{arch} on {ds.name}: train accuracy {accuracy(module, tr.x, tr.y):.4f}, test accuracy {accuracy(module, te.x, te.y):.4f} ({len(te)} held out)"
        )
        save_model(module, out, tr.x)
        console.print(f"wrote {out}")


def attack_cmd(
    model: str = typer.Argument(..., help="Model: .pt (TorchScript), .pt2 (torch.export) or package.module:attribute."),
    kind: str = typer.Option(
        ...,
        "--kind",
        help="Attack: trojan, trojan-neuron, poison-generic, poison-specific, int8, int8-channel, dynamic-int8, fp16, bf16, floor, prune, finetune, watermark, noise.",
    ),
    out: Path = typer.Option(
        ..., "--out", help="Where to write the tampered model (same format as the input; .safetensors for package.module:attribute)."
    ),
    data: Optional[str] = typer.Option(None, "--data", help="Labelled data: the attack's training data and (25 % held out) the evaluation split."),
    eval_data: Optional[str] = typer.Option(None, "--eval-data", help="Separate evaluation data (then all of --data is the attack's)."),
    weights: Optional[str] = typer.Option(None, "--weights", help=".safetensors or state_dict file for the model."),
    seed: int = typer.Option(0, "--seed", help="Seed of every random choice of the attack."),
    param: Optional[List[str]] = typer.Option(None, "--param", help="Attack parameter key=value (repeatable), e.g. ratio=0.2."),
) -> None:
    """Tamper with a model (trojan, poisoning, quantization, pruning, fine-tuning, noise ...) and write the copy."""
    with handled():
        from ..attacks import REGISTRY, run_attack
        from ..data import load_data
        from ..errors import UsageError
        from ..models import load_model

        if kind not in REGISTRY:
            raise UsageError(f"unknown attack {kind!r}: choose one of {', '.join(REGISTRY)}")
        params = _parse_params(param)
        if "seed" in params:
            raise UsageError("give the seed with --seed, not --param seed=...")
        if Path(model).exists() and out.exists() and out.resolve() == Path(model).resolve():
            raise UsageError("--out would overwrite the input model; choose another file")
        loaded = load_model(model, weights)
        if loaded.module is None:
            raise UsageError(f"attacks need the model's weights in PyTorch form; {loaded.source} is {loaded.format}")
        check_output(kind, loaded.format, out)
        ds = load_data(data) if data is not None else None
        ev = load_data(eval_data) if eval_data is not None else None
        result = run_attack(kind, loaded.module, ds, seed=seed, eval_data=ev, **params)
        write_attacked(result.model, kind, loaded.format, out, ds if ds is not None else ev)
        shown = ", ".join(f"{k}={v}" for k, v in result.params.items())
        console.print(f"attack {kind} on {loaded.source}: {shown}", highlight=False)
        console.print(f"  accuracy before {_fmt(result.acc_before)}  after {_fmt(result.acc_after)}", highlight=False)
        console.print(f"  success         {_fmt(result.success)}", highlight=False)
        console.print(f"  changed weights {result.changed}", highlight=False)
        console.print(f"wrote {out}", highlight=False)


# ------------------------------------------------------------------ evaluate


def _names(text: Optional[str]) -> list[str] | None:
    if text is None:
        return None
    items = [t.strip() for t in text.split(",") if t.strip()]
    return items or None


def _named_params(items: list[str] | None, option: str) -> dict[str, dict]:
    """``name:key=value`` (repeatable) -> {name: {key: value}}; values parsed as JSON when they parse."""
    out: dict[str, dict] = {}
    for item in items or []:
        name, sep, rest = item.partition(":")
        key, sep2, value = rest.partition("=")
        if not sep or not sep2 or not name.strip() or not key.strip():
            fail(f"bad {option} {item!r}: expected NAME:key=value")
        try:
            parsed = json.loads(value)
        except ValueError:
            parsed = value
        out.setdefault(name.strip(), {})[key.strip()] = parsed
    return out


@contextlib.contextmanager
def _campaign_bar(enabled: bool) -> Iterator[Callable[[int, int, str], None]]:
    """One rich progress bar over the whole campaign, its label the current step."""
    if not enabled or (not sys.stderr.isatty() and not err_console.is_terminal):
        yield lambda done, total, what: None
        return
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    with Progress(
        TextColumn("[bold]evaluate[/]"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.description}"),
        console=err_console,
        transient=True,
    ) as prog:
        task = prog.add_task("starting", total=None)

        def update(done: int, total: int, what: str) -> None:
            prog.update(task, completed=done, total=total, description=what)

        yield update


def evaluate(
    model: str = typer.Argument(..., help="Model: .pt (TorchScript), .pt2 (torch.export) or package.module:attribute."),
    data: str = typer.Option(..., "--data", help="Labelled data: .npz with x and y, an IDX folder, or digits / mnist5k."),
    out: Path = typer.Option(..., "--out", help="Folder for report.md, CSV tables, PNG plots and results.json."),
    weights: Optional[str] = typer.Option(None, "--weights", help=".safetensors or state_dict file for the model."),
    methods: Optional[str] = typer.Option(
        None, "--methods", help="Comma-separated marker methods (default: all). The baselines natural, noise, rotation, distortion are always added."
    ),
    attacks: Optional[str] = typer.Option(None, "--attacks", help="Comma-separated attacks (default: all)."),
    trials: int = typer.Option(3, "--trials", help="Random instances (seeds) per random attack; deterministic attacks run once."),
    bag: int = typer.Option(100, "--bag", help="Candidate markers generated per method."),
    specs: str = typer.Option("top1,topk:3,topk:5,top1-prob:2,probs:1,probs:2,logits", "--specs", help="Output specs to measure under."),
    select: str = typer.Option("manc", "--select", help="Selection protocol for the detection rate: manc or random."),
    resamples: int = typer.Option(10_000, "--resamples", help="Resampled selections per method for the detection rate."),
    seed: int = typer.Option(0, "--seed", help="Seed of every random choice of the campaign."),
    test_fraction: float = typer.Option(0.3, "--test-fraction", help="Share of the data held out to measure accuracy."),
    tolerance: float = typer.Option(3e-5, "--tolerance", help="Comparison tolerance (logit units), as in a fingerprint."),
    no_baselines: bool = typer.Option(False, "--no-baselines", help="Do not add the baseline methods."),
    method_param: Optional[List[str]] = typer.Option(
        None, "--method-param", help="METHOD:key=value hyper-parameter (repeatable), e.g. sensitive:steps=100."
    ),
    attack_param: Optional[List[str]] = typer.Option(None, "--attack-param", help="ATTACK:key=value parameter (repeatable), e.g. prune:ratio=0.2."),
    low: Optional[float] = typer.Option(None, "--low", help="Lower end of the input range (default: inferred from the data)."),
    high: Optional[float] = typer.Option(None, "--high", help="Upper end of the input range (default: inferred from the data)."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
) -> None:
    """Measure every marker method against every attack: trigger ratio, detection rate vs N_S, key size, false alarms.

    Exit 0 when something was measured (the report lists what failed), 2 when nothing could be.
    """
    with handled():
        from ..data import load_data
        from ..evaluation.campaign import DEFAULT_SPECS, run_evaluation, write_report
        from ..models import load_model
        from ..outputs import OutputSpec
        from ..owner.methods import method_names

        method_list = _names(methods)
        if method_list is not None:
            unknown = [m for m in method_list if m not in method_names()]
            if unknown:
                fail(f"unknown method(s) {', '.join(unknown)}: choose from {', '.join(method_names())}")
        attack_list = _names(attacks)
        if attack_list is not None:
            try:
                from ..attacks import attack_names

                known = attack_names()
            except Exception:  # the suite is missing: the campaign records the error
                known = None
            if known is not None:
                unknown = [a for a in attack_list if a not in known]
                if unknown:
                    fail(f"unknown attack(s) {', '.join(unknown)}: choose from {', '.join(known)}")
        spec_list = _names(specs) or list(DEFAULT_SPECS)
        for s in spec_list:
            OutputSpec.parse(s)
        m = load_model(model, weights)
        ds = load_data(data, low=low, high=high)
        if ds.y is None:
            fail(f"{data} has no labels: the evaluation needs labelled data (accuracy, attacks)")
        with _campaign_bar(not quiet) as update:
            ev = run_evaluation(
                m,
                ds,
                methods=method_list,
                attacks=attack_list,
                specs=spec_list,
                trials=trials,
                bag=bag,
                select=select,
                resamples=resamples,
                seed=seed,
                progress=update,
                test_fraction=test_fraction,
                baselines=not no_baselines,
                tolerance=tolerance,
                method_params=_named_params(method_param, "--method-param"),
                attack_params=_named_params(attack_param, "--attack-param"),
            )
        write_report(ev, out)
        _summary(ev, out)
        if not ev.measured:
            fail(f"nothing could be measured ({len(ev.errors)} errors; see {out / 'report.md'})")


def _summary(ev, out: Path) -> None:
    from rich.table import Table

    spec = "top1" if "top1" in ev.params["specs"] else ev.params["specs"][0]
    table = ev.detection_table(spec)
    if table:
        t = Table(title=f"detection rate ({spec}, {ev.params['select']} selection) at N_S = 1 / 5 / 10")
        methods = list(dict.fromkeys(m for m, _ in table))
        attacks = list(dict.fromkeys(a for _, a in table))
        t.add_column("attack")
        for m in methods:
            t.add_column(m, justify="right")
        for a in attacks:
            cells = []
            for m in methods:
                r = table.get((m, a))
                cells.append("-" if r is None else f"{r[0]:.2f}/{r[4]:.2f}/{r[9]:.2f}")
            t.add_row(a, *cells)
        console.print(t)
    colour = "green" if ev.benign_flagged == 0 else "bold red"
    console.print(f"[{colour}]false alarms under benign runtimes: {ev.benign_flagged} of {ev.benign_checks} checks[/]", highlight=False)
    if ev.errors:
        console.print(f"[yellow]{len(ev.errors)} step(s) failed; see the report[/]")
        for e in ev.errors[:8]:
            console.print(f"  {e['stage']} {e['name']}: {e['error']}", highlight=False, soft_wrap=True)
    console.print(f"wrote {out}/report.md, CSV tables, PNG plots and results.json ({ev.seconds:.0f} s)")


def demo(
    fresh: bool = typer.Option(False, "--fresh", help="Retrain the demo model instead of using the cached one."),
    seed: int = typer.Option(0, "--seed", help="Seed of the demo."),
) -> None:
    """Train a small CNN, fingerprint it, serve it over HTTP, and verify it intact and tampered."""
    with handled():
        from ..demo import run_demo

        ok = run_demo(fresh=fresh, seed=seed, console=console)
        raise typer.Exit(0 if ok else 2)


def register(app: typer.Typer) -> None:
    app.command("train")(train_cmd)
    app.command("attack")(attack_cmd)
    app.command()(evaluate)
    app.command()(demo)
