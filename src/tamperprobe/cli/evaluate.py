"""``tamperprobe evaluate``: the attack-vs-method evaluation campaign (see ``tamperprobe.evaluation.campaign``)."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Callable, Iterator, List, Optional

import typer

from ._common import console, err_console, fail, handled


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

    with Progress(TextColumn("[bold]evaluate[/]"), BarColumn(), TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(),
                  TimeRemainingColumn(), TextColumn("{task.description}"), console=err_console, transient=True) as prog:
        task = prog.add_task("starting", total=None)

        def update(done: int, total: int, what: str) -> None:
            prog.update(task, completed=done, total=total, description=what)

        yield update


def register(app: typer.Typer) -> None:
    @app.command()
    def evaluate(
        model: str = typer.Argument(..., help="Model: .pt (TorchScript), .pt2 (torch.export) or package.module:attribute."),
        data: str = typer.Option(..., "--data", help="Labelled data: .npz with x and y, an IDX folder, or digits / mnist5k."),
        out: Path = typer.Option(..., "--out", help="Folder for report.md, CSV tables, PNG plots and results.json."),
        weights: Optional[str] = typer.Option(None, "--weights", help=".safetensors or state_dict file for the model."),
        methods: Optional[str] = typer.Option(None, "--methods", help="Comma-separated marker methods (default: all). The baselines natural, noise, rotation, distortion are always added."),
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
        method_param: Optional[List[str]] = typer.Option(None, "--method-param", help="METHOD:key=value hyper-parameter (repeatable), e.g. sensitive:steps=100."),
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
            from ..owner.methods import method_names
            from ..models import load_model
            from ..outputs import OutputSpec

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
                    m, ds, methods=method_list, attacks=attack_list, specs=spec_list, trials=trials, bag=bag, select=select,
                    resamples=resamples, seed=seed, progress=update, test_fraction=test_fraction, baselines=not no_baselines,
                    tolerance=tolerance, method_params=_named_params(method_param, "--method-param"),
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
