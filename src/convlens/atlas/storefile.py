"""The atlas store's file: one writer at a time, a damaged or foreign file refused on one line, disk errors named.

* :func:`writer_lock`: ``scan`` and ``dissect`` hold an exclusive ``flock`` on
  ``<store>.lock`` for their whole run, so a second run on the same store is
  refused at once (never two writers merging their totals into one file). The
  lock file is removed when the run ends; one left by a killed run is harmless
  (the kernel released its lock) and is reused and removed by the next run.
* :func:`connect`: opens the store read-only (readers) or read-write (a resumed
  scan), after refusing a write-ahead log beside it (convlens stores use a
  rollback journal, so a ``-wal`` file is another program's), and runs
  ``PRAGMA quick_check`` before anything is read or written: a truncated or
  damaged file is a one-line error and stays as it is. A hot journal left by
  a killed writer is rolled back by SQLite when the store is opened for
  writing; a reader, which must not write, says to run the scan again.
* :func:`sqlite_failure`: an SQLite error while writing as one line (disk full,
  I/O error, locked), saying what the store holds and how to resume.
* :func:`kill_point`: the test hook ``CONVLENS_TEST_KILL=<job>:<part>:<before|after>[:STOP]``
  SIGKILLs (or SIGSTOPs) the process inside (before ``COMMIT``) or right after
  the commit of a part, so the crash and concurrency tests are deterministic.
  Unset, it does nothing.
"""

from __future__ import annotations

import fcntl
import os
import signal
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import ConvlensError

TEST_KILL = "CONVLENS_TEST_KILL"


def kill_point(job: str, part: int, when: str) -> None:
    """Test hook: SIGKILL this process when ``CONVLENS_TEST_KILL`` names this point (see the module docstring)."""
    point = os.environ.get(TEST_KILL, "")
    if point == f"{job}:{part}:{when}":
        os.kill(os.getpid(), signal.SIGKILL)
    elif point == f"{job}:{part}:{when}:STOP":
        os.kill(os.getpid(), signal.SIGSTOP)


def lock_path(path: Path) -> Path:
    return path.with_name(path.name + ".lock")


@contextmanager
def writer_lock(path: str | os.PathLike | None) -> Iterator[None]:
    """Hold the store's writer lock for the block; another holder is a one-line error (``None``: no store)."""
    if path is None:
        yield
        return
    path = Path(path)
    lock = lock_path(path)
    while True:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            handle = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise ConvlensError(
                f"cannot write the atlas {path} ({err.strerror or err}); pass an --out in a folder you can write"
            ) from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(handle)
            raise ConvlensError(
                f"another convlens scan or dissect is writing {path} (it holds {lock.name}); "
                "wait for it to finish, or pass another --out"
            ) from None
        try:  # the file may have been removed by the holder we waited behind: lock the one on disk
            same = os.path.samestat(os.fstat(handle), os.stat(lock))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(handle)
    try:
        yield
    finally:
        try:
            os.unlink(lock)  # while still holding it, so nobody else locks a file that is going away
        except OSError:
            pass
        os.close(handle)


def _describe(path: Path, err: sqlite3.Error) -> str:
    """What an SQLite error on opening or reading ``path`` means to the user, one line."""
    name = getattr(err, "sqlite_errorname", "")
    if name == "SQLITE_READONLY_ROLLBACK":
        return (
            f"{path} was left mid-write by an interrupted scan or dissect (its journal {path.name}-journal "
            "holds an unfinished part); run the same command again to roll it back and resume"
        )
    if name == "SQLITE_NOTADB" or "not a database" in str(err):
        return f"{path} is not a convlens atlas (an SQLite file written by 'convlens scan')"
    if name in ("SQLITE_BUSY", "SQLITE_LOCKED"):
        return f"{path} is locked by another program writing it; wait for it to finish"
    return (
        f"{path} is damaged (SQLite: {err}); it was left as it is: delete it and run the scan again, or restore a copy"
    )


def connect(path: Path, *, write: bool) -> sqlite3.Connection:
    """A checked connection to the existing store ``path`` (see the module docstring); errors are one line."""
    wal = path.with_name(path.name + "-wal")
    if wal.exists():
        raise ConvlensError(
            f"{wal} is beside the atlas, but convlens writes a rollback journal, never a "
            "write-ahead log: another program has the store open in WAL mode, or left that file; "
            f"close the program or remove {wal.name}, then run again (the atlas was not opened)"
        )
    try:
        if write:
            connection = sqlite3.connect(path, isolation_level=None)
        else:
            connection = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    except sqlite3.Error as err:
        raise ConvlensError(f"cannot open the atlas {path}: {err}") from None
    try:
        problems = [row[0] for row in connection.execute("PRAGMA quick_check").fetchall()]
    except sqlite3.Error as err:
        connection.close()
        raise ConvlensError(_describe(path, err)) from None
    if problems != ["ok"]:
        connection.close()
        raise ConvlensError(
            f"{path} is damaged (SQLite quick_check: {problems[0]}); it was left as it is: "
            "delete it and run the scan again, or restore a copy"
        )
    return connection


def read_failure(path: Path, err: Exception) -> ConvlensError:
    """An error while reading a checked store (a damaged blob, a missing table) as one line."""
    if isinstance(err, sqlite3.Error):
        return ConvlensError(_describe(path, err))
    return ConvlensError(
        f"{path} is damaged ({type(err).__name__}: {err}); delete it and run the scan again, or restore a copy"
    )


def sqlite_failure(path: Path, err: sqlite3.Error, *, new: bool = False) -> ConvlensError:
    """An SQLite error while writing ``path`` as one line: what happened, what the store holds, what to do."""
    name = getattr(err, "sqlite_errorname", "")
    if name == "SQLITE_FULL":
        what = f"no space left on the device of {path}"
    elif name.startswith("SQLITE_IOERR") or name == "SQLITE_CANTOPEN":
        what = f"cannot write {path} (SQLite: {err}; is the disk full or read-only?)"
    elif name in ("SQLITE_BUSY", "SQLITE_LOCKED"):
        what = f"{path} is locked by another program"
    else:
        what = f"cannot write {path} (SQLite: {err})"
    if new:
        return ConvlensError(f"{what}; nothing was kept: free space (or pass another --out) and run again")
    return ConvlensError(
        f"{what}; the store keeps every part committed before this one: free space and run the "
        "same command again to resume"
    )


def remove_store(path: Path) -> None:
    """Remove a store that could not be created (and its journal), so no half-made file is left."""
    for leftover in (path, path.with_name(path.name + "-journal")):
        try:
            leftover.unlink()
        except FileNotFoundError:
            pass
