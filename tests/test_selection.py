"""MANC greedy coverage and random selection, with groups."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from torch import nn

from tamperprobe.errors import UsageError
from tamperprobe.evaluation.protocol import manc_draws, manc_orders
from tamperprobe.models import Model, TorchModel
from tamperprobe.owner.methods.base import Bag
from tamperprobe.owner.selection import _greedy, manc, manc_batch, pack_active, popcount, random_selection, select


def _coverage(active: np.ndarray, idx) -> int:
    idx = list(idx)
    return int(active[idx].any(axis=0).sum()) if idx else 0


def _optimum(active: np.ndarray, k: int) -> int:
    return max(_coverage(active, c) for c in itertools.combinations(range(len(active)), k))


def _random_instance(rng: np.random.Generator) -> np.ndarray:
    n, units = int(rng.integers(2, 9)), int(rng.integers(3, 13))
    acts = rng.normal(size=(n, units)) - rng.uniform(0.0, 1.5)  # varied densities of active neurons
    return acts


def test_greedy_guarantee_against_brute_force() -> None:
    rng = np.random.default_rng(0)
    for _ in range(300):
        acts = _random_instance(rng)
        active = acts > 0
        for k in range(1, min(3, len(acts)) + 1):
            idx = manc(acts, k, np.random.default_rng(1))
            assert len(idx) == k and len(set(idx.tolist())) == k
            best_single = max(_coverage(active, [i]) for i in range(len(acts)))
            assert _coverage(active, idx[:1]) == best_single  # the first pick maximises coverage
            if k == 1:
                assert _coverage(active, idx) == _optimum(active, 1)
            assert _coverage(active, idx) >= (1 - 1 / math.e) * _optimum(active, k) - 1e-9


def test_greedy_is_optimal_on_disjoint_and_nested_instances() -> None:
    rng = np.random.default_rng(3)
    for _ in range(100):
        n, units = int(rng.integers(3, 9)), 16
        # disjoint supports: greedy takes the k largest sets, which is optimal
        labels = rng.integers(0, n, size=units)
        disjoint = np.stack([(labels == i) for i in range(n)]).astype(float)
        # nested supports (a chain): any optimum contains the largest set, greedy too
        sizes = rng.permutation(np.linspace(1, units, n).astype(int))
        nested = (np.arange(units)[None, :] < sizes[:, None]).astype(float)
        for acts in (disjoint, nested):
            for k in range(1, min(4, n) + 1):
                idx = manc(acts, k, np.random.default_rng(0))
                assert _coverage(acts > 0, idx) == _optimum(acts > 0, k)


def test_known_greedy_order_and_reset_after_saturation() -> None:
    acts = np.array(
        [
            [1, 1, 0, 0, 0, 0],  # 0
            [1, 1, 1, 1, 0, 0],  # 1: the biggest
            [0, 0, 0, 0, 1, 0],  # 2
            [0, 0, 0, 0, 1, 1],  # 3: the only one adding 2 after sample 1
            [0, 0, 0, 0, 0, 0],  # 4: never active, comes last
            [1, 1, 1, 0, 0, 0],  # 5: biggest once coverage is reset
        ],
        dtype=float,
    )
    order = manc(acts, 6, np.random.default_rng(0))
    assert order[:3].tolist() == [1, 3, 5]  # 1, then 3, then saturation: reset, 5 covers 3
    assert order[-1] == 4
    assert sorted(order.tolist()) == list(range(6))


def test_ties_are_broken_by_the_rng_and_are_reproducible() -> None:
    acts = np.eye(8)  # every sample adds exactly one neuron: all ties
    firsts = {int(manc(acts, 1, np.random.default_rng(s))[0]) for s in range(40)}
    assert len(firsts) > 3
    for s in range(5):
        a = manc(acts, 5, np.random.default_rng(s))
        b = manc(acts, 5, np.random.default_rng(s))
        assert a.tolist() == b.tolist()


def test_random_selection_and_k_checks() -> None:
    idx = random_selection(10, 4, np.random.default_rng(0))
    assert len(set(idx.tolist())) == 4 and idx.max() < 10
    assert idx.tolist() == random_selection(10, 4, np.random.default_rng(0)).tolist()
    with pytest.raises(UsageError):
        random_selection(3, 4, np.random.default_rng(0))
    with pytest.raises(UsageError):
        manc(np.ones((3, 2)), 4, np.random.default_rng(0))
    with pytest.raises(UsageError):
        manc(np.ones((3, 2)), 0, np.random.default_rng(0))


def _model_and_bag(n: int = 12, groups: np.ndarray | None = None) -> tuple[Model, Bag]:
    torch.manual_seed(0)
    module = nn.Sequential(nn.Flatten(), nn.Linear(64, 20), nn.ReLU(), nn.Linear(20, 10)).eval()
    x = np.random.default_rng(0).random((n, 1, 8, 8), dtype=np.float32)
    return TorchModel(module, "mlp"), Bag(x, x.copy(), groups)


def test_select_manc_uses_the_penultimate_activations() -> None:
    model, bag = _model_and_bag()
    idx = select("manc", model, bag, 5, np.random.default_rng(0))
    with torch.no_grad():
        acts = model.module[:3](torch.from_numpy(bag.inputs)).numpy()
    assert idx.tolist() == manc(acts, 5, np.random.default_rng(0)).tolist()
    assert idx.tolist() == select("manc", model, bag, 5, np.random.default_rng(0)).tolist()
    named = select("manc", model, bag, 5, np.random.default_rng(0), layer="1")
    assert len(set(named.tolist())) == 5
    with pytest.raises(UsageError):
        select("manc", model, bag, 13, np.random.default_rng(0))
    with pytest.raises(UsageError):
        select("best", model, bag, 3, np.random.default_rng(0))  # type: ignore[arg-type]


def test_select_random_is_deterministic() -> None:
    model, bag = _model_and_bag()
    a = select("random", model, bag, 6, np.random.default_rng(7))
    b = select("random", None, bag, 6, np.random.default_rng(7))
    assert a.tolist() == b.tolist() and len(set(a.tolist())) == 6


@pytest.mark.parametrize("kind", ["manc", "random"])
def test_groups_are_kept_or_dropped_whole(kind: str) -> None:
    groups = np.repeat(np.arange(6), 2)  # six pairs
    model, bag = _model_and_bag(12, groups)
    for k in (2, 4, 6):
        idx = select(kind, model, bag, k, np.random.default_rng(k))
        assert len(idx) == k and len(set(idx.tolist())) == k
        chosen = set(groups[idx].tolist())
        for g in chosen:
            assert set(np.flatnonzero(groups == g).tolist()) <= set(idx.tolist())
    idx = select(kind, model, bag, 5, np.random.default_rng(0))  # odd k with pairs: one marker more
    assert len(idx) == 6
    assert all((groups[idx] == g).sum() == 2 for g in set(groups[idx].tolist()))


def test_groups_of_mixed_sizes_fill_k_exactly_when_possible() -> None:
    groups = np.array([0, 0, 0, 1, 2, 2, 3, 4, 4, 4])  # sizes 3, 1, 2, 1, 3
    model, bag = _model_and_bag(10, groups)
    for k in range(1, 11):
        for seed in range(3):
            idx = select("manc", model, bag, k, np.random.default_rng(seed))
            assert len(idx) == k  # 1 and 2 fill any remainder
            for g in set(groups[idx].tolist()):
                assert (groups[idx] == g).sum() == (groups == g).sum()


def test_group_coverage_is_the_union_of_members() -> None:
    acts = np.array([[1, 0, 0, 0], [0, 1, 0, 0], [1, 1, 1, 0], [0, 0, 0, 1]], dtype=np.float32)
    groups = np.array([0, 0, 1, 2])  # group 0 covers {0, 1} with two markers; group 1 covers {0, 1, 2}
    model = TorchModel(nn.Sequential(nn.Identity(), nn.Linear(4, 2)).eval(), "id")
    bag = Bag(acts, acts.copy(), groups)
    idx = select("manc", model, bag, 2, np.random.default_rng(0))
    assert idx.tolist() == [2, 3]  # group 1 first (3 new neurons), then group 2 (1 new); pair 0 adds none
    idx = select("manc", model, bag, 3, np.random.default_rng(0))
    assert idx.tolist() == [2, 0, 1]  # group 2 would leave 1 marker that no whole group fills
    idx = select("manc", model, bag, 4, np.random.default_rng(0))
    assert idx.tolist() == [2, 3, 0, 1]


# ----------------------------------------------------------------------------- bitsets and the batched greedy


@pytest.mark.parametrize("neurons", [0, 1, 7, 63, 64, 65, 200])
def test_bitsets_count_what_the_boolean_rows_hold(neurons: int) -> None:
    rng = np.random.default_rng(neurons)
    active = rng.random((9, neurons)) < 0.4
    words = pack_active(active)
    assert words.dtype == np.uint64 and words.shape == (9, max(1, -(-neurons // 64)))
    assert popcount(words).tolist() == active.sum(axis=1).tolist()
    other = rng.random((9, neurons)) < 0.5
    assert popcount(words & ~pack_active(other)).tolist() == (active & ~other).sum(axis=1).tolist()


def test_ties_go_to_the_highest_priority() -> None:
    active = np.eye(6, dtype=bool)  # every unit adds one neuron: every step is a tie
    priority = np.array([2, 5, 0, 4, 1, 3])
    assert _greedy(active, np.ones(6, dtype=np.int64), 6, priority) == [1, 3, 5, 0, 4, 2]
    pools = np.array([[0, 1, 2, 3, 4, 5], [5, 4, 3, 2, 1, 0]])
    batch = manc_batch(active, pools, 6, np.stack([priority, priority]))
    assert batch[0].tolist() == [1, 3, 5, 0, 4, 2]
    assert batch[1].tolist() == [4, 2, 0, 5, 1, 3]  # the same ranks at other positions pick other units


def _tie_heavy_instance(rng: np.random.Generator) -> np.ndarray:
    """Few neurons, duplicated rows and empty rows: ties and saturation resets at almost every step."""
    units, neurons = int(rng.integers(4, 30)), int(rng.choice([1, 3, 5, 64, 70, 130]))
    base = rng.random((int(rng.integers(1, 6)), neurons)) < rng.uniform(0.05, 0.6)
    rows = base[rng.integers(0, len(base), size=units)]
    rows[rng.random(units) < 0.2] = False
    return rows


def test_manc_batch_equals_the_per_selection_greedy_for_the_same_draws() -> None:
    rng = np.random.default_rng(11)
    for _ in range(60):
        active = _tie_heavy_instance(rng)
        units = len(active)
        m = int(rng.integers(1, units + 1))
        k = int(rng.integers(1, m + 1))
        pools = np.stack([rng.choice(units, size=m, replace=False) for _ in range(40)])
        priority = np.stack([rng.permutation(m) for _ in range(40)])
        want = [pools[r][_greedy(active[pools[r]], np.ones(m, dtype=np.int64), k, priority[r])].tolist() for r in range(len(pools))]
        for chunk_bytes in (1, 1 << 20):  # one row per chunk, and all rows in one: each against the same per-row greedy
            batch = manc_batch(active, pools, k, priority, chunk_bytes=chunk_bytes)
            assert [row.tolist() for row in batch] == want


def test_manc_orders_runs_manc_on_each_drawn_sub_bag() -> None:
    rng = np.random.default_rng(5)
    acts = rng.normal(size=(30, 12)) - 0.8
    orders = manc_orders(acts, 10, 200, np.random.default_rng(9), fraction=0.5)
    pools, priority = manc_draws(30, 15, 200, np.random.default_rng(9))
    assert orders.shape == (200, 10)
    for r in range(200):
        assert set(pools[r].tolist()) >= set(orders[r].tolist()) and len(set(orders[r].tolist())) == 10
        assert orders[r].tolist() == pools[r][_greedy(acts[pools[r]] > 0, np.ones(15, dtype=np.int64), 10, priority[r])].tolist()
        assert sorted(priority[r].tolist()) == list(range(15))
    # every unit appears in about half of the sub-bags (a uniform subset of half the bag)
    share = np.bincount(pools.reshape(-1), minlength=30) / 200
    assert 0.35 < share.min() and share.max() < 0.65


def _reference_manc(active: np.ndarray, k: int, priority: np.ndarray) -> list[int]:
    """The documented rule written plainly on booleans: largest gain, ties to the highest priority, reset when saturated."""
    remaining = list(range(len(active)))
    covered = np.zeros(active.shape[1], dtype=bool)
    picked = []
    for _ in range(k):
        gains = {u: int((active[u] & ~covered).sum()) for u in remaining}
        if covered.any() and max(gains.values()) == 0:
            covered[:] = False
            gains = {u: int(active[u].sum()) for u in remaining}
        top = max(gains.values())
        choice = max((u for u in remaining if gains[u] == top), key=lambda u: priority[u])
        picked.append(choice)
        remaining.remove(choice)
        covered |= active[choice]
    return picked


def test_manc_follows_the_documented_rule_on_tie_heavy_instances() -> None:
    rng = np.random.default_rng(2)
    for _ in range(80):
        active = _tie_heavy_instance(rng)
        k = int(rng.integers(1, len(active) + 1))
        seed = int(rng.integers(1 << 30))
        priority = np.random.default_rng(seed).permutation(len(active))
        assert manc(active.astype(float), k, np.random.default_rng(seed)).tolist() == _reference_manc(active, k, priority)
