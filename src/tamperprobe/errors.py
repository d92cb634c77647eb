"""Error types and the exit codes the CLI maps them to.

A security failure is not a usage error: TAMPERED has its own exit code (1), a fingerprint
that is not authentic (unsigned, untrusted signer, altered after signing) has its own (3),
and every other failure (bad input, unreachable endpoint, damaged file) exits 2. None of
them is ever reported as INTACT.
"""

from __future__ import annotations

EXIT_INTACT = 0
EXIT_TAMPERED = 1
EXIT_ERROR = 2
EXIT_UNTRUSTED = 3


class TamperprobeError(Exception):
    """Base class: a one-line message meant for the user; the CLI exits with `exit_code`."""

    exit_code = EXIT_ERROR


class UsageError(TamperprobeError):
    """The caller asked for something malformed (bad option value, unknown name)."""


class ModelLoadError(TamperprobeError):
    """A model file or reference could not be loaded."""


class DataError(TamperprobeError):
    """A data set could not be read or does not fit the model."""


class FingerprintFormatError(TamperprobeError):
    """A fingerprint file is damaged, altered, truncated or of an unknown version."""


class QueryError(TamperprobeError):
    """A prediction request failed or its answer was malformed."""


class AuthenticityError(TamperprobeError):
    """A fingerprint file is not authentic: unsigned, signed by an untrusted key, or altered after signing.

    A security failure, not a usage error: it has its own exit code so that an alarm can tell a
    forged or swapped fingerprint from a flaky endpoint.
    """

    exit_code = EXIT_UNTRUSTED


class AlteredFileError(AuthenticityError, FingerprintFormatError):
    """A signed fingerprint file whose bytes were changed (damaged or altered): not authentic, exit 3.

    A ``FingerprintFormatError`` too, so that callers catching damage still catch it; its exit code
    is ``AuthenticityError``'s, as for a signature that does not match.
    """


class MissingDependencyError(TamperprobeError):
    """An optional dependency is not installed; the message names the extra that installs it (``_extras``)."""
