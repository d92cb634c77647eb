"""The one SQLite file under the run history (``history``) and the pool ledger (``ledger``): connection, schema, upgrade, limits.

Location: ``$TAMPERPROBE_HISTORY`` if set, else ``history.sqlite`` in the user data directory
(``platformdirs.user_data_dir("tamperprobe")``); every function also takes an explicit ``path``.

Tables (schema version 4, in ``PRAGMA user_version``)::

    runs(id, time, target, protocol, fingerprint, output_spec, verdict, markers, mismatched,
         failed, seconds, tolerance, summary, signer, notes, decoys, pool, repeated, draw)
    markers(run_id, kind, idx, status, expected, observed, detail, latency)
    drawn(fingerprint, kind, idx, time, draw, target, digest)

``history`` documents ``runs`` and ``markers``, ``ledger`` documents ``drawn``.

**The file is hostile until proven otherwise.** Whoever can write it could plant SQL that runs
whenever tamperprobe writes (a trigger), answers that are not what was stored (a view in place
of a table), or a statement that never ends, and so hold the alarm or make the ledger forget
what was sent. So every connection:

* refuses a file whose schema is not exactly the one tamperprobe creates: ``sqlite_master``
  must hold exactly the expected tables, indexes and their ``CREATE`` text (no trigger, view,
  extra table or index, no altered column), else a one-line ``HistoryError`` (exit 2) that
  names what is foreign. Files of versions 1-3 may hold only tamperprobe's own tables and
  indexes; they are rebuilt to the exact version 4 schema in one transaction, every row kept;
* runs with ``PRAGMA trusted_schema = OFF`` (no function with side effects from the schema);
* refuses a path that is not a regular file (a FIFO would block the first read forever);
* bounds all its work: the busy timeout bounds lock waits (``timeout``) and a progress handler
  interrupts any statement once the connection has used ``timeout + BUDGET`` seconds, so every
  call returns or raises ``HistoryError`` within that time, whatever the file holds. A pending
  signal (Ctrl-C, SIGTERM turned into an interrupt) is also handled inside the handler.

A newer schema version is refused (upgrade tamperprobe); the database runs in WAL mode and
every write is one short transaction, so several processes can share one file.
"""

from __future__ import annotations

import functools
import os
import sqlite3
import stat
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .._util import one_line
from ..errors import TamperprobeError
from .untrusted import clean

SCHEMA_VERSION = 4
WRITE_TIMEOUT = 2.0  # seconds a write waits for a lock held by another process
READ_TIMEOUT = 10.0
BUDGET = 5.0  # seconds of SQLite work a connection may do beyond its lock waits before it is interrupted
_PROGRESS_STEPS = 2000  # virtual machine instructions between two looks at the clock

