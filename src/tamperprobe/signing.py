"""Keys, signatures and encryption at rest for fingerprint files.

A fingerprint is evidence only if it is authentic: whoever can rewrite the expected outputs (or
the tolerance) can make any model verify INTACT. So the owner signs every fingerprint with an
Ed25519 private key, and verification accepts a file only when its signature checks against a
*trusted* public key. The signature covers a SHA-256 digest of every tensor and every metadata
field of the file (``fingerprint.content_digest``), so nothing that influences a verdict can be
changed without the private key.

The markers are also the owner's secret (whoever holds them can special-case them), so a file
can be encrypted at rest with a symmetric key (AES-256-GCM, an AEAD: a wrong key or any altered
byte is detected before anything is parsed).

Key files:

* private key: PKCS#8 PEM, written with mode 0600, optionally encrypted with a passphrase;
* public key: SubjectPublicKeyInfo PEM; its *key id* is the first 16 hex digits of the SHA-256 of
  the raw 32-byte key, recorded in every signature;
* secret (encryption) key: 32 random bytes, stored as 64 hex digits (mode 0600), or given as
  64 hex digits in an environment variable.

Trusted public keys come from exactly one source, the first given of: ``--trust-key FILE``
(repeatable), the environment variable ``TAMPERPROBE_TRUST_KEYS`` (files separated by ``:``), or
every ``*.pub`` file in the trusted-keys folder (``trusted_keys_dir()``, under the user's config
folder). Naming keys means exactly these keys: the folder's are not added to them.

Whoever can write a trusted key can forge any fingerprint, so trusted keys are checked as sshd's
``StrictModes`` checks ``authorized_keys`` (``check_key_file``): a key file and every folder above
it up to the home folder (or up to a root-owned sticky folder such as ``/tmp``) must be owned by
the user or root and not writable by group or others; in the trusted-keys folder the folder itself
and its key files must not be symbolic links (a link could point anywhere). Anything else is
refused with a one-line error naming the path. Folders and key files tamperprobe creates get
modes 0700 and 0644, whatever the umask.
"""

from __future__ import annotations

import base64
import hashlib
import os
import secrets
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import AuthenticityError, UsageError

ALGORITHM = "ed25519"
ENCRYPTION_MAGIC = b"TPFENC1\n"  # an encrypted fingerprint starts with these bytes
_NONCE = 12
TRUST_ENV = "TAMPERPROBE_TRUST_KEYS"
SECRET_ENV = "TAMPERPROBE_FINGERPRINT_KEY"
SIGNING_KEY_ENV = "TAMPERPROBE_SIGNING_KEY"


def config_dir() -> Path:
    """tamperprobe's folder in the user's config folder (``$XDG_CONFIG_HOME/tamperprobe`` on Linux)."""
    import platformdirs

    return Path(platformdirs.user_config_dir("tamperprobe"))


def trusted_keys_dir() -> Path:
    """The folder whose ``*.pub`` files are trusted by default."""
    return config_dir() / "trusted-keys"


def default_signing_key_path() -> Path:
    """The owner's signing key: ``$TAMPERPROBE_SIGNING_KEY``, else ``signing-key.pem`` in the config folder."""
    env = os.environ.get(SIGNING_KEY_ENV, "").strip()
    return Path(env) if env else config_dir() / "signing-key.pem"


def ensure_signing_key(passphrase: bytes | None = None) -> tuple[Path, bool]:
    """The default signing key's path, creating the key pair on first use; ``True`` when it was just created.

    A new key's public half is also copied into the trusted-keys folder, so fingerprints made on this
    machine verify on this machine; other machines need the public key copied to them.
    """
    path = default_signing_key_path()
    if path.exists():
        return path, False
    _, pub = generate_keypair(path, path.with_suffix(".pub"), passphrase=passphrase)
    trust_public_key(pub)
    return path, True


def _private_dir(folder: Path) -> None:
    """Create ``folder`` (and missing parents) with mode 0700: a folder only its owner can write, whatever the umask."""
    missing = [f for f in (folder, *folder.parents) if not f.exists()]
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    for f in missing:
        f.chmod(0o700)


