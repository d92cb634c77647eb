"""The pool ledger: every marker and decoy ever drawn, so that none is sent twice (``served.pool`` draws through it).

Table ``drawn`` of the history file (``_db``): one row per marker or decoy drawn,
``(fingerprint, kind, idx, time, draw, target, digest)``, primary key ``(fingerprint, kind, idx)``.
``kind`` is ``marker`` or ``decoy``, ``idx`` its index in the fingerprint, ``draw`` the id of the
run's draw (a run records it in ``runs.draw``; a draw whose id has no run was interrupted),
``target`` where it was to be sent (without URL credentials or query values) and ``digest`` the
*content* of the query (``content_digest``: SHA-256 of its dtype, shape and bytes; NULL in rows
written before version 4 until a draw of their fingerprint fills it in).

**Used means used by content.** A marker counts as used when its fingerprint drew it *or* when any
row holds its digest, whatever fingerprint drew it: a fingerprint regenerated with the same seed
and a larger size reproduces the old markers under a new id, and those are never sent again.

``claim`` is the ledger's only writer: it reads what was used and writes the new draw in one
``BEGIN IMMEDIATE`` transaction, commits **before** anything is sent (a crash wastes markers
rather than re-sending them; two processes sharing the file never draw the same marker), and
then reads the draw's rows back: if they are not all there (something removed them) the draw is
refused with ``HistoryError`` and nothing is sent. ``release`` deletes a draw's rows, for a run
that reached no server. Every function fails within its time limit with ``HistoryError``.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from ._db import WRITE_TIMEOUT, HistoryError, connect, like_escape, now, resolve, rollback
from .credentials import redact_urls_in
from .untrusted import clean

Chooser = Callable[[dict[str, set[int]]], dict[str, list[int]]]
Digests = Mapping[str, Sequence[str]]


def _rows_digests(batch: np.ndarray) -> list[str]:
    """``content_digest`` of every row of ``batch`` (one header hashed once, then copied per row)."""
    arr = np.ascontiguousarray(batch)
    base = hashlib.sha256(f"tamperprobe.query|{arr.dtype.str}|{arr.shape[1:]}\n".encode())
    flat = arr.reshape(len(arr), -1).view(np.uint8) if arr.size else arr.reshape(len(arr), 0)
    out = []
    for row in flat:
        h = base.copy()
        h.update(row.data)
        out.append(h.hexdigest())
    return out


def content_digest(query: np.ndarray) -> str:
    """SHA-256 (hex) of one query as sent: its dtype, shape and bytes, so equal inputs of any fingerprint get equal digests."""
    arr = np.asarray(query)
    return _rows_digests(arr[None])[0]


def digests_of(queries: Mapping[str, np.ndarray]) -> dict[str, list[str]]:
    """``content_digest`` of every row of each kind's inputs (``{"marker": fp.inputs, "decoy": fp.decoy_inputs}``)."""
    return {kind: _rows_digests(arr) for kind, arr in queries.items()}


def _used(con: sqlite3.Connection, fingerprint: str, digests: Digests | None) -> dict[str, set[int]]:
    """Per kind, the indices drawn for ``fingerprint`` or whose content any draw holds."""
    used: dict[str, set[int]] = {}
    for kind, idx in con.execute("SELECT kind, idx FROM drawn WHERE fingerprint = ?", (fingerprint,)):
        used.setdefault(str(kind), set()).add(int(idx))
    if digests:
        sent = {str(d) for (d,) in con.execute("SELECT digest FROM drawn WHERE digest IS NOT NULL")}
        for kind, ds in digests.items():
            hits = {i for i, d in enumerate(ds) if d in sent}
            if hits:
                used.setdefault(kind, set()).update(hits)
    return used


def _backfill(con: sqlite3.Connection, fingerprint: str, digests: Digests) -> None:
    """Give this fingerprint's rows written before version 4 their digest, so other fingerprints see those queries as sent."""
    rows = con.execute("SELECT kind, idx FROM drawn WHERE fingerprint = ? AND digest IS NULL", (fingerprint,)).fetchall()
    fill = [(digests[str(k)][int(i)], fingerprint, str(k), int(i)) for k, i in rows if str(k) in digests and 0 <= int(i) < len(digests[str(k)])]
    if fill:
        con.executemany("UPDATE drawn SET digest = ? WHERE fingerprint = ? AND kind = ? AND idx = ?", fill)