_MARKERS_TABLE = """CREATE TABLE markers (
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
_STATEMENTS = (
    """CREATE TABLE runs (
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
)""",
    _MARKERS_TABLE,
    """CREATE TABLE drawn (
    fingerprint TEXT NOT NULL,
    kind TEXT NOT NULL,
    idx INTEGER NOT NULL,
    time TEXT NOT NULL,
    draw TEXT NOT NULL,
    target TEXT,
    digest TEXT,
    PRIMARY KEY (fingerprint, kind, idx)
)""",
    "CREATE INDEX runs_time ON runs(time)",
    "CREATE INDEX runs_target ON runs(target)",
    "CREATE INDEX runs_fingerprint ON runs(fingerprint)",
    "CREATE INDEX drawn_draw ON drawn(draw)",
    "CREATE INDEX drawn_digest ON drawn(digest)",
)
_TABLES = ("runs", "markers", "drawn")
# what a file of versions 1-3 may hold (each a subset of this): tamperprobe's tables, their automatic indexes, its own indexes
_OLD_OBJECTS = {
    ("table", "runs"),
    ("table", "markers"),
    ("table", "drawn"),
    ("table", "sqlite_sequence"),
    ("index", "sqlite_autoindex_markers_1"),
    ("index", "sqlite_autoindex_drawn_1"),
    ("index", "runs_time"),
    ("index", "runs_target"),
    ("index", "runs_fingerprint"),
    ("index", "drawn_draw"),
}


class HistoryError(TamperprobeError):
    """The history database cannot be opened, read or written, or holds what tamperprobe did not put there."""


def default_path() -> Path:
    env = os.environ.get("TAMPERPROBE_HISTORY")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_data_dir("tamperprobe")) / "history.sqlite"


def resolve(path: str | os.PathLike | None) -> Path:
    return Path(path).expanduser() if path is not None else default_path()


def now() -> str:
    """The current UTC time as ISO 8601 with microseconds (``2025-01-31T12:00:00.123456+00:00``)."""
    return datetime.now(UTC).isoformat(timespec="microseconds")


def text(value: Any, limit: int = 400) -> str | None:
    """``value`` made inert for storage (``untrusted.clean``); None for None or an empty string."""
    return None if value is None or value == "" else clean(value, limit)


def like_escape(value: str) -> str:
    """``value`` as a literal inside a ``LIKE ... ESCAPE '\\'`` pattern."""
    return str(value).replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


@functools.cache
def expected_schema() -> frozenset[tuple[str, str, str, str | None]]:
    """``(type, name, tbl_name, sql)`` of every object of a version 4 file, as SQLite itself stores them."""
    con = sqlite3.connect(":memory:")
    try:
        for stmt in _STATEMENTS:
            con.execute(stmt)
        return frozenset(con.execute("SELECT type, name, tbl_name, sql FROM sqlite_master"))
    finally:
        con.close()


def _check_regular(p: Path) -> None:
    """Refuse a database (or one of its journals) that exists and is not a regular file: a FIFO or a device could block forever."""
    for q in (p, Path(f"{p}-wal"), Path(f"{p}-shm"), Path(f"{p}-journal")):
        try:
            mode = q.stat().st_mode
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise HistoryError(f"cannot open history {p}: {exc.strerror or exc}") from None
        if not stat.S_ISREG(mode):
            raise HistoryError(f"cannot open history {p}: {q} is not a regular file")


def _describe(objects: Iterable[tuple[Any, ...]]) -> str:
    shown = sorted(f"{kind} {clean(name, 60)}" for kind, name, *_ in objects)
    return ", ".join(shown[:4]) + (f" and {len(shown) - 4} more" if len(shown) > 4 else "")


def check_schema(con: sqlite3.Connection, p: Path) -> None:
    """Refuse (``HistoryError``) a version 4 file whose schema is not exactly ``expected_schema()``."""
    have = {tuple(row) for row in con.execute("SELECT type, name, tbl_name, sql FROM main.sqlite_master")}
    want = expected_schema()
    foreign = have - want
    if foreign:
        ours = {(t, n) for t, n, _, _ in want}
        extra = {o for o in foreign if (o[0], o[1]) not in ours}
        altered = {o for o in foreign if (o[0], o[1]) in ours}
        what = "; ".join(
            part for part in (f"{_describe(extra)} it did not create" if extra else "", f"an altered {_describe(altered)}" if altered else "") if part
        )
        raise HistoryError(f"history {p} holds {what}: refusing it (move the file away; tamperprobe starts a new one)")
    missing = want - have
    if missing:
        raise HistoryError(f"history {p} lacks {_describe(set(missing))}: refusing it (move the file away; tamperprobe starts a new one)")


def _check_old_schema(con: sqlite3.Connection, p: Path) -> None:
    """A file of versions 0-3 may hold only tamperprobe's own tables and indexes (and nothing at all, when new)."""
    have = {(str(t), str(n)) for t, n in con.execute("SELECT type, name FROM main.sqlite_master")}
    foreign = have - _OLD_OBJECTS
    if foreign:
        raise HistoryError(f"history {p} holds {_describe(foreign)} tamperprobe did not create: refusing it (move the file away)")


def _budget(deadline: float) -> Any:
    def handler() -> int:
        return 1 if time.monotonic() > deadline else 0  # nonzero interrupts the running statement

    return handler


