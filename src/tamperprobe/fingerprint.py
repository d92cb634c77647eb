"""The fingerprint: secret marker inputs and the intact model's outputs, in one signed file.

The file is a safetensors archive (no pickle). Tensors: ``inputs`` (exactly as sent),
``logits`` and ``probs`` of the intact model (float32), ``seeds`` (the natural inputs the
markers started from), optionally ``groups`` (markers that belong together: sent in the same
run) and optionally ``decoy_inputs`` and ``decoy_logits``: natural inputs with the intact model's
logits, mixed among the markers of a run so that an operator cannot tell how many of a run's
queries are markers (``served.pool``). The header
metadata key ``tamperprobe`` holds JSON: the format tag ``tamperprobe.fingerprint/v2``, the
input spec, the generator with every parameter and the seed, the digest of the model weights,
the intended output spec, the comparison tolerance, the creation time, optionally ``per_run`` (the
markers a verification run draws from the pool by default), optionally ``model_name`` and
``model_version`` (what the fingerprint vouches for, with the weight digest: ``verify --expect
NAME:VERSION`` refuses any other fingerprint, ``check_expected``), ``sha256`` (the *content
digest*: SHA-256 over the canonical JSON of every other metadata field and over every tensor's
name, dtype, shape and bytes) and ``signature``: an Ed25519 signature of the content digest
(``tamperprobe.signing``). Anyone can recompute a checksum; only the holder of the private key
can sign, so ``load`` accepts a file only when a trusted public key verifies its signature
(or, on explicit request, an unsigned file). The fingerprint id is the first 16 hex digits of
the content digest, so it changes with any tensor or any metadata field. The decoy tensors and
``per_run`` are written only when set, so a file without them (every file written before they
existed) reads, verifies and keeps its id exactly as before: it simply has no decoys. The same
holds for ``model_name`` and ``model_version``: optional keys of the v2 payload, absent in older
files (whose ids are unchanged), covered by the digest and the signature when present.

Version 1 files (no signature; the id covered the tensors only) are still read, as unsigned
files. A file may also be encrypted at rest (``signing.encrypt``): then the whole archive is an
AEAD ciphertext and reading it needs the secret key.

Keep the file private: whoever holds the markers can special-case them.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import struct
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, overload

import numpy as np

from ._util import atomic_write, one_line
from .data import InputSpec
from .errors import AlteredFileError, AuthenticityError, FingerprintFormatError, UsageError
from .outputs import DEFAULT_TOLERANCE, OutputSpec, softmax64

FORMAT = "tamperprobe.fingerprint"
VERSION = 2
MAX_TOLERANCE = 0.01  # logit units: far above any benign runtime noise, far below a boundary margin's use
_SIGNED_PREFIX = b"tamperprobe.fingerprint/v2\0"
_NOT_CONTENT = ("sha256", "signature")


def check_tolerance(value: Any, what: str = "tolerance") -> float:
    """A finite tolerance in ``[0, MAX_TOLERANCE]`` (logit units); anything else is a UsageError."""
    try:
        tol = float(value)
    except (TypeError, ValueError):
        raise UsageError(f"{what} must be a number, got {value!r}") from None
    if not math.isfinite(tol) or not 0.0 <= tol <= MAX_TOLERANCE:
        raise UsageError(f"{what} must be a finite number in [0, {MAX_TOLERANCE:g}] (logit units), got {value!r}")
    return tol


@dataclass(frozen=True)
class Fingerprint:
    inputs: np.ndarray  # (n, *input_spec.shape), dtype input_spec.dtype
    logits: np.ndarray  # (n, C) float32, the intact model's logits
    probs: np.ndarray  # (n, C) float32, softmax of logits
    input_spec: InputSpec
    generator: dict[str, Any]  # {"method": str, "params": {...}, "seed": int, "selection": str, "bag": int}
    model_digest: str
    output_spec: str = "logits"
    tolerance: float = DEFAULT_TOLERANCE
    created: str = ""
    seeds: np.ndarray | None = None
    groups: np.ndarray | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    decoy_inputs: np.ndarray | None = None  # (d, *input_spec.shape), dtype input_spec.dtype: natural inputs
    decoy_logits: np.ndarray | None = None  # (d, C) float32, the intact model's logits on them
    per_run: int | None = None  # markers a verification run draws by default (None: the served side's default)
    model_name: str | None = None  # the model this fingerprint vouches for (with model_digest), e.g. "fraud-scorer"
    model_version: str | None = None  # its version, e.g. "2025-03" or "v4.1"
    version: int = field(default=VERSION, compare=False)  # the format version it was read from (or will be written as)
    signer: str | None = field(default=None, compare=False)  # key id whose signature was verified on reading

    def __len__(self) -> int:
        return len(self.inputs)

    @property
    def classes(self) -> int:
        return int(self.logits.shape[1])

    @property
    def id(self) -> str:
        """A short content id: equal for identical fingerprints, different when any tensor or metadata field differs.

        (Version 1 files keep the id they were created with, which covered the tensors only.)
        """
        if self.version == 1:
            return _content_digest(self._tensors())[:16]
        return _content_digest(self._tensors(), self._meta())[:16]

    @property
    def labels(self) -> np.ndarray:
        return self.logits.argmax(axis=1)

    @property
    def decoys(self) -> int:
        return 0 if self.decoy_inputs is None else len(self.decoy_inputs)

    def queries(self, kind: str) -> tuple[np.ndarray, np.ndarray]:
        """Inputs (as sent) and intact logits of the ``marker``s or the ``decoy``s (empty arrays when there are none)."""
        if kind == "marker":
            return self.inputs, self.logits
        if kind != "decoy":
            raise ValueError(f"unknown query kind {kind!r}")
        if self.decoy_inputs is None or self.decoy_logits is None:
            return self.inputs[:0], self.logits[:0]
        return self.decoy_inputs, self.decoy_logits

    def _tensors(self) -> dict[str, np.ndarray]:
        out = {"inputs": self.inputs, "logits": self.logits, "probs": self.probs}
        if self.seeds is not None:
            out["seeds"] = self.seeds
        if self.groups is not None:
            out["groups"] = self.groups
        if self.decoy_inputs is not None and self.decoy_logits is not None:
            out["decoy_inputs"] = self.decoy_inputs
            out["decoy_logits"] = self.decoy_logits
        return out

    def _meta(self) -> dict[str, Any]:
        """The metadata as stored (without checksum and signature), JSON-normalised."""
        meta = {
            "format": f"{FORMAT}/v{VERSION}",
            "input_spec": self.input_spec.to_json(),
            "generator": self.generator,
            "model_digest": self.model_digest,
            "output_spec": self.output_spec,
            "tolerance": self.tolerance,
            "created": self.created,
            "extra": self.extra,
        }
        if self.per_run is not None:
            meta["per_run"] = int(self.per_run)
        if self.model_name is not None:
            meta["model_name"] = self.model_name
        if self.model_version is not None:
            meta["model_version"] = self.model_version
        return json.loads(json.dumps(meta, default=_json_default))

    def subset(self, idx: Any) -> Fingerprint:
        """The markers ``idx`` (with their seeds and groups); the decoys are kept, ``per_run`` while it fits."""
        idx = np.asarray(idx, dtype=np.int64)
        return replace(
            self,
            per_run=self.per_run if self.per_run is None or self.per_run <= len(idx) else None,
            inputs=self.inputs[idx],
            logits=self.logits[idx],
            probs=self.probs[idx],
            seeds=None if self.seeds is None else self.seeds[idx],
            groups=None if self.groups is None else self.groups[idx],
        )


_IDENTITY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+/@-]{0,127}")
_FP_ID = re.compile(r"[0-9a-f]{16}")


def _identity(value: Any, what: str) -> str | None:
    """A model name or version as recorded: None, or 1-128 characters of letters, digits and ``._+/@-`` (no ``:``, no spaces)."""
    if value is None:
        return None
    if not isinstance(value, str) or not _IDENTITY.fullmatch(value):
        raise ValueError(f"{what} must be 1-128 letters, digits or ._+/@- starting with a letter or digit, got {str(value)[:40]!r}")
    return value


@overload
def with_identity(fp: Fingerprint, name: str | None, version: str | None) -> Fingerprint: ...
@overload
def with_identity(fp: None, name: str | None, version: str | None) -> None: ...
def with_identity(fp: Fingerprint | None, name: str | None, version: str | None) -> Fingerprint | None:
    """``fp`` recording what it vouches for: model ``name`` and ``version`` (both or neither; ``UsageError`` if malformed).

    This changes the fingerprint's content, so its id (and any signature) is new: sign after it.
    ``fp`` None only checks the two values (the CLI does so before generating).
    """
    if (name is None) != (version is None):
        raise UsageError("give --model-name and --model-version together: a fingerprint vouches for one version of one model")
    try:
        name, version = _identity(name, "--model-name"), _identity(version, "--model-version")
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if name is None or fp is None:
        return fp
    return replace(fp, model_name=name, model_version=version)


def check_expected(fp: Fingerprint, expect: str | None, what: str = "the fingerprint") -> None:
    """Refuse (``AuthenticityError``, exit 3) a fingerprint that is not the one expected; ``expect`` None checks nothing.

    ``expect`` is a fingerprint id (16 hex digits) or ``NAME:VERSION`` of the model it must vouch
    for. A validly signed fingerprint of the same owner for another model or an older version is
    exactly what a swapped file would be, so the check is on what the file says it vouches for.
    """
    if expect is None:
        return
    want = str(expect).strip()
    have = f"{fp.id}" + (f" for {fp.model_name}:{fp.model_version}" if fp.model_name is not None else " (no model name or version recorded)")
    if _FP_ID.fullmatch(want.lower()):
        if fp.id != want.lower():
            raise AuthenticityError(f"{what} is not the fingerprint expected: it is {have}, --expect {want}")
        return
    name, sep, version = want.partition(":")
    if not sep or not name or not version:
        raise UsageError(f"--expect {want[:60]!r}: give a fingerprint id (16 hex digits) or NAME:VERSION")
    if (fp.model_name, fp.model_version) != (name, version):
        raise AuthenticityError(f"{what} is not the fingerprint expected: it is {have}, --expect {want[:140]}")


def make_fingerprint(inputs: np.ndarray, logits: np.ndarray, input_spec: InputSpec, generator: dict, model_digest: str, **kw: Any) -> Fingerprint:
    """Build a fingerprint from the intact model's logits, filling probs and the creation time."""
    logits = np.ascontiguousarray(logits, dtype=np.float32)
    probs = softmax64(logits).astype(np.float32)
    created = kw.pop("created", None) or datetime.now(UTC).replace(microsecond=0).isoformat()
    inputs = np.ascontiguousarray(inputs, dtype=np.dtype(input_spec.dtype))
    if "tolerance" in kw:
        kw["tolerance"] = check_tolerance(kw["tolerance"])
    if kw.get("decoy_inputs") is not None:
        kw["decoy_inputs"] = np.ascontiguousarray(kw["decoy_inputs"], dtype=np.dtype(input_spec.dtype))
        kw["decoy_logits"] = np.ascontiguousarray(kw["decoy_logits"], dtype=np.float32)
    return Fingerprint(inputs, logits, probs, input_spec, generator, model_digest, created=created, **kw)


