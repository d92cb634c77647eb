"""The SQLite verification history, on a real file."""

from __future__ import annotations

import sqlite3
import threading
from datetime import UTC, datetime, timedelta

import pytest

from tamperprobe._util import parse_duration
from tamperprobe.errors import UsageError
from tamperprobe.outputs import Answer
from tamperprobe.served import history
from tamperprobe.served.verify import INCONCLUSIVE, INTACT, TAMPERED, MarkerResult, Report


def _report(verdict=INTACT, target="kserve:http://127.0.0.1:8080/v2/models/a", fp="abcdef0123456789", n=3):
    markers = []
    for i in range(n):
        exp = Answer(labels=(i,))
        if verdict == INCONCLUSIVE and i == 0:
            markers.append(MarkerResult(i, exp, None, False, failure="connection refused", latency=0.5))
        elif verdict == TAMPERED and i == 1:
            markers.append(MarkerResult(i, exp, Answer(labels=(9,)), False, detail="label #1 is 9, expected 1", latency=0.01))
        else:
            markers.append(MarkerResult(i, exp, exp, True, latency=0.01 * (i + 1)))
    return Report(verdict, target, "top1", fp, markers, 0.25, 3e-5)


def test_record_and_read_back(tmp_path):
    path = tmp_path / "h.sqlite"
    rid = history.record(_report(TAMPERED), protocol="kserve", path=path)
    assert isinstance(rid, int)
    (run,) = history.runs(path)
    assert run["id"] == rid and run["verdict"] == TAMPERED and run["protocol"] == "kserve"
    assert run["markers"] == 3 and run["mismatched"] == 1 and run["failed"] == 0
    assert run["fingerprint"] == "abcdef0123456789" and run["output_spec"] == "top1" and run["seconds"] == 0.25
    assert run["target"].startswith("kserve:http://127.0.0.1:8080")
    t = datetime.fromisoformat(run["time"])
    assert t.tzinfo is not None and abs(datetime.now(UTC) - t) < timedelta(minutes=1)
    rows = history.markers(rid, path)
    assert [r["index"] for r in rows] == [0, 1, 2]
    assert [r["status"] for r in rows] == ["match", "MISMATCH", "match"]
    assert rows[1]["expected"] == "1" and rows[1]["observed"] == "9" and "expected 1" in rows[1]["detail"]
    assert rows[0]["latency"] == pytest.approx(0.01)


def test_filters_order_and_limit(tmp_path):
    path = tmp_path / "h.sqlite"
    ids = [
        history.record(_report(INTACT, target="kserve:http://a:1"), protocol="kserve", path=path),
        history.record(_report(TAMPERED, target="kserve:http://b:2", fp="ffff000011112222"), protocol="kserve", path=path),
        history.record(_report(INCONCLUSIVE, target="tfserving:http://a:1/v1"), protocol="tfserving", path=path),
        history.record(_report(INTACT, target="json:http://c_d:3"), protocol="json", path=path),
    ]
    assert [r["id"] for r in history.runs(path)] == ids[::-1]  # newest first
    assert [r["id"] for r in history.runs(path, limit=2)] == ids[:1:-1]
    assert {r["id"] for r in history.runs(path, target="http://a:1")} == {ids[0], ids[2]}
    assert [r["id"] for r in history.runs(path, verdict="tampered")] == [ids[1]]
    assert [r["id"] for r in history.runs(path, fingerprint="ffff")] == [ids[1]]
    assert history.runs(path, target="c_d")[0]["id"] == ids[3]
    assert history.runs(path, target="c%d") == []  # LIKE wildcards are literal
    inconclusive = history.runs(path, verdict=INCONCLUSIVE)[0]
    assert inconclusive["failed"] == 1
    assert history.markers(inconclusive["id"], path)[0]["detail"] == "connection refused"
    assert len(history.runs(path, since="1h")) == 4
    assert history.runs(path, since=datetime.now(UTC) + timedelta(minutes=1)) == []
    assert len(history.runs(path, since="2000-01-01T00:00")) == 4
    with pytest.raises(history.HistoryError):
        history.runs(path, since="yesterday-ish")


