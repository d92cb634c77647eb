"""Evaluation: how well each marker method detects each attack, under each prediction API.

``campaign`` runs the measurements (``run_evaluation`` -> ``Evaluation``), ``protocol`` holds the
resampled selections and detection curves, ``report`` writes markdown, CSV and ``results.json``
(``write_report``), and ``plots`` draws the figures. ``adversary`` measures the same against an
operator who sees the queries and routes suspected markers to the original model
(``run_adversary`` -> ``AdversaryEvaluation``, ``adversary_report.write_adversary_report``), with
the routers of ``routers`` scored as ``routing`` does. The result types and their JSON live in
``results``; the phases both runners share (bags, attacked models, progress, timing) in ``runner``.
"""

from __future__ import annotations

from .adversary import Traffic, run_adversary
from .adversary_report import write_adversary_report
from .campaign import DEFAULT_SPECS, run_evaluation
from .report import write_report
from .results import AdversaryEvaluation, Evaluation

__all__ = [
    "DEFAULT_SPECS",
    "AdversaryEvaluation",
    "Evaluation",
    "Traffic",
    "run_adversary",
    "run_evaluation",
    "write_adversary_report",
    "write_report",
]
