"""A local SQLite history of verifications: one row per run, one per marker.

Location: ``$TAMPERPROBE_HISTORY`` if set, else ``history.sqlite`` in the user data directory
(``platformdirs.user_data_dir("tamperprobe")``); every function also takes an explicit ``path``.

Tables (schema version 3, in ``PRAGMA user_version``; a version 1 or 2 file is upgraded in place,
its rows kept)::

    runs(id, time, target, protocol, fingerprint, output_spec, verdict, markers, mismatched,
         failed, seconds, tolerance, summary, signer, notes, decoys, pool, repeated, draw)
    markers(run_id, kind, idx, status, expected, observed, detail, latency)
    drawn(fingerprint, kind, idx, time, draw, target)

``time`` is UTC ISO 8601 (``2025-01-31T12:00:00.123456+00:00``); ``status`` is ``match``,
``MISMATCH`` or ``failed``; ``latency`` is the seconds the request carrying that marker took
(None for a local model). ``kind`` is ``marker`` or ``decoy`` (a natural input with a known
answer, ``served.pool``) and ``idx`` its index in the fingerprint's markers or decoys;
``runs.markers`` and ``runs.decoys`` count each kind, ``mismatched`` and ``failed`` count both.
``pool`` says how the run's markers were chosen (``fresh``: drawn unused from the pool,
``repeat``: ``--allow-repeat``, ``all``: every marker, as for a local model file; NULL before
version 3), ``repeated`` how many of its markers and decoys had been sent before, and ``draw`` the
id of its draw in ``drawn``.

``drawn`` is the pool ledger (``served.pool``): one row per marker or decoy ever drawn for a
fingerprint, primary key ``(fingerprint, kind, idx)``, written in one ``BEGIN IMMEDIATE``
transaction with the read of what was used (``claim``) and committed before anything is sent,
so two processes sharing the file can never draw the same marker and a crash wastes markers
rather than re-sending them. A draw whose ``draw`` id has no run was interrupted. ``signer`` is the key id whose signature of the fingerprint was
verified, NULL when the fingerprint was not signed (accepted with ``--allow-unsigned``; rows
written before version 2 are NULL too); ``notes`` holds the report's notes, one per line (such
as the unsigned fingerprint's). ``target`` never holds URL credentials or query values, and
every text is stored as ``untrusted.clean`` leaves it.

The database runs in WAL mode and every write is one short transaction, so several ``watch``
processes can record into one file. A write waits at most ``timeout`` seconds (2 by default)
for a lock: the history is written after the verdict is out (``verify`` and ``watch`` print it,
run the hook and fix the exit code first), and a locked, damaged or unwritable database is a
``HistoryError`` the caller reports as a warning.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable
from contextlib import closing
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._util import one_line
from ..errors import TamperprobeError, UsageError
from .credentials import redact_urls_in
from .untrusted import clean

if TYPE_CHECKING:
    from .verify import Report

SCHEMA_VERSION = 3
WRITE_TIMEOUT = 2.0  # seconds a write waits for a lock held by another process
READ_TIMEOUT = 10.0
_MARKERS_TABLE = """
CREATE TABLE IF NOT EXISTS markers (
    run_id INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    kind TEXT NOT NULL DEFAULT 'marker',
    idx INTEGER NOT NULL,
    status TEXT NOT NULL,
    expected TEXT,
    observed TEXT,
    detail TEXT,
    latency REAL,
    PRIMARY KEY (run_id, kind, idx)
)"""
_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time TEXT NOT NULL,
    target TEXT NOT NULL,
    protocol TEXT,
    fingerprint TEXT NOT NULL,
    output_spec TEXT NOT NULL,
    verdict TEXT NOT NULL,
    markers INTEGER NOT NULL,
    mismatched INTEGER NOT NULL,
    failed INTEGER NOT NULL,
    seconds REAL NOT NULL,
    tolerance REAL,
    summary TEXT,
    signer TEXT,
    notes TEXT,
    decoys INTEGER,
    pool TEXT,
    repeated INTEGER,
    draw TEXT
);
{_MARKERS_TABLE};
CREATE TABLE IF NOT EXISTS drawn (
    fingerprint TEXT NOT NULL,
    kind TEXT NOT NULL,
    idx INTEGER NOT NULL,
    time TEXT NOT NULL,
    draw TEXT NOT NULL,
    target TEXT,
    PRIMARY KEY (fingerprint, kind, idx)
);
CREATE INDEX IF NOT EXISTS runs_time ON runs(time);
CREATE INDEX IF NOT EXISTS runs_target ON runs(target);
CREATE INDEX IF NOT EXISTS runs_fingerprint ON runs(fingerprint);
CREATE INDEX IF NOT EXISTS drawn_draw ON drawn(draw);
"""
# columns of ``runs`` added after version 1, as (name, type), added to an older file on upgrade
_ADDED_COLUMNS = (("signer", "TEXT"), ("notes", "TEXT"), ("decoys", "INTEGER"), ("pool", "TEXT"), ("repeated", "INTEGER"), ("draw", "TEXT"))


