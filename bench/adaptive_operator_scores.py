"""Summary of the score-API plan of the adaptive-operator benchmark (placeholder until the tables are written)."""

from __future__ import annotations

from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "bench" / "results"


def write_scores(settings: list[str]) -> Path:
    return OUT / "adaptive-operator-scores.md"
