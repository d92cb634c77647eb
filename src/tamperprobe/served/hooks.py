"""The alarm hook: a shell command run on TAMPERED and when INCONCLUSIVE starts, with the run in its environment.

One helper for every caller (``watch``, and the fleet after it), so the variables a hook sees and
how it is bounded are written once:

``TAMPERPROBE_VERDICT``, ``TAMPERPROBE_SUMMARY``, ``TAMPERPROBE_ENDPOINT`` (without credentials or
query values), ``TAMPERPROBE_PROTOCOL``, ``TAMPERPROBE_FINGERPRINT`` (id),
``TAMPERPROBE_FINGERPRINT_FILE``, ``TAMPERPROBE_SIGNER`` (key id, empty when unsigned),
``TAMPERPROBE_MARKERS`` and ``TAMPERPROBE_DECOYS`` (sent in the run), ``TAMPERPROBE_MISMATCHED``
and ``TAMPERPROBE_FAILED`` (markers and decoys), ``TAMPERPROBE_RUN`` (1, 2, ... within this
session), ``TAMPERPROBE_TIME`` (UTC ISO) and ``TAMPERPROBE_RUNS_LEFT`` (runs the pool can still
supply; empty when unknown). Every value is made inert by ``untrusted.clean``.

The hook runs before the history write (the alarm never waits on the database), so it gets no
history run id; it is bounded by a timeout, and a hook that fails or hangs is a one-line problem
for the caller to warn about, never a lost verdict.
"""

from __future__ import annotations

import os
import subprocess
from typing import TYPE_CHECKING

from .._util import one_line
from .credentials import redact_urls_in
from .untrusted import clean, env_text
from .verify import INCONCLUSIVE, TAMPERED

if TYPE_CHECKING:
    from .session import Run

HOOK_TIMEOUT = 60.0  # seconds a hook may run before it is stopped and reported


def run_hook(command: str, env_vars: dict[str, str], timeout: float = HOOK_TIMEOUT) -> str | None:
    """Run the hook through the shell with ``env_vars`` added; None on success, else a one-line problem."""
    try:
        proc = subprocess.run(command, shell=True, env={**os.environ, **env_vars}, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return f"hook timed out after {timeout:g} s"
    except OSError as exc:
        return f"hook could not start: {one_line(exc)}"
    return None if proc.returncode == 0 else f"hook exited with status {proc.returncode}"


def hook_environment(run: Run, *, endpoint: str, protocol: str, fingerprint_file: str) -> dict[str, str]:
    """The ``TAMPERPROBE_*`` variables a hook sees for ``run`` (see the module doc), secrets removed, text made inert."""
    r = run.report
    values = {
        "TAMPERPROBE_VERDICT": r.verdict,
        "TAMPERPROBE_SUMMARY": r.summary(),
        "TAMPERPROBE_ENDPOINT": redact_urls_in(endpoint),
        "TAMPERPROBE_PROTOCOL": protocol,
        "TAMPERPROBE_FINGERPRINT": r.fingerprint_id,
        "TAMPERPROBE_FINGERPRINT_FILE": fingerprint_file,
        "TAMPERPROBE_SIGNER": r.signer or "",
        "TAMPERPROBE_MARKERS": str(r.marker_count),
        "TAMPERPROBE_DECOYS": str(r.decoy_count),
        "TAMPERPROBE_MISMATCHED": str(r.mismatched),
        "TAMPERPROBE_FAILED": str(r.failed),
        "TAMPERPROBE_RUN": str(run.number),
        "TAMPERPROBE_TIME": run.time,
        "TAMPERPROBE_RUNS_LEFT": "" if r.runs_left is None else str(r.runs_left),
    }
    # the endpoint and the file name are the user's own text (shown without secrets); anything else may carry the server's words:
    # only characters no shell acts on
    return {k: (clean if k in ("TAMPERPROBE_ENDPOINT", "TAMPERPROBE_FINGERPRINT_FILE") else env_text)(v, 1000) for k, v in values.items()}


def wants_hook(run: Run) -> bool:
    """Whether ``run`` raises the hook: TAMPERED, or the first INCONCLUSIVE run of a streak."""
    return run.report.verdict == TAMPERED or (run.report.verdict == INCONCLUSIVE and run.streak == 1)