def _content_digest(tensors: dict[str, np.ndarray], meta: dict | None = None) -> str:
    """SHA-256 over every tensor and, when given, the canonical JSON of the metadata (without checksum and signature)."""
    h = hashlib.sha256()
    if meta is not None:
        canonical = {k: v for k, v in meta.items() if k not in _NOT_CONTENT}
        h.update(json.dumps(canonical, sort_keys=True, default=_json_default).encode() + b"\n")
    for name in sorted(tensors):
        arr = np.ascontiguousarray(tensors[name])
        h.update(f"{name}|{arr.dtype.str}|{arr.shape}\n".encode())
        h.update(arr.tobytes())
    return h.hexdigest()


def _signed_message(digest_hex: str) -> bytes:
    return _SIGNED_PREFIX + bytes.fromhex(digest_hex)


def to_bytes(fp: Fingerprint, *, sign_key: Any = None) -> bytes:
    """The v2 file contents: a safetensors archive, signed with ``sign_key`` (an Ed25519 private key) when given."""
    from safetensors.numpy import save

    from . import signing

    tensors = {k: np.ascontiguousarray(v) for k, v in fp._tensors().items()}
    meta: dict[str, Any] = fp._meta()
    meta["tolerance"] = check_tolerance(meta["tolerance"])
    meta["sha256"] = _content_digest(tensors, meta)
    if sign_key is not None:
        meta["signature"] = signing.sign(_signed_message(meta["sha256"]), sign_key)
    return save(tensors, metadata={"tamperprobe": json.dumps(meta, sort_keys=True, default=_json_default)})