def trust_public_key(public_path: str | os.PathLike) -> Path:
    """Copy a public key into the trusted-keys folder as ``<key id>.pub`` (mode 0644; the folder 0700 when created); returns the copy."""
    pub = Path(public_path)
    kid = key_id(load_public_key(pub))
    folder = trusted_keys_dir()
    _private_dir(folder)
    target = folder / f"{kid}.pub"
    data = pub.read_bytes()
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0), 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    target.chmod(0o644)
    return target


# ------------------------------------------------------------------------ key files


def _write_private(path: Path, data: bytes) -> None:
    """Create ``path`` with mode 0600 before any secret byte is written; refuse to overwrite."""
    if not path.parent.exists():
        _private_dir(path.parent)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise UsageError(f"{path} exists: refusing to overwrite a key (move it away first)") from None
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def generate_keypair(
    private_path: str | os.PathLike, public_path: str | os.PathLike | None = None, *, passphrase: bytes | None = None
) -> tuple[Path, Path]:
    """Write a new Ed25519 key pair: the private key (mode 0600, encrypted when a passphrase is given) and the public key."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    if passphrase is not None and not passphrase:
        raise UsageError("an empty passphrase protects nothing: give none or a real one")
    priv_path = Path(private_path)
    pub_path = Path(public_path) if public_path is not None else priv_path.with_suffix(".pub")
    if pub_path.exists():
        raise UsageError(f"{pub_path} exists: refusing to overwrite a key (move it away first)")
    key = Ed25519PrivateKey.generate()
    enc: serialization.KeySerializationEncryption = serialization.BestAvailableEncryption(passphrase) if passphrase else serialization.NoEncryption()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc)
    _write_private(priv_path, pem)
    pub = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    pub_path.write_bytes(pub)
    return priv_path, pub_path


def load_private_key(path: str | os.PathLike, passphrase: bytes | None = None) -> Any:
    """An Ed25519 private key from a PEM file (``passphrase`` for an encrypted one)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read signing key {p}: {exc.strerror or exc}") from None
    try:
        key = serialization.load_pem_private_key(raw, password=passphrase or None)
    except TypeError:
        if passphrase:
            raise UsageError(f"signing key {p} is not passphrase-protected: give no passphrase") from None
        raise UsageError(f"signing key {p} is passphrase-protected: give its passphrase (--passphrase-env VAR)") from None
    except ValueError:
        raise UsageError(f"{p} is not a readable PEM private key (or the passphrase is wrong)") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise UsageError(f"{p} is not an Ed25519 private key")
    return key


