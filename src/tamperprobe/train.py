"""The one seeded training loop (``fit``), shared by the zoo, the demo and the attacks, and a model's accuracy."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from ._torch import accuracy as _accuracy
from ._torch import as_logits, eval_mode, module_device, predict, set_training, to_tensor
from ._util import Progress


class Adam:
    """Adam (Kingma & Ba) with L2 weight decay, step for step as ``torch.optim.Adam``'s single-tensor path.

    Written out because the first ``torch.optim`` call imports ``torch._dynamo``, which doubles
    the start-up of a short command (about 1 s more than ``import torch`` itself; see
    ``bench/results/startup.md``). The arithmetic is torch's, op for op, so training gives the same
    weights bit for bit on the CPU (``tests/test_train.py`` compares the two).
    """

    def __init__(
        self, params: Sequence[torch.Tensor], lr: float, weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8
    ) -> None:
        self.params = list(params)
        self.lr, self.weight_decay, self.betas, self.eps = float(lr), float(weight_decay), betas, float(eps)
        self.state: dict[int, tuple[torch.Tensor, torch.Tensor, list[int]]] = {}

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        """One update of every parameter that has a gradient (each keeps its own step count, as torch's)."""
        b1, b2 = self.betas
        for i, p in enumerate(self.params):
            if p.grad is None:
                continue
            if i not in self.state:
                self.state[i] = (
                    torch.zeros_like(p, memory_format=torch.preserve_format),
                    torch.zeros_like(p, memory_format=torch.preserve_format),
                    [0],
                )
            m1, m2, count = self.state[i]
            count[0] += 1
            grad = p.grad if self.weight_decay == 0 else p.grad.add(p, alpha=self.weight_decay)
            m1.lerp_(grad, 1 - b1)
            m2.mul_(b2).addcmul_(grad, grad, value=1 - b2)
            step_size = self.lr / (1 - b1 ** float(count[0]))
            denom = (m2.sqrt() / (1 - b2 ** float(count[0])) ** 0.5).add_(self.eps)
            p.addcdiv_(m1, denom, value=-step_size)


def fit(
    module: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    *,
    epochs: int = 10,
    lr: float = 1e-3,
    batch_size: int = 64,
    seed: int = 0,
    params: Sequence[torch.Tensor] | None = None,
    weight_decay: float = 0.0,
    progress: Progress | None = None,
    clip: float | None = 5.0,
) -> nn.Module:
    """Train ``module`` in place with Adam on (x, y), batches in a seeded order; only ``params`` are updated when given.

    Works on any module returning logits (a tensor, or the first of a tuple or dict), including
    ``torch.export`` programs and TorchScript. Leaves the module in eval mode.
    """
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    device = module_device(module)  # the batches' order is drawn on the CPU: the same on every device
    xt = to_tensor(x).to(device)
    yt = torch.from_numpy(np.asarray(y, dtype=np.int64)).to(device)
    trainable = list(params) if params is not None else [p for p in module.parameters() if p.requires_grad]
    opt = Adam(trainable, lr=lr, weight_decay=weight_decay)
    loss_fn = nn.CrossEntropyLoss()
    set_training(module, True)
    steps_per_epoch = max(1, (len(xt) + batch_size - 1) // batch_size)
    total = epochs * steps_per_epoch
    done = 0
    for epoch in range(epochs):
        order = torch.randperm(len(xt), generator=gen, device="cpu")
        for i in range(0, len(xt), batch_size):
            idx = order[i : i + batch_size].to(device)
            opt.zero_grad()
            loss = loss_fn(as_logits(module(xt[idx])), yt[idx])
            loss.backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(trainable, clip)
            opt.step()
            done += 1
            if progress:
                progress(done, total, f"epoch {epoch + 1}/{epochs}")
    set_training(module, False)
    return module


def accuracy(module: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    """Share of ``x`` that ``module`` (run in eval mode, its training flags restored) labels as ``y``."""
    with eval_mode(module):
        return _accuracy(predict(module, x), y)
