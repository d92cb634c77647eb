"""Clients that verify a served model through its prediction API, one module per dialect.

==============  ===============================================================  ==================
protocol        endpoint                                                         module
==============  ===============================================================  ==================
``kserve``      Open Inference Protocol / KServe v2 (Triton, MLServer, serve)    ``kserve.py``
``torchserve``  TorchServe ``POST /predictions/NAME``                            ``torchserve.py``
``tfserving``   TensorFlow Serving / KServe v1 ``POST /v1/models/NAME:predict``  ``tfserving.py``
``json``        any JSON endpoint described by a template                         ``jsonapi.py``
==============  ===============================================================  ==================

All share ``base.HTTPTarget`` (retries, timeouts, limits, marker scheduling, the failure
reasons) and implement the ``Target`` protocol. ``make_client`` builds one from CLI options.
"""

from __future__ import annotations

from typing import Any

from ...errors import UsageError
from .base import DEFAULT_MAX_RESPONSE, Failure, HTTPTarget

PROTOCOLS = ("kserve", "torchserve", "tfserving", "json")
_ALIASES = {
    "kserve": "kserve",
    "v2": "kserve",
    "oip": "kserve",
    "triton": "kserve",
    "mlserver": "kserve",
    "kserve-v2": "kserve",
    "torchserve": "torchserve",
    "tfserving": "tfserving",
    "tf-serving": "tfserving",
    "v1": "tfserving",
    "kserve-v1": "tfserving",
    "json": "json",
    "template": "json",
}


def protocol_name(protocol: str) -> str:
    """The canonical protocol name for ``protocol`` or an alias (triton, mlserver, v1, ...)."""
    key = str(protocol).strip().lower()
    if key not in _ALIASES:
        raise UsageError(f"unknown protocol {protocol!r}: choose one of {', '.join(PROTOCOLS)}")
    return _ALIASES[key]


def make_client(
    protocol: str,
    url: str,
    *,
    model_name: str | None = None,
    headers: dict[str, str] | None = None,
    token_env: str | None = None,
    timeout: float = 10.0,
    retries: int = 3,
    backoff: float = 0.2,
    batch_size: int = 1,
    delay: float = 0.0,
    shuffle: bool = True,
    seed: int | None = None,
    verify_tls: bool = True,
    max_response_bytes: int = DEFAULT_MAX_RESPONSE,
    template: Any = None,
    input_spec: Any = None,
    classes: int | None = None,
    max_retry_after: float = 10.0,
) -> HTTPTarget:
    """A ``Target`` for the endpoint at ``url`` speaking ``protocol`` (see the module doc).

    ``template`` (json only) is a dict, inline JSON or a file path. ``classes`` (e.g. the
    fingerprint's) makes answers with another number of classes failures even when the server's
    metadata does not tell. Bad options raise ``UsageError``; ``query`` itself never raises.
    """
    name = protocol_name(protocol)
    if template is not None and name != "json":
        raise UsageError("--template applies to --protocol json only")
    kw = dict(
        model_name=model_name,
        headers=headers,
        token_env=token_env,
        timeout=timeout,
        retries=retries,
        backoff=backoff,
        batch_size=batch_size,
        delay=delay,
        shuffle=shuffle,
        seed=seed,
        verify_tls=verify_tls,
        max_response_bytes=max_response_bytes,
        input_spec=input_spec,
        classes=classes,
        max_retry_after=max_retry_after,
    )
    if name == "kserve":
        from .kserve import KServeClient

        return KServeClient(url, **kw)
    if name == "torchserve":
        from .torchserve import TorchServeClient

        return TorchServeClient(url, **kw)
    if name == "tfserving":
        from .tfserving import TFServingClient

        return TFServingClient(url, **kw)
    from .jsonapi import JSONAPIClient

    return JSONAPIClient(url, template=template, **kw)


__all__ = ["PROTOCOLS", "Failure", "HTTPTarget", "make_client", "protocol_name"]
