"""Lab commands: ``train``, ``attack``, ``evaluate`` and ``demo``. Each body wires options to library calls."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, List, Optional

import typer
from rich.markup import escape
from typer.core import TyperCommand

from ..attacks import attack_names
from ..evaluation import DEFAULT_SPECS
from ..evaluation.routers import router_names
from ..owner.methods import method_names
from ._common import console, err_console, fail, handled, print_json, progress_bar
from ._options import (
    DataOption,
    DeviceOption,
    HighOption,
    JsonOption,
    LowOption,
    ModelArgOption,
    ModelArgument,
    ParamOption,
    SeedOption,
    ThreadsOption,
    WeightsOption,
    use_runtime,
)

if TYPE_CHECKING:
    from ..evaluation import Evaluation

KindOption = Annotated[str, typer.Option("--kind", help=f"Attack, one of: {', '.join(attack_names())} (described above).")]
OutModelOption = Annotated[
    Path, typer.Option("--out", help="Where to write the tampered model (same format as the input; .safetensors for package.module:attribute).")
]
AttackDataOption = Annotated[
    Optional[str], typer.Option("--data", help="Labelled data: the attack's training data and (25 % held out) the evaluation split.")
]
EvalDataOption = Annotated[Optional[str], typer.Option("--eval-data", help="Separate evaluation data (then all of --data is the attack's).")]


class _AttackListCommand(TyperCommand):
    """A command whose help ends with every registered attack and its one-line description.

    The descriptions live in the attack classes; they are imported (with torch) only when the
    help is shown, so the command line starts without torch.
    """

    def format_help(self, ctx: Any, formatter: Any) -> None:
        from ..attacks import describe_attacks

        listing = "\n\n".join(f"{name}: {text}" for name, text in describe_attacks().items())
        self.help = f"{(self.help or '').strip()}\n\nAttacks:\n\n{listing}"
        super().format_help(ctx, formatter)


# ------------------------------------------------------------------ train


def train_cmd(
    arch: Annotated[str, typer.Argument(help="Architecture from the zoo: mlp, cnn, irnn or perceptron.")],
    data: DataOption,
    out: Annotated[Path, typer.Option("--out", help="Model file to write: .pt (TorchScript), .pt2 (torch.export), .onnx or .safetensors.")],
    epochs: Annotated[int, typer.Option("--epochs", help="Training epochs.")] = 20,
    lr: Annotated[float, typer.Option("--lr", help="Adam learning rate.")] = 1e-3,
    seed: SeedOption = 0,
    test_fraction: Annotated[float, typer.Option("--test-fraction", help="Share of the data held out for the test accuracy.")] = 0.25,
    threads: ThreadsOption = None,
    device: DeviceOption = None,
    as_json: JsonOption = False,
) -> None:
    """Train a zoo model on labelled data and write it in the format of --out's suffix."""
    with handled():
        from .. import zoo
        from ..data import load_data
        from ..models import save_model

        zoo.check_architecture(arch)
        dev = use_runtime(threads, device)
        ds = load_data(data)
        with progress_bar(f"training {arch}") as update:
            trained = zoo.train_model(arch, ds, epochs=epochs, lr=lr, seed=seed, test_fraction=test_fraction, progress=update, device=dev)
        save_model(trained.module, out, trained.example)
        if as_json:
            print_json(
                {
                    "architecture": arch,
                    "data": trained.data,
                    "train_accuracy": trained.train_accuracy,
                    "test_accuracy": trained.test_accuracy,
                    "held_out": trained.held_out,
                    "epochs": epochs,
                    "lr": lr,
                    "seed": seed,
                    "test_fraction": test_fraction,
                    "file": out,
                }
            )
            return
        console.print(
            f"{arch} on {trained.data}: train accuracy {trained.train_accuracy:.4f}, "
            f"test accuracy {trained.test_accuracy:.4f} ({trained.held_out} held out)"
        )
        console.print(f"wrote {out}")


