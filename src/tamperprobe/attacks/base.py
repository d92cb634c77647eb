"""The template every attack shares (``Attack.run``) and the helpers the attack families use.

An attack is a small class in the plug-in convention of ``tamperprobe._params``: keyword-only
hyper-parameters that the constructor only stores, declared ``constraints``, and ClassVars
for its ``name``, whether its outcome depends on the seed (``random``) and whether it needs
labelled training data (``needs_data``). A subclass implements ``apply`` (tamper with a copy)
and, where it has data-dependent defaults or a goal, ``resolve`` and ``success``.

``Attack.run`` owns the rest, once for every attack: it validates the parameters, checks that
labelled data is there when needed, splits off an evaluation part, seeds torch, runs ``apply``
on a copy (the input module is never modified), and reports every parameter (data-dependent
defaults filled in, seed included), the accuracy before and after on the evaluation part, the
success rate where the attack has a goal (trojan trigger, poisoned class) and how many scalar
weights changed.

Evaluation split: when ``eval_data`` is not given and ``data`` has labels, ``data`` is split
(``eval_fraction``, default 0.25, with a fixed split seed 0 so that every attack and every
seed sees the same split); the attack trains on the first part and is evaluated on the
second. With ``eval_data`` given, all of ``data`` is used by the attack.

Works on plain ``nn.Module``s, on ``torch.export`` programs' ``.module()`` (GraphModule;
its ``train()``/``eval()`` are not supported by torch and are skipped) and on TorchScript
modules (weights edited in place on a copy; see each attack for what it needs).
"""

from __future__ import annotations

import copy
import io
from abc import ABC, abstractmethod
from collections.abc import Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, ClassVar, final

import numpy as np
import torch
from torch import nn

from .._params import Configurable, Interval, coerce
from .._torch import eval_mode, module_device, module_logits, quiet, set_training
from .._util import Progress, one_line
from ..data import Dataset
from ..errors import DataError, UsageError
from ..train import accuracy, fit

DEFAULT_EVAL_FRACTION = 0.25
EVAL_SPLIT_SEED = 0
# the progress callback of the attack being run: ``fine_tune`` reports its training steps to it
_PROGRESS: ContextVar[Progress | None] = ContextVar("tamperprobe_attack_progress", default=None)


@dataclass(frozen=True)
class AttackResult:
    model: nn.Module  # the tampered copy (the input module is never modified)
    kind: str
    params: dict  # every parameter, data-dependent defaults filled in, seed included
    acc_before: float | None  # on the evaluation split, when labels are given
    acc_after: float | None
    success: float | None  # trojan: trigger success; poisoning: see the poison module; else None
    changed: int  # number of scalar weights that differ from the original


@dataclass(frozen=True)
class Context:
    """What an attack gets besides the module copy and its own (validated) parameters."""

    train: Dataset | None  # data the attack may learn from (None for weight-only runs without data)
    eval: Dataset | None  # evaluation split (may be unlabelled)
    seed: int
    classes: int | None  # number of model outputs, when data was available to probe


# hyper-parameters of every training attack
TRAINING_CONSTRAINTS: dict[str, Any] = {
    "epochs": Interval(1, None, integer=True),
    "lr": Interval(0, None, closed="neither"),
    "batch_size": Interval(1, None, integer=True),
}


