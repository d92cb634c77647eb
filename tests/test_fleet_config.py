"""The fleet file: every field checked before anything is sent, errors naming file, entry and field."""

from __future__ import annotations

from pathlib import Path

import pytest

from tamperprobe.errors import UsageError
from tamperprobe.fleet import config

GOOD = """
[fleet]
concurrency = 8

[defaults]
protocol = "triton"
every = "1h"
spread = "50m"
deadline = "55m"
trust_keys = ["owner.pub"]

[[endpoint]]
name = "digits-eu"
url = "https://models.example.internal/v2/models/digits"
fingerprint = "digits-v3.tpf"
expect = "digits:v3"
token_env = "EU_TOKEN"

[[endpoint]]
name = "digits-us"
url = "http://127.0.0.1:8080/v2/models/digits"
fingerprint = "fp/digits-v3.tpf"
every = 30
per_run = 4
decoys = 0.5
output_spec = "top1"
headers = { "X-Team" = "ml" }
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "fleet.toml"
    p.write_text(text, encoding="utf-8")
    return p


def test_good_file_reads_with_defaults_overridden_and_paths_from_its_folder(tmp_path: Path) -> None:
    fleet = config.load(write(tmp_path, GOOD))
    assert fleet.settings.concurrency == 8
    eu, us = fleet.endpoints
    assert (eu.name, us.name) == ("digits-eu", "digits-us")
    assert eu.protocol == us.protocol == "kserve"  # the alias resolved once
    assert eu.every == 3600.0 and us.every == 30.0
    assert eu.spread == 3000.0 and eu.deadline == 3300.0
    assert eu.fingerprint == tmp_path / "digits-v3.tpf"
    assert us.fingerprint == tmp_path / "fp" / "digits-v3.tpf"
    assert eu.trust_keys == us.trust_keys == (tmp_path / "owner.pub",)
    assert eu.expect == "digits:v3" and us.expect is None
    assert us.headers == (("X-Team", "ml"),) and us.per_run == 4 and us.decoys == 0.5
    assert set(fleet.fingerprints()) == {tmp_path / "digits-v3.tpf", tmp_path / "fp" / "digits-v3.tpf"}


BAD = [
    # (edit of GOOD, the text the one-line error must hold)
    (("expect = ", "expcet = "), "endpoint 1 (digits-eu): unknown field 'expcet'"),
    (("every = 30", 'every = "soon"'), "endpoint 2 (digits-us): field 'every'"),
    (("every = 30", "every = true"), "endpoint 2 (digits-us): field 'every'"),
    (("per_run = 4", "per_run = 0"), "endpoint 2 (digits-us): field 'per_run' must be a whole number >= 1"),
    (('output_spec = "top1"', 'output_spec = "top7"'), "endpoint 2 (digits-us): field 'output_spec'"),
    (('protocol = "triton"', 'protocol = "grpc2"'), "[defaults]: field 'protocol' unknown protocol 'grpc2'"),
    (('headers = { "X-Team" = "ml" }', 'headers = { "Authorization" = "Bearer s3cret" }'), "field 'headers' header 'Authorization' holds a secret"),
    (("http://127.0.0.1:8080/", "http://me:pw@127.0.0.1:8080/"), "field 'url' holds credentials"),
    (("http://127.0.0.1:8080/v2/models/digits", "http://127.0.0.1:8080/v2/models/digits?api_key=x"), "field 'url' holds a secret in its query"),
    (("http://127.0.0.1:8080/", "ftp://127.0.0.1:8080/"), "field 'url' must be an http:// or https:// URL"),
    (('name = "digits-us"', 'name = "digits-eu"'), "endpoint 2 (digits-eu): name 'digits-eu' is also endpoint 1's"),
    (('name = "digits-us"', 'name = "a b"'), "field 'name' must be letters"),
    (('token_env = "EU_TOKEN"', 'token_env = "EU_TOKEN"\ntoken_file = "t"'), "give token_env or token_file, not both"),
    (('spread = "50m"', 'spread = "2h"'), "field 'spread' must not exceed 'deadline'"),
    (("concurrency = 8", "concurrency = -1"), "[fleet]: field 'concurrency'"),
    (
        ('expect = "digits:v3"', 'expect = "digits-v3"'),
        "endpoint 1 (digits-eu): field 'expect' must be a fingerprint id (16 hex digits) or NAME:VERSION",
    ),
    (('expect = "digits:v3"', 'expect = ":v3"'), "endpoint 1 (digits-eu): field 'expect' must be a fingerprint id"),
    (('expect = "digits:v3"', "expect = 3"), "endpoint 1 (digits-eu): field 'expect' must be a non-empty string"),
    (("concurrency = 8", "concurrency = 8\nper_endpoint_connections = 0"), "[fleet]: field 'per_endpoint_connections' must be a whole number >= 1"),
    (("[fleet]", "[fleets]"), "unknown table 'fleets'"),
    (('fingerprint = "fp/digits-v3.tpf"\n', ""), "endpoint 2 (digits-us): missing field 'fingerprint'"),
    (("[defaults]", '[defaults]\nname = "x"'), "field 'name' cannot come from [defaults]"),
    (('url = "https', "url = https"), "not valid TOML"),
]


@pytest.mark.parametrize("edit,message", BAD, ids=[m for _, m in BAD])
def test_bad_files_are_refused_in_one_line_naming_file_entry_and_field(tmp_path: Path, edit: tuple[str, str], message: str) -> None:
    old, new = edit
    assert old in GOOD
    path = write(tmp_path, GOOD.replace(old, new, 1))
    with pytest.raises(UsageError) as info:
        config.load(path)
    text = str(info.value)
    assert "\n" not in text
    assert text.startswith(str(path))
    assert message in text
    assert info.value.exit_code == 2


def test_missing_file_and_no_endpoints_are_errors(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="cannot read the fleet file"):
        config.load(tmp_path / "nope.toml")
    with pytest.raises(UsageError, match=r"no \[\[endpoint\]\] entries"):
        config.load(write(tmp_path, "[defaults]\nevery = '1h'\n"))
    bad = tmp_path / "bin.toml"
    bad.write_bytes(b"\xff\xfe[x]")
    with pytest.raises(UsageError, match="not UTF-8"):
        config.load(bad)


def test_every_endpoint_field_can_be_a_default() -> None:
    # the two tables share one list of fields: a field an endpoint takes can be given once for all (but its name)
    assert set(config.ENDPOINT_FIELDS) >= {"expect", "token_env", "trust_keys", "hook", "output_spec", "per_run", "decoys", "timeout", "retries"}


def test_an_entrys_client_profile_reaches_its_client(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each endpoint sends its requests as the ordinary client its entry names (an ignored profile would send another shape)."""
    import numpy as np

    from tamperprobe.data import InputSpec
    from tamperprobe.fingerprint import make_fingerprint
    from tamperprobe.fleet.check import FLEET_PROFILE, make_session
    from tamperprobe.served.session import Settings

    monkeypatch.setenv("EU_TOKEN", "t0ken")
    text = GOOD.replace('name = "digits-us"', 'name = "digits-us"\nclient_profile = "curl"')
    fleet = config.load(write(tmp_path, text))
    x = np.zeros((4, 1, 8, 8), dtype=np.float32)
    fp = make_fingerprint(x, np.eye(4, 3, dtype=np.float32), InputSpec((1, 8, 8)), {"method": "natural"}, "sha256:w")
    eu, us = (make_session(e, fp, Settings(allow_repeat=True, record=False), None, None, default_profile=FLEET_PROFILE) for e in fleet.endpoints)
    assert us.target.profile.name == "curl"
    assert eu.target.profile.name == "python-requests-session"  # fleet check's default: requests.Session(), kept alive
    watched = make_session(fleet.endpoints[0], fp, Settings(allow_repeat=True, record=False), None, None)
    assert watched.target.profile.name == "python-requests"  # fleet watch's (verify's): a new connection per request