# ------------------------------------------------------------------ attack


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def attack_cmd(
    model: ModelArgument,
    kind: KindOption,
    out: OutModelOption,
    data: AttackDataOption = None,
    eval_data: EvalDataOption = None,
    weights: WeightsOption = None,
    model_arg: ModelArgOption = None,
    seed: SeedOption = 0,
    param: ParamOption = None,
    threads: ThreadsOption = None,
    device: DeviceOption = None,
    as_json: JsonOption = False,
) -> None:
    """Tamper with a model (trojan, poisoning, quantization, pruning, fine-tuning, noise ...) and write the copy."""
    with handled():
        from .._params import parse_kv
        from ..attacks import get_attack
        from ..attacks.io import check_output, write_attacked
        from ..data import load_data
        from ..errors import UsageError
        from ..models import load_model, parse_model_args

        params: dict[str, Any] = dict(parse_kv(param))
        if "seed" in params:
            raise UsageError("give the seed with --seed, not --param seed=...")
        eval_fraction = params.pop("eval_fraction", None)
        attack = get_attack(kind, params)
        if Path(model).exists() and out.exists() and out.resolve() == Path(model).resolve():
            raise UsageError("--out would overwrite the input model; choose another file")
        loaded = load_model(model, weights, model_args=parse_model_args(model_arg), device=use_runtime(threads, device))
        module = loaded.require_torch("an attack")
        check_output(attack, loaded.format, out)
        ds = load_data(data) if data is not None else None
        ev = load_data(eval_data) if eval_data is not None else None
        with progress_bar(f"attack {kind}") as update:
            result = attack.run(module, ds, seed=seed, eval_data=ev, eval_fraction=eval_fraction, progress=update)
        write_attacked(result.model, attack, loaded.format, out, ds if ds is not None else ev)
        if as_json:
            print_json(
                {
                    "attack": kind,
                    "model": loaded.source,
                    "params": result.params,
                    "accuracy_before": result.acc_before,
                    "accuracy_after": result.acc_after,
                    "success": result.success,
                    "changed_weights": result.changed,
                    "file": out,
                }
            )
            return
        shown = ", ".join(f"{k}={v}" for k, v in result.params.items())
        console.print(f"attack {kind} on {loaded.source}: {shown}", highlight=False)
        console.print(f"  accuracy before {_fmt(result.acc_before)}  after {_fmt(result.acc_after)}", highlight=False)
        console.print(f"  success         {_fmt(result.success)}", highlight=False)
        console.print(f"  changed weights {result.changed}", highlight=False)
        console.print(f"wrote {out}", highlight=False)


# ------------------------------------------------------------------ evaluate


def _names(text: Optional[str], known: list[str], what: str) -> list[str] | None:
    """Comma-separated names, each checked against the registry (None: all of them)."""
    if text is None:
        return None
    items = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in items if t not in known]
    if unknown:
        fail(f"unknown {what}(s) {', '.join(unknown)}: choose from {', '.join(known)}")
    return items or None


def _named_params(items: list[str] | None, option: str) -> dict[str, dict[str, str]]:
    """``NAME:key=value`` (repeatable) -> {name: {key: value}}; the values are coerced by the plug-in's annotations later."""
    from .._params import parse_kv
    from ..errors import UsageError

    out: dict[str, dict[str, str]] = {}
    for item in items or []:
        name, sep, rest = item.partition(":")
        if not sep or not name.strip():
            raise UsageError(f"bad {option} {item!r}: expected NAME:key=value")
        out.setdefault(name.strip(), {}).update(parse_kv([rest], option))
    return out


