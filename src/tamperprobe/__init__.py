"""tamperprobe: prove, through its prediction API alone, that a served classifier is unchanged.

The package is laid out as the pipeline, owner side then served side:

1. **Load** (``models``, ``data``): ``load_model`` takes the real weights (TorchScript, torch.export,
   ONNX, ``package.module:attribute`` or an ``nn.Module``) behind one small ``Model`` protocol;
   ``load_data`` some natural inputs.
2. **Generate** (``owner``): ``create_fingerprint`` grows marker inputs whose outputs react to
   any change of the weights (``owner.methods``: VerIDeep Sensitive-Samples, TamperNN markers,
   boundary-calibrated pairs; one plug-in per file), keeps a few (``owner.selection``: MANC or
   random) and records the intact model's outputs; ``owner.calibrate`` measures benign runtime
   noise, ``owner.budget`` the query budget.
3. **Store** (``fingerprint``, ``signing``): one versioned file, signed with the owner's Ed25519
   key and optionally encrypted; the one contract between the two halves.
4. **Query** (``served``): a *target* answers prediction requests, ``served.targets.LocalTarget``
   in-process or a protocol client from ``served.clients`` for a served endpoint (KServe v2 /
   Open Inference Protocol, TorchServe, TF-Serving, any JSON API).
5. **Compare and decide** (``outputs``, ``served.verify``): an ``OutputSpec`` says what the API
   reveals and holds the one comparison rule; ``verify`` decides INTACT, TAMPERED or
   INCONCLUSIVE; ``served.history`` and ``served.watch`` keep and repeat the verdicts.

Around them: ``server`` (a reference Open Inference Protocol server, ``oip`` the protocol's
shared tables), ``attacks`` (every kind of tampering, one plug-in per file), ``evaluation``
(detection against the number of queries, the papers' tables), ``cli`` (the command line, which
only wires options to these calls) and ``demo``. Private helpers: ``_torch``, ``_util``,
``_params`` (the plug-in convention).
"""

from __future__ import annotations

import os as _os

__version__ = "0.1.0"

# torch's OpenMP threads spin while they wait for each other; on a machine whose cores other jobs
# keep busy, a spinning thread holds a core its partner needs, and two threads ran 4-86x slower
# than one (bench/results/threads.md). Sleeping instead removes that collapse. It takes effect only
# if torch was not imported before tamperprobe, and a value the user set is kept.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

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
