"""The campaign hands its bag cells to the backend before its attack cells.

With fewer workers than cells, a worker takes the cells in the order they were submitted; the
driver's own work (selections, benign runtimes) waits for the bags only, so bags first lets it
overlap with the attacks' training (``bench/results/ray-campaign.md``). The order changes no
result: a backend that records the order gives the results of the plain local backend.
"""

from __future__ import annotations

from tamperprobe.data import load_data
from tamperprobe.evaluation import run_evaluation
from tamperprobe.evaluation.backends import LocalBackend
from tamperprobe.models import TorchModel

VOLATILE = ("machine", "started", "seconds", "timings")
SMALL = {"methods": ["natural", "noise"], "baselines": False, "bag": 12, "resamples": 50, "trials": 1, "runtimes": ["batch1"], "seed": 3}


class Recording(LocalBackend):
    """The local backend, recording the keys of every batch of cells submitted to it, in order.

    Named otherwise than ``local``, so the campaign submits its attack cells ahead as it does for Ray.
    """

    name = "recording"

    def __init__(self) -> None:
        self.batches: list[list[str]] = []

    def submit(self, cells):
        self.batches.append([cell.key for cell in cells])
        return super().submit(cells)


def test_bags_are_submitted_before_attacks_and_change_no_result(trained_mlp):
    model, data = TorchModel(trained_mlp, "digits-mlp"), load_data("digits")
    recording = Recording()
    ev = run_evaluation(model, data, attacks=["prune", "fp16"], backend=recording, **SMALL)
    keys = [k for batch in recording.batches for k in batch]
    assert keys[:2] == ["method:natural", "method:noise"]
    assert keys[2:] == ["attack:prune#0", "attack:fp16#0"]
    plain = run_evaluation(model, data, attacks=["prune", "fp16"], **SMALL)
    assert {k: v for k, v in ev.to_json().items() if k not in VOLATILE} == {k: v for k, v in plain.to_json().items() if k not in VOLATILE}