class Attack(Configurable, ABC):
    """One attack kind. Subclasses set the ClassVars, store their hyper-parameters and implement ``apply``."""

    name: ClassVar[str] = ""
    needs_data: ClassVar[bool] = False  # labelled training data required
    random: ClassVar[bool] = False  # the result depends on the seed
    torchscript_only: ClassVar[bool] = False  # the tampered module can only be written as TorchScript

    @classmethod
    def summary(cls) -> str:
        """The one-line description: the first line of the class docstring."""
        return one_line((cls.__doc__ or "").strip())

    def resolve(self, model: nn.Module, ctx: Context) -> dict[str, Any]:
        """Values for parameters whose default depends on the model or the data (recorded with the result)."""
        return {}

    @abstractmethod
    def apply(self, model: nn.Module, ctx: Context) -> nn.Module:
        """Tamper with ``model`` (a private copy, in eval mode) and return the tampered module."""

    def success(self, model: nn.Module, ctx: Context) -> float | None:
        """How well the attack reached its goal on ``ctx.eval``; None when it has no goal."""
        return None

    @final
    def run(
        self,
        module: nn.Module,
        data: Dataset | None = None,
        *,
        seed: int = 0,
        eval_data: Dataset | None = None,
        eval_fraction: float | None = None,
        progress: Progress | None = None,
        acc_before: float | None = None,
    ) -> AttackResult:
        """Run the attack on a copy of ``module``; see the module docstring for the data split (``eval_fraction`` None: 0.25).

        ``progress(done, total, what)`` hears about the phases (accuracy, tampering) and every training step.
        ``acc_before``: ``module``'s accuracy on ``eval_data``, when the caller has measured it already
        (an evaluation runs every attack on one model and one evaluation set); None: measured here.
        """
        report = progress if progress is not None else _no_progress
        if not isinstance(module, nn.Module):
            raise UsageError(f"attacks need a PyTorch nn.Module, got {type(module).__name__}")
        params = self.validated()
        seed = coerce("seed", seed, int)
        train, evaluation, fraction = self._split(data, eval_data, eval_fraction)
        probe = train if train is not None and len(train) else evaluation
        ctx = Context(train, evaluation, seed, _num_classes(module, probe) if probe is not None and len(probe) else None)

        if acc_before is None or eval_data is None:
            report(0, 1, "measuring accuracy")
            acc_before = _accuracy(module, evaluation)
        report(0, 1, "tampering")
        work = copy_module(module)
        set_training(work, False)
        attack = type(self)(**params)
        attack = type(self)(**{**params, **attack.resolve(work, ctx)})
        torch.manual_seed(seed)
        token = _PROGRESS.set(progress)
        try:
            with quiet():
                tampered = attack.apply(work, ctx)
        finally:
            _PROGRESS.reset(token)
        set_training(tampered, False)
        report(0, 1, "measuring accuracy")
        acc_after = _accuracy(tampered, evaluation)
        success = attack.success(tampered, ctx) if evaluation is not None and len(evaluation) else None
        report(1, 1, "")
        recorded = {**attack.get_params(), "seed": seed}
        if fraction is not None:
            recorded["eval_fraction"] = fraction
        return AttackResult(tampered, self.name, recorded, acc_before, acc_after, success, count_changed(module, tampered))

    def _split(
        self, data: Dataset | None, eval_data: Dataset | None, eval_fraction: float | None
    ) -> tuple[Dataset | None, Dataset | None, float | None]:
        """(training part, evaluation part, the fraction split off or None); refuses missing labelled data."""
        labelled = data is not None and data.y is not None
        if self.needs_data and not labelled:
            what = "no data" if data is None else f"{data.name} has no labels"
            raise UsageError(f"attack {self.name} needs labelled training data ({what}); pass --data")
        train, evaluation, fraction = data, eval_data, None
        if eval_data is None and labelled and data is not None:
            given = DEFAULT_EVAL_FRACTION if eval_fraction is None else coerce("eval_fraction", eval_fraction, float)
            fraction = Interval(0, 1, closed="neither").check("eval_fraction", given)
            train, evaluation = data.split(fraction, seed=EVAL_SPLIT_SEED)
        if self.needs_data and (train is None or len(train) == 0):
            raise UsageError(f"attack {self.name} got an empty training set")
        return train, evaluation, fraction


# --------------------------------------------------------------------------------------------
# module helpers


def is_script(module: nn.Module) -> bool:
    return isinstance(module, torch.jit.ScriptModule)


def copy_module(module: nn.Module) -> nn.Module:
    """An independent copy. TorchScript goes through save/load: a deepcopy's parameters are not leaves."""
    if is_script(module):
        buf = io.BytesIO()
        with quiet():
            torch.jit.save(module, buf)
            buf.seek(0)
            out = torch.jit.load(buf, map_location=module_device(module))
        return out
    return copy.deepcopy(module)


