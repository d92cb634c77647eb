"""Pools never overlap (issue 18.4): the ledger knows every query by its content, so no marker goes out twice under any fingerprint.

A regenerated fingerprint with the same seed and a larger size holds the old markers under a new id
(here built directly: the first markers equal, the rest new, another creation time). Real SQLite files.
"""

from __future__ import annotations

import numpy as np
import pytest

from tamperprobe.data import InputSpec
from tamperprobe.fingerprint import make_fingerprint
from tamperprobe.served import ledger, pool

SHAPE = (1, 4, 4)


def _fp(x, created):
    logits = np.stack([x.reshape(len(x), -1).sum(1), -x.reshape(len(x), -1).sum(1)], axis=1).astype(np.float32)
    return make_fingerprint(x, logits, InputSpec(SHAPE), {"method": "natural", "seed": 0}, "test", output_spec="logits", created=created)


@pytest.fixture
def twins():
    x = np.random.default_rng(0).random((24, *SHAPE)).astype(np.float32)
    old, bigger = _fp(x[:8], "2025-01-01T00:00:00+00:00"), _fp(x, "2025-02-01T00:00:00+00:00")
    assert old.id != bigger.id and np.array_equal(bigger.inputs[:8], old.inputs)
    return old, bigger


def test_a_regenerated_fingerprint_never_resends_the_old_markers(twins, tmp_path):
    old, bigger = twins
    hist = tmp_path / "h.sqlite"
    sent_old = pool.draw(old, pool.plan(old, per_run=8, decoys=0), path=hist).markers
    assert sorted(sent_old) == list(range(8))
    plan = pool.plan(bigger, per_run=4, decoys=0)
    state = pool.status(bigger, plan, hist)
    assert (state.used_markers, state.runs_left) == (8, 4)  # main: 0 used, 6 runs
    sent_new = [i for _ in range(4) for i in pool.draw(bigger, plan, path=hist).markers]
    assert sorted(sent_new) == list(range(8, 24))  # main: 12 of 24, some of them the old 8 again
    with pytest.raises(pool.PoolExhausted, match="fresh seed") as info:
        pool.draw(bigger, plan, path=hist)
    assert "never with the seed of an old one" in str(info.value) and "nothing was sent" in str(info.value)


def test_the_ledger_knows_queries_by_content_across_kinds_and_fingerprints(twins, tmp_path):
    """A decoy of one fingerprint that is a marker of another counts as sent once either was drawn."""
    old, _ = twins
    hist = tmp_path / "h.sqlite"
    rng = np.random.default_rng(1)
    other_x = rng.random((4, *SHAPE)).astype(np.float32)
    holder = make_fingerprint(
        other_x, np.zeros((4, 2), np.float32), InputSpec(SHAPE), {"method": "natural"}, "test",
        decoy_inputs=old.inputs[:4], decoy_logits=old.logits[:4],
    )  # fmt: skip
    pool.draw(old, pool.plan(old, per_run=8, decoys=0), path=hist)
    assert ledger.drawn(holder.id, hist, ledger.digests_of({"decoy": holder.queries("decoy")[0]})) == {"decoy": {0, 1, 2, 3}}
    assert pool.status(holder, pool.plan(holder, per_run=2, decoys=1), hist).used_decoys == 4


def test_content_digest_is_the_bytes_sent():
    a = np.arange(16, dtype=np.float32).reshape(SHAPE)
    assert ledger.content_digest(a) == ledger.content_digest(a.copy())
    b = a.copy()
    b[0, 0, 0] = np.nextafter(b[0, 0, 0], 1)  # one ulp
    assert ledger.content_digest(b) != ledger.content_digest(a)
    assert ledger.content_digest(a.astype(np.float64)) != ledger.content_digest(a)
