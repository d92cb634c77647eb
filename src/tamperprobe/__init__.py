"""tamperprobe: prove, through its prediction API alone, that a served classifier is unchanged.

The flow, owner side then served side:

1. ``load_model`` the real weights and ``load_data`` some natural inputs;
2. ``create_fingerprint`` generates marker inputs whose outputs react to any change of the
   weights (VerIDeep Sensitive-Samples, TamperNN markers, boundary-calibrated pairs), keeps a
   few (MANC or random selection) and records the intact model's outputs;
3. ``save_fingerprint`` / ``load_fingerprint`` store it in one versioned, checksummed file;
4. a *target* answers prediction requests: ``LocalTarget`` for a model in-process, or a client
   from ``tamperprobe.served.clients.make_client`` for a served endpoint;
5. ``verify`` compares the answers under an ``OutputSpec`` (what the API reveals) and decides
   INTACT, TAMPERED or INCONCLUSIVE.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .data import Dataset, InputSpec, load_data
from .errors import TamperprobeError
from .fingerprint import Fingerprint
from .fingerprint import load as load_fingerprint
from .fingerprint import save as save_fingerprint
from .models import Model, load_model
from .outputs import Answer, OutputSpec
from .owner.generate import create_fingerprint
from .served.targets import LocalTarget, QueryFailure, Target
from .served.verify import INCONCLUSIVE, INTACT, TAMPERED, Report, verify

__all__ = [
    "Answer",
    "Dataset",
    "Fingerprint",
    "INCONCLUSIVE",
    "INTACT",
    "InputSpec",
    "Model",
    "LocalTarget",
    "OutputSpec",
    "QueryFailure",
    "Report",
    "TAMPERED",
    "Target",
    "TamperprobeError",
    "create_fingerprint",
    "load_data",
    "load_fingerprint",
    "load_model",
    "save_fingerprint",
    "verify",
]
