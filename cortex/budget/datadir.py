"""The data dir: the ledger database, the lock that says a server owns it, and its admin socket."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import IO

LEDGER_FILE = "ledger.db"
LOCK_FILE = "cortex.lock"
SOCKET_FILE = "admin.sock"
# Set by `serve --workers`' supervisor for its workers: the descriptor of the data dir's lock it holds (and
# that each worker inherits), so the dir stays locked while the supervisor or any worker lives.
LOCK_FD_ENV = "CORTEX_DATA_DIR_LOCK_FD"


class DataDirBusy(Exception):
    pass


def ledger_path(data_dir: str | Path) -> Path:
    return Path(data_dir) / LEDGER_FILE


def socket_path(data_dir: str | Path) -> Path:
    """Where a running server serves its admin API to the CLI (cortex/admin_socket.py)."""
    return Path(data_dir) / SOCKET_FILE


def lock(data_dir: str | Path) -> IO[str]:
    """Take the data dir's exclusive lock; held until the returned file is closed.

    The in-memory ledger is authoritative while cortex serves, so offline
    edits to its database must wait until it stops.
    """
    path = Path(data_dir)
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    inherited = _inherited(path / LOCK_FILE)
    if inherited is not None:
        return inherited
    handle = open(path / LOCK_FILE, "a+")
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise DataDirBusy(f"{path} is in use by a running cortex (pid in {path / LOCK_FILE})") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


def _inherited(lock_path: Path) -> IO[str] | None:
    """The lock this process inherited (LOCK_FD_ENV) if it is `lock_path`'s, else None.

    flock belongs to the open file, which the supervisor and its workers share: locking it again
    here succeeds, and closing this handle (a duplicate) leaves it locked for the others.
    """
    fd_text = os.environ.get(LOCK_FD_ENV)
    if not fd_text or not fd_text.isdigit():
        return None
    try:
        held, wanted = os.fstat(int(fd_text)), os.stat(lock_path)
    except OSError:
        return None
    if (held.st_dev, held.st_ino) != (wanted.st_dev, wanted.st_ino):
        return None
    handle = os.fdopen(os.dup(int(fd_text)), "a+")
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise DataDirBusy(f"{lock_path.parent} is in use by a running cortex (pid in {lock_path})") from None
    return handle