DEFAULT_KEY = "default"  # sign with the user's default signing key (created on first use)


def save(
    fp: Fingerprint, path: str | os.PathLike, *, sign_key: Any = DEFAULT_KEY, encrypt_key: bytes | None = None, passphrase: bytes | None = None
) -> Path:
    """Write ``fp`` atomically (mode 0600: the markers are secret), signed, and encrypted when ``encrypt_key`` is given.

    ``sign_key`` is an Ed25519 private key, ``"default"`` (the default: the user's signing key,
    ``signing.ensure_signing_key()``, created and trusted on this machine on first use; ``passphrase``
    unlocks it) or ``None`` for an unsigned file, which ``load`` refuses unless told to accept it.
    """
    from . import signing

    if isinstance(sign_key, str) and sign_key == DEFAULT_KEY:
        sign_key = signing.load_private_key(signing.ensure_signing_key()[0], passphrase)
    data = to_bytes(fp, sign_key=sign_key)
    if encrypt_key is not None:
        data = signing.encrypt(data, encrypt_key)
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, tuple):
        return list(obj)
    raise TypeError(f"cannot record {type(obj).__name__} in a fingerprint")


def _read_archive(p: Path, raw: bytes) -> tuple[str | None, dict[str, np.ndarray]]:
    """The ``tamperprobe`` metadata text and the tensors of a safetensors archive held in memory."""
    from safetensors.numpy import load as st_load

    try:
        tensors = st_load(raw)
        (n,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8 : 8 + n])
        raw_meta = (header.get("__metadata__") or {}).get("tamperprobe")
    except Exception as exc:
        raise FingerprintFormatError(f"{p} is not a readable fingerprint (truncated or not a tamperprobe file): {one_line(exc)}") from None
    return raw_meta, tensors