class HistoryError(TamperprobeError):
    """The history database cannot be opened, read or written."""


def default_path() -> Path:
    env = os.environ.get("TAMPERPROBE_HISTORY")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_data_dir("tamperprobe")) / "history.sqlite"


def _connect(path: str | os.PathLike | None, create: bool = True, timeout: float = READ_TIMEOUT) -> sqlite3.Connection:
    p = Path(path).expanduser() if path is not None else default_path()
    if not create and not p.exists():
        raise HistoryError(f"no history at {p} (nothing recorded yet)")
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        con = sqlite3.connect(str(p), timeout=timeout, isolation_level=None)
        con.row_factory = sqlite3.Row
        con.execute(f"PRAGMA busy_timeout = {int(timeout * 1000)}")
        con.execute("PRAGMA foreign_keys = ON")
        version = con.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            con.close()
            raise HistoryError(f"{p} was written by a newer tamperprobe (history schema v{version}); upgrade tamperprobe")
        if version < SCHEMA_VERSION:
            try:
                con.execute("PRAGMA journal_mode = WAL")
            except sqlite3.OperationalError:
                pass  # e.g. a file system without shared memory: the default journal still works
            con.execute("BEGIN IMMEDIATE")
            try:
                for stmt in _SCHEMA.split(";"):
                    if stmt.strip():
                        con.execute(stmt)
                _upgrade(con)
                con.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                con.execute("COMMIT")
            except BaseException:
                con.execute("ROLLBACK")
                raise
        return con
    except HistoryError:
        raise
    except (sqlite3.Error, OSError) as exc:
        raise HistoryError(f"cannot open history {p}: {one_line(exc)}") from None


def _upgrade(con: sqlite3.Connection) -> None:
    """Bring a version 1 or 2 file to the current schema inside the caller's transaction, keeping every row.

    ``runs`` gains the newer columns (NULL in old rows). ``markers`` gains ``kind`` inside its
    primary key, which SQLite cannot alter: the table is rebuilt and its rows copied as markers.
    """
    have = {row[1] for row in con.execute("PRAGMA table_info(runs)")}
    for column, kind in _ADDED_COLUMNS:
        if column not in have:
            con.execute(f"ALTER TABLE runs ADD COLUMN {column} {kind}")
    if "kind" not in {row[1] for row in con.execute("PRAGMA table_info(markers)")}:
        con.execute("ALTER TABLE markers RENAME TO markers_old")
        con.execute(_MARKERS_TABLE)
        con.execute(
            "INSERT INTO markers (run_id, kind, idx, status, expected, observed, detail, latency)"
            " SELECT run_id, 'marker', idx, status, expected, observed, detail, latency FROM markers_old"
        )
        con.execute("DROP TABLE markers_old")


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


def _text(value: Any, limit: int = 400) -> str | None:
    return None if value is None or value == "" else clean(value, limit)


def record(report: Report, protocol: str | None = None, path: str | os.PathLike | None = None, *, timeout: float = WRITE_TIMEOUT) -> int:
    """Store a verify ``Report`` and its markers and decoys; returns the run id.

    Waits at most ``timeout`` seconds for another writer's lock; any failure (locked, damaged,
    not a database, a folder that cannot be created) is a ``HistoryError``.
    """
    rows = [
        (m.kind, int(m.index), m.status, _text(m.expected, 4000), _text(m.observed, 4000), _text(m.failure or m.detail), m.latency)
        for m in report.markers
    ]
    with closing(_connect(path, timeout=timeout)) as con:
        try:
            con.execute("BEGIN IMMEDIATE")
            cur = con.execute(
                "INSERT INTO runs (time, target, protocol, fingerprint, output_spec, verdict, markers, mismatched, failed, seconds, tolerance,"
                " summary, signer, notes, decoys, pool, repeated, draw) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    _now(),
                    clean(redact_urls_in(report.target), 300),
                    protocol,
                    report.fingerprint_id,
                    report.output_spec,
                    report.verdict,
                    report.marker_count,
                    report.mismatched,
                    report.failed,
                    float(report.seconds),
                    float(report.tolerance),
                    _text(report.summary(), 600),
                    _text(report.signer, 64),
                    "\n".join(clean(n, 300) for n in report.notes) or None,
                    report.decoy_count,
                    _text(report.pool, 16),
                    report.repeated,
                    _text(report.draw, 64),
                ),
            )
            assert cur.lastrowid is not None  # set by every INSERT
            run_id = cur.lastrowid
            con.executemany(
                "INSERT INTO markers (run_id, kind, idx, status, expected, observed, detail, latency) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [(run_id, *r) for r in rows],
            )
            con.execute("COMMIT")
        except sqlite3.Error as exc:
            try:
                con.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            raise HistoryError(f"cannot record the run in the history: {one_line(exc)}") from None
    return run_id


