"""Key commands: ``keygen`` (signing and encryption keys) and ``sign`` (sign an existing fingerprint file)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ._common import console, err_console, handled
from ._options import FingerprintArgument, PassphraseEnvOption, VouchNameOption, VouchVersionOption, passphrase_from_env


def keygen(
    private: Annotated[Optional[Path], typer.Argument(help="Private key file to write (default: the signing key in the config folder).")] = None,
    public: Annotated[Optional[Path], typer.Option("--public", help="Public key file to write (default: PRIVATE with suffix .pub).")] = None,
    passphrase_env: PassphraseEnvOption = None,
    trust: Annotated[bool, typer.Option("--trust/--no-trust", help="Also trust the new public key on this machine.")] = True,
    secret: Annotated[
        Optional[Path], typer.Option("--secret", help="Instead, write a 256-bit secret key for encrypting fingerprints at rest.")
    ] = None,
) -> None:
    """Make an Ed25519 key pair for signing fingerprints (private key mode 0600), or a secret key for encryption at rest."""
    with handled():
        from .. import signing

        if secret is not None:
            signing.generate_secret_key(secret)
            console.print(f"wrote secret key {secret} (mode 0600): fingerprint --encrypt-key {secret}; verify --decrypt-key {secret}")
            return
        passphrase = passphrase_from_env(passphrase_env)
        priv = private if private is not None else signing.default_signing_key_path()
        priv_path, pub_path = signing.generate_keypair(priv, public, passphrase=passphrase)
        kid = signing.key_id(signing.load_public_key(pub_path))
        console.print(f"wrote private key {priv_path} (mode 0600{', passphrase-protected' if passphrase else ''}) and public key {pub_path}")
        console.print(f"key id {kid}")
        if trust:
            trusted = signing.trust_public_key(pub_path)
            console.print(f"trusted on this machine: {trusted}; copy {pub_path} to every machine that verifies")


def sign(
    fp_path: FingerprintArgument,
    key: Annotated[Optional[Path], typer.Option("--key", help="Private key (default: the signing key in the config folder).")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="File to write (default: overwrite FP).")] = None,
    passphrase_env: PassphraseEnvOption = None,
    encrypt_key: Annotated[Optional[Path], typer.Option("--encrypt-key", help="Also encrypt the file at rest with this secret key.")] = None,
    decrypt_key: Annotated[Optional[Path], typer.Option("--decrypt-key", help="Secret key of an encrypted FP.")] = None,
    model_name: VouchNameOption = None,
    model_version: VouchVersionOption = None,
) -> None:
    """Sign a fingerprint you vouch for (an unsigned file, or a version 1 file, which it upgrades to version 2).

    With --model-name and --model-version it also records which model it vouches for (a new
    fingerprint id), so that verify --expect NAME:VERSION refuses any other fingerprint.
    """
    with handled():
        from .. import signing
        from ..fingerprint import load, save, with_identity

        secret = signing.load_secret_key(decrypt_key)
        fp = load(fp_path, trust=signing.Trust.from_sources(allow_unsigned=True), secret_key=secret, require_encrypted=decrypt_key is not None)
        fp = with_identity(fp, model_name, model_version)
        key_path = key if key is not None else signing.default_signing_key_path()
        private = signing.load_private_key(key_path, passphrase_from_env(passphrase_env))
        target = out if out is not None else fp_path
        save(fp, target, sign_key=private, encrypt_key=signing.load_secret_key(encrypt_key, env=None))
        if fp.version < 2:
            err_console.print(f"[yellow]note:[/] {fp_path} was format v{fp.version}; {target} is v2", highlight=False)
        what = f" for {fp.model_name}:{fp.model_version}" if fp.model_name is not None else ""
        console.print(f"signed {target} (fingerprint {fp.id}{what}) with key {signing.key_id(private.public_key())}", highlight=False)


def register(app: typer.Typer) -> None:
    app.command()(keygen)
    app.command()(sign)
