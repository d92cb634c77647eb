"""The interface every attack shares, and the helpers the attack families use.

An attack takes a white-box ``nn.Module`` and returns a tampered *copy* (the input is never
modified) together with what it did: every parameter (defaults filled in, seed included),
the accuracy before and after on an evaluation split, a success rate where the attack has
a goal (trojan trigger, poisoned class), and how many scalar weights changed.

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
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from .._torch import as_logits
from ..data import Dataset
from ..errors import DataError, UsageError


@dataclass(frozen=True)
class AttackResult:
    model: nn.Module  # the tampered copy (the input module is never modified)
    kind: str
    params: dict  # every parameter, defaults filled in, seed included
    acc_before: float | None  # on the evaluation split, when labels are given
    acc_after: float | None
    success: float | None  # trojan: trigger success; poisoning: see the poison module; else None
    changed: int  # number of scalar weights that differ from the original


@dataclass
class Context:
    """What an attack gets besides the module copy and its parameters."""

    train: Dataset | None  # data the attack may learn from (None for weight-only runs without data)
    eval: Dataset | None  # evaluation split (may be unlabelled)
    seed: int
    classes: int | None  # number of model outputs, when data was available to probe
    extra: dict = field(default_factory=dict)


class Attack:
    """One attack kind. Subclasses set ``name``, ``defaults`` and implement ``apply``."""

    name: ClassVar[str]
    defaults: ClassVar[dict[str, Any]] = {}
    needs_data: ClassVar[bool] = False  # labelled training data required
    random: ClassVar[bool] = False  # result depends on the seed
    summary: ClassVar[str] = ""

    def apply(self, model: nn.Module, ctx: Context, p: dict[str, Any]) -> nn.Module:
        """Tamper with ``model`` (already a private copy) and return the tampered module."""
        raise NotImplementedError

    def success(self, model: nn.Module, ctx: Context, p: dict[str, Any]) -> float | None:
        return None


REGISTRY: dict[str, Attack] = {}


def register(cls: type[Attack]) -> type[Attack]:
    REGISTRY[cls.name] = cls()
    return cls


def attack_names() -> list[str]:
    """Every attack kind, in registration order."""
    return list(REGISTRY)


# --------------------------------------------------------------------------------------------
# running


def run_attack(
    kind: str,
    module: nn.Module,
    data: Dataset | None,
    *,
    seed: int = 0,
    eval_data: Dataset | None = None,
    **params: Any,
) -> AttackResult:
    """Run attack ``kind`` on a copy of ``module``; see the module docstring for the data split."""
    if kind not in REGISTRY:
        raise UsageError(f"unknown attack {kind!r}: choose one of {', '.join(REGISTRY)}")
    if not isinstance(module, nn.Module):
        raise UsageError(f"attacks need a PyTorch nn.Module, got {type(module).__name__}")
    attack = REGISTRY[kind]
    eval_fraction = params.pop("eval_fraction", 0.25)
    p = resolve_params(attack, params)
    p["seed"] = int(seed)
    labelled = data is not None and data.y is not None
    if attack.needs_data and not labelled:
        what = "no data" if data is None else f"{data.name} has no labels"
        raise UsageError(f"attack {kind} needs labelled training data ({what}); pass --data")
    train_ds, eval_ds = data, eval_data
    if eval_data is None and labelled:
        eval_fraction = coerce("eval_fraction", eval_fraction, 0.25)
        if not isinstance(eval_fraction, (int, float)) or not 0.0 < eval_fraction < 1.0:
            raise UsageError(f"eval_fraction must lie in (0, 1), got {eval_fraction}")
        train_ds, eval_ds = data.split(eval_fraction, seed=0)
        p["eval_fraction"] = eval_fraction
    if attack.needs_data and (train_ds is None or len(train_ds) == 0):
        raise UsageError(f"attack {kind} got an empty training set")
    probe = train_ds if train_ds is not None and len(train_ds) else eval_ds
    classes = _num_classes(module, probe) if probe is not None and len(probe) else None
    ctx = Context(train_ds, eval_ds, int(seed), classes)

    labels = eval_ds is not None and eval_ds.y is not None and len(eval_ds) > 0
    acc_before = evaluate(module, eval_ds) if labels else None
    with quiet():
        tampered = attack.apply(copy_module(module), ctx, p)
    _set_eval(tampered)
    acc_after = evaluate(tampered, eval_ds) if labels else None
    success = attack.success(tampered, ctx, p) if eval_ds is not None and len(eval_ds) else None
    return AttackResult(tampered, kind, p, acc_before, acc_after, success, count_changed(module, tampered))


def resolve_params(attack: Attack, given: dict[str, Any]) -> dict[str, Any]:
    """Defaults overridden by ``given``; strings (from the CLI) are coerced to the default's type."""
    unknown = sorted(set(given) - set(attack.defaults))
    if unknown:
        accepted = ", ".join(attack.defaults) or "none"
        raise UsageError(f"attack {attack.name} has no parameter {', '.join(unknown)} (accepted: {accepted}; plus seed, eval_fraction)")
    out = dict(attack.defaults)
    for key, value in given.items():
        out[key] = coerce(key, value, attack.defaults[key])
    return out