MethodsOption = Annotated[
    Optional[str],
    typer.Option(
        "--methods",
        help=f"Comma-separated marker methods from {', '.join(method_names())} (default: all). "
        "The baselines natural, noise, rotation, distortion are always added.",
    ),
]
AttacksOption = Annotated[Optional[str], typer.Option("--attacks", help=f"Comma-separated attacks from {', '.join(attack_names())} (default: all).")]
TrialsOption = Annotated[int, typer.Option("--trials", help="Random instances (seeds) per random attack; deterministic attacks run once.")]
BagOption = Annotated[int, typer.Option("--bag", help="Candidate markers generated per method.")]
SpecsOption = Annotated[str, typer.Option("--specs", help="Comma-separated output specs to measure under.")]
SelectOption = Annotated[str, typer.Option("--select", help="Selection protocol for the detection rate: manc or random.")]
ResamplesOption = Annotated[int, typer.Option("--resamples", help="Resampled selections per method for the detection rate.")]
TestFractionOption = Annotated[float, typer.Option("--test-fraction", help="Share of the data held out to measure accuracy.")]
EvalToleranceOption = Annotated[
    Optional[float],
    typer.Option(
        "--tolerance",
        help="Comparison tolerance (logit units) for every method. Default: as a fingerprint sets it, "
        "twice the benign floor measured on each method's markers under the benign runtimes, at least 3e-5.",
        show_default=False,
    ),
]
NoBaselinesOption = Annotated[bool, typer.Option("--no-baselines", help="Do not add the baseline methods.")]
AttackSamplesOption = Annotated[
    int,
    typer.Option(
        "--attack-samples",
        help="Training samples the attacks get: a seeded subset of the train part (0: all of it). "
        "Trojans and poisoning train 10 epochs over them, so their time grows with it.",
    ),
]
MethodParamOption = Annotated[
    Optional[List[str]], typer.Option("--method-param", help="METHOD:key=value hyper-parameter (repeatable), e.g. sensitive:steps=100.")
]
AttackParamOption = Annotated[
    Optional[List[str]], typer.Option("--attack-param", help="ATTACK:key=value parameter (repeatable), e.g. prune:ratio=0.2.")
]
NoPlotsOption = Annotated[bool, typer.Option("--no-plots", help="Write no PNG plots (tables, CSV and JSON only).")]
AdversaryOption = Annotated[
    Optional[str],
    typer.Option(
        "--adversary",
        help="Also measure against an operator who routes suspected markers to the original model: "
        f"'all' or comma-separated routers ({', '.join(router_names())}); "
        "writes adversary/adversary.md, CSV and JSON into --out.",
    ),
]
AdversaryCostsOption = Annotated[
    Optional[str],
    typer.Option("--adversary-costs", help="Operator costs (shares of ordinary traffic routed) the adversary tables show, e.g. 0.01,0.05,0.2."),
]
QuietOption = Annotated[bool, typer.Option("--quiet", help="No progress on stderr.")]
BackendOption = Annotated[
    str,
    typer.Option(
        "--backend",
        help="Where the bags and the attacks run: local (this process) or ray (Ray tasks on a cluster; the ray extra). "
        "Same results for the same seed.",
    ),
]
AddressOption = Annotated[
    Optional[str], typer.Option("--address", help="Address of the Ray cluster to join (default: RAY_ADDRESS, else start one on this machine).")
]