def load_public_key(path: str | os.PathLike) -> Any:
    """An Ed25519 public key from a PEM file."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read public key {p}: {exc.strerror or exc}") from None
    try:
        key = serialization.load_pem_public_key(raw)
    except ValueError:
        raise UsageError(f"{p} is not a readable PEM public key") from None
    if not isinstance(key, Ed25519PublicKey):
        raise UsageError(f"{p} is not an Ed25519 public key")
    return key


def key_id(public_key: Any) -> str:
    """First 16 hex digits of the SHA-256 of the raw public key."""
    from cryptography.hazmat.primitives import serialization

    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


# ------------------------------------------------------------------------ signatures


def sign(digest: bytes, private_key: Any) -> dict[str, str]:
    """A signature record over ``digest``: algorithm, key id, base64 signature."""
    sig = private_key.sign(digest)
    return {"alg": ALGORITHM, "key_id": key_id(private_key.public_key()), "sig": base64.b64encode(sig).decode("ascii")}


@dataclass(frozen=True)
class Trust:
    """Which fingerprint files to accept: signed by one of ``keys``; unsigned ones only with ``allow_unsigned``."""

    keys: tuple[Any, ...] = ()
    allow_unsigned: bool = False
    sources: tuple[str, ...] = field(default=())

    @classmethod
    def from_sources(cls, files: Iterable[str | os.PathLike] | None = None, *, allow_unsigned: bool = False, use_defaults: bool = True) -> Trust:
        """Exactly the keys in ``files`` when any is given; else (when ``use_defaults``) those of ``$TAMPERPROBE_TRUST_KEYS``
        when set, else those of the trusted-keys folder. Every key file is checked (``check_key_file``) before it is read."""
        paths: list[Path] = [Path(f) for f in files or []]
        if not paths and use_defaults:
            env = os.environ.get(TRUST_ENV, "")
            paths = [Path(p) for p in env.split(os.pathsep) if p.strip()]
            if not paths:
                paths = folder_keys(trusted_keys_dir())
        paths = list(dict.fromkeys(paths))
        for p in paths:
            check_key_file(p)
        keys = tuple(load_public_key(p) for p in paths)
        return cls(keys, allow_unsigned, tuple(str(p) for p in paths))

    def key_ids(self) -> list[str]:
        return [key_id(k) for k in self.keys]

    def source_of(self, kid: str) -> str | None:
        """The file the trusted key ``kid`` was read from (None when unknown: a key given as an object)."""
        for key, source in zip(self.keys, self.sources, strict=False):
            if key_id(key) == kid:
                return source
        return None


def folder_keys(folder: Path) -> list[Path]:
    """The ``*.pub`` files of the trusted-keys ``folder`` (none when it does not exist); a folder or key file that is a
    symbolic link, or a ``*.pub`` that is not a regular file, is refused (``UsageError``)."""
    if not os.path.lexists(folder):
        return []
    if folder.is_symlink():
        raise UsageError(f"trusted-keys folder {folder} is a symbolic link: refusing it (make it a real folder)")
    if not folder.is_dir():
        raise UsageError(f"trusted-keys folder {folder} is not a folder")
    out = []
    for p in sorted(folder.glob("*.pub")):
        if p.is_symlink():
            raise UsageError(f"trusted key {p} is a symbolic link: refusing it (copy the key file into the folder instead)")
        if not p.is_file():
            raise UsageError(f"trusted key {p} is not a regular file")
        out.append(p)
    return out


def _unsafe(st: os.stat_result, uid: int) -> str | None:
    """Why a file or folder with status ``st`` could be changed by someone else than ``uid`` and root, or None."""
    if st.st_uid not in (uid, 0):
        return f"is owned by uid {st.st_uid}, not by you (uid {uid}) or root"
    if st.st_mode & 0o022:
        who = "group and others" if st.st_mode & 0o022 == 0o022 else ("group" if st.st_mode & 0o020 else "others")
        return f"is writable by {who} (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


def check_key_file(path: str | os.PathLike) -> None:
    """Refuse (``UsageError``, naming the path) a trusted key that someone else than the user or root could have written.

    Checked as sshd's ``StrictModes``: the key file (a link followed to its target) and every
    folder above it, up to and including the home folder, or up to a root-owned folder with the
    sticky bit (``/tmp``: nobody else can replace entries there), must be owned by the user or root
    and not writable by group or others. Not on systems without POSIX owners (Windows).
    """
    if os.name != "posix":
        return
    uid = os.geteuid()
    p = Path(path)
    try:
        real = p.resolve(strict=True)
        st = real.stat()
    except OSError as exc:
        raise UsageError(f"cannot read public key {p}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(st.st_mode):
        raise UsageError(f"trusted key {p} is not a regular file")
    why = _unsafe(st, uid)
    if why:
        raise UsageError(f"trusted key {p} {why}: refusing it (chown/chmod go-w it, as sshd's StrictModes would ask)")
    try:
        home: Path | None = Path.home().resolve()
    except (RuntimeError, KeyError, OSError):
        home = None
    for folder in real.parents:
        st = folder.stat()
        if st.st_uid == 0 and st.st_mode & stat.S_ISVTX:
            return  # /tmp and the like: entries below cannot be replaced by others
        why = _unsafe(st, uid)
        if why:
            raise UsageError(f"folder {folder} above trusted key {p} {why}: refusing the key (chown/chmod go-w the folder)")
        if folder == home:
            return


def check_signature(digest: bytes, record: Any, trust: Trust, what: str) -> str:
    """The signer's key id when ``record`` is a valid signature of ``digest`` by a trusted key; else AuthenticityError."""
    from cryptography.exceptions import InvalidSignature

    if not isinstance(record, dict) or record.get("alg") != ALGORITHM or not isinstance(record.get("sig"), str):
        raise AuthenticityError(f"{what}: malformed signature record")
    kid = str(record.get("key_id", ""))
    if not trust.keys:
        raise AuthenticityError(f"{what} is signed by key {kid[:16]} but no public key is trusted: pass --trust-key FILE or set {TRUST_ENV}")
    try:
        sig = base64.b64decode(record["sig"], validate=True)
    except ValueError:
        raise AuthenticityError(f"{what}: malformed signature") from None
    for key in trust.keys:
        if key_id(key) != kid:
            continue
        try:
            key.verify(sig, digest)
        except InvalidSignature:
            raise AuthenticityError(f"{what}: the signature does not match the contents (the file was altered)") from None
        return kid
    raise AuthenticityError(f"{what} is signed by key {kid[:16]}, which is not among the trusted keys ({', '.join(trust.key_ids())})")