Chooser = Callable[[dict[str, set[int]]], dict[str, list[int]]]


def claim(
    fingerprint: str, choose: Chooser, *, draw: str, target: str = "", path: str | os.PathLike | None = None, timeout: float = WRITE_TIMEOUT
) -> dict[str, list[int]]:
    """Draw and mark in one write transaction: the pool ledger's only writer (``served.pool``).

    ``choose(used)`` gets, per kind (``marker``, ``decoy``), the indices already drawn for
    ``fingerprint`` and returns the indices to send, per kind; those not drawn before are
    recorded under the draw id ``draw`` and committed before this returns, so they count as
    used even if nothing is ever sent. The read and the write sit in one ``BEGIN IMMEDIATE``
    transaction (the write lock is taken first), so two processes sharing the file see each
    other's draws; the primary key refuses a marker recorded twice whatever happens. An
    exception from ``choose`` rolls back and propagates; a database failure is a
    ``HistoryError``.
    """
    with closing(_connect(path, timeout=timeout)) as con:
        try:
            con.execute("BEGIN IMMEDIATE")
            used: dict[str, set[int]] = {}
            for kind, idx in con.execute("SELECT kind, idx FROM drawn WHERE fingerprint = ?", (fingerprint,)):
                used.setdefault(str(kind), set()).add(int(idx))
            chosen = choose(used)
            now, where = _now(), clean(redact_urls_in(target), 300)
            new = [(fingerprint, kind, int(i), now, draw, where) for kind, ids in chosen.items() for i in ids if int(i) not in used.get(kind, set())]
            con.executemany("INSERT INTO drawn (fingerprint, kind, idx, time, draw, target) VALUES (?, ?, ?, ?, ?, ?)", new)
            con.execute("COMMIT")
        except BaseException as exc:
            try:
                con.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            if isinstance(exc, sqlite3.Error):
                raise HistoryError(f"cannot record the draw in the history: {one_line(exc)}") from None
            raise
    return chosen


def drawn(fingerprint: str, path: str | os.PathLike | None = None) -> dict[str, set[int]]:
    """The indices drawn so far for ``fingerprint``, per kind (empty when there is no history yet)."""
    p = Path(path).expanduser() if path is not None else default_path()
    if not p.exists():
        return {}
    try:
        with closing(_connect(p, create=False)) as con:
            out: dict[str, set[int]] = {}
            for kind, idx in con.execute("SELECT kind, idx FROM drawn WHERE fingerprint = ?", (fingerprint,)):
                out.setdefault(str(kind), set()).add(int(idx))
            return out
    except sqlite3.Error as exc:
        raise HistoryError(f"cannot read the history: {one_line(exc)}") from None


def pool_usage(path: str | os.PathLike | None = None, fingerprint: str | None = None) -> list[dict]:
    """Per fingerprint (id prefix ``fingerprint``), how many markers and decoys were drawn, in how many draws, first and last time."""
    sql = (
        "SELECT fingerprint, SUM(kind = 'marker') AS markers, SUM(kind = 'decoy') AS decoys, COUNT(DISTINCT draw) AS draws,"
        " MIN(time) AS first, MAX(time) AS last FROM drawn"
    )
    args: list[Any] = []
    if fingerprint:
        sql += " WHERE fingerprint LIKE ? ESCAPE '\\'"
        args.append(_like_escape(fingerprint) + "%")
    sql += " GROUP BY fingerprint ORDER BY last DESC"
    try:
        with closing(_connect(path)) as con:
            return [dict(r) for r in con.execute(sql, args).fetchall()]
    except sqlite3.Error as exc:
        raise HistoryError(f"cannot read the history: {one_line(exc)}") from None


_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}


