"""Keys and signing from the command line: keygen, sign, trust sources, passphrases, encryption keys."""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from tamperprobe import signing
from tamperprobe.cli.app import app
from tamperprobe.data import InputSpec
from tamperprobe.errors import AuthenticityError, UsageError
from tamperprobe.fingerprint import load, make_fingerprint, save

RUN = CliRunner()


@pytest.fixture(autouse=True)
def _config_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.delenv(signing.TRUST_ENV, raising=False)
    monkeypatch.delenv(signing.SIGNING_KEY_ENV, raising=False)


def _fp():
    x = np.linspace(0, 1, 2 * 64, dtype=np.float32).reshape(2, 1, 8, 8)
    return make_fingerprint(x, np.eye(2, 3, dtype=np.float32), InputSpec((1, 8, 8)), {"method": "natural"}, "sha256:0")


def test_keygen_writes_a_private_key_only_the_owner_can_read_and_trusts_it(tmp_path):
    res = RUN.invoke(app, ["keygen", str(tmp_path / "k.pem")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "k.pem").stat().st_mode & 0o777 == 0o600
    pub = signing.load_public_key(tmp_path / "k.pub")
    kid = signing.key_id(pub)
    assert (signing.trusted_keys_dir() / f"{kid}.pub").read_bytes() == (tmp_path / "k.pub").read_bytes()
    # a file signed with it verifies with the default trust sources
    save(_fp(), tmp_path / "a.tpf", sign_key=signing.load_private_key(tmp_path / "k.pem"))
    assert load(tmp_path / "a.tpf").signer == kid
    # keygen never overwrites a key
    res = RUN.invoke(app, ["keygen", str(tmp_path / "k.pem")])
    assert res.exit_code == 2 and "refusing to overwrite" in res.output


def test_passphrase_protected_key(tmp_path, monkeypatch):
    monkeypatch.setenv("PASS", "correct horse")
    res = RUN.invoke(app, ["keygen", str(tmp_path / "k.pem"), "--passphrase-env", "PASS", "--no-trust"])
    assert res.exit_code == 0, res.output
    assert b"ENCRYPTED" in (tmp_path / "k.pem").read_bytes()
    with pytest.raises(UsageError, match="passphrase-protected"):
        signing.load_private_key(tmp_path / "k.pem")
    with pytest.raises(UsageError, match="passphrase is wrong"):
        signing.load_private_key(tmp_path / "k.pem", b"wrong")
    assert signing.load_private_key(tmp_path / "k.pem", b"correct horse") is not None
    monkeypatch.setenv("EMPTY", "")
    res = RUN.invoke(app, ["keygen", str(tmp_path / "k2.pem"), "--passphrase-env", "EMPTY"])
    assert res.exit_code == 2 and "not set or empty" in res.output


def test_sign_upgrades_an_unsigned_file(tmp_path):
    RUN.invoke(app, ["keygen"])
    save(_fp(), tmp_path / "a.tpf", sign_key=None)
    with pytest.raises(AuthenticityError, match="not signed"):
        load(tmp_path / "a.tpf")
    res = RUN.invoke(app, ["sign", str(tmp_path / "a.tpf")])
    assert res.exit_code == 0, res.output
    back = load(tmp_path / "a.tpf")
    assert back.signer is not None and back.inputs.tobytes() == _fp().inputs.tobytes()


def test_trust_from_environment_variable(tmp_path, monkeypatch):
    signing.generate_keypair(tmp_path / "k.pem")
    save(_fp(), tmp_path / "a.tpf", sign_key=signing.load_private_key(tmp_path / "k.pem"))
    with pytest.raises(AuthenticityError, match="no public key is trusted"):
        load(tmp_path / "a.tpf")
    monkeypatch.setenv(signing.TRUST_ENV, str(tmp_path / "k.pub"))
    assert load(tmp_path / "a.tpf").signer == signing.key_id(signing.load_public_key(tmp_path / "k.pub"))


def test_library_save_signs_with_the_default_key(tmp_path):
    """The Python API round trip works out of the box: save signs with the default key, which this machine trusts."""
    save(_fp(), tmp_path / "a.tpf")
    back = load(tmp_path / "a.tpf")
    assert back.signer == signing.key_id(signing.load_public_key(signing.default_signing_key_path().with_suffix(".pub")))


def test_default_signing_key_is_created_once(tmp_path):
    path, created = signing.ensure_signing_key()
    assert created and path.stat().st_mode & 0o777 == 0o600
    again, created_again = signing.ensure_signing_key()
    assert again == path and not created_again
    assert len(list(signing.trusted_keys_dir().glob("*.pub"))) == 1


def test_secret_key_file_and_environment(tmp_path, monkeypatch):
    res = RUN.invoke(app, ["keygen", "--secret", str(tmp_path / "s.key")])
    assert res.exit_code == 0, res.output
    key = signing.load_secret_key(tmp_path / "s.key")
    assert len(key) == 32
    monkeypatch.setenv(signing.SECRET_ENV, key.hex())
    assert signing.load_secret_key() == key
    monkeypatch.setenv(signing.SECRET_ENV, "not hex")
    with pytest.raises(UsageError, match="64 hex digits"):
        signing.load_secret_key()
