"""Clients that verify a served model through its prediction API, one module per dialect.

==============  ===============================================================  ==================
protocol        endpoint                                                         module
==============  ===============================================================  ==================
``kserve``      Open Inference Protocol / KServe v2 (Triton, MLServer, serve)    ``kserve.py``
``torchserve``  TorchServe ``POST /predictions/NAME``                            ``torchserve.py``
``tfserving``   TensorFlow Serving / KServe v1 ``POST /v1/models/NAME:predict``  ``tfserving.py``
``json``        any JSON endpoint described by a template                         ``jsonapi.py``
==============  ===============================================================  ==================

Each is an ``http.HTTPTarget`` (retries, timeouts, limits, marker scheduling, the failure
reasons) that reads its responses with ``answers.py`` and implements the ``Target`` protocol.
``PROTOCOLS`` is the registry: a new dialect is one module with an ``HTTPTarget`` subclass and
one line there; ``make_client`` builds a client by name and ``protocol_help`` describes them all.
"""

from __future__ import annotations

from typing import Any

from ..._registry import Registry
from ...errors import UsageError
from . import jsonapi, kserve, tfserving, torchserve
from .answers import Failure
from .http import DEFAULT_DEADLINE, DEFAULT_MAX_RESPONSE, HTTPTarget

PROTOCOLS: Registry[HTTPTarget] = Registry(
    "protocol",
    {
        "kserve": kserve.KServeClient,
        "torchserve": torchserve.TorchServeClient,
        "tfserving": tfserving.TFServingClient,
        "json": jsonapi.JSONAPIClient,
    },
    base=HTTPTarget,
    summary=lambda cls: cls.summary,
    aliases="aliases",
)


def protocol_name(protocol: str) -> str:
    """The registered protocol name for ``protocol`` or one of its aliases (triton, mlserver, v1, ...)."""
    return PROTOCOLS.canonical(str(protocol).strip())


def protocol_help() -> str:
    """One line describing every registered protocol (the ``--protocol`` help)."""
    return PROTOCOLS.help()


def make_client(protocol: str, url: str, *, template: Any = None, **options: Any) -> HTTPTarget:
    """A ``Target`` for the endpoint at ``url`` speaking ``protocol`` (a name or alias in ``PROTOCOLS``).

    ``options`` are the client's keyword arguments (``http.HTTPTarget``: ``model_name``,
    ``headers``, ``token_env``, ``token_file``, ``timeout``, ``deadline``, ``retries``,
    ``batch_size``, ``delay``, ``spread``, ``seed``, ``verify_tls``, ``ca_file``, ``classes``,
    ``profile``: the client whose requests to reproduce, ``profiles.load_profile``, ...). ``template`` (for a dialect described by one, ``json``) is
    a dict, inline JSON or a file path. ``classes`` (e.g. the fingerprint's) makes answers with
    another number of classes failures even when the server's metadata does not tell. Bad
    options raise ``UsageError``; ``query`` itself never raises.
    """
    cls = PROTOCOLS[protocol_name(protocol)]
    if template is not None:
        if not cls.takes_template:
            users = " or ".join(name for name, c in PROTOCOLS.items() if c.takes_template)
            raise UsageError(f"--template applies to --protocol {users} only")
        options["template"] = template
    return cls(url, **options)


__all__ = ["DEFAULT_DEADLINE", "DEFAULT_MAX_RESPONSE", "PROTOCOLS", "Failure", "HTTPTarget", "make_client", "protocol_help", "protocol_name"]
