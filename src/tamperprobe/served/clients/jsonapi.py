"""A generic JSON prediction endpoint, described by a small template.

The template is a JSON object (a file given with ``--template FILE``, or inline JSON)::

    {
      "method": "POST",
      "path": "/predict",
      "headers": {"X-Model": "digits"},
      "request": {"model": "digits", "image": "{{input}}"},
      "response": {
        "labels": "result.label",
        "scores": "result.probs",
        "scores_kind": "probs",
        "probability": "result.confidence"
      },
      "batch": "predictions"
    }

``request`` (required) is the JSON body. A string that is exactly a placeholder is replaced by
a JSON value (placeholders inside longer strings are refused, so a value is never spliced into
text):

==================  ==========================================================
``"{{input}}"``      the marker as a nested list, without the batch axis
``"{{input_flat}}"`` the marker as a flat list (row-major)
``"{{inputs}}"``     a list of markers (batch mode only)
``"{{shape}}"``      the input shape without the batch axis, a list of ints
==================  ==========================================================

``response`` (required) names where the answer is, as paths into the response JSON: keys
separated by dots, list indices in brackets (``outputs[0].probs``, ``[0].label``,
``data["key.with.dots"]``, ``$`` for the whole body). At least one of:

* ``labels``: an int, an integer string or a list of them, most likely first;
* ``scores``: a list with one number per class; ``scores_kind`` says ``probs`` or ``logits``
  (default: probabilities if they lie in [0, 1] and sum to 1, else logits);
* ``probability``: the top-1 probability (with ``labels``, answers ``top1-prob:N``).

``method`` (POST, PUT or PATCH; default POST), ``path`` (appended to the endpoint URL; default
none) and ``headers`` are optional. Without ``batch`` each request carries one marker
(``{{input}}``/``{{input_flat}}``); with ``"batch": PATH`` the request uses ``{{inputs}}``, PATH
points at the list of per-marker results, and the response paths are relative to each result.
A path that is missing from a response is ``malformed response: missing 'result.label'``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from ..._util import one_line
from ...errors import UsageError
from ...outputs import Answer, OutputSpec
from ..targets import QueryFailure
from .answers import Failure, Parts, as_labels, as_number, as_vector, parts_from_scores, to_answer
from .http import HTTPTarget, nested, parse_headers

PLACEHOLDERS = ("{{input}}", "{{input_flat}}", "{{inputs}}", "{{shape}}")
_TOKEN = re.compile(r'\.?([A-Za-z_$][\w$-]*)|\[(-?\d+)\]|\["((?:[^"\\]|\\.)*)"\]')
_KEYS = {"method", "path", "headers", "request", "response", "batch"}
_RESPONSE_KEYS = {"labels", "scores", "scores_kind", "probability"}


def parse_path(text: str) -> list[str | int]:
    """``a.b[0]["c.d"]`` -> ["a", "b", 0, "c.d"]; ``$`` or "" -> [] (the whole document)."""
    s = str(text).strip()
    if s in ("", "$"):
        return []
    rooted = s.startswith("$")
    if rooted:
        s = s[1:]
    steps: list[str | int] = []
    pos = 0
    while pos < len(s):
        m = _TOKEN.match(s, pos)
        if not m or m.end() == pos or (pos == 0 and s.startswith(".") and not rooted):
            raise UsageError(f"bad response path {text!r} at {s[pos : pos + 10]!r}: use keys separated by dots and [index]")
        if m.group(1) is not None:
            steps.append(m.group(1))
        elif m.group(2) is not None:
            steps.append(int(m.group(2)))
        else:
            steps.append(json.loads(f'"{m.group(3)}"'))
        pos = m.end()
    return steps


def get_path(doc: Any, steps: list[str | int], text: str) -> Any:
    cur = doc
    for step in steps:
        if isinstance(step, int):
            if not isinstance(cur, list) or not -len(cur) <= step < len(cur):
                raise Failure(f"malformed response: missing {text!r}")
            cur = cur[step]
        else:
            if not isinstance(cur, dict) or step not in cur:
                raise Failure(f"malformed response: missing {text!r}")
            cur = cur[step]
    return cur


def _map_strings(value: Any, fn: Callable[[str], Any]) -> Any:
    """``value`` (JSON) with every string ``s`` replaced by ``fn(s)``."""
    if isinstance(value, dict):
        return {k: _map_strings(v, fn) for k, v in value.items()}
    if isinstance(value, list):
        return [_map_strings(v, fn) for v in value]
    return fn(value) if isinstance(value, str) else value


def _placeholders(request: Any) -> set[str]:
    """The placeholders in a request template; UsageError for a string that mentions one without being exactly one."""
    found: set[str] = set()

    def check(text: str) -> str:
        if "{{" in text:
            if text.strip() not in PLACEHOLDERS:
                raise UsageError(f"template: {text!r} is not a placeholder; a string must be exactly one of {', '.join(PLACEHOLDERS)}")
            found.add(text.strip())
        return text

    _map_strings(request, check)
    return found


def _fill(request: Any, subs: dict[str, Any]) -> Any:
    return _map_strings(request, lambda text: subs.get(text.strip(), text))


def _refuse_unknown(d: dict, known: set[str], what: str) -> None:
    unknown = set(d) - known
    if unknown:
        raise UsageError(f"template: unknown {what}(s) {', '.join(sorted(unknown))} (known: {', '.join(sorted(known))})")


def load_template(template: Any) -> dict:
    """A template from a dict, inline JSON text, or a path to a JSON file; validated (UsageError)."""
    if isinstance(template, (str, Path)) and not (isinstance(template, str) and template.lstrip().startswith("{")):
        p = Path(template)
        try:
            template = p.read_text()
        except OSError as exc:
            raise UsageError(f"cannot read template {p}: {one_line(exc.strerror or exc)}") from None
    if isinstance(template, str):
        try:
            template = json.loads(template)
        except ValueError as exc:
            raise UsageError(f"template is not valid JSON: {one_line(exc)}") from None
    if not isinstance(template, dict):
        raise UsageError("a template must be a JSON object with 'request' and 'response'")
    _refuse_unknown(template, _KEYS, "key")
    if "request" not in template or "response" not in template:
        raise UsageError("template needs 'request' (the body, with a placeholder) and 'response' (paths)")
    method = str(template.get("method", "POST")).upper()
    if method not in ("POST", "PUT", "PATCH"):
        raise UsageError(f"template: method must be POST, PUT or PATCH, not {method}")
    path = str(template.get("path", ""))
    if path and not path.startswith("/"):
        raise UsageError("template: 'path' must start with /")
    headers = template.get("headers", {})
    if not isinstance(headers, dict) or not all(isinstance(v, str) for v in headers.values()):
        raise UsageError("template: 'headers' must map names to strings")
    found = _placeholders(template["request"])
    batch = template.get("batch")
    if batch is not None:
        if "{{inputs}}" not in found:
            raise UsageError('template: batch mode needs "{{inputs}}" in the request')
        if found & {"{{input}}", "{{input_flat}}"}:
            raise UsageError("template: batch mode sends {{inputs}}, not {{input}}/{{input_flat}}")
        batch_steps = parse_path(batch)
    else:
        if "{{inputs}}" in found:
            raise UsageError('template: "{{inputs}}" needs "batch" (the path of the list of results)')
        if not found & {"{{input}}", "{{input_flat}}"}:
            raise UsageError('template: the request must contain "{{input}}" or "{{input_flat}}"')
        batch_steps = None
    resp = template["response"]
    if not isinstance(resp, dict):
        raise UsageError("template: 'response' must be an object of paths")
    _refuse_unknown(resp, _RESPONSE_KEYS, "response key")
    if not set(resp) & {"labels", "scores", "probability"}:
        raise UsageError("template: 'response' needs at least one of labels, scores, probability")
    kind = resp.get("scores_kind")
    if kind not in (None, "probs", "logits"):
        raise UsageError("template: scores_kind must be probs or logits")
    paths = {k: (str(resp[k]), parse_path(resp[k])) for k in ("labels", "scores", "probability") if k in resp}
    return {
        "method": method,
        "path": path,
        "headers": dict(headers),
        "request": template["request"],
        "paths": paths,
        "scores_kind": kind,
        "batch": (str(batch), batch_steps) if batch is not None else None,
    }


class JSONAPIClient(HTTPTarget):
    protocol: ClassVar[str] = "json"
    summary: ClassVar[str] = "any JSON API, described by --template"
    aliases: ClassVar[tuple[str, ...]] = ("template",)
    takes_template: ClassVar[bool] = True

    def __init__(self, url: str, *, template: Any = None, model_name: str | None = None, **kw: Any) -> None:
        if template is None:
            raise UsageError("--protocol json needs --template (a JSON request/response template)")
        self.template = load_template(template)
        if self.template["batch"] is None:
            kw["batch_size"] = 1
        kw["headers"] = {**parse_headers(self.template["headers"]), **parse_headers(kw.get("headers"))}
        super().__init__(url.rstrip("/") if self.template["path"] else url, model_name=model_name, **kw)

    def endpoint_url(self) -> str:
        return self.url.rstrip("/") + self.template["path"] if self.template["path"] else self.url

    def _query_batch(self, x: np.ndarray, spec: OutputSpec) -> list[Answer | QueryFailure]:
        t = self.template
        subs: dict[str, Any] = {"{{shape}}": [int(s) for s in x.shape[1:]]}
        if t["batch"] is None:
            subs["{{input}}"] = nested(x[0])
            subs["{{input_flat}}"] = nested(x[0].reshape(-1))
        else:
            subs["{{inputs}}"] = nested(x)
        body = _fill(t["request"], subs)
        doc = self.request(t["method"], self.endpoint_url(), json_body=body).json()
        if t["batch"] is None:
            results = [doc]
        else:
            text, steps = t["batch"]
            results = get_path(doc, steps, text)
            if not isinstance(results, list) or len(results) != len(x):
                got = len(results) if isinstance(results, list) else type(results).__name__
                raise Failure(f"malformed response: {text!r} holds {got} results for {len(x)} inputs")
        return [to_answer(self._parts(r), spec, self.classes) for r in results]

    def _parts(self, doc: Any) -> Parts:
        paths = self.template["paths"]
        p = Parts()
        if "labels" in paths:
            text, steps = paths["labels"]
            p.labels = as_labels(get_path(doc, steps, text), "labels")
        if "scores" in paths:
            text, steps = paths["scores"]
            scores = parts_from_scores(as_vector(get_path(doc, steps, text), "scores"), self.template["scores_kind"])
            p.probs, p.logits = scores.probs, scores.logits
        if "probability" in paths:
            text, steps = paths["probability"]
            v = get_path(doc, steps, text)
            if isinstance(v, list) and len(v) == 1:
                v = v[0]
            p.probability = as_number(v, "probability")
        return p
