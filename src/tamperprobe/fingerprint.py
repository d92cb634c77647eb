"""The fingerprint: secret marker inputs and the intact model's outputs, in one file.

The file is a safetensors archive (no pickle). Tensors: ``inputs`` (exactly as sent),
``logits`` and ``probs`` of the intact model (float32), ``seeds`` (the natural inputs the
markers started from) and optionally ``groups`` (markers that belong together). The header
metadata key ``tamperprobe`` holds JSON: the format tag ``tamperprobe.fingerprint/v1``, the
input spec, the generator with every parameter and the seed, the selection, the digest of
the model weights, the intended output spec, the comparison tolerance, the creation time,
and a SHA-256 over all tensors and that metadata, so that any altered byte is detected on reading.

Keep the file private: whoever holds the markers can special-case them.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from .data import InputSpec
from .errors import FingerprintFormatError
from .outputs import DEFAULT_TOLERANCE, OutputSpec, softmax64

FORMAT = "tamperprobe.fingerprint"
VERSION = 1
_TENSORS = ("inputs", "logits", "probs", "seeds", "groups")


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

    def __len__(self) -> int:
        return len(self.inputs)

    @property
    def classes(self) -> int:
        return int(self.logits.shape[1])

    @property
    def id(self) -> str:
        """A short content id: equal for bit-identical fingerprints."""
        return _tensor_digest(self._tensors())[:16]

    @property
    def labels(self) -> np.ndarray:
        return self.logits.argmax(axis=1)

    def _tensors(self) -> dict[str, np.ndarray]:
        out = {"inputs": self.inputs, "logits": self.logits, "probs": self.probs}
        if self.seeds is not None:
            out["seeds"] = self.seeds
        if self.groups is not None:
            out["groups"] = self.groups
        return out

    def subset(self, idx) -> Fingerprint:
        idx = np.asarray(idx, dtype=np.int64)
        return replace(
            self,
            inputs=self.inputs[idx],
            logits=self.logits[idx],
            probs=self.probs[idx],
            seeds=None if self.seeds is None else self.seeds[idx],
            groups=None if self.groups is None else self.groups[idx],
        )


def make_fingerprint(inputs: np.ndarray, logits: np.ndarray, input_spec: InputSpec, generator: dict, model_digest: str, **kw: Any) -> Fingerprint:
    """Build a fingerprint from the intact model's logits, filling probs and the creation time."""
    logits = np.ascontiguousarray(logits, dtype=np.float32)
    probs = softmax64(logits).astype(np.float32)
    created = kw.pop("created", None) or datetime.now(UTC).replace(microsecond=0).isoformat()
    inputs = np.ascontiguousarray(inputs, dtype=np.dtype(input_spec.dtype))
    return Fingerprint(inputs, logits, probs, input_spec, generator, model_digest, created=created, **kw)


def _tensor_digest(tensors: dict[str, np.ndarray], meta: dict | None = None) -> str:
    """SHA-256 over every tensor and, when given, the canonical JSON of the metadata (without its checksum)."""
    h = hashlib.sha256()
    if meta is not None:
        canonical = {k: v for k, v in meta.items() if k != "sha256"}
        h.update(json.dumps(canonical, sort_keys=True, default=_json_default).encode() + b"\n")
    for name in sorted(tensors):
        arr = np.ascontiguousarray(tensors[name])
        h.update(f"{name}|{arr.dtype.str}|{arr.shape}\n".encode())
        h.update(arr.tobytes())
    return h.hexdigest()


def save(fp: Fingerprint, path: str | os.PathLike) -> Path:
    from safetensors.numpy import save_file

    p = Path(path)
    tensors = {k: np.ascontiguousarray(v) for k, v in fp._tensors().items()}
    meta = {
        "format": f"{FORMAT}/v{VERSION}",
        "input_spec": fp.input_spec.to_json(),
        "generator": fp.generator,
        "model_digest": fp.model_digest,
        "output_spec": fp.output_spec,
        "tolerance": fp.tolerance,
        "created": fp.created,
        "extra": fp.extra,
    }
    meta["sha256"] = _tensor_digest(tensors, json.loads(json.dumps(meta, default=_json_default)))
    if p.parent and not p.parent.exists():
        p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"tamperprobe": json.dumps(meta, sort_keys=True, default=_json_default)})
    os.replace(tmp, p)
    return p


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, tuple):
        return list(obj)
    raise TypeError(f"cannot record {type(obj).__name__} in a fingerprint")


def load(path: str | os.PathLike) -> Fingerprint:
    """Read a fingerprint back bit-exactly; any damage gives a FingerprintFormatError."""
    from safetensors import safe_open

    p = Path(path)
    if not p.is_file():
        raise FingerprintFormatError(f"fingerprint not found: {p}")
    try:
        with safe_open(str(p), framework="numpy") as f:
            raw_meta = (f.metadata() or {}).get("tamperprobe")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise FingerprintFormatError(f"{p} is not a readable fingerprint (truncated or not a tamperprobe file): {first}") from None
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
    if int(m.group(2)) > VERSION:
        raise FingerprintFormatError(f"{p} is fingerprint format v{m.group(2)}; this tamperprobe reads up to v{VERSION}: upgrade tamperprobe")
    if _tensor_digest(tensors, meta) != meta.get("sha256"):
        raise FingerprintFormatError(f"{p}: contents do not match the recorded checksum (the file was altered or damaged)")
    missing = [k for k in ("inputs", "logits", "probs") if k not in tensors]
    if missing:
        raise FingerprintFormatError(f"{p}: missing tensors {', '.join(missing)}")
    try:
        spec = InputSpec.from_json(meta["input_spec"])
        OutputSpec.parse(meta["output_spec"])
        fp = Fingerprint(
            inputs=tensors["inputs"],
            logits=tensors["logits"],
            probs=tensors["probs"],
            input_spec=spec,
            generator=dict(meta["generator"]),
            model_digest=str(meta["model_digest"]),
            output_spec=str(meta["output_spec"]),
            tolerance=float(meta["tolerance"]),
            created=str(meta["created"]),
            seeds=tensors.get("seeds"),
            groups=tensors.get("groups"),
            extra=dict(meta.get("extra") or {}),
        )
    except Exception as exc:
        raise FingerprintFormatError(f"{p}: fingerprint header is incomplete or invalid ({exc})") from None
    n = len(fp.inputs)
    if (
        fp.logits.ndim != 2
        or fp.logits.shape[1] < 1
        or len(fp.logits) != n
        or fp.probs.shape != fp.logits.shape
        or tuple(fp.inputs.shape[1:]) != spec.shape
    ):
        raise FingerprintFormatError(f"{p}: tensor shapes are inconsistent")
    return fp
