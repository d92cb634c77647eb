"""A campaign's settings, checked once: what ``campaign.run_evaluation`` runs with.

``campaign_settings`` checks the arguments (a ``UsageError`` names the one out of range) and returns
the ``CampaignSettings`` every phase reads; the output specs are parsed and deduplicated, the
runtimes validated (``owner.calibrate.parse_runtimes``), a given tolerance checked.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from .._params import Interval, Options, Settings
from ..fingerprint import check_tolerance
from ..outputs import OutputSpec
from ..owner.calibrate import parse_runtimes
from .protocol import SELECTIONS


@dataclass(frozen=True)
class CampaignSettings(Settings):
    """The campaign's arguments, checked when built (``_params.Settings``: the constraints below)."""

    specs: tuple[OutputSpec, ...]
    trials: int
    bag: int
    select: str
    resamples: int
    seed: int
    test_fraction: float
    runtimes: tuple[str, ...]
    tolerance: float | None  # None: measured per method, as a fingerprint sets it
    manc_fraction: float
    layer: str | None
    attack_samples: int | None  # None: all of the training data

    constraints: ClassVar[dict[str, Any]] = {
        "trials": Interval(1, None, integer=True),
        "bag": Interval(1, None, integer=True),
        "select": Options(*SELECTIONS),
        "resamples": Interval(1, None, integer=True),
        "test_fraction": Interval(0, 1, closed="neither"),
        "manc_fraction": Interval(0, 1, closed="right"),
        "attack_samples": Interval(0, None, integer=True, text="at least 0 (0: all)"),
    }
    labels: ClassVar[dict[str, str]] = {
        "trials": "--trials",
        "bag": "--bag",
        "select": "selection",
        "resamples": "--resamples",
        "test_fraction": "--test-fraction",
        "attack_samples": "--attack-samples",
    }


def campaign_settings(
    specs: Sequence[str],
    trials: int,
    bag: int,
    select: str,
    resamples: int,
    seed: int,
    test_fraction: float,
    runtimes: Sequence[str],
    tolerance: float | None,
    manc_fraction: float,
    layer: str | None,
    attack_samples: int | None = None,
) -> CampaignSettings:
    """The arguments checked (``CampaignSettings`` declares the ranges); UsageError for anything out of range."""
    names = list(dict.fromkeys(str(OutputSpec.parse(s)) for s in specs))
    return CampaignSettings(
        specs=tuple(OutputSpec.parse(s) for s in names),
        trials=trials,
        bag=bag,
        select=select,
        resamples=resamples,
        seed=seed,
        test_fraction=test_fraction,
        runtimes=parse_runtimes(runtimes) if runtimes else (),
        tolerance=None if tolerance is None else check_tolerance(tolerance),
        manc_fraction=manc_fraction,
        layer=layer,
        attack_samples=attack_samples or None,
    )
