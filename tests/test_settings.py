"""Settings objects checked by the plug-ins' constraint machinery (``_params.Settings``)."""

from __future__ import annotations

from dataclasses import FrozenInstanceError, dataclass
from typing import Any, ClassVar

import pytest

from tamperprobe._params import Interval, Options, Settings
from tamperprobe.errors import UsageError
from tamperprobe.evaluation.settings import campaign_settings as _settings


@dataclass(frozen=True)
class Retry(Settings):
    attempts: int
    backoff: float
    mode: str = "exponential"
    limit: float | None = None

    constraints: ClassVar[dict[str, Any]] = {
        "attempts": Interval(1, 10, integer=True),
        "backoff": Interval(0, None, closed="neither"),
        "mode": Options("exponential", "constant"),
    }
    labels: ClassVar[dict[str, str]] = {"attempts": "--retries"}

    def _check_together(self) -> None:
        if self.limit is not None and self.limit < self.backoff:
            raise UsageError(f"the backoff limit {self.limit} is below the backoff {self.backoff}")


def test_fields_are_coerced_and_checked_when_built() -> None:
    r = Retry(attempts="3", backoff="0.5", limit="2")  # type: ignore[arg-type]  # text, as from a command line
    assert (r.attempts, r.backoff, r.limit) == (3, 0.5, 2.0) and isinstance(r.attempts, int)
    assert r.to_json() == {"attempts": 3, "backoff": 0.5, "mode": "exponential", "limit": 2.0}
    with pytest.raises(FrozenInstanceError):
        r.attempts = 4  # type: ignore[misc]
    for kwargs, message in [
        ({"attempts": 0, "backoff": 1.0}, "--retries must be in [1, 10], got 0"),
        ({"attempts": 2.5, "backoff": 1.0}, "--retries must be a whole number, got 2.5"),
        ({"attempts": True, "backoff": 1.0}, "--retries must be a whole number, got True"),
        ({"attempts": 2, "backoff": 0.0}, "backoff must be > 0, got 0.0"),
        ({"attempts": 2, "backoff": 1.0, "mode": "linear"}, "unknown mode 'linear': choose one of exponential, constant"),
        ({"attempts": 2, "backoff": 1.0, "limit": 0.5}, "the backoff limit 0.5 is below the backoff 1.0"),
    ]:
        with pytest.raises(UsageError, match=f"^{message.replace('[', '[[]').replace('(', '[(]').replace(')', '[)]')}$"):
            Retry(**kwargs)


def test_campaign_settings_are_settings() -> None:
    s = _settings(["top1", "top1"], 2, 10, "manc", 100, 0, 0.3, [], None, 0.5, None, 0)
    assert isinstance(s, Settings) and s.attack_samples is None and len(s.specs) == 1
    bad = {"trials": 0, "test_fraction": 1.0, "attack_samples": -1, "select": "best", "manc_fraction": 0.0}
    messages = {
        "trials": "--trials must be >= 1, got 0",
        "test_fraction": "--test-fraction must be in (0, 1), got 1.0",
        "attack_samples": "--attack-samples must be at least 0 (0: all), got -1",
        "select": "unknown selection 'best': choose one of manc, random",
        "manc_fraction": "manc_fraction must be in (0, 1], got 0.0",
    }
    for key, value in bad.items():
        args: dict[str, Any] = dict(specs=["top1"], trials=2, bag=10, select="manc", resamples=100, seed=0, test_fraction=0.3)
        args |= dict(runtimes=[], tolerance=None, manc_fraction=0.5, layer=None, attack_samples=None)
        args[key] = value
        with pytest.raises(UsageError) as info:
            _settings(**args)
        assert str(info.value) == messages[key]
