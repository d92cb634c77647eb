"""Command-line options shared by several commands, each declared once (``Annotated`` aliases).

A command writes ``weights: WeightsOption = None`` instead of repeating the declaration, so a
shared option has one name, one help text and one default everywhere.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, List, Optional

import typer

ModelArgument = Annotated[
    str, typer.Argument(help="Model: .pt (TorchScript), .pt2 (torch.export), .onnx, or package.module:attribute (an nn.Module, class or factory).")
]
FingerprintArgument = Annotated[Path, typer.Argument(metavar="FP", help="Fingerprint file.")]
WeightsOption = Annotated[
    Optional[str], typer.Option("--weights", help=".safetensors or state_dict file for the model (read without unpickling code).")
]
ModelArgOption = Annotated[
    Optional[List[str]],
    typer.Option(
        "--model-arg",
        help="Keyword argument key=value for a package.module:attribute class or factory (repeatable; JSON values), "
        "e.g. --model-arg model_name=resnet18 --model-arg num_classes=10.",
    ),
]
DataOption = Annotated[str, typer.Option("--data", help="Natural inputs: .npz with x (and y), an IDX folder, or digits / mnist5k.")]
LowOption = Annotated[Optional[float], typer.Option("--low", help="Lower end of the input range (default: inferred from the data).")]
HighOption = Annotated[Optional[float], typer.Option("--high", help="Upper end of the input range (default: inferred from the data).")]
SeedOption = Annotated[int, typer.Option("--seed", help="Seed of every random choice.")]
ParamOption = Annotated[Optional[List[str]], typer.Option("--param", help="Hyper-parameter key=value (repeatable), e.g. epsilon=0.1.")]
ThreadsOption = Annotated[
    Optional[int],
    typer.Option(
        "--threads",
        help="Torch threads for running the model (default: $TAMPERPROBE_THREADS, else 1; 0: torch's default of one per core). "
        "One, because on a machine shared with other jobs more threads wait for each other: on 2 busy cores, torch's default of 2 "
        "threads made generation and inference 4-86x slower than one (bench/results/threads.md). Raise it on an idle machine with many cores.",
        show_default=False,
    ),
]
DeviceOption = Annotated[
    Optional[str],
    typer.Option(
        "--device",
        help="Where the model runs: cpu (default), cuda or cuda:N. Markers and recorded outputs come back as CPU float32.",
        show_default=False,
    ),
]
HistoryOption = Annotated[
    Optional[Path], typer.Option("--history", help="SQLite history file (default: $TAMPERPROBE_HISTORY or the user data folder).")
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print the result as JSON.")]

# ------------------------------------------------------------------ keys, signatures, encryption at rest

SignKeyOption = Annotated[
    Optional[Path], typer.Option("--sign-key", help="Ed25519 private key to sign with (default: your signing key, created on first use).")
]
UnsignedOption = Annotated[bool, typer.Option("--unsigned", help="Write an unsigned fingerprint (verification then needs --allow-unsigned).")]
PassphraseEnvOption = Annotated[
    Optional[str], typer.Option("--passphrase-env", help="Environment variable holding the private key's passphrase (never on the command line).")
]
EncryptKeyOption = Annotated[
    Optional[Path], typer.Option("--encrypt-key", help="Encrypt the file at rest with this secret key (tamperprobe keygen --secret FILE).")
]
TrustKeyOption = Annotated[
    Optional[List[Path]],
    typer.Option(
        "--trust-key",
        help="Trust exactly this public key (repeatable), instead of $TAMPERPROBE_TRUST_KEYS or the trusted-keys config folder. "
        "Key files must be writable only by you or root (as sshd's StrictModes).",
    ),
]
AllowUnsignedOption = Annotated[
    bool, typer.Option("--allow-unsigned", help="Accept an unsigned (or version 1) fingerprint: anyone could have written it. Warned on every run.")
]
DecryptKeyOption = Annotated[
    Optional[Path], typer.Option("--decrypt-key", help="Secret key of an encrypted fingerprint (default: $TAMPERPROBE_FINGERPRINT_KEY).")
]

ExpectOption = Annotated[
    Optional[str],
    typer.Option(
        "--expect",
        help="Refuse any fingerprint but this one: its id (16 hex digits) or the NAME:VERSION of the model it vouches for "
        "(recorded with fingerprint/sign --model-name --model-version). Exit 3 otherwise.",
    ),
]
VouchNameOption = Annotated[
    Optional[str], typer.Option("--model-name", help="Name of the model the fingerprint vouches for (recorded and signed; with --model-version).")
]
VouchVersionOption = Annotated[
    Optional[str], typer.Option("--model-version", help="Version of the model the fingerprint vouches for (recorded and signed; with --model-name).")
]


def use_runtime(threads: int | None, device: str | None) -> Any:
    """Apply ``--threads`` (``_torch.use_threads``) and check ``--device``; returns the ``torch.device`` for ``load_model``.

    Called first in the body of every command that runs a model, so a bad value fails before any work.
    """
    from .._torch import resolve_device, use_threads

    use_threads(threads)
    return resolve_device(device)


def passphrase_from_env(var: str | None) -> bytes | None:
    """The passphrase held by environment variable ``var`` (never taken from the command line)."""
    import os

    from ..errors import UsageError

    if var is None:
        return None
    value = os.environ.get(var)
    if not value:
        raise UsageError(f"environment variable {var} is not set or empty")
    return value.encode()


def load_fingerprint_from_options(
    path: Path, trust_key: list[Path] | None, allow_unsigned: bool, decrypt_key: Path | None, expect: str | None = None
) -> Any:
    """Read and authenticate a fingerprint as the trust options say, and check it is the one expected (``--expect``).

    A decryption key (``--decrypt-key`` or ``$TAMPERPROBE_FINGERPRINT_KEY``) means the file must be
    encrypted; a fingerprint that is not the one ``expect`` names (id or ``NAME:VERSION``,
    ``fingerprint.check_expected``) exits 3 like any other inauthentic file. An accepted unsigned file is warned about.
    """
    from .. import signing
    from ..fingerprint import check_expected, load
    from ._common import err_console

    trust = signing.Trust.from_sources(trust_key, allow_unsigned=allow_unsigned)
    fp = load(path, trust=trust, secret_key=signing.load_secret_key(decrypt_key))
    check_expected(fp, expect, str(path))
    if fp.signer is None:
        err_console.print(
            f"[bold yellow]warning:[/] {path} is not signed (--allow-unsigned): anyone who could write it could have chosen its expected answers",
            highlight=False,
            soft_wrap=True,
        )
    return fp


def save_fingerprint_from_options(
    fp: Any, out: Path, sign_key: Path | None, unsigned: bool, passphrase_env: str | None, encrypt_key: Path | None
) -> str:
    """Write ``fp`` signed as the options say; returns a note on how it was signed (and whether a key was just created)."""
    from .. import signing
    from ..errors import UsageError
    from ..fingerprint import save

    if unsigned and sign_key is not None:
        raise UsageError("give --sign-key or --unsigned, not both")
    passphrase = passphrase_from_env(passphrase_env)
    secret = signing.load_secret_key(encrypt_key, env=None)
    if unsigned:
        save(fp, out, sign_key=None, encrypt_key=secret)
        return "unsigned: verification needs --allow-unsigned"
    note = ""
    if sign_key is None:
        sign_key, created = signing.ensure_signing_key(passphrase)
        if created:
            note = f"; created your signing key {sign_key} (its public key {sign_key.with_suffix('.pub')} is trusted here: copy it to the machines that verify)"
    private = signing.load_private_key(sign_key, passphrase)
    save(fp, out, sign_key=private, encrypt_key=secret)
    return f"signed with key {signing.key_id(private.public_key())}{note}" + (", encrypted" if secret is not None else "")