def load(path: str | os.PathLike, *, trust: Any = None, secret_key: bytes | None = None, require_encrypted: bool | None = None) -> Fingerprint:
    """Read a fingerprint back bit-exactly and check that it is authentic.

    ``trust`` (a ``signing.Trust``) says which signers to accept and whether an unsigned file
    (or a version 1 file) may be read; ``None`` means the default trusted keys
    (``signing.Trust.from_sources()``) and no unsigned files. Damage gives a
    ``FingerprintFormatError``; a missing, untrusted or wrong signature an ``AuthenticityError``,
    and so does any damage to a signed file (``AlteredFileError``, both at once: exit 3, as every
    altered signed file), but for a newer format version, which an upgrade reads.
    ``secret_key`` decrypts a file encrypted at rest. A plaintext file is refused
    (``AuthenticityError``) when ``require_encrypted``, by default whenever a ``secret_key`` is
    given: whoever gives a key expects an encrypted file, and a plaintext one in its place may be a
    swap (``require_encrypted=False`` reads both, as ``tamperprobe sign`` does).
    """
    from . import signing

    p = Path(path)
    if not p.is_file():
        raise FingerprintFormatError(f"fingerprint not found: {p}")
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise FingerprintFormatError(f"cannot read fingerprint {p}: {exc.strerror or exc}") from None
    if signing.is_encrypted(raw):
        raw = signing.decrypt(raw, secret_key, str(p))
    elif require_encrypted or (require_encrypted is None and secret_key is not None):
        raise AuthenticityError(
            f"{p} is not encrypted, but a decryption key was given (--decrypt-key or ${signing.SECRET_ENV}): refusing it, "
            "an encrypted fingerprint may have been swapped for a plaintext one (give no key to read a plaintext file)"
        )
    try:
        return _parse(p, raw, trust)
    except FingerprintFormatError as exc:
        if isinstance(exc, (AuthenticityError, _NewerVersionError)) or not _looks_signed(raw):
            raise
        raise AlteredFileError(f"{exc} (a signed file: it was altered after signing)") from None


class _NewerVersionError(FingerprintFormatError):
    """A file of a newer format: an upgrade reads it, so it is not counted as altered."""


def _looks_signed(raw: bytes) -> bool:
    """Whether the header of ``raw`` carries a signature record (one changed byte cannot hide both words)."""
    head = raw[: 1 << 20]
    return b"signature" in head or b"ed25519" in head