def evaluate(
    model: ModelArgument,
    data: DataOption,
    out: Annotated[Path, typer.Option("--out", help="Folder for report.md, CSV tables, PNG plots and results.json.")],
    weights: WeightsOption = None,
    model_arg: ModelArgOption = None,
    methods: MethodsOption = None,
    attacks: AttacksOption = None,
    trials: TrialsOption = 3,
    bag: BagOption = 100,
    specs: SpecsOption = ",".join(DEFAULT_SPECS),
    select: SelectOption = "manc",
    resamples: ResamplesOption = 10_000,
    seed: SeedOption = 0,
    test_fraction: TestFractionOption = 0.3,
    tolerance: EvalToleranceOption = None,
    no_baselines: NoBaselinesOption = False,
    attack_samples: AttackSamplesOption = 1000,
    method_param: MethodParamOption = None,
    attack_param: AttackParamOption = None,
    low: LowOption = None,
    high: HighOption = None,
    no_plots: NoPlotsOption = False,
    adversary: AdversaryOption = None,
    adversary_costs: AdversaryCostsOption = None,
    quiet: QuietOption = False,
    backend: BackendOption = "local",
    address: AddressOption = None,
    threads: ThreadsOption = None,
    device: DeviceOption = None,
    as_json: JsonOption = False,
) -> None:
    """Measure every marker method against every attack: trigger ratio, detection rate vs N_S, key size, false alarms.

    Exit 0 when something was measured (the report lists what failed), 2 when nothing could be.
    """
    with handled():
        from ..evaluation import write_report

        campaign = {
            "methods": _names(methods, method_names(), "method"),
            "attacks": _names(attacks, attack_names(), "attack"),
            "specs": [s.strip() for s in specs.split(",") if s.strip()] or list(DEFAULT_SPECS),
            "method_params": _named_params(method_param, "--method-param"),
            "attack_params": _named_params(attack_param, "--attack-param"),
            **dict(trials=trials, bag=bag, select=select, resamples=resamples, seed=seed, test_fraction=test_fraction),
            **dict(baselines=not no_baselines, tolerance=tolerance, attack_samples=attack_samples),
            "backend": _backend(backend, address),
        }
        routers, costs = _adversary_options(adversary, adversary_costs)  # checked before the long work
        runtime = use_runtime(threads, device)
        _warn_without_plots(no_plots)
        try:
            with progress_bar("evaluate", enabled=not quiet) as update:
                m, ds, ev = _run_campaign(model, weights, model_arg, data, low, high, runtime, campaign, update)
            with progress_bar("writing the report", enabled=not quiet) as update:
                plots = [p for p in write_report(ev, out, plots=not no_plots, progress=update) if p.suffix == ".png"]
            versus = None if routers is None else _run_adversary(m, ds, ev, routers, costs, out, quiet, campaign["backend"])
        finally:
            campaign["backend"].close()
        if as_json:
            print_json(_summary_json(ev, out, plots, versus))
        else:
            _summary(ev, out, plots, versus)
        if not ev.measured:
            fail(f"nothing could be measured ({len(ev.errors)} errors; see {out / 'report.md'})")


def _backend(name: str, address: Optional[str]) -> Any:
    """``--backend`` and ``--address`` checked before the long work (the ray extra installed when asked for)."""
    from .._extras import available, missing
    from ..evaluation.backends import get_backend

    chosen = get_backend(name, address)
    if chosen.name == "ray" and not available("ray"):
        raise missing("ray", "evaluate --backend ray")
    return chosen


def _warn_without_plots(no_plots: bool) -> None:
    """Say on stderr, before the long work, why no plots will be drawn (matplotlib missing)."""
    from ..evaluation.plots import plots_unavailable

    reason = None if no_plots else plots_unavailable()
    if reason:
        err_console.print(f"[yellow]plots skipped:[/] {escape(reason)}", highlight=False, soft_wrap=True)


def _run_campaign(
    model: str, weights: Any, model_arg: Any, data: str, low: Any, high: Any, runtime: Any, campaign: dict[str, Any], update: Any
) -> tuple[Any, Any, Evaluation]:
    """Load the model and the labelled data, then run the campaign: (model, data, evaluation)."""
    from ..data import load_data
    from ..evaluation import run_evaluation
    from ..models import load_model, parse_model_args

    update(0, 0, "loading the model")
    m = load_model(model, weights, model_args=parse_model_args(model_arg), device=runtime)
    update(0, 0, "loading the data")
    ds = load_data(data, low=low, high=high)
    if ds.y is None:
        fail(f"{data} has no labels: the evaluation needs labelled data (accuracy, attacks)")
    return m, ds, run_evaluation(m, ds, progress=update, **campaign)


