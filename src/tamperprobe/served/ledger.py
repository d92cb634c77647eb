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
from dataclasses import dataclass
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
    return _with_content(_rows_of(con, fingerprint), digests, _sent(con) if digests else set())


def _rows_of(con: sqlite3.Connection, fingerprint: str) -> dict[str, set[int]]:
    """Per kind, the indices drawn for ``fingerprint``."""
    used: dict[str, set[int]] = {}
    for kind, idx in con.execute("SELECT kind, idx FROM drawn WHERE fingerprint = ?", (fingerprint,)):
        used.setdefault(str(kind), set()).add(int(idx))
    return used


def _sent(con: sqlite3.Connection) -> set[str]:
    """The content digest of every query any draw holds."""
    return {str(d) for (d,) in con.execute("SELECT digest FROM drawn WHERE digest IS NOT NULL")}


def _with_content(rows: dict[str, set[int]], digests: Digests | None, sent: set[str]) -> dict[str, set[int]]:
    """``rows`` (a copy) and, per kind, the indices whose digest is in ``sent``."""
    used = {kind: set(ids) for kind, ids in rows.items()}
    for kind, ds in (digests or {}).items():
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


@dataclass(frozen=True)
class Claim:
    """One draw to record: what ``claim`` takes, for ``claim_many``."""

    fingerprint: str
    choose: Chooser
    draw: str
    digests: Digests | None = None
    target: str = ""


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
    got = claim_many([Claim(fingerprint, choose, draw, digests, target)], path=path, timeout=timeout)[0]
    if isinstance(got, BaseException):
        raise got
    return got


def claim_many(
    claims: Sequence[Claim], *, path: str | os.PathLike | None = None, timeout: float = WRITE_TIMEOUT
) -> list[dict[str, list[int]] | Exception]:
    """Several draws in one write transaction, in order, each as ``claim`` makes one: each sees what those before it chose.

    Per claim, what its ``choose`` picked, or the exception it raised (that claim writes nothing;
    the others are kept) or a ``HistoryError`` if its rows cannot all be read back after the
    commit. Every draw is committed before this returns. A database failure fails them all: it is
    raised (``HistoryError``) and nothing is written.
    """
    results: list[dict[str, list[int]] | Exception] = []
    wanted: list[set[tuple[str, str, int, str | None]]] = []
    with connect(path, timeout=timeout, what="record the draw in the history") as con:
        try:
            con.execute("BEGIN IMMEDIATE")
            for c in claims:
                if c.digests:
                    _backfill(con, c.fingerprint, c.digests)
            # read once, then kept up to date with each claim's rows: what _used would read again inside this transaction
            sent = _sent(con) if any(c.digests for c in claims) else set()
            rows: dict[str, dict[str, set[int]]] = {}
            for c in claims:
                if c.fingerprint not in rows:
                    rows[c.fingerprint] = _rows_of(con, c.fingerprint)
                used = _with_content(rows[c.fingerprint], c.digests, sent)
                try:
                    chosen = c.choose(used)
                except Exception as exc:  # noqa: BLE001 - that claim's answer; the others go on
                    results.append(exc)
                    wanted.append(set())
                    continue
                where, stamp = clean(redact_urls_in(c.target), 300), now()
                new = [
                    (c.fingerprint, kind, int(i), stamp, c.draw, where, c.digests[kind][int(i)] if c.digests and kind in c.digests else None)
                    for kind, ids in chosen.items()
                    for i in ids
                    if int(i) not in used.get(kind, set())
                ]
                con.executemany("INSERT INTO drawn (fingerprint, kind, idx, time, draw, target, digest) VALUES (?, ?, ?, ?, ?, ?, ?)", new)
                for _, kind, i, _, _, _, d in new:
                    rows[c.fingerprint].setdefault(kind, set()).add(i)
                    if d is not None:
                        sent.add(d)
                results.append(chosen)
                wanted.append({(f, k, i, d) for f, k, i, _, _, _, d in new})
            con.execute("COMMIT")
        except BaseException:
            rollback(con)
            raise
        for n, c in enumerate(claims):
            if isinstance(results[n], Exception):
                continue
            sql = "SELECT fingerprint, kind, idx, digest FROM drawn WHERE draw = ?"
            kept = {(str(f), str(k), int(i), d) for f, k, i, d in con.execute(sql, (c.draw,))}
            if kept != wanted[n]:
                results[n] = HistoryError(
                    f"the pool ledger kept {len(kept & wanted[n])} of the {len(wanted[n])} queries just drawn: something in the history file "
                    "removed or changed them, so it cannot keep markers from being sent twice"
                )
    return results


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


__all__: Sequence[str] = ("Chooser", "Claim", "HistoryError", "claim", "claim_many", "content_digest", "digests_of", "drawn", "pool_usage", "release")