def _parse(p: Path, raw: bytes, trust: Any) -> Fingerprint:
    """``load`` of the bytes read (and decrypted): every check of the format, the checksum and the signature."""
    from . import signing

    raw_meta, tensors = _read_archive(p, raw)
    if raw_meta is None:
        raise FingerprintFormatError(f"{p} is a safetensors file but not a tamperprobe fingerprint")
    try:
        meta = json.loads(raw_meta)
        tag = str(meta["format"])
    except (ValueError, KeyError, TypeError):
        raise FingerprintFormatError(f"{p}: fingerprint header is damaged") from None
    m = re.fullmatch(r"([a-z.]+)/v([0-9]{1,6})", tag)
    if not m or m.group(1) != FORMAT:
        raise FingerprintFormatError(f"{p}: unknown format {tag[:60]!r}")
    version = int(m.group(2))
    if version > VERSION:
        raise _NewerVersionError(f"{p} is fingerprint format v{version}; this tamperprobe reads up to v{VERSION}: upgrade tamperprobe")
    digest = _content_digest(tensors, meta)
    if digest != meta.get("sha256"):
        raise FingerprintFormatError(f"{p}: contents do not match the recorded checksum (the file was altered or damaged)")
    trust = signing.Trust.from_sources() if trust is None else trust
    signer = None
    record = meta.get("signature") if version >= 2 else None
    if record is not None:
        signer = signing.check_signature(_signed_message(digest), record, trust, str(p))
    elif not trust.allow_unsigned:
        what = "a version 1 file, which carries no signature" if version == 1 else "not signed"
        raise AuthenticityError(f"{p} is {what}: refusing it (sign it with `tamperprobe sign`, or pass --allow-unsigned to accept the risk)")
    missing = [k for k in ("inputs", "logits", "probs") if k not in tensors]
    if missing:
        raise FingerprintFormatError(f"{p}: missing tensors {', '.join(missing)}")
    try:
        spec = InputSpec.from_json(meta["input_spec"])
        OutputSpec.parse(meta["output_spec"])
        tolerance = float(meta["tolerance"])
        fp = Fingerprint(
            inputs=tensors["inputs"],
            logits=tensors["logits"],
            probs=tensors["probs"],
            input_spec=spec,
            generator=dict(meta["generator"]),
            model_digest=str(meta["model_digest"]),
            output_spec=str(meta["output_spec"]),
            tolerance=tolerance,
            created=str(meta["created"]),
            seeds=tensors.get("seeds"),
            groups=tensors.get("groups"),
            extra=dict(meta.get("extra") or {}),
            decoy_inputs=tensors.get("decoy_inputs"),
            decoy_logits=tensors.get("decoy_logits"),
            per_run=None if meta.get("per_run") is None else int(meta["per_run"]),
            model_name=_identity(meta.get("model_name"), "model_name"),
            model_version=_identity(meta.get("model_version"), "model_version"),
            version=version,
            signer=signer,
        )
    except Exception as exc:
        raise FingerprintFormatError(f"{p}: fingerprint header is incomplete or invalid ({one_line(exc)})") from None
    try:
        check_tolerance(tolerance, "the recorded tolerance")
    except UsageError as exc:
        raise FingerprintFormatError(f"{p}: {exc}") from None
    n = len(fp.inputs)
    if (
        fp.logits.ndim != 2
        or fp.logits.shape[1] < 1
        or len(fp.logits) != n
        or fp.probs.shape != fp.logits.shape
        or tuple(fp.inputs.shape[1:]) != spec.shape
    ):
        raise FingerprintFormatError(f"{p}: tensor shapes are inconsistent")
    _check_decoys(p, fp, ("decoy_inputs" in tensors) + ("decoy_logits" in tensors))
    if fp.per_run is not None and not 1 <= fp.per_run <= n:
        raise FingerprintFormatError(f"{p}: per_run {fp.per_run} is not between 1 and the {n} markers")
    return fp


def _check_decoys(p: Path, fp: Fingerprint, present: int) -> None:
    """Decoys come as inputs and logits together, shaped like the markers' (a half-present pair is damage)."""
    if present == 0:
        return
    di, dl = fp.decoy_inputs, fp.decoy_logits
    if (
        present != 2
        or di is None
        or dl is None
        or tuple(di.shape[1:]) != fp.input_spec.shape
        or di.dtype != np.dtype(fp.input_spec.dtype)
        or dl.shape != (len(di), fp.classes)
        or dl.dtype != np.float32
    ):
        raise FingerprintFormatError(f"{p}: decoy tensors are inconsistent")
