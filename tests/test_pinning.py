"""Pinning (issue 18.5): a fingerprint records what it vouches for, and --expect refuses any other (exit 3), even a validly signed one.

Real signed files (the session's own config folder holds the signing key), the CLI in-process.
"""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from tamperprobe import signing
from tamperprobe.cli._options import load_fingerprint_from_options
from tamperprobe.cli.app import app
from tamperprobe.data import InputSpec
from tamperprobe.errors import EXIT_UNTRUSTED, AuthenticityError, UsageError
from tamperprobe.fingerprint import check_expected, load, make_fingerprint, save, with_identity

RUN = CliRunner()


def _fp(seed=0):
    x = np.random.default_rng(seed).random((4, 1, 8, 8)).astype(np.float32)
    return make_fingerprint(x, np.eye(4, 3, dtype=np.float32), InputSpec((1, 8, 8)), {"method": "natural"}, "sha256:weights", created="2025-01-01")


def test_identity_is_recorded_signed_and_read_back(tmp_path):
    plain = _fp()
    pinned = with_identity(plain, "fraud-scorer", "v4.1")
    assert pinned.id != plain.id  # the identity is content: covered by the id and the signature
    back = load(save(pinned, tmp_path / "fp.tpf"))
    assert (back.model_name, back.model_version, back.model_digest, back.id) == ("fraud-scorer", "v4.1", "sha256:weights", pinned.id)
    assert load(save(plain, tmp_path / "old.tpf")).model_name is None  # files without it read as before, same id
    assert load(tmp_path / "old.tpf").id == plain.id


@pytest.mark.parametrize(("name", "version"), [("a", None), (None, "1"), ("has space", "1"), ("n", "1:2"), ("", "1"), ("x" * 200, "1")])
def test_malformed_identities_are_refused(name, version):
    with pytest.raises(UsageError):
        with_identity(_fp(), name, version)


def test_expect_refuses_any_other_fingerprint_with_exit_3(tmp_path):
    v4 = with_identity(_fp(0), "fraud-scorer", "v4")
    v3 = with_identity(_fp(1), "fraud-scorer", "v3")  # the owner's own, validly signed, for an older version
    check_expected(v4, None)
    check_expected(v4, v4.id)
    check_expected(v4, v4.id.upper())
    check_expected(v4, "fraud-scorer:v4")
    for swapped, expect in ((v3, "fraud-scorer:v4"), (v3, v4.id), (_fp(0), "fraud-scorer:v4")):
        with pytest.raises(AuthenticityError, match="not the fingerprint expected") as info:
            check_expected(swapped, expect)
        assert info.value.exit_code == EXIT_UNTRUSTED == 3 and "\n" not in str(info.value)
    for bad in ("fraud-scorer", ":v4", "fraud-scorer:", "abc"):
        with pytest.raises(UsageError, match="NAME:VERSION"):
            check_expected(v4, bad)


def test_the_cli_loader_takes_expect(tmp_path):
    path = save(with_identity(_fp(1), "fraud-scorer", "v3"), tmp_path / "swapped.tpf")
    assert load_fingerprint_from_options(path, None, False, None, expect="fraud-scorer:v3").model_version == "v3"
    with pytest.raises(AuthenticityError, match=r"swapped.tpf is not the fingerprint expected: it is [0-9a-f]{16} for fraud-scorer:v3"):
        load_fingerprint_from_options(path, None, False, None, expect="fraud-scorer:v4")


def test_sign_records_the_identity(tmp_path):
    path = save(_fp(), tmp_path / "fp.tpf", sign_key=None)
    r = RUN.invoke(app, ["sign", str(path), "--model-name", "fraud-scorer", "--model-version", "v4"])
    assert r.exit_code == 0 and "for fraud-scorer:v4" in r.stdout, r.output
    back = load(path)
    assert (back.model_name, back.model_version) == ("fraud-scorer", "v4") and back.signer is not None
    r = RUN.invoke(app, ["sign", str(path), "--model-name", "fraud-scorer"])
    assert r.exit_code == 2 and "--model-version" in r.stderr


