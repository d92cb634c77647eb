"""The run history: one row per verification run, one per marker or decoy it sent (SQLite, shared with the pool ledger).

The file, its location (``$TAMPERPROBE_HISTORY``, else the user data folder), its schema checks,
upgrade and time limits are ``_db``'s; the pool ledger (table ``drawn``) is ``ledger``'s. Here::

    runs(id, time, target, protocol, fingerprint, output_spec, verdict, markers, mismatched,
         failed, seconds, tolerance, summary, signer, notes, decoys, pool, repeated, draw)
    markers(run_id, kind, idx, status, expected, observed, detail, latency)

``time`` is UTC ISO 8601 (``2025-01-31T12:00:00.123456+00:00``); ``status`` is ``match``,
``MISMATCH`` or ``failed``; ``latency`` is the seconds the request carrying that marker took
(None for a local model). ``kind`` is ``marker`` or ``decoy`` (a natural input with a known
answer, ``served.pool``) and ``idx`` its index in the fingerprint's markers or decoys;
``runs.markers`` and ``runs.decoys`` count each kind, ``mismatched`` and ``failed`` count both.
``pool`` says how the run's markers were chosen (``fresh``: drawn unused from the pool,
``repeat``: ``--allow-repeat``, ``all``: every marker, as for a local model file; NULL in rows
written before version 3), ``repeated`` how many of its markers and decoys had been sent before,
and ``draw`` the id of its draw in the ledger. ``signer`` is the key id whose signature of the
fingerprint was verified, NULL when the fingerprint was not signed (accepted with
``--allow-unsigned``; rows written before version 2 are NULL too); ``notes`` holds the report's
notes, one per line. ``target`` never holds URL credentials or query values, and every text is
stored as ``untrusted.clean`` leaves it.

The history is written after the verdict is out (``verify`` and ``watch`` print it, run the hook
and fix the exit code first). A write waits at most ``timeout`` seconds (2 by default) for a
lock and every call is bounded in time (``_db``); a locked, damaged, foreign or unwritable
database is a ``HistoryError`` the caller reports as a warning.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from .._util import parse_duration
from ..errors import TamperprobeError
from ._db import READ_TIMEOUT, SCHEMA_VERSION, WRITE_TIMEOUT, HistoryError, connect, default_path, like_escape, now, rollback, text
from .credentials import redact_urls_in
from .untrusted import clean

if TYPE_CHECKING:
    from .verify import Report


def record(report: Report, protocol: str | None = None, path: str | os.PathLike | None = None, *, timeout: float = WRITE_TIMEOUT) -> int:
    """Store a verify ``Report`` and its markers and decoys; returns the run id.

    Waits at most ``timeout`` seconds for another writer's lock; any failure (locked, damaged,
    not a database, a folder that cannot be created) is a ``HistoryError``.
    """
    return record_many([(report, protocol)], path, timeout=timeout)[0]


def record_many(reports: Sequence[tuple[Report, str | None]], path: str | os.PathLike | None = None, *, timeout: float = WRITE_TIMEOUT) -> list[int]:
    """Store several ``(report, protocol)`` runs in one transaction (all or none, as ``record`` stores one); their run ids.

    A fleet's pass writes its runs in a few transactions instead of one per endpoint; the draws
    those runs sent are in the ledger already (``ledger.claim`` commits each before sending).
    """
    with connect(path, timeout=timeout, what="record the run in the history") as con:
        try:
            con.execute("BEGIN IMMEDIATE")
            ids = [_insert(con, report, protocol) for report, protocol in reports]
            con.execute("COMMIT")
        except BaseException:
            rollback(con)
            raise
    return ids


def _insert(con: Any, report: Report, protocol: str | None) -> int:
    rows = [
        (m.kind, int(m.index), m.status, text(m.expected, 4000), text(m.observed, 4000), text(m.failure or m.detail), m.latency)
        for m in report.markers
    ]
    cur = con.execute(
        "INSERT INTO runs (time, target, protocol, fingerprint, output_spec, verdict, markers, mismatched, failed, seconds, tolerance,"
        " summary, signer, notes, decoys, pool, repeated, draw) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            now(),
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
            text(report.summary(), 600),
            text(report.signer, 64),
            "\n".join(clean(n, 300) for n in report.notes) or None,
            report.decoy_count,
            text(report.pool, 16),
            report.repeated,
            text(report.draw, 64),
        ),
    )
    assert cur.lastrowid is not None  # set by every INSERT
    run_id = int(cur.lastrowid)
    con.executemany(
        "INSERT INTO markers (run_id, kind, idx, status, expected, observed, detail, latency) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        [(run_id, *r) for r in rows],
    )
    return run_id


def _since_text(since: Any) -> str:
    """``since`` as a UTC ISO timestamp: a datetime, an ISO string, or a duration back from now (``24h``)."""
    if isinstance(since, datetime):
        dt = since if since.tzinfo else since.replace(tzinfo=UTC)
    elif isinstance(since, timedelta):
        dt = datetime.now(UTC) - since
    else:
        value = str(since).strip()
        try:
            return (datetime.now(UTC) - timedelta(seconds=parse_duration(value))).isoformat(timespec="microseconds")
        except TamperprobeError:
            pass
        try:
            dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
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
        args.append("%" + like_escape(target) + "%")
    if verdict:
        where.append("verdict = ?")
        args.append(str(verdict).upper())
    if fingerprint:
        where.append("fingerprint LIKE ? ESCAPE '\\'")
        args.append(like_escape(fingerprint) + "%")
    if since is not None:
        where.append("time >= ?")
        args.append(_since_text(since))
    sql = "SELECT * FROM runs" + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY time DESC, id DESC"
    if limit is not None:
        sql += " LIMIT ?"
        args.append(int(limit))
    with connect(path) as con:
        return [dict(r) for r in con.execute(sql, args).fetchall()]


def markers(run_id: int, path: str | os.PathLike | None = None) -> list[dict]:
    """The per-marker outcomes of one run: its markers by index, then its decoys by index."""
    with connect(path) as con:
        rows = con.execute(
            'SELECT run_id, kind, idx AS "index", status, expected, observed, detail, latency FROM markers WHERE run_id = ?'
            " ORDER BY kind = 'decoy', idx",
            (int(run_id),),
        ).fetchall()
        return [dict(r) for r in rows]


__all__ = (
    "READ_TIMEOUT",
    "SCHEMA_VERSION",
    "WRITE_TIMEOUT",
    "HistoryError",
    "default_path",
    "markers",
    "parse_duration",
    "record",
    "record_many",
    "runs",
)
