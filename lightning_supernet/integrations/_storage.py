"""Opening an Optuna storage with clear errors, fast durable SQLite, and connections that survive ``fork``.

SQLite is switched to write-ahead logging with ``synchronous=NORMAL``: a commit no longer waits for ``fsync``
(about 15 ms a commit on slow disks, a dozen commits a trial), yet a process killed with SIGKILL loses nothing it
committed; only a power cut can drop the last transactions. Its transactions start with ``BEGIN IMMEDIATE``
(serialised), so two workers never both take the same enqueued trial. Network databases get a connect timeout, so an
unreachable server fails fast with :class:`~lightning_supernet.errors.StorageError`.

Example:
    >>> storage, rdb = make_storage(None)
    >>> storage is None and rdb is None
    True
"""

from __future__ import annotations

import os
import time
import warnings
from pathlib import Path
from typing import Any

from lightning_supernet.errors import MissingDependencyError, StorageError
from lightning_supernet.integrations import require

__all__ = ["make_storage", "prepare_fork", "redact", "reopen_after_fork"]

_ALLOWED = ("an Optuna storage URL such as 'sqlite:///search.db' or 'postgresql+psycopg2://user:pw@host/db', "
            "'journal:path/search.log' (Optuna's append-only journal file), an optuna.storages.BaseStorage, or None "
            "(in memory)")


def redact(url: str) -> str:
    """The URL with its password hidden (for messages).

    Example:
        >>> redact("postgresql://bob:secret@db/x")
        'postgresql://bob:***@db/x'
    """
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url).render_as_string(hide_password=True)
    except (ArgumentError, ValueError):
        return url.split("@")[-1] if "@" in url else url


def make_storage(spec: Any, heartbeat_interval: int | None = None, *, grace_period: int | None = None,
                 stale_callback: Any = None) -> tuple[Any, Any]:
    """``(storage for optuna.create_study, the RDBStorage behind it or None)``.

    Args:
        spec: a URL (``sqlite:///...``, ``postgresql+psycopg2://...``, ``journal:<file>``), a storage, or ``None``.
        heartbeat_interval: RDB only: seconds between trial heartbeats (Optuna's heartbeat thread, one write per
            interval), so that a worker marks the RUNNING trials of a killed worker FAIL.
        grace_period: RDB only: seconds without a heartbeat after which a RUNNING trial is stale (``None``:
            twice ``heartbeat_interval``).
        stale_callback: RDB only: Optuna's ``heartbeat_stale_trial_callback``, called with ``(study, trial)`` for
            each stale trial marked FAIL.

    Raises:
        StorageError: an unparsable URL, a missing SQLite folder, or a database that cannot be reached.
        MissingDependencyError: the URL's database driver is not installed.

    Example:
        >>> make_storage("nosuchdb://x")  # doctest: +SKIP
        Traceback (most recent call last):
        StorageError: `storage`='nosuchdb://x' cannot be opened ...
    """
    optuna = require("optuna", "optuna", "the subnet search")
    if spec is None:
        return None, None
    if isinstance(spec, optuna.storages.BaseStorage):
        inner = getattr(spec, "_backend", spec)
        return spec, inner if isinstance(inner, optuna.storages.RDBStorage) else None
    if not isinstance(spec, (str, os.PathLike)):
        raise StorageError(f"`storage` is a {type(spec).__name__}; allowed: {_ALLOWED}")
    url = str(spec)
    if url.startswith("journal:"):
        return _journal(optuna, url[len("journal:"):]), None
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError) as err:
        raise StorageError(f"`storage`={url!r} is not a database URL; allowed: {_ALLOWED}") from err
    backend = parsed.get_backend_name()
    engine_kwargs: dict[str, Any] = {}
    if backend == "sqlite":
        db = parsed.database
        if db and db != ":memory:" and not Path(db).expanduser().resolve().parent.is_dir():
            raise StorageError(f"`storage`={url!r}: the folder of the SQLite file ({Path(db).parent}) does not "
                               "exist; allowed: a path in an existing folder")
        engine_kwargs["connect_args"] = {"timeout": 60}
    elif backend in ("postgresql", "mysql"):
        engine_kwargs["connect_args"] = {"connect_timeout": 10}
        engine_kwargs["pool_pre_ping"] = True
    try:
        heartbeat = {"heartbeat_interval": heartbeat_interval, "grace_period": grace_period,
                     "heartbeat_stale_trial_callback": stale_callback} if heartbeat_interval else {}
        rdb = _open_rdb(optuna, url, engine_kwargs, heartbeat)
    except ImportError as err:
        raise MissingDependencyError(
            f"`storage`={redact(url)!r} needs a database driver that is not installed ({err}). HINT: pip install "
            "'lightning-supernet[postgres]' (psycopg2-binary) for postgresql+psycopg2:// URLs") from err
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise StorageError(
            f"`storage`={redact(url)!r} cannot be opened: {type(err).__name__}: {first}. HINT: is the database "
            f"server running and reachable, and do the user, password and database exist? Allowed: {_ALLOWED}"
        ) from err
    if backend == "sqlite":
        _fast_sqlite(rdb)
    return rdb, rdb


