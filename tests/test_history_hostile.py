"""The history file is hostile until proven otherwise (issue 18.3): whoever can write it cannot hold the alarm or make the ledger forget.

Real components: real SQLite files planted with triggers, views, extra tables and indexes by a
plain ``sqlite3`` connection (what anyone who can write the file can do), the CLI in a process
of its own (forked from the test's, ``tests/_procs.py``) bounded by a timeout (a hang fails the test instead of hanging the suite), the
reference server on 127.0.0.1, and the pool drawing from a real fingerprint.
"""

from __future__ import annotations

import os
import sqlite3
import time

import numpy as np
import pytest
import torch

from _procs import run_cli, run_forked
from fakes import confident_mlp
from tamperprobe.data import InputSpec
from tamperprobe.fingerprint import make_fingerprint, save
from tamperprobe.outputs import Answer
from tamperprobe.served import _db, history, ledger, pool
from tamperprobe.served.verify import INTACT, MarkerResult, Report
from tamperprobe.server.app import ServerThread

SHAPE = (1, 8, 8)
# a statement that never ends: counts an endless recursive sequence
_ENDLESS = "SELECT count(*) FROM (WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT x FROM c)"
_PLANTS = {
    "looping trigger on runs": f"CREATE TRIGGER hold AFTER INSERT ON runs BEGIN {_ENDLESS}; END",
    "looping trigger on drawn": f"CREATE TRIGGER hold AFTER INSERT ON drawn BEGIN {_ENDLESS}; END",
    "trigger forgetting draws": "CREATE TRIGGER forget AFTER INSERT ON drawn BEGIN DELETE FROM drawn WHERE rowid = NEW.rowid; END",
    "view": "CREATE VIEW recent AS SELECT * FROM runs",
    "extra table": "CREATE TABLE notes_of_mine (x TEXT)",
    "extra index": "CREATE INDEX runs_verdict ON runs(verdict)",
}


def _report() -> Report:
    exp = Answer(labels=(1,))
    return Report(INTACT, "kserve:http://127.0.0.1:9/v2/models/m", "top1", "abcdef0123456789", [MarkerResult(0, exp, exp, True)], 0.1, 3e-5)


def _planted(path, sql: str):
    """A valid current history (made by tamperprobe) into which ``sql`` was planted afterwards."""
    history.runs(path)
    with sqlite3.connect(path) as con:
        con.execute(sql)
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("hostile")
    intact, tampered = confident_mlp(0), confident_mlp(1)
    x = np.random.default_rng(0).random((20, *SHAPE)).astype(np.float32)
    logits = np.concatenate([intact.logits(x[i : i + 1]) for i in range(len(x))])
    fp = make_fingerprint(x, logits, InputSpec(SHAPE), {"method": "natural"}, "test", output_spec="logits")
    model_file = d / "tampered.pt"
    torch.jit.trace(tampered.module, torch.zeros(1, *SHAPE)).save(str(model_file))
    return {"fp": fp, "fp_path": save(fp, d / "fp.tpf"), "tampered": tampered, "model_file": model_file}


def _cli(*args, timeout: float = 120):
    """The CLI in a process of its own (forked from this one: no second ``import torch``), killed after ``timeout``."""
    start = time.monotonic()
    proc = run_cli(*args, timeout=timeout, extra_env={"OMP_NUM_THREADS": "1", "TAMPERPROBE_THREADS": "1"})
    return proc, time.monotonic() - start


# --------------------------------------------------------------------------- the alarm is never held


def test_verify_with_a_looping_trigger_in_the_history_prints_tampered_and_exits_1_promptly(world, tmp_path):
    """A trusted local model draws nothing, so the history is first touched after the verdict: refused at once, a warning."""
    hist = _planted(tmp_path / "h.sqlite", _PLANTS["looping trigger on runs"])
    proc, _ = _cli("verify", world["fp_path"], "--model", world["model_file"], "--trusted-model", "--history", hist)
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert proc.stdout.strip().splitlines()[-1].startswith("TAMPERED: ")
    (warning,) = proc.stderr.strip().splitlines()
    assert warning.startswith("warning: the run was not recorded in the history") and "trigger hold" in warning
    # a suspect's model file draws from the pool like an endpoint: the same file refuses the draw, before anything runs
    proc, _ = _cli("verify", world["fp_path"], "--model", world["model_file"], "--history", hist)
    assert proc.returncode == 2 and "trigger hold" in proc.stderr and "nothing was sent" in proc.stderr, (proc.stdout, proc.stderr)