def test_default_path_from_env(tmp_path, monkeypatch):
    target = tmp_path / "sub" / "env.sqlite"
    monkeypatch.setenv("TAMPERPROBE_HISTORY", str(target))
    assert history.default_path() == target
    rid = history.record(_report())
    assert target.exists() and history.runs()[0]["id"] == rid
    monkeypatch.delenv("TAMPERPROBE_HISTORY")
    assert history.default_path().name == "history.sqlite"


def test_concurrent_writers(tmp_path):
    path = tmp_path / "h.sqlite"
    history.record(_report(), path=path)  # create the schema once
    errors = []

    def worker(k):
        try:
            for _ in range(5):
                history.record(_report(target=f"t{k}"), protocol="kserve", path=path)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(history.runs(path, limit=None)) == 21
    with sqlite3.connect(path) as con:
        assert con.execute("SELECT COUNT(*) FROM markers").fetchone()[0] == 21 * 3
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_newer_schema_is_refused(tmp_path):
    path = tmp_path / "h.sqlite"
    history.record(_report(), path=path)
    with sqlite3.connect(path) as con:
        con.execute("PRAGMA user_version = 99")
    with pytest.raises(history.HistoryError, match="newer tamperprobe"):
        history.runs(path)


def test_parse_duration():
    assert parse_duration("30s") == 30
    assert parse_duration("10m") == 600
    assert parse_duration("1h30m") == 5400
    assert parse_duration("1.5h") == 5400
    assert parse_duration("90") == 90
    assert parse_duration("250ms") == 0.25
    for bad in ("", "10x", "m", "-5s", "1h 30"):
        with pytest.raises(UsageError):
            parse_duration(bad)


_V1_SCHEMA = """
CREATE TABLE runs (id INTEGER PRIMARY KEY AUTOINCREMENT, time TEXT NOT NULL, target TEXT NOT NULL, protocol TEXT,
    fingerprint TEXT NOT NULL, output_spec TEXT NOT NULL, verdict TEXT NOT NULL, markers INTEGER NOT NULL,
    mismatched INTEGER NOT NULL, failed INTEGER NOT NULL, seconds REAL NOT NULL, tolerance REAL, summary TEXT);
CREATE TABLE markers (run_id INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE, idx INTEGER NOT NULL, status TEXT NOT NULL,
    expected TEXT, observed TEXT, detail TEXT, latency REAL, PRIMARY KEY (run_id, idx));
INSERT INTO runs VALUES (1, '2025-01-01T00:00:00+00:00', 'kserve:http://old', 'kserve', 'abcd', 'top1', 'INTACT', 3, 0, 0, 0.1, 3e-5, 'INTACT');
PRAGMA user_version = 1;
"""


def test_a_version_1_history_is_upgraded_in_place(tmp_path):
    path = tmp_path / "v1.sqlite"
    with sqlite3.connect(path) as con:
        con.executescript(_V1_SCHEMA)
    rid = history.record(_report(TAMPERED), protocol="kserve", path=path)
    old, new = sorted(history.runs(path), key=lambda r: r["id"])
    assert (old["target"], old["signer"], old["notes"]) == ("kserve:http://old", None, None)
    assert new["id"] == rid and new["verdict"] == TAMPERED
    with sqlite3.connect(path) as con:
        assert con.execute("PRAGMA user_version").fetchone()[0] == history.SCHEMA_VERSION == 4


def test_record_stores_inert_redacted_text_and_the_signer(tmp_path):
    path = tmp_path / "h.sqlite"
    r = _report(INCONCLUSIVE, target="kserve:http://user:pw@127.0.0.1:9/v2?api_key=k3y")
    r.markers[0] = MarkerResult(0, Answer(labels=(0,)), None, False, failure="HTTP 500: \x1b[2K\rINTACT\u202e")
    signed = Report(**{**r.__dict__, "signer": "0123456789abcdef", "notes": ["a note\x1b[0m"]})
    history.record(signed, path=path)
    (row,) = history.runs(path)
    assert row["target"] == "kserve:http://127.0.0.1:9/v2?api_key=***"
    assert row["signer"] == "0123456789abcdef" and row["notes"] == "a note\\x1b[0m"
    assert history.markers(row["id"], path)[0]["detail"] == "HTTP 500: \\x1b[2K\\rINTACT\\u202e"
    assert "\x1b" not in row["summary"] and "\r" not in row["summary"]
