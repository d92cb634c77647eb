"""Write the golden fingerprint files that tests/test_golden.py pins the on-disk format with.

Files (next to this script), for the current format (v2, signed):

* ``fingerprint-v2.tpf``        float32 inputs (1, 4, 4), no seeds, no groups, output spec ``logits``
* ``fingerprint-v2-uint8.tpf``  uint8 inputs (1, 4, 4) in the 8-bit domain, float32 seeds and
                                int64 groups (boundary-style pairs), output spec ``probs:3``
* ``expected-v2.json``          what reading each file must give: every tensor (dtype, shape,
                                raw bytes in hex and the values), the decoded header metadata,
                                the Fingerprint fields, the content id, and the SHA-256 of the file
* ``golden-signing-key.pem`` / ``.pub``: the Ed25519 key pair that signs them. A TEST key,
  public on purpose: never trust it outside these tests. Ed25519 signatures are deterministic,
  so the signed files are reproducible byte for byte.

The v1 files (``fingerprint-v1*.tpf`` and ``expected.json``, same contents, unsigned) were
written by version 0.1 with this script's builders; they are frozen: the current code no longer
writes v1 and must keep reading them.

Everything is fixed: arrays come from closed-form expressions (no RNG) and the creation time is
a constant. ``make_fingerprint`` computes ``probs`` (a float64 softmax rounded to float32) at
regeneration time; expected.json records the resulting bytes, and the test rewrites the file from
those recorded tensors, so the byte-identity check does not depend on the platform's ``exp``.

Usage::

    python tests/golden/make_golden.py           # check: rebuild in memory, compare with the committed files
    python tests/golden/make_golden.py --regen   # overwrite the committed golden files

Only regenerate on purpose: the committed files stand for files written by released versions.
A format change must keep reading them (tests/test_golden.py fails otherwise); if v1 is ever
superseded, add new golden files next to these rather than regenerating the v1 ones.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import struct
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
CREATED = "2024-05-01T12:00:00+00:00"
FILES = {"float32": "fingerprint-v2.tpf", "uint8": "fingerprint-v2-uint8.tpf"}
EXPECTED = "expected-v2.json"
V1_FILES = {"float32": "fingerprint-v1.tpf", "uint8": "fingerprint-v1-uint8.tpf"}
V1_EXPECTED = "expected.json"
SIGNING_KEY = "golden-signing-key.pem"
PUBLIC_KEY = "golden-signing-key.pub"
_TENSOR_NAMES = ("inputs", "logits", "probs", "seeds", "groups")


def _logits(n: int, classes: int) -> np.ndarray:
    """Fixed logits with a clear ranking per row, negatives, a non-decimal value and a near-tie."""
    i = np.arange(n, dtype=np.float64)[:, None]
    c = np.arange(classes, dtype=np.float64)[None, :]
    z = np.sin(1.0 + 0.7 * i + 1.3 * c) * (2.0 + i) - 0.25 * c
    z[0, 1] = 0.1  # not exactly representable: pins float32 rounding
    z[n - 1, 0] = z[n - 1, 2] + 1e-6  # a near-tie
    return z.astype(np.float32)


def build_float32():
    from tamperprobe.data import InputSpec
    from tamperprobe.fingerprint import make_fingerprint

    n, classes = 3, 5
    spec = InputSpec((1, 4, 4), "float32", 0.0, 1.0)
    x = (np.arange(n * 16, dtype=np.float64).reshape(n, 1, 4, 4) * 7 % 17) / 16.0
    x[0, 0, 0, 0] = 0.1
    x[1, 0, 3, 3] = 1.0
    generator = {
        "method": "sensitive",
        "params": {"epsilon": 0.1, "steps": 50, "lr": 0.01},
        "seed": 7,
        "selection": "manc",
        "bag": 20,
        "layer": None,
        "data": "digits",
    }
    return make_fingerprint(
        x.astype(np.float32),
        _logits(n, classes),
        spec,
        generator,
        "sha256:" + "ab" * 32,
        output_spec="logits",
        tolerance=3e-5,
        created=CREATED,
    )


def build_uint8():
    from tamperprobe.data import InputSpec
    from tamperprobe.fingerprint import make_fingerprint

    n, classes = 4, 6
    spec = InputSpec((1, 4, 4), "uint8", 0.0, 16.0)
    u = (np.arange(n * 16, dtype=np.int64).reshape(n, 1, 4, 4) * 37 + 11) % 256
    u[0, 0, 0, 0], u[0, 0, 0, 1] = 0, 255
    seeds = (u.astype(np.float32) / np.float32(255.0)) * np.float32(16.0)
    seeds[1, 0, 2, 2] = np.float32(1.0) / np.float32(3.0)
    groups = np.repeat(np.arange(n // 2, dtype=np.int64), 2)
    generator = {
        "method": "boundary",
        "params": {"delta": 0.5, "k": 4, "pairs": True, "uint8": True},
        "seed": 11,
        "selection": "random",
        "bag": 8,
        "layer": None,
        "data": "digits",
    }
    extra = {"input_encoding": {"dtype": "uint8", "low": 0.0, "high": 16.0, "decode": "u/255*(high-low)+low"}, "pairs": 2, "note": "golden ünïcode ✓"}
    return make_fingerprint(
        u.astype(np.uint8),
        _logits(n, classes) * 3,
        spec,
        generator,
        "sha256:" + "cd" * 32,
        output_spec="probs:3",
        tolerance=1e-4,
        created=CREATED,
        seeds=seeds,
        groups=groups,
        extra=extra,
    )


BUILDERS = {"float32": build_float32, "uint8": build_uint8}


def raw_header(raw: bytes) -> dict:
    """The safetensors JSON header of a file's bytes."""
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n])


