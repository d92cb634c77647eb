"""A campaign's settings, checked once: what ``campaign.run_evaluation`` runs with.

``campaign_settings`` checks the arguments (a ``UsageError`` names the one out of range) and returns
the ``CampaignSettings`` every phase reads; the output specs are parsed and deduplicated, the
runtimes validated (``owner.calibrate.parse_runtimes``), a given tolerance checked.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import UsageError
from ..fingerprint import check_tolerance
from ..outputs import OutputSpec
from ..owner.calibrate import parse_runtimes
from .protocol import SELECTIONS


@dataclass(frozen=True)
class CampaignSettings:
    """The campaign's arguments, checked."""

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
    attack_samples: int | None


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
    """The arguments checked; UsageError for anything out of range."""
    names = list(dict.fromkeys(str(OutputSpec.parse(s)) for s in specs))
    if select not in SELECTIONS:
        raise UsageError(f"unknown selection {select!r}: choose manc or random")
    if trials < 1 or bag < 1 or resamples < 1:
        raise UsageError("--trials, --bag and --resamples must be at least 1")
    if not 0 < test_fraction < 1:
        raise UsageError(f"--test-fraction must be in (0, 1), got {test_fraction}")
    if not 0 < manc_fraction <= 1:
        raise UsageError(f"manc_fraction must be in (0, 1], got {manc_fraction}")
    if attack_samples is not None and attack_samples < 0:
        raise UsageError(f"--attack-samples must be at least 0 (0: all), got {attack_samples}")
    return CampaignSettings(
        specs=tuple(OutputSpec.parse(s) for s in names),
        trials=int(trials),
        bag=int(bag),
        select=select,
        resamples=int(resamples),
        seed=int(seed),
        test_fraction=float(test_fraction),
        runtimes=parse_runtimes(runtimes) if runtimes else (),
        tolerance=None if tolerance is None else check_tolerance(tolerance),
        manc_fraction=float(manc_fraction),
        layer=layer,
        attack_samples=int(attack_samples) if attack_samples else None,
    )