def claim(
    fingerprint: str,
    choose: Chooser,
    *,
    draw: str,
    digests: Digests | None = None,
    target: str = "",
    path: str | os.PathLike | None = None,
    timeout: float = WRITE_TIMEOUT,
) -> dict[str, list[int]]:
    """Draw and mark in one write transaction, then check the mark held; returns what ``choose`` picked.

    ``choose(used)`` gets, per kind (``marker``, ``decoy``), the indices already used (drawn for
    ``fingerprint``, or sent by content under any fingerprint when ``digests`` gives each index's
    ``content_digest``) and returns the indices to send, per kind; those not used before are
    recorded under the draw id ``draw`` with their digests and committed before this returns. An
    exception from ``choose`` rolls back and propagates; a database failure, or a draw whose rows
    cannot all be read back after the commit, is a ``HistoryError``.
    """
    where = clean(redact_urls_in(target), 300)
    with connect(path, timeout=timeout, what="record the draw in the history") as con:
        try:
            con.execute("BEGIN IMMEDIATE")
            if digests:
                _backfill(con, fingerprint, digests)
            used = _used(con, fingerprint, digests)
            chosen = choose(used)
            stamp = now()
            new = [
                (fingerprint, kind, int(i), stamp, draw, where, digests[kind][int(i)] if digests and kind in digests else None)
                for kind, ids in chosen.items()
                for i in ids
                if int(i) not in used.get(kind, set())
            ]
            con.executemany("INSERT INTO drawn (fingerprint, kind, idx, time, draw, target, digest) VALUES (?, ?, ?, ?, ?, ?, ?)", new)
            con.execute("COMMIT")
        except BaseException:
            rollback(con)
            raise
        kept = {(str(f), str(k), int(i), d) for f, k, i, d in con.execute("SELECT fingerprint, kind, idx, digest FROM drawn WHERE draw = ?", (draw,))}
    wanted = {(f, k, i, d) for f, k, i, _, _, _, d in new}
    if kept != wanted:
        raise HistoryError(
            f"the pool ledger kept {len(kept & wanted)} of the {len(wanted)} queries just drawn: something in the history file removed or "
            "changed them, so it cannot keep markers from being sent twice"
        )
    return chosen


def drawn(fingerprint: str, path: str | os.PathLike | None = None, digests: Digests | None = None) -> dict[str, set[int]]:
    """The indices used so far for ``fingerprint``, per kind (by content too when ``digests`` is given; empty without a history)."""
    if not resolve(path).exists():
        return {}
    with connect(path, create=False) as con:
        return _used(con, fingerprint, digests)


def pool_usage(path: str | os.PathLike | None = None, fingerprint: str | None = None) -> list[dict]:
    """Per fingerprint (id prefix ``fingerprint``), how many markers and decoys were drawn, in how many draws, first and last time."""
    sql = (
        "SELECT fingerprint, SUM(kind = 'marker') AS markers, SUM(kind = 'decoy') AS decoys, COUNT(DISTINCT draw) AS draws,"
        " MIN(time) AS first, MAX(time) AS last FROM drawn"
    )
    args: list[Any] = []
    if fingerprint:
        sql += " WHERE fingerprint LIKE ? ESCAPE '\\'"
        args.append(like_escape(fingerprint) + "%")
    sql += " GROUP BY fingerprint ORDER BY last DESC"
    with connect(path) as con:
        return [dict(r) for r in con.execute(sql, args).fetchall()]


def release(draw_id: str, path: str | os.PathLike | None = None, *, timeout: float = WRITE_TIMEOUT) -> int:
    """Delete the rows of draw ``draw_id``; returns how many. Only for a run that reached no server: its queries were never sent."""
    with connect(path, create=False, timeout=timeout, what="release the draw in the history") as con:
        return int(con.execute("DELETE FROM drawn WHERE draw = ?", (str(draw_id),)).rowcount)


__all__: Sequence[str] = ("Chooser", "HistoryError", "claim", "content_digest", "digests_of", "drawn", "pool_usage", "release")