def _journal(optuna: Any, path: str) -> Any:
    path = path[2:] if path.startswith("//") else path
    if not path or not Path(path).expanduser().resolve().parent.is_dir():
        raise StorageError(f"`storage`='journal:{path}': the journal file's folder does not exist; allowed: "
                           "'journal:<path of a file in an existing folder>'")
    from optuna.storages.journal import JournalFileBackend

    return optuna.storages.JournalStorage(JournalFileBackend(str(Path(path).expanduser())))


def _open_rdb(optuna: Any, url: str, engine_kwargs: dict[str, Any], heartbeat: dict[str, Any],
              attempts: int = 5) -> Any:
    # Workers that start together on a fresh database race to create its tables ("table ... already exists",
    # a duplicate version row): the loser retries and then finds the schema in place.
    for attempt in range(attempts):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, **heartbeat)
        except Exception as err:
            text = str(err).lower()
            if attempt + 1 == attempts or not any(w in text for w in ("already exists", "duplicate", "unique")):
                raise
            time.sleep(0.2 * (attempt + 1))
    raise AssertionError("unreachable")


def _wal(cur: Any, seconds: float = 60.0) -> None:
    """Switch the database to WAL once. Switching takes an exclusive lock and SQLite answers "database is locked"
    at once, without its busy timeout, when another connection switches or writes at that moment (two workers
    opening a new study file together): wait and retry; a database already in WAL mode is only read."""
    import sqlite3

    deadline = time.monotonic() + seconds
    while cur.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
        try:
            cur.execute("PRAGMA journal_mode=WAL")  # an in-memory database keeps "memory": no retry then
            return
        except sqlite3.OperationalError as err:
            if "locked" not in str(err) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _fast_sqlite(rdb: Any) -> None:
    from sqlalchemy import event

    def on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # transactions are begun below, not by the sqlite3 module
        cur = dbapi_conn.cursor()
        _wal(cur)
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.close()

    def on_begin(conn: Any) -> None:
        # Optuna reads a trial's state, then writes it (a WAITING trial becomes RUNNING). SQLite has no row
        # locks: two workers that read WAITING together both ran (and told) one enqueued trial. BEGIN IMMEDIATE
        # takes the write lock when the transaction starts, so the second worker reads RUNNING and moves on.
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    event.listen(rdb.engine, "connect", on_connect)
    event.listen(rdb.engine, "begin", on_begin)
    rdb.engine.dispose()  # connections opened before the listener reconnect with it


def prepare_fork(rdb: Any) -> None:
    """Close pooled connections before forking workers (a child must not reuse its parent's sockets)."""
    if rdb is not None:
        rdb.engine.dispose()


def reopen_after_fork(rdb: Any, child: bool = False) -> None:
    """In a forked child, drop the inherited pool without closing the parent's connections."""
    if rdb is not None and child:
        rdb.engine.dispose(close=False)
