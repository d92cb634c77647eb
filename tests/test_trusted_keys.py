"""Trusted keys are checked as sshd's StrictModes checks authorized_keys (issue 18.3): whoever could write one could forge any fingerprint.

Real key files and folders with real owners and modes (chown needs root: those cases skip otherwise),
real symbolic links, the CLI in-process.
"""

from __future__ import annotations

import os

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


@pytest.fixture
def owner(tmp_path):
    """The owner's key, trusted in the folder as keygen does, and a fingerprint it signed."""
    res = RUN.invoke(app, ["keygen", str(tmp_path / "owner.pem")])
    assert res.exit_code == 0, res.output
    fp_path = save(_fp(), tmp_path / "fp.tpf", sign_key=signing.load_private_key(tmp_path / "owner.pem"))
    kid = signing.key_id(signing.load_public_key(tmp_path / "owner.pub"))
    return {"fp": fp_path, "kid": kid, "pub": tmp_path / "owner.pub", "folder": signing.trusted_keys_dir()}


def _inspect(fp, *extra):
    return RUN.invoke(app, ["inspect", str(fp), *map(str, extra)])


def test_the_folder_key_verifies_and_the_trust_names_its_file(owner):
    trust = signing.Trust.from_sources()
    assert load(owner["fp"], trust=trust).signer == owner["kid"]
    assert trust.source_of(owner["kid"]) == str(owner["folder"] / f"{owner['kid']}.pub")
    assert trust.source_of("0" * 16) is None


def test_trust_key_means_exactly_these_keys(owner, tmp_path):
    signing.generate_keypair(tmp_path / "other.pem")
    with pytest.raises(AuthenticityError, match="not among the trusted keys"):
        load(owner["fp"], trust=signing.Trust.from_sources([tmp_path / "other.pub"]))  # main: the folder's key was added
    r = _inspect(owner["fp"], "--trust-key", tmp_path / "other.pub")
    assert r.exit_code == 3 and owner["kid"] in r.stderr, r.output
    assert _inspect(owner["fp"], "--trust-key", owner["pub"]).exit_code == 0


def test_the_environment_variable_also_replaces_the_folder(owner, tmp_path, monkeypatch):
    signing.generate_keypair(tmp_path / "other.pem")
    monkeypatch.setenv(signing.TRUST_ENV, str(tmp_path / "other.pub"))
    with pytest.raises(AuthenticityError, match="not among the trusted keys"):
        load(owner["fp"])


@pytest.mark.parametrize("mode", [0o777, 0o775, 0o757])
def test_a_folder_writable_by_others_is_refused(owner, mode):
    owner["folder"].chmod(mode)
    with pytest.raises(UsageError, match="writable by") as info:
        signing.Trust.from_sources()
    assert str(owner["folder"]) in str(info.value)
    r = _inspect(owner["fp"])
    assert r.exit_code == 2 and r.stderr.count("\n") == 1 and str(owner["folder"]) in r.stderr, r.output


def test_a_key_file_writable_by_others_is_refused(owner):
    key = owner["folder"] / f"{owner['kid']}.pub"
    key.chmod(0o666)
    with pytest.raises(UsageError, match=f"trusted key {key} is writable by group and others"):
        signing.Trust.from_sources()


def test_a_folder_above_writable_by_others_is_refused(owner):
    config = owner["folder"].parent  # $XDG_CONFIG_HOME/tamperprobe
    config.chmod(0o777)
    with pytest.raises(UsageError, match=f"folder {config} above trusted key"):
        signing.Trust.from_sources()


@pytest.mark.skipif(os.name != "posix" or os.geteuid() != 0, reason="giving a file to another user needs root")
def test_a_key_owned_by_another_user_is_refused(owner):
    key = owner["folder"] / f"{owner['kid']}.pub"
    os.chown(key, 12345, 12345)
    with pytest.raises(UsageError, match="is owned by uid 12345"):
        signing.Trust.from_sources()
    os.chown(key, 0, 0)
    os.chown(owner["folder"], 12345, 12345)
    with pytest.raises(UsageError, match="is owned by uid 12345"):
        signing.Trust.from_sources()


def test_symbolic_links_in_the_folder_are_refused(owner, tmp_path):
    signing.generate_keypair(tmp_path / "elsewhere.pem")
    link = owner["folder"] / "elsewhere.pub"
    link.symlink_to(tmp_path / "elsewhere.pub")
    with pytest.raises(UsageError, match=f"trusted key {link} is a symbolic link"):
        signing.Trust.from_sources()  # main: followed, and the key it points to trusted


def test_a_trusted_keys_folder_that_is_a_link_is_refused(owner, tmp_path):
    real = tmp_path / "real-folder"
    owner["folder"].rename(real)
    owner["folder"].symlink_to(real)
    with pytest.raises(UsageError, match="is a symbolic link"):
        signing.Trust.from_sources()


def test_keys_tamperprobe_writes_pass_the_checks_whatever_the_umask(tmp_path):
    old = os.umask(0o002)  # as on systems with user private groups
    try:
        res = RUN.invoke(app, ["keygen"])
    finally:
        os.umask(old)
    assert res.exit_code == 0, res.output
    folder = signing.trusted_keys_dir()
    assert folder.stat().st_mode & 0o777 == 0o700 and folder.parent.stat().st_mode & 0o777 == 0o700
    (key,) = folder.glob("*.pub")
    assert key.stat().st_mode & 0o777 == 0o644
    assert len(signing.Trust.from_sources().keys) == 1
