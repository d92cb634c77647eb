"""The one ``Registry`` type behind methods, attacks, routers and protocol clients.

A new router and a new protocol client are each written as one new file (here in ``tmp_path``,
put on the import path) and registered with one line; everything else finds them.
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from tamperprobe import zoo
from tamperprobe._registry import Registry
from tamperprobe.attacks import REGISTRY as ATTACKS
from tamperprobe.attacks import get_attack
from tamperprobe.errors import UsageError
from tamperprobe.evaluation.routers import ROUTERS, Operator, Router, get_router, router_names
from tamperprobe.models import TorchModel
from tamperprobe.outputs import OutputSpec
from tamperprobe.owner.methods import REGISTRY as METHODS
from tamperprobe.owner.methods import get_method, method_descriptions
from tamperprobe.served.clients import PROTOCOLS, HTTPTarget, make_client, protocol_help, protocol_name
from tamperprobe.server.app import ServerThread

ROUTER_FILE = '''
"""A new router: one file."""
import numpy as np
from tamperprobe._params import Interval
from tamperprobe.evaluation.routers import Router


class Brightness(Router):
    """Route by mean brightness: markers drawn away from the data tend to be brighter."""

    constraints = {"scale": Interval(0.0, 10.0, closed="right")}

    def __init__(self, *, scale: float = 1.0) -> None:
        self.scale = scale

    def score(self, requests, history=()):
        return self.scale * np.asarray(requests, dtype=np.float64).reshape(len(requests), -1).mean(axis=1)
'''

CLIENT_FILE = '''
"""A new protocol client: one file."""
from tamperprobe import oip
from tamperprobe.served.clients.answers import Parts, to_answer
from tamperprobe.served.clients.http import HTTPTarget


class LogitsOnly(HTTPTarget):
    """Open Inference Protocol JSON in, the logits output back."""

    protocol = "logits-only"
    summary = "a new dialect: Open Inference Protocol logits"
    aliases = ("lo",)
    default_model_name = "model"

    def _query_batch(self, x, spec):
        body = {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": oip.json_data(x, "FP32")}]}
        doc = self.request("POST", f"{self.url}/v2/models/{self.model_name}/infer", json_body=body).json()
        out = next(o for o in doc["outputs"] if o["name"] == oip.LOGITS)
        rows = oip.decode_json(out["data"], out["datatype"], out["shape"], "output 'logits'").reshape(len(x), -1)
        return [to_answer(Parts(logits=row.tolist()), spec, self.classes) for row in rows]
'''


def _new_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, text: str) -> None:
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(text))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, name, raising=False)


def test_a_new_router_is_one_file_and_one_registry_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _new_file(tmp_path, monkeypatch, "brightness_router", ROUTER_FILE)
    monkeypatch.setitem(ROUTERS, "brightness", "brightness_router:Brightness")  # the one registry line
    assert router_names()[-1] == "brightness"
    assert "brightness: Route by mean brightness" in ROUTERS.help()
    router = get_router("brightness", scale="2")  # text from the command line, coerced and validated
    assert isinstance(router, Router) and router.scale == 2.0
    x = np.stack([np.zeros((1, 4, 4)), np.ones((1, 4, 4))]).astype(np.float32)
    router.fit(x, operator=Operator(original=None))  # type: ignore[arg-type]
    assert router.score(x).tolist() == [0.0, 2.0]
    with pytest.raises(UsageError, match=r"scale must be in \(0, 10\], got 0"):
        get_router("brightness", scale=0)
    with pytest.raises(UsageError, match="unknown parameter"):
        get_router("brightness", bogus=1)
    with pytest.raises(UsageError, match="^unknown router 'nope': choose one of exact-repeat, .*, brightness$"):
        get_router("nope")


def test_a_new_protocol_client_is_one_file_and_one_registry_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _new_file(tmp_path, monkeypatch, "logits_only_client", CLIENT_FILE)
    monkeypatch.setitem(PROTOCOLS, "logits-only", "logits_only_client:LogitsOnly")  # the one registry line
    assert "logits-only: a new dialect" in protocol_help()
    assert protocol_name("LO") == "logits-only"  # through the class's aliases
    torch.manual_seed(0)
    model = TorchModel(zoo.build("mlp", (1, 8, 8)).eval(), "mlp")
    x = np.random.default_rng(0).random((3, 1, 8, 8)).astype(np.float32)
    with ServerThread(model, name="m", input_shape=(1, 8, 8)) as srv:
        client = make_client("logits-only", srv.url, model_name="m", seed=0)
        assert type(client).__name__ == "LogitsOnly" and isinstance(client, HTTPTarget)
        answers = client.query(x, OutputSpec.parse("top1")).answers
    assert [a.labels[0] for a in answers] == model.logits(x).argmax(axis=1).tolist()  # type: ignore[union-attr]


def test_unknown_names_and_wrong_entries_are_one_line_errors() -> None:
    reg: Registry[Router] = Registry(
        "router", {"good": "tamperprobe.evaluation.routers:ExactRepeat", "bad": "tamperprobe.outputs:OutputSpec"}, base=Router
    )
    with pytest.raises(UsageError, match="^unknown router 'x': choose one of good, bad$"):
        reg.cls("x")
    with pytest.raises(UsageError, match="router 'bad' is registered as tamperprobe.outputs:OutputSpec, which is not a Router"):
        reg.cls("bad")
    with pytest.raises(UsageError, match="a router is a name or a Router instance, not int"):
        reg.build(3)  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="'package.module:Class'"):
        Registry("thing", {"x": "no-colon"})["x"]
    assert reg.cls("good").__name__ == "ExactRepeat"
    with pytest.raises(UsageError, match="unknown method 'Natural'"):
        get_method("Natural")  # only registries with aliases match in any case


def test_help_text_is_read_without_importing_the_module(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(METHODS, "grid", "tamperprobe.owner.methods.grid:Grid")  # a reference, as in the source
    monkeypatch.delitem(sys.modules, "tamperprobe.owner.methods.grid", raising=False)  # not imported yet
    assert method_descriptions()["grid"].startswith("TamperNN GRID")
    assert "tamperprobe.owner.methods.grid" not in sys.modules


def test_instances_are_validated_and_take_no_parameters() -> None:
    from tamperprobe.attacks.sparsify import Prune

    with pytest.raises(UsageError, match="given with a Prune instance"):
        get_attack(Prune(), {"ratio": 0.2})
    bad = Prune(ratio=2.0)  # hand-built with a value its constraints refuse
    with pytest.raises(UsageError, match="ratio"):
        get_attack(bad)
    with pytest.raises(UsageError, match="ratio"):
        get_attack("prune", {"ratio": "2"})  # get_attack validates a name's parameters too
    assert isinstance(ATTACKS, Registry) and isinstance(METHODS, Registry) and isinstance(ROUTERS, Registry) and isinstance(PROTOCOLS, Registry)
