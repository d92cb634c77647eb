"""Evaluation: how well each marker method detects each attack, under each prediction API.

``campaign`` runs the measurements (``run_evaluation`` -> ``Evaluation``), ``protocol`` holds the
resampled selections and detection curves, ``report`` writes markdown, CSV and ``results.json``
(``write_report``), and ``plots`` draws the figures.
"""

from __future__ import annotations

from .campaign import DEFAULT_SPECS, Evaluation, run_evaluation
from .report import write_report

__all__ = ["DEFAULT_SPECS", "Evaluation", "run_evaluation", "write_report"]
