"""``tamperprobe demo``: the whole loop on a small CNN, offline, in about a minute.

Trains (once, cached under the user's cache directory) a small CNN on scikit-learn's bundled
8x8 digits, fingerprints it, serves it over the Open Inference Protocol on 127.0.0.1, verifies
the intact model through the API, then swaps in tampered copies and verifies each again.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._util import Progress

if TYPE_CHECKING:
    from rich.console import Console
    from torch import nn

    from .data import Dataset


@dataclass(frozen=True)
class DemoFingerprint:
    title: str
    method: str
    spec: str
    params: dict
    size: int
    bag: int


DEMO_FINGERPRINTS = (
    DemoFingerprint("sensitive · logits", "sensitive", "logits", {}, 10, 100),
    DemoFingerprint("crossed pairs · top1", "crossed", "top1", {}, 4, 40),
)
# (attack, parameters, title)
DEMO_ATTACKS: tuple[tuple[str, dict[str, Any], str], ...] = (
    ("int8", {}, "int8 weight quantization"),
    ("fp16", {}, "fp16 round-trip"),
    ("floor", {}, "flooring of small weights"),
    ("finetune", {"n": 300}, "fine-tuning on 300 samples"),
    ("noise", {}, "noise on 0.1 % of weights"),
    ("trojan", {}, "BadNets trojan"),
)


def cache_dir() -> Path:
    env = os.environ.get("TAMPERPROBE_CACHE")
    if env:
        return Path(env)
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("tamperprobe"))


def demo_model(seed: int = 0, fresh: bool = False, progress: Progress | None = None) -> tuple[nn.Module, Dataset, Dataset]:
    """The demo CNN trained on digits (cached). Returns (module, train, test)."""
    import torch

    from . import zoo
    from .data import load_data
    from .errors import ModelLoadError
    from .models import load_weights, save_state_dict
    from .train import fit

    data = load_data("digits")
    train, test = data.split(0.3, seed=seed)
    path = cache_dir() / "demo" / f"digits_cnn_seed{seed}.safetensors"
    torch.manual_seed(seed)
    module = zoo.digits_cnn()
    if path.exists() and not fresh:
        try:
            load_weights(module, path)
            return module.eval(), train, test
        except ModelLoadError:
            pass  # a damaged cache entry: train again
    assert train.y is not None
    fit(module, train.x, train.y, epochs=20, lr=3e-3, seed=seed, progress=progress)
    save_state_dict(module, path)
    return module.eval(), train, test


def run_demo(fresh: bool = False, seed: int = 0, console: Console | None = None, threads: int | None = None, device: Any = None) -> bool:
    """Run the demo; True when every verdict came out as expected (intact INTACT, every attack TAMPERED).

    ``threads`` and ``device`` as ``--threads`` and ``--device`` (``_torch.use_threads``,
    ``_torch.resolve_device``): the model is trained (or read from the cache) on the CPU and then
    fingerprinted, attacked and served from ``device``.
    """
    import tempfile

    from rich.console import Console
    from rich.table import Table

    from ._torch import resolve_device, use_threads
    from .attacks import run_attack
    from .cli._common import progress_bar
    from .models import Model, TorchModel, load_model, save_model
    from .served.clients import make_client
    from .served.verify import INTACT, TAMPERED, verify
    from .server.app import ServerThread
    from .train import accuracy

    console = console or Console()
    use_threads(threads)  # one by default: the demo CNN is tiny and the machine may be shared
    dev = resolve_device(device)
    console.print("[bold]tamperprobe demo[/]: a CNN on scikit-learn's 8x8 digits, served on 127.0.0.1")
    with progress_bar("training the demo CNN") as update:
        module, train, test = demo_model(seed, fresh, progress=update)
    module = module.to(dev)
    assert test.y is not None  # digits are labelled
    base_acc = accuracy(module, test.x, test.y)
    console.print(f"model: {sum(p.numel() for p in module.parameters())} weights, test accuracy {base_acc:.3f}")

    intact = TorchModel(module, "demo-cnn")
    prints = _fingerprints(intact, train, seed, console)

    table = Table(title="verification through the Open Inference Protocol API")
    table.add_column("served model")
    table.add_column("accuracy")
    for plan, _ in prints:
        table.add_column(f"{plan.title}\nchanged · verdict")
    all_ok = True
    with tempfile.TemporaryDirectory() as tmp, ServerThread(intact, name="digits-cnn", output_spec="logits", input_spec=train.input_spec) as server:
        console.print(f"serving on {server.url} (KServe v2 / Open Inference Protocol)")
        cases: list[tuple[str, str | None, dict[str, Any]]] = [("intact model", None, {})]
        cases += [(title, kind, params) for kind, params, title in DEMO_ATTACKS]
        for title, kind, params in cases:
            served: Model = intact
            acc = base_acc
            if kind is not None:
                result = run_attack(kind, module, train, seed=seed, eval_data=test, **params)
                # served exactly as a provider would run it: a TorchScript file through the server
                path = save_model(result.model, Path(tmp) / f"{kind}.pt", test.x[:2])
                served = load_model(path)
                acc = float("nan") if result.acc_after is None else result.acc_after
            server.swap(served)
            cells = []
            for plan, fp in prints:
                client = make_client(
                    "kserve", server.url, model_name="digits-cnn", seed=seed, timeout=10.0, input_spec=fp.input_spec, classes=fp.classes
                )
                report = verify(fp, client, plan.spec)
                want = INTACT if kind is None else TAMPERED
                all_ok &= report.verdict == want
                colour = {"INTACT": "green", "TAMPERED": "red"}.get(report.verdict, "yellow")
                cells.append(f"{report.mismatched}/{len(report.markers)} · [{colour}]{report.verdict}[/]")
            delta = "" if kind is None else f" ({acc - base_acc:+.3f})"
            table.add_row(title, f"{acc:.3f}{delta}", *cells)
    console.print(table)
    if all_ok:
        console.print("[bold green]as expected:[/] the intact model verifies INTACT, every tampered copy TAMPERED")
    else:
        console.print("[bold yellow]some verdicts differ from the expected ones (see the table)[/]")
    _keep(module, test.x[:2], prints[-1], console)
    return all_ok


def _fingerprints(intact: Any, train: Any, seed: int, console: Console) -> list[tuple[Any, Any]]:
    """One fingerprint per plan of ``DEMO_FINGERPRINTS``, with its progress bar and a line each."""
    from .cli._common import progress_bar
    from .owner.generate import create_fingerprint

    prints = []
    for plan in DEMO_FINGERPRINTS:
        with progress_bar(f"generating {plan.method} markers") as update:
            fp = create_fingerprint(
                intact, train, method=plan.method, size=plan.size, bag=plan.bag, seed=seed, output_spec=plan.spec, params=plan.params, progress=update
            )
        prints.append((plan, fp))
        console.print(f"fingerprint: {plan.title}: {len(fp)} markers, id {fp.id}")
    return prints


def _keep(module: Any, example: Any, last: tuple[Any, Any], console: Console) -> None:
    """Keep the demo's model and its last fingerprint in the cache, and say how to try them."""
    from .fingerprint import save
    from .models import save_model

    plan, fp = last
    keep = cache_dir() / "demo"
    model_file = save_model(module, keep / "digits_cnn.pt", example)
    fp_file = save(fp, keep / f"digits_cnn.{plan.method}.tpf")
    console.print("try it yourself with the demo's files:", highlight=False)
    console.print(f"  tamperprobe serve {model_file} --fingerprint {fp_file} --output-spec {plan.spec}", highlight=False, soft_wrap=True)
    console.print(f"  tamperprobe verify {fp_file} --endpoint http://127.0.0.1:8080 --protocol kserve", highlight=False, soft_wrap=True)