def describe(fp, raw: bytes) -> dict:
    """What reading the file must give (JSON-able)."""
    header = raw_header(raw)
    tensors = {}
    for name in _TENSOR_NAMES:
        arr = getattr(fp, name)
        if arr is None:
            continue
        arr = np.ascontiguousarray(arr)
        tensors[name] = {"dtype": arr.dtype.str, "shape": list(arr.shape), "hex": arr.tobytes().hex(), "values": arr.tolist()}
    return {
        "sha256_file": hashlib.sha256(raw).hexdigest(),
        "size": len(raw),
        "id": fp.id,
        "len": len(fp),
        "classes": fp.classes,
        "tensors": tensors,
        "fields": {
            "input_spec": fp.input_spec.to_json(),
            "generator": fp.generator,
            "model_digest": fp.model_digest,
            "output_spec": fp.output_spec,
            "tolerance": fp.tolerance,
            "created": fp.created,
            "extra": fp.extra,
        },
        "header_tensors": {k: v for k, v in header.items() if k != "__metadata__"},
        "meta": json.loads(header["__metadata__"]["tamperprobe"]),
    }


def signing_key():
    from tamperprobe.signing import load_private_key

    return load_private_key(HERE / SIGNING_KEY)


def render() -> dict[str, bytes]:
    """Every current-format golden file's bytes, freshly built with the current code."""
    from tamperprobe.fingerprint import save

    out, expected = {}, {}
    key_pem = signing_key()
    with tempfile.TemporaryDirectory() as tmp:
        for key, build in BUILDERS.items():
            fp = build()
            p = save(fp, Path(tmp) / FILES[key], sign_key=key_pem)
            raw = p.read_bytes()
            out[FILES[key]] = raw
            expected[key] = dict(file=FILES[key], **describe(fp, raw))
    out[EXPECTED] = (json.dumps(expected, indent=1, sort_keys=True, ensure_ascii=False) + "\n").encode()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--regen", action="store_true", help="overwrite the committed golden files")
    args = ap.parse_args(argv)
    files = render()
    if args.regen:
        for name, data in files.items():
            (HERE / name).write_bytes(data)
            print(f"wrote {HERE / name} ({len(data)} bytes)")
        return 0
    stale = [name for name, data in files.items() if not (HERE / name).is_file() or (HERE / name).read_bytes() != data]
    for name in files:
        print(f"{name}: {'DIFFERS' if name in stale else 'ok'}")
    if stale:
        print("the current code writes different golden files; regenerate only on purpose (--regen)", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