def test_a_plaintext_file_given_with_a_decryption_key_is_refused(tmp_path, monkeypatch):
    key_file = signing.generate_secret_key(tmp_path / "s.key")
    key = signing.load_secret_key(key_file)
    plain = save(_fp(), tmp_path / "plain.tpf")
    with pytest.raises(AuthenticityError, match="is not encrypted, but a decryption key was given"):
        load(plain, secret_key=key)
    r = RUN.invoke(app, ["inspect", str(plain), "--decrypt-key", str(key_file)])
    assert r.exit_code == 3 and "not encrypted" in r.stderr and r.stderr.count("\n") == 1, r.output  # main: read silently, exit 0
    monkeypatch.setenv(signing.SECRET_ENV, key.hex())
    assert RUN.invoke(app, ["inspect", str(plain)]).exit_code == 3  # the key from the environment means the same
    encrypted = save(_fp(), tmp_path / "enc.tpf", encrypt_key=key)
    assert load(encrypted, secret_key=key).id == _fp().id
    assert load(plain, secret_key=key, require_encrypted=False).id == _fp().id


def test_fingerprint_records_the_identity_it_is_given(tmp_path):
    import torch

    from fakes import confident_mlp

    model = tmp_path / "m.pt"
    torch.jit.trace(confident_mlp(0).module, torch.zeros(1, 1, 8, 8)).save(str(model))
    args = ["fingerprint", str(model), "--data", "digits", "--method", "natural", "--select", "random", "--size", "2", "--bag", "4"]
    args += ["--no-check", "--tolerance", "1e-4", "--out", str(tmp_path / "f.tpf")]
    r = RUN.invoke(app, [*args, "--model-name", "digits-mlp", "--model-version", "1.0"])
    assert r.exit_code == 0, r.output
    fp = load(tmp_path / "f.tpf")
    assert (fp.model_name, fp.model_version) == ("digits-mlp", "1.0") and fp.id in r.stdout  # the id printed is the file's
    check_expected(fp, "digits-mlp:1.0")
    r = RUN.invoke(app, [*args, "--model-name", "digits mlp", "--model-version", "1.0"])
    assert r.exit_code == 2 and r.stderr.count("\n") == 1 and "--model-name" in r.stderr


def test_fleet_entries_pin_by_the_same_rule():
    from tamperprobe.fleet.check import expect_problem

    v4 = with_identity(_fp(0), "fraud-scorer", "v4")
    assert expect_problem(v4, None) is None and expect_problem(v4, "fraud-scorer:v4") is None and expect_problem(v4, v4.id) is None
    assert "not the one expected" in expect_problem(v4, "fraud-scorer:v3")
    assert "NAME:VERSION" in expect_problem(v4, "fraud-scorer")  # a bare name could be any version: refused, not run


def test_verify_and_watch_refuse_a_swapped_fingerprint_before_sending_anything(tmp_path):
    """A validly signed fingerprint of another deployment (the owner's, for an older model) is refused by --expect: exit 3."""
    v3 = save(with_identity(_fp(1), "fraud-scorer", "v3"), tmp_path / "v3.tpf")
    dead = "http://127.0.0.1:9/v2/models/m"  # nothing is sent: the refusal comes first
    for cmd in (["verify", str(v3), "--endpoint", dead], ["watch", str(v3), "--endpoint", dead, "--count", "1"]):
        r = RUN.invoke(app, [*cmd, "--expect", "fraud-scorer:v4"])
        assert r.exit_code == EXIT_UNTRUSTED and "not the fingerprint expected" in r.stderr, (cmd, r.output)
        assert "Traceback" not in r.output
    assert RUN.invoke(app, ["verify", str(v3), "--endpoint", dead, "--expect", "fraud-scorer:v3", "--retries", "0", "--timeout", "1"]).exit_code == 2