def test_watch_with_a_looping_trigger_on_the_ledger_stops_with_exit_2_sending_nothing(world, tmp_path):
    hist = _planted(tmp_path / "h.sqlite", _PLANTS["looping trigger on drawn"])
    seen: list = []

    class Counting(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = world["tampered"].module

        def forward(self, x):
            seen.extend(r for r in x.detach().numpy() if r.any())  # the server's own zero probe is not a query
            return self.inner(x)

    from tamperprobe.models import TorchModel

    with ServerThread(TorchModel(Counting(), "counting"), name="m", input_shape=SHAPE) as srv:
        args = ["watch", world["fp_path"], "--endpoint", srv.url, "--model-name", "m", "--history", hist, "--per-run", "2", "--every", "0s"]
        proc, seconds = _cli(*args, "--count", "1", "--retries", "0", timeout=60)
    assert proc.returncode == 2 and seen == [], (proc.stdout, proc.stderr)
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("error:") and "trigger hold" in line and "nothing was sent" in line
    assert seconds < 30


# --------------------------------------------------------------------------- the ledger cannot be made to forget


def test_a_trigger_deleting_ledger_rows_cannot_stretch_a_pool(world, tmp_path):
    hist = _planted(tmp_path / "h.sqlite", _PLANTS["trigger forgetting draws"])
    fp = world["fp"]
    plan = pool.plan(fp, per_run=2, decoys=0)
    assert pool.capacity(fp, plan) == 10
    drawn: list[int] = []
    for _ in range(15):
        try:
            drawn += pool.draw(fp, plan, path=hist).markers
        except (pool.PoolExhausted, history.HistoryError) as exc:
            assert "trigger forget" in str(exc) and "nothing was sent" in str(exc)
            break
    assert len(drawn) == len(set(drawn)) <= len(fp)  # main: 15 runs, 30 markers from a 20-marker pool


def test_a_draw_whose_rows_vanish_after_the_commit_is_refused(world, tmp_path, monkeypatch):
    """The second line of defence: with the schema check switched off, the read-back after the commit still catches a forgetting ledger."""
    hist = _planted(tmp_path / "h.sqlite", _PLANTS["trigger forgetting draws"])
    monkeypatch.setattr(_db, "check_schema", lambda con, p: None)
    fp = world["fp"]
    with pytest.raises(history.HistoryError, match="kept 0 of the 2 queries just drawn"):
        pool.draw(fp, pool.plan(fp, per_run=2, decoys=0), path=hist)


# --------------------------------------------------------------------------- anything foreign is refused, in one line


@pytest.mark.parametrize("plant", ["view", "extra table", "extra index", "looping trigger on runs"])
def test_a_history_holding_anything_tamperprobe_did_not_create_is_refused(tmp_path, plant):
    hist = _planted(tmp_path / "h.sqlite", _PLANTS[plant])
    name = _PLANTS[plant].split()[2] if "TRIGGER" not in _PLANTS[plant] else "hold"
    for call in (lambda: history.runs(hist), lambda: history.record(_report(), path=hist), lambda: ledger.pool_usage(hist)):
        with pytest.raises(history.HistoryError) as info:
            call()
        message = str(info.value)
        assert "\n" not in message and name in message and "did not create" in message
    proc, _ = _cli("history", "--history", hist, timeout=60)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and name in proc.stderr, proc.stderr


def test_an_altered_table_is_refused(tmp_path):
    """A table of the right name with another definition (here a CHECK that fails every insert) is foreign too."""
    hist = tmp_path / "h.sqlite"
    history.runs(hist)
    with sqlite3.connect(hist) as con:
        con.execute("DROP TABLE drawn")
        con.execute(
            "CREATE TABLE drawn (fingerprint TEXT NOT NULL, kind TEXT NOT NULL, idx INTEGER NOT NULL, time TEXT NOT NULL, draw TEXT NOT NULL,"
            " target TEXT, digest TEXT, PRIMARY KEY (fingerprint, kind, idx) ON CONFLICT IGNORE)"
        )
    with pytest.raises(history.HistoryError, match="an altered table drawn"):
        history.runs(hist)


def test_an_old_history_holding_a_trigger_is_refused_not_upgraded(tmp_path):
    hist = tmp_path / "v1.sqlite"
    with sqlite3.connect(hist) as con:
        con.executescript(_V1 + f"CREATE TRIGGER hold AFTER INSERT ON runs BEGIN {_ENDLESS}; END;")
    with pytest.raises(history.HistoryError, match="trigger hold"):
        history.record(_report(), path=hist)
    with sqlite3.connect(hist) as con:
        assert con.execute("PRAGMA user_version").fetchone()[0] == 1  # left as it was


def test_another_programs_database_is_refused_not_written_into(tmp_path):
    other = tmp_path / "app.sqlite"
    with sqlite3.connect(other) as con:
        con.execute("CREATE TABLE customers (name TEXT)")
    with pytest.raises(history.HistoryError, match="table customers"):
        history.record(_report(), path=other)
    with sqlite3.connect(other) as con:
        assert [r[0] for r in con.execute("SELECT name FROM sqlite_master")] == ["customers"]


def _print_refusal(path: str) -> None:
    try:
        history.runs(path)
    except history.HistoryError as exc:
        print(exc)


def test_a_fifo_in_place_of_the_history_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "h.sqlite"
    os.mkfifo(fifo)
    proc = run_forked(_print_refusal, str(fifo), timeout=60)  # in a child of its own: were it to block, it is killed
    assert "is not a regular file" in proc.stdout, (proc.stdout, proc.stderr)


# --------------------------------------------------------------------------- every statement is bounded in time


def test_a_statement_that_never_ends_is_interrupted_within_the_budget(tmp_path):
    start = time.monotonic()
    with pytest.raises(history.HistoryError, match="did not answer within"):
        with _db.connect(tmp_path / "h.sqlite", timeout=0.2, budget=0.5) as con:
            con.execute(_ENDLESS).fetchone()
    assert time.monotonic() - start < 5


def test_a_looping_trigger_past_the_schema_check_still_ends_within_the_budget(tmp_path, monkeypatch):
    """Were the schema check ever to miss something, the progress handler still bounds what it can run."""
    hist = _planted(tmp_path / "h.sqlite", _PLANTS["looping trigger on runs"])
    monkeypatch.setattr(_db, "check_schema", lambda con, p: None)
    monkeypatch.setattr(_db, "BUDGET", 0.5)
    start = time.monotonic()
    with pytest.raises(history.HistoryError, match="cannot record the run in the history: the database did not answer within"):
        history.record(_report(), path=hist, timeout=0.2)
    assert time.monotonic() - start < 5
    assert history.runs(hist) == []  # rolled back


# --------------------------------------------------------------------------- upgrades keep old files readable, and exact

_V1 = """
CREATE TABLE runs (id INTEGER PRIMARY KEY AUTOINCREMENT, time TEXT NOT NULL, target TEXT NOT NULL, protocol TEXT,
    fingerprint TEXT NOT NULL, output_spec TEXT NOT NULL, verdict TEXT NOT NULL, markers INTEGER NOT NULL,
    mismatched INTEGER NOT NULL, failed INTEGER NOT NULL, seconds REAL NOT NULL, tolerance REAL, summary TEXT);
CREATE TABLE markers (run_id INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE, idx INTEGER NOT NULL, status TEXT NOT NULL,
    expected TEXT, observed TEXT, detail TEXT, latency REAL, PRIMARY KEY (run_id, idx));
CREATE INDEX runs_time ON runs(time);
INSERT INTO runs VALUES (7, '2025-01-01T00:00:00+00:00', 'kserve:http://old', 'kserve', 'abcd', 'top1', 'INTACT', 1, 0, 0, 0.1, 3e-5, 'INTACT');
INSERT INTO markers VALUES (7, 0, 'match', '1', '1', '', 0.01);
PRAGMA user_version = 1;
"""
# a version 3 file as tamperprobe 0.x wrote it: version 1 tables grown by ALTER TABLE, and the ledger without digests
_V3_EXTRA = """
ALTER TABLE runs ADD COLUMN signer TEXT; ALTER TABLE runs ADD COLUMN notes TEXT; ALTER TABLE runs ADD COLUMN decoys INTEGER;
ALTER TABLE runs ADD COLUMN pool TEXT; ALTER TABLE runs ADD COLUMN repeated INTEGER; ALTER TABLE runs ADD COLUMN draw TEXT;
CREATE TABLE drawn (fingerprint TEXT NOT NULL, kind TEXT NOT NULL, idx INTEGER NOT NULL, time TEXT NOT NULL, draw TEXT NOT NULL,
    target TEXT, PRIMARY KEY (fingerprint, kind, idx));
CREATE INDEX drawn_draw ON drawn(draw);
PRAGMA user_version = 3;
"""


def test_a_version_1_file_is_rebuilt_to_the_exact_schema_keeping_its_rows(tmp_path):
    hist = tmp_path / "v1.sqlite"
    with sqlite3.connect(hist) as con:
        con.executescript(_V1)
    rid = history.record(_report(), path=hist)
    assert rid == 8  # ids continue after the old ones
    old = history.runs(hist, target="old")[0]
    assert (old["id"], old["target"], old["signer"]) == (7, "kserve:http://old", None)
    assert [(m["kind"], m["index"], m["status"]) for m in history.markers(7, hist)] == [("marker", 0, "match")]
    with sqlite3.connect(hist) as con:
        assert {tuple(r) for r in con.execute("SELECT type, name, tbl_name, sql FROM sqlite_master")} == _db.expected_schema()


def test_a_version_3_ledger_keeps_its_draws_and_learns_their_content(world, tmp_path):
    """Rows drawn before digests existed still count for their fingerprint, and once that fingerprint draws again they
    protect the same queries under any other fingerprint too."""
    fp = world["fp"]
    hist = tmp_path / "v3.sqlite"
    with sqlite3.connect(hist) as con:
        con.executescript(_V1 + _V3_EXTRA)
        con.executemany(
            "INSERT INTO drawn VALUES (?, 'marker', ?, '2025-01-01T00:00:00+00:00', 'old', 'kserve:http://old')", [(fp.id, i) for i in (0, 1)]
        )
    plan = pool.plan(fp, per_run=2, decoys=0)
    d = pool.draw(fp, plan, path=hist)
    assert not {0, 1} & set(d.markers)
    twin = make_fingerprint(fp.inputs, fp.logits, fp.input_spec, {"method": "natural", "seed": 1}, "test", output_spec="logits")
    assert twin.id != fp.id
    assert pool.status(twin, plan, hist).used_markers == 4  # the two old rows (now with digests) and the new draw


def test_release_forgets_a_draw_that_reached_no_server(world, tmp_path):
    fp, hist = world["fp"], tmp_path / "h.sqlite"
    plan = pool.plan(fp, per_run=2, decoys=0)
    kept, dropped = pool.draw(fp, plan, path=hist), pool.draw(fp, plan, path=hist)
    assert dropped.draw_id is not None and ledger.release(dropped.draw_id, hist) == 2
    assert ledger.drawn(fp.id, hist) == {"marker": set(kept.markers)}
    assert ledger.release("no-such-draw", hist) == 0


def test_threads_creating_a_new_history_at_once_all_accept_it(tmp_path):
    """A fleet's endpoints open a history that does not exist yet from several threads: none may take the schema another
    thread has just created for a foreign one (found by the fleet docs page: "holds index drawn_digest it did not create")."""
    import threading

    from tamperprobe.served import _db

    for attempt in range(5):
        path = tmp_path / f"h{attempt}.sqlite"
        errors: list[BaseException] = []
        start = threading.Barrier(8)

        def open_it(path=path, start=start, errors=errors) -> None:
            start.wait()
            try:
                with _db.connect(path):
                    pass
            except BaseException as exc:  # noqa: BLE001 - collected for the assertion
                errors.append(exc)

        threads = [threading.Thread(target=open_it) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert errors == [], errors