def _adversary_options(routers: Optional[str], costs: Optional[str]) -> tuple[list[str] | None, list[float]]:
    """``--adversary`` (``all`` or router names) and ``--adversary-costs`` checked: (routers or None, costs)."""
    from ..errors import UsageError
    from ..evaluation.adversary_report import COSTS

    if routers is None:
        if costs is not None:
            raise UsageError("--adversary-costs needs --adversary")
        return None, list(COSTS)
    known = router_names()
    chosen = known if routers.strip() == "all" else _names(routers, known, "router")
    if not chosen:
        raise UsageError(f"--adversary needs 'all' or router names from {', '.join(known)}")
    values = list(COSTS)
    if costs is not None:
        try:
            values = [float(c) for c in costs.split(",") if c.strip()]
        except ValueError:
            raise UsageError(f"bad --adversary-costs {costs!r}: expected numbers such as 0.01,0.05,0.2") from None
        if not values or any(not 0.0 <= c <= 1.0 for c in values):
            raise UsageError(f"bad --adversary-costs {costs!r}: shares of ordinary traffic in [0, 1]")
    from .._extras import available, missing

    needed = [("scipy", "evaluate --adversary")] + ([("sklearn", "the learned router")] if "learned" in chosen else [])
    for module, what in needed:
        if not available(module):
            raise missing(module, what)
    return list(chosen), sorted(set(values))


def _run_adversary(
    model: Any, data: Any, ev: Evaluation, routers: list[str], costs: list[float], out: Path, quiet: bool, backend: Any = None
) -> dict[str, Any]:
    """The adversary measurement with the campaign's settings, written to ``out/adversary``; a summary of it."""
    from ..evaluation.adversary import run_adversary_for
    from ..evaluation.adversary_report import write_adversary_report

    with progress_bar("adversary", enabled=not quiet) as update:
        aev = run_adversary_for(ev, model, data, routers=routers, costs=costs, progress=update, backend=backend)
    write_adversary_report(aev, out / "adversary", costs=costs)
    return {
        "report": out / "adversary" / "adversary.md",
        "routers": routers,
        "costs": costs,
        "errors": [e.to_json() for e in aev.errors],
        "measured": bool(aev.detection),
        "seconds": aev.seconds,
    }


SUMMARY_NS = (1, 5, 10)


def _summary_json(ev: Evaluation, out: Path, plots: list[Path], versus: dict[str, Any] | None = None) -> dict[str, Any]:
    from ..evaluation.results import NO_CHANGE

    methods, attacks, rates = ev.detection_summary(SUMMARY_NS)
    quiet = set(ev.no_functional_change())
    return {
        "output": out,
        "files": {"report": out / "report.md", "results": out / "results.json", "plots": plots},
        "adversary": versus,
        "spec": ev.key_spec,
        "selection": ev.params["select"],
        "ns": list(SUMMARY_NS),
        "detection": {m: {a: rates[(m, a)] if (m, a) in rates else NO_CHANGE for a in attacks if (m, a) in rates or a in quiet} for m in methods},
        "false_alarms": {"flagged": ev.benign_flagged, "checks": ev.benign_checks},
        "errors": [e.to_json() for e in ev.errors],
        "measured": ev.measured,
        "seconds": ev.seconds,
    }