def parse_duration(text: str | float | int) -> float:
    """``30s``, ``10m``, ``1h30m``, ``1.5h``, ``2d``, ``500ms`` or plain seconds (``90``) -> seconds."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value = float(text)
    else:
        s = str(text).strip().lower().replace(" ", "")
        try:
            value = float(s)
        except ValueError:
            import re

            pieces = re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)", s)
            if not s or "".join(a + b for a, b in pieces) != s:
                raise UsageError(f"bad duration {text!r}: use e.g. 30s, 10m, 1h, 1h30m") from None
            value = sum(float(a) * _UNITS[b] for a, b in pieces)
    if not value >= 0 or value == float("inf"):
        raise UsageError(f"bad duration {text!r}: must be a finite number of seconds >= 0")
    return value


def _since_text(since: Any) -> str:
    """``since`` as a UTC ISO timestamp: a datetime, an ISO string, or a duration back from now (``24h``)."""
    if isinstance(since, datetime):
        dt = since if since.tzinfo else since.replace(tzinfo=UTC)
    elif isinstance(since, timedelta):
        dt = datetime.now(UTC) - since
    else:
        text = str(since).strip()
        try:
            return (datetime.now(UTC) - timedelta(seconds=parse_duration(text))).isoformat(timespec="microseconds")
        except TamperprobeError:
            pass
        try:
            dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            raise HistoryError(f"bad --since {since!r}: give an ISO time (2025-01-31T12:00) or a duration (24h)") from None
        if dt.tzinfo is None:
            dt = dt.replace(tzinfo=UTC)
    return dt.astimezone(UTC).isoformat(timespec="microseconds")


def runs(
    path: str | os.PathLike | None = None,
    *,
    target: str | None = None,
    verdict: str | None = None,
    fingerprint: str | None = None,
    since: Any = None,
    limit: int | None = 50,
) -> list[dict]:
    """Recorded runs, newest first. ``target`` matches a substring of the target (endpoint),
    ``fingerprint`` a prefix of the fingerprint id, ``verdict`` exactly (case-insensitive),
    ``since`` is a datetime, an ISO time or a duration back from now (``24h``)."""
    where: list[str] = []
    args: list[Any] = []
    if target:
        where.append("target LIKE ? ESCAPE '\\'")
        args.append("%" + _like_escape(target) + "%")
    if verdict:
        where.append("verdict = ?")
        args.append(str(verdict).upper())
    if fingerprint:
        where.append("fingerprint LIKE ? ESCAPE '\\'")
        args.append(_like_escape(fingerprint) + "%")
    if since is not None:
        where.append("time >= ?")
        args.append(_since_text(since))
    sql = "SELECT * FROM runs" + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY time DESC, id DESC"
    if limit is not None:
        sql += " LIMIT ?"
        args.append(int(limit))
    try:
        with closing(_connect(path)) as con:
            return [dict(r) for r in con.execute(sql, args).fetchall()]
    except sqlite3.Error as exc:
        raise HistoryError(f"cannot read the history: {one_line(exc)}") from None


def markers(run_id: int, path: str | os.PathLike | None = None) -> list[dict]:
    """The per-marker outcomes of one run: its markers by index, then its decoys by index."""
    try:
        with closing(_connect(path)) as con:
            rows = con.execute(
                'SELECT run_id, kind, idx AS "index", status, expected, observed, detail, latency FROM markers WHERE run_id = ?'
                " ORDER BY kind = 'decoy', idx",
                (int(run_id),),
            ).fetchall()
            return [dict(r) for r in rows]
    except sqlite3.Error as exc:
        raise HistoryError(f"cannot read the history: {one_line(exc)}") from None


def _like_escape(text: str) -> str:
    return str(text).replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def release(draw_id: str, path: str | os.PathLike | None = None, *, timeout: float = WRITE_TIMEOUT) -> int:
    """Return the markers and decoys of draw ``draw_id`` to the pool: its ledger rows are deleted; returns how many.

    Only for a draw of which nothing can have reached the target (no connection was made:
    ``targets.QueryResult.sent``); anything that may have been sent stays spent. A database
    failure is a ``HistoryError`` (the markers then stay spent, the safe side).
    """
    with closing(_connect(path, timeout=timeout)) as con:
        try:
            con.execute("BEGIN IMMEDIATE")
            cur = con.execute("DELETE FROM drawn WHERE draw = ?", (str(draw_id),))
            con.execute("COMMIT")
        except sqlite3.Error as exc:
            try:
                con.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            raise HistoryError(f"cannot return the draw to the pool: {one_line(exc)}") from None
    return int(cur.rowcount)
