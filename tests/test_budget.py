"""TamperNN's key-size formula and the detection confidence."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tamperprobe.owner.budget import detection_confidence, key_size, key_size_or_none


@pytest.mark.parametrize(
    "p,c,s",
    [(0.5, 0.99, 7), (0.5, 0.9, 4), (0.1, 0.99, 44), (0.01, 0.95, 299), (0.9, 0.999, 4), (1.0, 0.99, 1), (0.5, 0.75, 3), (0.5, 0.5, 2)],
)
def test_key_size_known_values(p, c, s):
    assert key_size(p, c) == s
    if p < 1:  # the defining inequality
        assert s > math.log(1 - c) / math.log(1 - p) - 1e-12
    else:  # a marker that always flips: one is enough, and it detects surely
        assert s == 1 and detection_confidence(p, s) == 1.0 > c
    assert key_size_or_none(p, c) == s


def test_key_size_or_none_for_p_zero():
    assert key_size_or_none(0.0, 0.9) is None
    assert key_size_or_none(0.5, 0.99) == 7
    for p, c in ((0.0, 1.0), (-0.1, 0.9), (0.0, float("nan"))):
        with pytest.raises(ValueError):
            key_size_or_none(p, c)


@pytest.mark.parametrize("p", [0.003, 0.05, 0.2, 0.5, 0.77])
@pytest.mark.parametrize("c", [0.5, 0.9, 0.99, 0.999999])
def test_key_size_is_the_smallest_reaching_c(p, c):
    s = key_size(p, c)
    assert detection_confidence(p, s) >= c
    assert s == 1 or detection_confidence(p, s - 1) <= c + 1e-12


def test_detection_confidence():
    assert detection_confidence(0.5, 7) == pytest.approx(1 - 0.5**7)
    assert detection_confidence(0.0, 10) == 0.0
    assert detection_confidence(1.0, 1) == 1.0
    assert detection_confidence(0.3, 0) == 0.0
    assert detection_confidence(0.5, np.int64(3)) == pytest.approx(0.875)


@pytest.mark.parametrize(
    "p,c", [(0.0, 0.9), (-0.1, 0.9), (1.5, 0.9), (0.5, 1.0), (0.5, 0.0), (float("nan"), 0.9), (0.5, float("inf")), ("0.5", 0.9), (True, 0.9)]
)
def test_key_size_rejects_bad_input(p, c):
    with pytest.raises(ValueError):
        key_size(p, c)


@pytest.mark.parametrize("p,s", [(0.5, -1), (0.5, 1.5), (2.0, 3), (0.5, True)])
def test_detection_confidence_rejects_bad_input(p, s):
    with pytest.raises(ValueError):
        detection_confidence(p, s)
