"""The shared training loop: its hand-written Adam is torch's Adam, bit for bit."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from tamperprobe import train, zoo


class _WithUnused(nn.Module):
    """A CNN plus a parameter the forward pass never reads (its gradient stays None)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = zoo.build("cnn", (1, 8, 8))
        self.unused = nn.Parameter(torch.ones(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@pytest.mark.parametrize("weight_decay", [0.0, 1e-3])
def test_fit_trains_exactly_as_torch_optim_adam(digits, monkeypatch, weight_decay):
    train_set = digits[0]
    torch.manual_seed(0)
    ours = _WithUnused()
    theirs, initial = copy.deepcopy(ours), copy.deepcopy(ours)
    kwargs = dict(epochs=2, lr=3e-3, seed=0, weight_decay=weight_decay, batch_size=50)
    train.fit(ours, train_set.x[:400], train_set.y[:400], **kwargs)
    monkeypatch.setattr(train, "Adam", lambda params, lr, weight_decay: torch.optim.Adam(params, lr=lr, weight_decay=weight_decay))
    train.fit(theirs, train_set.x[:400], train_set.y[:400], **kwargs)
    for (name, a), b in zip(ours.state_dict().items(), theirs.state_dict().values()):
        assert torch.equal(a, b), name
    assert torch.equal(ours.unused, torch.ones(3))  # no gradient, no step
    assert not torch.equal(ours.net.head[-1].weight, initial.net.head[-1].weight)  # it trained


def test_fit_updates_only_the_given_parameters(digits):
    torch.manual_seed(0)
    module = zoo.build("mlp", (1, 8, 8))
    frozen = {k: v.clone() for k, v in module.state_dict().items()}
    last = module.net[-1]
    train.fit(module, digits[0].x[:200], digits[0].y[:200], epochs=1, lr=1e-2, params=[last.weight])
    for name, value in module.state_dict().items():
        changed = not torch.equal(value, frozen[name])
        assert changed == (name == "net.5.weight"), name