def _accuracy(module: nn.Module, ds: Dataset | None) -> float | None:
    """Accuracy on a labelled, non-empty data set; None otherwise."""
    if ds is None or ds.y is None or len(ds) == 0:
        return None
    return accuracy(module, ds.x, ds.y)


def _num_classes(module: nn.Module, ds: Dataset) -> int:
    try:
        with eval_mode(module):
            out = module_logits(module, ds.x[:1])
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"the model does not run on {ds.name} (inputs {tuple(ds.x.shape[1:])}): {one_line(exc, 200)}") from None
    return int(out.shape[1])


def fine_tune(
    module: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    params: Sequence[torch.Tensor] | None = None,
) -> None:
    """Fine-tune ``module`` in place with the shared training loop (``train.fit``); ``params`` default to every float parameter.

    The training steps are reported to the progress callback of the running ``Attack.run``.
    """
    trainable = list(params) if params is not None else [t for t in module.parameters() if t.is_floating_point()]
    for t in trainable:
        t.requires_grad_(True)
    progress = _PROGRESS.get()
    report = None if progress is None else _prefixed(progress, "training, ")
    fit(module, x, y, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, params=trainable, progress=report)


def _no_progress(done: int, total: int, what: str = "") -> None:
    return None


def _prefixed(progress: Progress, prefix: str) -> Progress:
    def report(done: int, total: int, what: str = "") -> None:
        progress(done, total, prefix + what)

    return report


def float_parameters(module: nn.Module, *, matrices_only: bool = False) -> list[tuple[str, torch.Tensor]]:
    """(name, parameter) for floating-point parameters; ``matrices_only`` keeps dim >= 2 (weights, kernels)."""
    out: list[tuple[str, torch.Tensor]] = []
    for name, t in module.named_parameters():
        if not t.is_floating_point():
            continue
        if matrices_only and t.dim() < 2:
            continue
        out.append((name, t))
    return out


def weight_view(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every scalar weight as float32, by name; dynamically quantized Linear layers are dequantized."""
    out: dict[str, torch.Tensor] = {}
    for name, t in module.named_parameters():
        out[name] = t.detach().float()
    for mname, m in module.named_modules():
        if is_script(m):
            continue
        w = getattr(m, "weight", None)
        if callable(w) and hasattr(m, "_packed_params"):  # torch.ao dynamic quantized Linear
            prefix = f"{mname}." if mname else ""
            qw = m.weight()
            out[prefix + "weight"] = (qw.dequantize() if qw.is_quantized else qw).detach().float()
            b = m.bias()
            if b is not None:
                out[prefix + "bias"] = b.detach().float()
    return out


def count_changed(original: nn.Module, tampered: nn.Module) -> int:
    """How many scalar weights of ``original`` differ in ``tampered`` (bitwise, NaN counts as changed)."""
    before, after = weight_view(original), weight_view(tampered)
    n = 0
    for name, a in before.items():
        b = after.get(name)
        if b is None or b.shape != a.shape:
            n += a.numel()
            continue
        n += int((a != b).sum())
    return n


# --------------------------------------------------------------------------------------------
# data helpers


def labelled(ds: Dataset | None) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) of a labelled data set (``Attack.run`` has checked the labels of attacks that need them)."""
    if ds is None or ds.y is None:
        raise UsageError("this attack needs labelled data")
    return np.asarray(ds.x, dtype=np.float32), np.asarray(ds.y, dtype=np.int64)


def check_class(key: str, value: int, classes: int | None) -> int:
    """``value`` as a class index of a model with ``classes`` outputs."""
    if value < 0 or (classes is not None and value >= classes):
        raise UsageError(f"parameter {key}={value} is not a class of this model (0..{(classes or 1) - 1})")
    return int(value)


def rng_for(seed: int, salt: int = 0) -> np.random.Generator:
    return np.random.default_rng([int(seed), salt])
