"""The Ray backend on a real local Ray cluster: the same results as the local backend, failures per cell.

One cluster (``ray.init(num_cpus=2)``) serves the module's tests, so its start-up is paid once, and
stops when they are done (its daemons would otherwise keep using CPU for the rest of the session).
The test attacks are defined here and sent to the workers by value (the workers cannot import this
file). Every Ray worker imports torch, so the tests that kill workers come last and run one task at
a time: the workers the other tests started serve them, and a worker is started again only where a
death leaves none.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from tamperprobe.attacks.base import Attack
from tamperprobe.data import load_data
from tamperprobe.evaluation import run_evaluation
from tamperprobe.evaluation.backends import RayBackend, get_backend
from tamperprobe.models import TorchModel

# ray is imported by the cluster fixture, not here: every xdist worker collects this module, one runs it
pytestmark = pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="ray is not installed (the ray extra)")

VOLATILE = ("machine", "started", "seconds", "timings")
SMALL = dict(
    methods=["natural", "boundary", "nope"],
    specs=["top1", "logits"],
    trials=2,
    bag=24,
    select="random",
    resamples=300,
    seed=7,
    baselines=False,
    runtimes=("batch1",),
    attack_params={"noise": {"fraction": 0.2, "sigma": 0.05}, "prune": {"ratio": 0.3}},
)


class Boom(Attack):
    """An attack that raises: its cell fails."""

    name = "boom"

    def apply(self, model, ctx):
        raise RuntimeError("boom: this attack always fails")


class KillOnce(Attack):
    """An attack whose first run kills its own process (a worker dying mid-campaign); later runs scale the biases."""

    name = "kill-once"

    def __init__(self, *, flag: str = "") -> None:
        self.flag = flag

    def apply(self, model, ctx):
        if not os.path.exists(self.flag):
            Path(self.flag).write_text("killed once")
            os.kill(os.getpid(), signal.SIGKILL)
        with torch.no_grad():
            for name, t in model.named_parameters():
                if name.endswith("bias"):
                    t.mul_(1.5)
        return model


class KillAlways(Attack):
    """An attack whose every run kills its process: the cell fails for good once Ray stops retrying."""

    name = "kill-always"

    def apply(self, model, ctx):
        os.kill(os.getpid(), signal.SIGKILL)


#: Ray's own settings for the test cluster: no workers started ahead of the tasks (a worker that runs a task imports
#: torch anyway; one started ahead and never used only costs its start-up), and no metrics collection.
_LEAN = {
    "enable_worker_prestart": False,
    "prestart_worker_first_driver": False,
    "enable_metrics_collection": False,
    "num_workers_soft_limit": 2,
    "worker_maximum_startup_concurrency": 1,
}


#: The head node of the test cluster, as ``ray.init(num_cpus=2)`` starts it but without the two processes the tests do not
#: use: the autoscaler's monitor (a one-machine cluster does not scale) and the log monitor (the driver does not ask for
#: the workers' output, ``log_to_driver=False``).
_HEAD = {"num_cpus": 2, "include_dashboard": False, "no_monitor": True, "include_log_monitor": False, "_system_config": _LEAN}


@pytest.fixture(scope="module")
def cluster():
    """A local cluster (Ray's test cluster, ``ray.cluster_utils.Cluster``) and this process connected to it as its driver.

    Its files, sockets and the address file that ``Cluster`` writes for ``ray.init()`` to find go into a folder of its
    own (``RAY_TMPDIR``), so no other Ray program on the machine sees it; the folder's name is short because Ray's socket
    paths live under it."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # the test cluster listens on 127.0.0.1 only
    import ray
    from ray.cluster_utils import Cluster

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import this file
    folder = tempfile.mkdtemp(prefix="tpray")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_TMPDIR", folder)
        head = Cluster(initialize_head=True, head_node_args=_HEAD)
        try:
            ray.init(address=head.address, log_to_driver=False, configure_logging=False)
            assert {n["NodeManagerAddress"] for n in ray.nodes()} == {"127.0.0.1"}
            yield ray
        finally:
            ray.shutdown()
            head.shutdown()
            shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def model_and_data(trained_mlp):
    return TorchModel(trained_mlp, "digits-mlp"), load_data("digits")


def _document(ev) -> dict:
    return {k: v for k, v in ev.to_json().items() if k not in VOLATILE}


@pytest.fixture(scope="module")
def local(model_and_data):
    model, data = model_and_data
    return run_evaluation(model, data, attacks=["noise", "prune", "fp16", Boom(), "nope"], **SMALL)


@pytest.mark.parametrize("cpus_per_task", [2, 1], ids=["one-worker", "two-workers"])
def test_ray_gives_the_results_of_the_local_backend(cluster, model_and_data, local, cpus_per_task):
    model, data = model_and_data
    ev = run_evaluation(model, data, attacks=["noise", "prune", "fp16", Boom(), "nope"], backend=RayBackend(cpus_per_task=cpus_per_task), **SMALL)
    assert _document(ev) == _document(local)
    assert ev.measured and {"method:natural", "attack:noise#1", "attack:fp16#0"} <= set(ev.timings)
    assert cluster.is_initialized()  # a cluster the backend joined keeps running


def test_a_cell_that_raises_is_reported_in_the_errors_table(cluster, local, model_and_data):
    errors = {(e.stage, e.name): e.error for e in local.errors}
    assert errors[("attack", "boom#0")] == "RuntimeError: boom: this attack always fails"
    assert errors[("method", "nope")].startswith("UsageError: unknown method 'nope'")
    (boom,) = [a for a in local.attacks if a.attack == "boom"]
    assert boom.error == errors[("attack", "boom#0")] and boom.max_abs_dlogit is None
    assert [m.method for m in local.methods if m.error is None] == ["natural", "boundary"]


def test_the_local_backend_imports_no_ray():
    code = "import sys; from tamperprobe.evaluation import run_evaluation, backends; backends.get_backend('local'); print('ray' in sys.modules)"
    import subprocess

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env={**os.environ})
    assert out.stdout.strip() == "False"