def detection_tables(
    methods: list[str], attacks: list[str], rates: dict[tuple[str, str], list[float]], width: int, quiet: Sequence[str] = ()
) -> list[Any]:
    """The detection summary as tables at most ``width`` columns wide: the methods are spread evenly over
    as few tables as fit (each repeating the attack column), so no number is ever cut. The cells of the
    ``quiet`` attacks (no functional change) read ``no change``."""
    from rich.table import Table

    def cell(m: str, a: str) -> str:
        if a in quiet:
            return "no change"
        return "-" if (m, a) not in rates else "/".join(f"{r:.2f}" for r in rates[(m, a)])

    cells = {(m, a): cell(m, a) for m in methods for a in attacks}
    first = max([len("attack"), *(len(a) for a in attacks)])
    need = {m: max([len(m), *(len(cells[(m, a)]) for a in attacks)]) for m in methods}

    def fits(group: list[str]) -> bool:  # left edge, then each column with its padding and right border
        return len(group) == 1 or 1 + first + 3 + sum(need[m] + 3 for m in group) <= width

    groups: list[list[str]] = []
    for m in methods:  # greedy: the fewest tables
        if groups and fits([*groups[-1], m]):
            groups[-1].append(m)
        else:
            groups.append([m])
    size = -(-len(methods) // max(1, len(groups)))
    even = [methods[i : i + size] for i in range(0, len(methods), size)]
    if len(even) == len(groups) and all(fits(g) for g in even):
        groups = even
    tables = []
    for group in groups:
        t = Table()
        t.add_column("attack", no_wrap=True, min_width=first)
        for m in group:
            t.add_column(m, justify="right", no_wrap=True, min_width=need[m])
        for a in attacks:
            t.add_row(a, *(cells[(m, a)] for m in group))
        tables.append(t)
    return tables


def _summary(ev: Evaluation, out: Path, plots: list[Path], versus: dict[str, Any] | None = None) -> None:
    methods, attacks, rates = ev.detection_summary(SUMMARY_NS)
    if rates:
        ns = " / ".join(map(str, SUMMARY_NS))
        console.print(f"detection rate ({ev.key_spec}, {ev.params['select']} selection) at N_S = {ns}:", highlight=False, soft_wrap=True)
        quiet = ev.no_functional_change()
        for table in detection_tables(methods, attacks, rates, console.width, quiet):
            console.print(table)
        if quiet:
            console.print(
                f"no change: {', '.join(quiet)} moved no logit beyond the benign floor (nothing to detect)", highlight=False, soft_wrap=True
            )
    colour = "green" if ev.benign_flagged == 0 else "bold red"
    console.print(f"[{colour}]false alarms under benign runtimes: {ev.benign_flagged} of {ev.benign_checks} checks[/]", highlight=False)
    if ev.errors:
        console.print(f"[yellow]{len(ev.errors)} step(s) failed; see the report[/]")
        for e in ev.errors[:8]:
            console.print(f"  {e.stage} {e.name}: {e.error}", highlight=False, soft_wrap=True, markup=False)
    pictures = f"{len(plots)} PNG plots" if plots else "no plots"
    console.print(f"wrote {out}/report.md, CSV tables, {pictures} and results.json ({ev.seconds:.0f} s)", highlight=False, soft_wrap=True)
    if versus is not None:
        failed = f"; {len(versus['errors'])} step(s) failed" if versus["errors"] else ""
        console.print(
            f"wrote {versus['report']}: detection against routers {', '.join(versus['routers'])} ({versus['seconds']:.0f} s{failed})",
            highlight=False,
            soft_wrap=True,
        )


# ------------------------------------------------------------------ demo


def demo(
    fresh: Annotated[bool, typer.Option("--fresh", help="Retrain the demo model instead of using the cached one.")] = False,
    seed: SeedOption = 0,
    threads: ThreadsOption = None,
    device: DeviceOption = None,
) -> None:
    """Train a small CNN, fingerprint it, serve it over HTTP, and verify it intact and tampered."""
    with handled():
        from ..demo import run_demo

        ok = run_demo(fresh=fresh, seed=seed, console=console, threads=threads, device=device)
        raise typer.Exit(0 if ok else 2)


def register(app: typer.Typer) -> None:
    app.command("train")(train_cmd)
    app.command("attack", cls=_AttackListCommand)(attack_cmd)
    app.command()(evaluate)
    app.command()(demo)