@contextmanager
def connect(
    path: str | os.PathLike | None,
    *,
    create: bool = True,
    timeout: float = READ_TIMEOUT,
    budget: float | None = None,
    what: str = "read the history",
) -> Iterator[sqlite3.Connection]:
    """An open, checked connection (autocommit; rows as ``sqlite3.Row``), closed on exit.

    Any SQLite failure inside the block, including a statement interrupted by the time limit, is a
    ``HistoryError`` ``cannot <what>: <reason>``; so is a file that cannot be opened or is refused
    (module docstring). ``create=False`` refuses a file that does not exist. The connection may
    work ``timeout + budget`` seconds in all (``budget`` default ``BUDGET``).
    """
    p = resolve(path)
    if not create and not p.exists():
        raise HistoryError(f"no history at {p} (nothing recorded yet)")
    _check_regular(p)
    limit = float(timeout) + float(BUDGET if budget is None else budget)
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        con = sqlite3.connect(str(p), timeout=timeout, isolation_level=None)
    except (sqlite3.Error, OSError) as exc:
        raise HistoryError(f"cannot open history {p}: {one_line(exc)}") from None
    try:
        con.set_progress_handler(_budget(time.monotonic() + limit), _PROGRESS_STEPS)
        try:
            _open(con, p, timeout)
        except sqlite3.Error as exc:
            raise HistoryError(f"cannot open history {p}: {_reason(exc, limit)}") from None
        try:
            yield con
        except sqlite3.Error as exc:
            raise HistoryError(f"cannot {what}: {_reason(exc, limit)}") from None
    finally:
        con.close()


def _reason(exc: sqlite3.Error, limit: float) -> str:
    if "interrupt" in str(exc).lower():
        return f"the database did not answer within {limit:g} s (interrupted)"
    return one_line(exc)


def _open(con: sqlite3.Connection, p: Path, timeout: float) -> None:
    """Settings, then the schema check (and the upgrade or creation of an older or new file)."""
    con.row_factory = sqlite3.Row
    con.execute("PRAGMA trusted_schema = OFF")
    con.execute(f"PRAGMA busy_timeout = {int(timeout * 1000)}")
    version = con.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise HistoryError(f"{p} was written by a newer tamperprobe (history schema v{version}); upgrade tamperprobe")
    if version < SCHEMA_VERSION:
        # the old-schema check runs inside _upgrade's transaction, after the version is read again: checked here, another
        # connection could complete the creation between the two reads and its new schema would look foreign
        _upgrade(con, p)
    check_schema(con, p)
    con.execute("PRAGMA foreign_keys = ON")


def _upgrade(con: sqlite3.Connection, p: Path) -> None:
    """Create a new file's schema, or rebuild a version 1-3 file to the exact version 4 schema, every row kept, in one transaction.

    The old tables are copied to temporary tables (outside the file), dropped, created afresh from
    ``_STATEMENTS`` and filled back with the columns both versions have (``runs`` gains the newer
    columns as NULL, ``markers`` its ``kind`` as ``marker``, ``drawn`` its ``digest`` as NULL).
    """
    try:
        con.execute("PRAGMA journal_mode = WAL")
    except sqlite3.OperationalError:
        pass  # e.g. a file system without shared memory: the default journal still works
    con.execute("PRAGMA foreign_keys = OFF")
    con.execute("BEGIN IMMEDIATE")
    try:
        if con.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION:  # another process upgraded it meanwhile
            con.execute("COMMIT")
            return
        _check_old_schema(con, p)
        present = [t for t in _TABLES if con.execute("SELECT 1 FROM main.sqlite_master WHERE type = 'table' AND name = ?", (t,)).fetchone()]
        columns = {t: [str(r[1]) for r in con.execute(f"PRAGMA main.table_info({t})")] for t in present}
        for t in present:
            con.execute(f"CREATE TEMP TABLE old_{t} AS SELECT * FROM main.{t}")
        for t in reversed(present):
            con.execute(f"DROP TABLE main.{t}")
        for stmt in _STATEMENTS:
            con.execute(stmt)
        for t in present:
            new = {str(r[1]) for r in con.execute(f"PRAGMA main.table_info({t})")}
            keep = ", ".join(c for c in columns[t] if c in new)
            con.execute(f"INSERT INTO main.{t} ({keep}) SELECT {keep} FROM temp.old_{t}")
            con.execute(f"DROP TABLE temp.old_{t}")
        con.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        con.execute("COMMIT")
    except BaseException:
        rollback(con)
        raise


def rollback(con: sqlite3.Connection) -> None:
    """Roll back the open transaction, if any (an interrupted statement may already have ended it)."""
    try:
        if con.in_transaction:
            con.execute("ROLLBACK")
    except sqlite3.Error:
        pass
