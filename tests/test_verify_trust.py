"""The served side authenticates its fingerprint before sending a single marker.

A forged fingerprint (expected logits replaced by a tampered model's and the checksum recomputed,
or re-signed with the attacker's own key, or stripped of its signature) is refused by ``verify``,
``watch`` and ``serve --fingerprint`` with exit code 3, and the endpoint never sees a request.
An unsigned file accepted with ``--allow-unsigned`` is warned about on every run and recorded
as unsigned in the history; a signed one records its signer.
"""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from typer.testing import CliRunner

from fakes import Scripted, confident_mlp, kserve
from tamperprobe.cli.app import app
from tamperprobe.data import InputSpec
from tamperprobe.errors import EXIT_UNTRUSTED
from tamperprobe.fingerprint import load, make_fingerprint, save
from tamperprobe.served import history

SHAPE = (1, 8, 8)


_model = confident_mlp


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("trust")
    intact, tampered = _model(0), _model(1)
    x = np.random.default_rng(0).random((5, *SHAPE)).astype(np.float32)
    rows = lambda m: np.concatenate([m.logits(x[i : i + 1]) for i in range(len(x))])  # noqa: E731
    fp = make_fingerprint(x, rows(intact), InputSpec(SHAPE), {"method": "natural"}, "test", output_spec="logits")
    signed = save(fp, d / "signed.tpf")
    unsigned = save(fp, d / "unsigned.tpf", sign_key=None)
    return {"dir": d, "signed": signed, "unsigned": unsigned, "tampered": tampered, "tampered_logits": rows(tampered)}


def _forge(src, dst, logits, *, keep_signature=False, resign_with=None):
    """The attack of issue 9: the tampered model's logits as the expected ones, checksum recomputed
    (keeping the owner's signature, re-signing with the attacker's key, or dropping the signature)."""
    from safetensors.numpy import save as st_save

    from tamperprobe.fingerprint import _content_digest, _signed_message
    from tamperprobe.outputs import softmax64
    from tamperprobe.signing import sign

    raw = src.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    meta = json.loads(json.loads(raw[8 : 8 + n])["__metadata__"]["tamperprobe"])
    tensors = {k: np.ascontiguousarray(v) for k, v in load(src)._tensors().items()}
    tensors["logits"] = np.ascontiguousarray(logits, dtype=np.float32)
    tensors["probs"] = softmax64(tensors["logits"]).astype(np.float32)
    meta["sha256"] = _content_digest(tensors, meta)
    if not keep_signature:
        meta.pop("signature", None)
    if resign_with is not None:
        meta["signature"] = sign(_signed_message(meta["sha256"]), resign_with)
    dst.write_bytes(st_save(tensors, metadata={"tamperprobe": json.dumps(meta, sort_keys=True)}))
    return dst


FORGERIES = {
    "re-checksummed, owner's signature kept": ({"keep_signature": True}, "signature does not match"),
    "re-signed with the attacker's key": ({"resign_with": Ed25519PrivateKey.generate()}, "not among the trusted keys"),
    "signature removed": ({}, "not signed"),
}


@pytest.mark.parametrize("forgery", list(FORGERIES))
def test_a_forged_fingerprint_is_refused_and_never_reaches_the_endpoint(world, tmp_path, forgery):
    kw, message = FORGERIES[forgery]
    forged = _forge(world["signed"], tmp_path / "forged.tpf", world["tampered_logits"], **kw)
    with Scripted(kserve(world["tampered"].logits)) as srv:
        common = [str(forged), "--endpoint", srv.url, "--model-name", "m", "--retries", "0"]
        v = CliRunner().invoke(app, ["verify", *common, "--history", str(tmp_path / "h.sqlite")])
        w = CliRunner().invoke(app, ["watch", *common, "--every", "0s", "--count", "1", "--no-history"])
        requests = len(srv.requests)
    for r in (v, w):
        assert r.exit_code == EXIT_UNTRUSTED, (r.stdout, r.stderr)
        assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1 and "INTACT" not in r.stdout
    assert requests == 0
    assert not (tmp_path / "h.sqlite").exists() or history.runs(tmp_path / "h.sqlite") == []


def test_serve_refuses_a_forged_fingerprint(world, tmp_path):
    forged = _forge(world["signed"], tmp_path / "forged.tpf", world["tampered_logits"], keep_signature=True)
    r = CliRunner().invoke(app, ["serve", "whatever.pt", "--fingerprint", str(forged)])
    assert r.exit_code == EXIT_UNTRUSTED and "signature does not match" in r.stderr


def test_a_signed_fingerprint_records_its_signer(world, tmp_path):
    hist = tmp_path / "h.sqlite"
    with Scripted(kserve(_model(0).logits)) as srv:
        r = CliRunner().invoke(app, ["verify", str(world["signed"]), "--endpoint", srv.url, "--model-name", "m", "--history", str(hist)])
    assert r.exit_code == 0 and r.stderr == "", r.stderr
    (row,) = history.runs(hist)
    assert row["signer"] == load(world["signed"]).signer and row["notes"] is None
    assert f"signed by key {row['signer']}" in " ".join(r.stdout.split())  # the printed verdict names the key that vouched


def test_an_unsigned_fingerprint_needs_the_opt_out_warns_every_run_and_is_recorded(world, tmp_path):
    hist = tmp_path / "h.sqlite"
    with Scripted(kserve(_model(0).logits)) as srv:
        common = [str(world["unsigned"]), "--endpoint", srv.url, "--model-name", "m", "--retries", "0", "--history", str(hist), "--per-run", "1"]
        refused = CliRunner().invoke(app, ["verify", *common])
        assert refused.exit_code == EXIT_UNTRUSTED and "not signed" in refused.stderr and len(srv.requests) == 0
        v = CliRunner().invoke(app, ["verify", *common, "--allow-unsigned"])
        w = CliRunner().invoke(app, ["watch", *common, "--allow-unsigned", "--every", "0s", "--count", "3"])
        j = CliRunner().invoke(app, ["verify", *common, "--allow-unsigned", "--json", "--no-history", "--allow-repeat"])
        h = CliRunner().invoke(app, ["history", "--history", str(hist)])
    assert v.exit_code == 0 and "is not signed (--allow-unsigned)" in v.stderr, v.stderr
    assert w.exit_code == 0 and w.stderr.count("the fingerprint is not signed") == 3, w.stderr  # once per run
    assert json.loads(j.stdout)["signer"] is None and "not signed" in json.loads(j.stdout)["notes"][0]
    rows = history.runs(hist)
    assert len(rows) == 4 and all(r["signer"] is None and "not signed" in r["notes"] for r in rows)
    assert h.stdout.count("UNSIGNED") == 4


@pytest.mark.parametrize("bad", ["nan", "inf", "-1", "1e9"])
def test_tolerance_from_the_command_line_is_bounded(world, bad):
    with Scripted(kserve(world["tampered"].logits)) as srv:
        r = CliRunner().invoke(app, ["verify", str(world["signed"]), "--endpoint", srv.url, "--model-name", "m", "--tolerance", bad])
        requests = len(srv.requests)
    assert r.exit_code == 2 and "--tolerance must be a finite number" in r.stderr, (r.stdout, r.stderr)
    assert requests == 0 and "INTACT" not in r.stdout