def test_backend_names_are_checked():
    from tamperprobe.errors import UsageError

    assert get_backend(None).name == get_backend("local").name == "local" and get_backend("ray").name == "ray"
    with pytest.raises(UsageError, match="unknown backend 'spark'"):
        get_backend("spark")
    with pytest.raises(UsageError, match="--address needs --backend ray"):
        get_backend("local", "127.0.0.1:6379")


def test_evaluate_backend_ray_on_a_torchscript_file_writes_the_local_results(cluster, trained_mlp, digits, tmp_path):
    """The command line: a TorchScript model (sent to the workers as its saved bytes), the same results.json as locally."""
    import json

    from typer.testing import CliRunner

    from tamperprobe.cli.app import app
    from tamperprobe.models import save_model

    model = save_model(trained_mlp, tmp_path / "m.pt", digits[1].x[:2])
    tiny = ["--methods", "natural", "--no-baselines", "--attacks", "noise,prune", "--trials", "2", "--bag", "12", "--resamples", "200"]
    docs = []
    for out, backend in ((tmp_path / "local", []), (tmp_path / "ray", ["--backend", "ray"])):
        r = CliRunner().invoke(
            app, ["evaluate", str(model), "--data", "digits", "--out", str(out), *tiny, "--specs", "top1,logits", "--no-plots", "--quiet", *backend]
        )
        assert r.exit_code == 0, r.output
        docs.append({k: v for k, v in json.loads((out / "results.json").read_text()).items() if k not in VOLATILE})
    assert docs[0] == docs[1] and docs[0]["model"]["kind"] == "torchscript" and docs[0]["errors"] == []


def test_the_adversary_harness_on_ray_gives_the_local_results(cluster, model_and_data, digits):
    """Bags and attacked models as Ray tasks, routers fitted on the driver: the adversary.json of the local backend."""
    from tamperprobe.evaluation import Traffic, run_adversary

    model, _ = model_and_data
    train, test = digits
    traffic = Traffic.split(test.x, seen=100, calibration=150, seed=3)
    common = dict(
        methods=["natural", "boundary", "nope"], attacks=["fp16", "noise", Boom()], routers=["exact-repeat", "near-twin", "margin-original"]
    )
    common |= dict(specs=["top1", "logits"], costs=(0.0, 0.05, 0.2), bag=16, resamples=300, seed=3)
    local = run_adversary(model, train, traffic, **common)
    remote = run_adversary(model, train, traffic, backend="ray", **common)
    assert _document(remote) == _document(local)
    assert {(e.stage, e.name) for e in local.errors} == {("method", "nope"), ("attack", "boom#0")} and local.detection


def test_a_worker_killed_mid_campaign_is_retried_and_changes_nothing(cluster, model_and_data, tmp_path):
    model, data = model_and_data
    flag = tmp_path / "killed"
    settings = {**SMALL, "methods": ["natural"], "attack_params": {}}
    ev = run_evaluation(model, data, attacks=[KillOnce(flag=str(flag)), "fp16"], backend=RayBackend(cpus_per_task=2), **settings)
    assert flag.read_text() == "killed once"  # the first attempt's worker died
    assert ev.errors == [] and all(a.functional_change for a in ev.attacks)
    again = run_evaluation(model, data, attacks=[KillOnce(flag=str(flag)), "fp16"], **settings)  # local, the flag already set
    assert _document(ev) == _document(again)


def test_a_cell_whose_worker_always_dies_fails_after_the_retries(cluster, model_and_data):
    model, data = model_and_data
    settings = {**SMALL, "methods": ["natural"], "attack_params": {}}
    ev = run_evaluation(model, data, attacks=[KillAlways(), "fp16"], backend=RayBackend(cpus_per_task=2, max_retries=1), **settings)
    ((stage, name, error),) = [(e.stage, e.name, e.error) for e in ev.errors]
    assert (stage, name) == ("attack", "kill-always#0") and error.endswith("(max_retries 1)") and "Worker" in error and "\x1b" not in error
    assert [a.error is None for a in ev.attacks] == [False, True] and ev.measured
    detection = {(d.attack, d.ns): d.rate for d in ev.detection if d.spec == "logits"}
    assert detection[("fp16", 10)] == pytest.approx(1.0) and not any(a == "kill-always" for a, _ in detection)