def coerce(key: str, value: Any, default: Any) -> Any:
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip()
        if isinstance(default, bool) or text.lower() in ("true", "false", "yes", "no"):
            low = text.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise UsageError(f"parameter {key} takes true or false, got {value!r}")
        if text.lower() in ("none", "auto", ""):
            return None
        if isinstance(default, int) or default is None:
            try:
                return int(text)
            except ValueError:
                pass
        if isinstance(default, (int, float)) or default is None:
            try:
                return float(text)
            except ValueError:
                if default is not None:
                    raise UsageError(f"parameter {key} takes a number, got {value!r}") from None
        return text
    if isinstance(default, bool) and not isinstance(value, bool):
        raise UsageError(f"parameter {key} takes true or false, got {value!r}")
    return value


# --------------------------------------------------------------------------------------------
# module helpers


@contextmanager
def quiet() -> Iterator[None]:
    """Silence torch's deprecation chatter (TorchScript, torch.ao.quantization) for our own calls."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", message=".*deprecated.*")
        yield


def is_script(module: nn.Module) -> bool:
    return isinstance(module, torch.jit.ScriptModule)


def copy_module(module: nn.Module) -> nn.Module:
    """An independent copy. TorchScript goes through save/load: a deepcopy's parameters are not leaves."""
    if is_script(module):
        buf = io.BytesIO()
        with quiet():
            torch.jit.save(module, buf)
            buf.seek(0)
            out = torch.jit.load(buf, map_location="cpu")
        return out
    return copy.deepcopy(module)


def _set_eval(module: nn.Module) -> None:
    try:
        module.eval()
    except NotImplementedError:  # torch.export's GraphModule
        pass


class Driver(nn.Module):
    """Wraps any module so that ``train.fit``/``train.predict`` can drive it.

    ``train()``/``eval()`` reach the inner module when it supports them (torch.export's
    GraphModule does not; its graph has no mode-dependent layers to switch anyway).
    """

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return as_logits(self.inner(x))

    def train(self, mode: bool = True) -> Driver:
        self.training = mode
        try:
            self.inner.train(mode)
        except NotImplementedError:
            pass
        return self


@contextmanager
def keep_modes(module: nn.Module) -> Iterator[None]:
    """Restore every submodule's training flag afterwards (evaluating must not alter the input)."""
    flags = [(m, m.training) for m in module.modules()]
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def logits(module: nn.Module, x: np.ndarray, batch_size: int = 512) -> torch.Tensor:
    out = []
    drv = Driver(module)
    with keep_modes(module), torch.no_grad(), quiet():
        drv.eval()
        for i in range(0, len(x), batch_size):
            out.append(drv(torch.from_numpy(np.ascontiguousarray(x[i : i + batch_size], dtype=np.float32))).float())
    return torch.cat(out) if out else torch.zeros(0, 0)


def predict(module: nn.Module, x: np.ndarray) -> np.ndarray:
    return logits(module, x).argmax(1).numpy() if len(x) else np.zeros(0, dtype=np.int64)


def evaluate(module: nn.Module, ds: Dataset) -> float:
    return float((predict(module, ds.x) == np.asarray(ds.y)).mean())


def _num_classes(module: nn.Module, ds: Dataset) -> int:
    try:
        out = logits(module, ds.x[:1])
    except DataError:
        raise
    except Exception as exc:
        text = str(exc).strip().splitlines()
        raise DataError(
            f"the model does not run on {ds.name} (inputs {tuple(ds.x.shape[1:])}): {text[0][:200] if text else type(exc).__name__}"
        ) from None
    return int(out.shape[1])


def fit(module: nn.Module, x: np.ndarray, y: np.ndarray, p: dict[str, Any], seed: int, params: list[nn.Parameter] | None = None) -> None:
    """Fine-tune ``module`` in place with the shared training loop (Adam, seeded)."""
    from ..train import fit as _fit

    trainable = list(params) if params is not None else [t for t in module.parameters() if t.is_floating_point()]
    for t in trainable:
        t.requires_grad_(True)
    drv = Driver(module)
    _fit(drv, x, y, epochs=int(p["epochs"]), lr=float(p["lr"]), batch_size=int(p.get("batch_size", 64)), seed=seed, params=trainable)
    _set_eval(module)


def float_parameters(module: nn.Module, *, matrices_only: bool = False) -> list[tuple[str, torch.Tensor]]:
    """(name, parameter) for floating-point parameters; ``matrices_only`` keeps dim >= 2 (weights, kernels)."""
    out = []
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
    assert ds is not None and ds.y is not None
    return np.asarray(ds.x, dtype=np.float32), np.asarray(ds.y, dtype=np.int64)


def check_class(key: str, value: Any, classes: int | None) -> int:
    try:
        c = int(value)
    except (TypeError, ValueError):
        raise UsageError(f"parameter {key} must be a class index, got {value!r}") from None
    if c < 0 or (classes is not None and c >= classes):
        raise UsageError(f"parameter {key}={c} is not a class of this model (0..{(classes or 1) - 1})")
    return c


def rng_for(seed: int, salt: int = 0) -> np.random.Generator:
    return np.random.default_rng([int(seed), salt])
