"""The phases a campaign and the adversary harness share: plan, bags, attacked models, progress, timing, errors.

``campaign.run_evaluation`` and ``adversary.run_adversary`` both generate one bag of markers per
method (``make_bag``), run every instance of every attack on a copy of the model (``plan_attacks``,
``run_attack``) and report progress, time and failures the same way (``Steps``). Every random
choice of a cell is seeded from the run's seed and the cell's coordinates (``derive_seed(seed,
"method", label)``, ``derive_seed(seed, "attack", label, trial)``), never from a generator shared
between cells, so a cell gives the same result whichever cells run before it, or beside it.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .._util import Progress, derive_seed, one_line
from ..attacks import attack_class, get_attack
from ..data import Dataset
from ..errors import UsageError
from ..models import Model, TorchModel
from ..owner.methods import Bag, get_method
from .results import ErrorRow, jsonable

if TYPE_CHECKING:
    from ..attacks.base import Attack
    from ..owner.methods import Method


def machine_info() -> dict[str, Any]:
    """Where a run ran: host, platform, versions, CPU model and the cores this process may use."""
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
        usable: int | None = len(os.sched_getaffinity(0))
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


def no_progress(done: int, total: int, what: str = "", /) -> None:
    return None


# ----------------------------------------------------------------------------- planning


def labelled_entries(entries: Sequence[str | Any]) -> dict[str, Any]:
    """Label -> entry: the name, an instance's ``name``, or the label of a ``(label, entry)`` pair; the first of equal labels wins."""
    out: dict[str, Any] = {}
    for entry in entries:
        if isinstance(entry, tuple):
            label, entry = entry
            out.setdefault(str(label), entry)
        else:
            out.setdefault(entry if isinstance(entry, str) else entry.name, entry)
    return out


def instances_of(entry: str | Attack, trials: int) -> int:
    """Instances of an attack to run: ``trials`` for a random one, else one (an unknown name fails once)."""
    try:
        cls = attack_class(entry) if isinstance(entry, str) else entry
    except UsageError:
        return 1
    return trials if cls.random else 1


@dataclass(frozen=True)
class AttackRun:
    """One instance of an attack: its label, its trial number and the attack (a name or an instance)."""

    label: str
    trial: int
    entry: Any  # str | Attack

    @property
    def name(self) -> str:
        return f"{self.label}#{self.trial}"

    def seed(self, seed: int) -> int:
        """This instance's seed, from the run's seed and its coordinates alone."""
        return derive_seed(seed, "attack", self.label, self.trial)


def plan_attacks(entries: dict[str, Any], trials: int) -> list[AttackRun]:
    """Every attack instance to run: ``trials`` of each random attack, one of each deterministic one."""
    return [AttackRun(label, t, entry) for label, entry in entries.items() for t in range(instances_of(entry, trials))]


def attacker_data(train: Dataset, samples: int | None, seed: int) -> Dataset:
    """The attacker's data: a seeded subset of at most ``samples`` of ``train`` (in their order), or all of it (None, 0)."""
    if not samples or samples >= len(train):
        return train
    idx = np.sort(np.random.default_rng(derive_seed(seed, "attack data")).permutation(len(train))[:samples])
    y = None if train.y is None else train.y[idx]
    return Dataset(train.x[idx], y, f"{train.name}[{samples}]", train.low, train.high, dict(train.meta))


# ----------------------------------------------------------------------------- cells


def make_bag(
    model: Model,
    data: Dataset,
    entry: str | Method,
    params: dict[str, Any],
    bag: int,
    seed: int,
    label: str,
    *,
    progress: Progress | None = None,
) -> tuple[Bag, dict[str, Any]]:
    """A method's bag of ``bag`` candidates from ``data``, seeded by ``seed`` and the method's ``label``, and its parameters.

    The inputs are returned in the model's domain (8-bit markers decoded), so that they can be run
    and compared directly. Raises UsageError when the method produces nothing usable.
    ``progress`` hears about the generation (the method's own steps).
    """
    import torch

    method = get_method(entry, **params)
    torch.manual_seed(derive_seed(seed, "method", label))
    rng = np.random.default_rng(derive_seed(seed, "method", label))
    generated = method.generate(model, data, bag, rng, progress)
    if len(generated) == 0:
        raise UsageError("the method produced no markers")
    if generated.encoding is not None:
        generated = Bag(generated.decoded(), generated.encoding.decode(generated.seeds), generated.groups, generated.info)
    x = np.ascontiguousarray(generated.inputs, dtype=np.float32)
    if x.shape[1:] != data.x.shape[1:]:
        raise UsageError(f"markers have shape {x.shape[1:]}, inputs {data.x.shape[1:]}")
    return Bag(x, generated.seeds, generated.groups, generated.info), method.get_params()