# ------------------------------------------------------------------------ encryption at rest


def generate_secret_key(path: str | os.PathLike) -> Path:
    """Write a new 256-bit secret key for encryption at rest (64 hex digits, mode 0600)."""
    p = Path(path)
    _write_private(p, secrets.token_hex(32).encode("ascii") + b"\n")
    return p


def parse_secret_key(text: str | bytes, what: str) -> bytes:
    raw = text.decode("ascii", "replace") if isinstance(text, bytes) else text
    raw = raw.strip()
    try:
        key = bytes.fromhex(raw)
    except ValueError:
        key = b""
    if len(key) != 32:
        raise UsageError(f"{what} must hold a 256-bit key as 64 hex digits (tamperprobe keygen --secret FILE makes one)")
    return key


def load_secret_key(path: str | os.PathLike | None = None, env: str | None = SECRET_ENV) -> bytes | None:
    """The encryption key from a file, else from the environment variable ``env``; None when neither is given."""
    if path is not None:
        p = Path(path)
        try:
            return parse_secret_key(p.read_bytes(), f"key file {p}")
        except OSError as exc:
            raise UsageError(f"cannot read key file {p}: {exc.strerror or exc}") from None
    if env and os.environ.get(env):
        return parse_secret_key(os.environ[env], f"${env}")
    return None


def secret_key_id(key: bytes) -> str:
    return hashlib.sha256(b"tamperprobe-secret-key\0" + key).hexdigest()[:16]


def encrypt(data: bytes, key: bytes) -> bytes:
    """``MAGIC || key id (16 hex) || nonce || AES-256-GCM(data)``; the header is authenticated too."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    nonce = secrets.token_bytes(_NONCE)
    header = ENCRYPTION_MAGIC + secret_key_id(key).encode("ascii")
    return header + nonce + AESGCM(key).encrypt(nonce, data, header)


def is_encrypted(head: bytes) -> bool:
    return head.startswith(ENCRYPTION_MAGIC)


def decrypt(blob: bytes, key: bytes | None, what: str) -> bytes:
    """The plaintext of an ``encrypt`` blob; a missing or wrong key, or an altered byte, is an error."""
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    n = len(ENCRYPTION_MAGIC)
    header, nonce, body = blob[: n + 16], blob[n + 16 : n + 16 + _NONCE], blob[n + 16 + _NONCE :]
    kid = header[n:].decode("ascii", "replace")
    if len(kid) != 16 or any(c not in "0123456789abcdef" for c in kid):  # not a key id: the header itself is damaged
        raise AuthenticityError(f"{what}: encrypted file header is damaged (no key id after the magic)")
    if key is None:
        raise UsageError(f"{what} is encrypted (key {kid}): give the key with --decrypt-key FILE or ${SECRET_ENV}")
    if secret_key_id(key) != kid:
        raise UsageError(f"{what} is encrypted with key {kid}, not with the given key {secret_key_id(key)}")
    if len(nonce) != _NONCE or not body:
        raise AuthenticityError(f"{what}: encrypted file is truncated")
    try:
        return AESGCM(key).decrypt(nonce, body, header)
    except InvalidTag:
        raise AuthenticityError(f"{what}: encrypted contents were altered or damaged") from None


def describe_keys(keys: Sequence[Any]) -> str:
    return ", ".join(key_id(k) for k in keys) or "(none)"