@dataclass(frozen=True)
class Attacked:
    """An attack instance that ran: the tampered model and what the attack reported about itself (JSON-safe)."""

    model: TorchModel
    seed: int
    params: dict[str, Any]
    acc_before: float | None
    acc_after: float | None
    success: float | None
    changed: int | None

    def report(self) -> dict[str, Any]:
        """The attack's own numbers, as the result rows record them."""
        return {
            "seed": self.seed,
            "params": self.params,
            "acc_before": self.acc_before,
            "acc_after": self.acc_after,
            "success": self.success,
            "changed": self.changed,
        }


def run_attack(
    model: Model,
    run: AttackRun,
    seed: int,
    params: dict[str, Any] | None,
    data: Dataset,
    *,
    eval_data: Dataset | None = None,
    progress: Progress | None = None,
    acc_before: float | None = None,
) -> Attacked:
    """Run one attack instance on a copy of ``model``'s module with ``data`` (its seed derived from ``seed`` and ``run``)."""
    module = model.require_torch("an attack")
    aseed = run.seed(seed)
    result = get_attack(run.entry, params).run(module, data, seed=aseed, eval_data=eval_data, progress=progress, acc_before=acc_before)
    return Attacked(
        TorchModel(result.model, f"attack:{run.label}"),
        aseed,
        jsonable(result.params),
        jsonable(result.acc_before),
        jsonable(result.acc_after),
        jsonable(result.success),
        jsonable(result.changed),
    )


def attack_cell(
    model: Model,
    run: AttackRun,
    seed: int,
    params: dict[str, Any] | None,
    data: Dataset,
    eval_data: Dataset | None,
    acc_before: float | None,
    progress: Progress | None = None,
) -> Attacked:
    """``run_attack`` with positional arguments, as a backend calls a cell."""
    return run_attack(model, run, seed, params, data, eval_data=eval_data, progress=progress, acc_before=acc_before)


# ----------------------------------------------------------------------------- progress, time, failures


class Steps:
    """A run's progress count, its phase timings and its error table, shared by its phases.

    ``step(what)`` counts one planned step done; ``within(what)`` gives the work inside the
    current step a progress callback that shows as ``what d/t detail`` on the run's count;
    ``timed(key)`` records a phase's seconds in ``timings``; ``error`` records a failed step in
    ``errors`` and returns its one-line text.
    """

    def __init__(self, progress: Progress | None, total: int, timings: dict[str, float], errors: list[ErrorRow]) -> None:
        self.progress = progress or no_progress
        self.total = total
        self.done = 0
        self.timings = timings
        self.errors = errors

    def step(self, what: str) -> None:
        self.done += 1
        self.progress(self.done, self.total, what)

    def within(self, what: str) -> Progress:
        self.progress(self.done, self.total, what)

        def update(done: int, total: int, detail: str = "", /) -> None:
            count = f" {done}/{total}" if total > 0 else ""
            self.progress(self.done, self.total, f"{what}{count}{f' ({detail})' if detail else ''}")

        return update

    @contextmanager
    def timed(self, key: str) -> Iterator[None]:
        t0 = time.monotonic()
        try:
            yield
        finally:
            self.timings[key] = time.monotonic() - t0

    def error(self, stage: str, name: str, exc: BaseException | str) -> str:
        text = one_line(exc, with_type=True)
        self.errors.append(ErrorRow(stage, name, text))
        return text

    def fail(self, stage: str, name: str, error: BaseException | str) -> str:
        """A failed cell's error: an exception raised here as ``error`` records it, a worker's one-line text as it is."""
        if isinstance(error, BaseException):
            return self.error(stage, name, error)
        self.errors.append(ErrorRow(stage, name, error))
        return error
